"""Seed 000's "Terminal 1 / Terminal 2" flow with real processes, plus the publish phase rules."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import assert_schema, sqlite_index_only
from tests.e2e.registry_support import TOKEN, Registry, digests, install_flags, make_project, snapshot


@pytest.fixture
def registry(tmp_path: Path, registry_backend):
    reg = Registry(tmp_path / "registry-data", token=TOKEN, backend=registry_backend)
    yield reg
    reg.stop()


def consumer_env(tmp_path: Path, name: str = "consumer") -> dict[str, str]:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "ATO_HOME": str(home / ".ato")}


def stderr_error(res) -> dict:
    docs = [d for d in res.stderr_json_lines() if "error" in d]
    assert docs, res.stderr
    return docs[-1]["error"]


def test_seed_flow_serve_build_publish_install_search_detail_download(ato, tmp_path: Path, registry: Registry) -> None:
    project = make_project(tmp_path / "seed-app", "seed-app", "0.1.0", description="seed flow capsule")
    built = ato(["build", ".", "--json"], cwd=project)
    assert built.code == 0, built.stderr
    artifact = Path(built.json()["artifact"])
    assert artifact.name == "seed-app.capsule"

    pub = ato(["publish", "--artifact", f"./{artifact.name}", "--registry", registry.url, "--json"], cwd=project,
              env={"ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr
    doc = pub.json()
    assert_schema(doc, "publish")
    assert doc["code"] == "PUBLISHED" and doc["route"] == "private" and doc["scoped_id"] == "local/seed-app"
    phases = {p["name"]: p for p in doc["phases"]}
    assert phases["build"]["status"] == "skipped" and phases["build"]["skipped_reason"] == "--artifact"
    assert phases["deploy"]["status"] == "ok"
    want = digests(artifact)
    assert doc["publish"]["blake3"] == "blake3:" + want["blake3"]
    assert doc["publish"]["sha256"] == "sha256:" + want["sha256"]
    assert doc["publish"]["already_existed"] is False

    # a different machine (fresh ATO_HOME) installs it: everything is downloaded once
    env = consumer_env(tmp_path)
    inst = ato(["install", "local/seed-app", "--registry", registry.url, "--json", *install_flags()], env=env)
    assert inst.code == 0, inst.stderr
    idoc = inst.json()
    assert_schema(idoc, "install")
    expected_path = Path(env["ATO_HOME"]) / "store" / "local" / "seed-app" / "0.1.0" / "seed-app-0.1.0.capsule"
    assert idoc["path"] == str(expected_path)
    assert idoc["install_kind"] == "Standard" and idoc["local_derivation"] is None
    assert idoc["launchable"] == {"CapsuleArchive": {"path": str(expected_path)}}
    assert idoc["projection"]["performed"] is False
    assert idoc["content_hash"] == "blake3:" + want["blake3"]
    assert expected_path.read_bytes() == artifact.read_bytes()
    if shutil.which("b3sum"):
        out = subprocess.run(["b3sum", "--no-names", str(expected_path)], capture_output=True, text=True, check=True)
        assert "blake3:" + out.stdout.strip() == idoc["content_hash"]
    t = idoc["transfer"]
    assert t["mode"] == "delta" and t["chunks_downloaded"] == t["chunks_total"] and t["chunks_reused"] == 0
    # the installed payload is a gc root of the consumer's CAS
    gc = ato(["cas", "gc", "--dry-run", "--json"], env=env)
    assert gc.code == 0 and gc.json()["objects_removed"] == 0, gc.stdout

    # installing again is a no-op that prints the same envelope
    again = ato(["install", "local/seed-app", "--registry", registry.url, "--json", *install_flags()], env=env)
    assert again.code == 0
    adoc = again.json()
    assert adoc["up_to_date"] is True and adoc["transfer"]["bytes_downloaded"] == 0
    assert adoc["path"] == idoc["path"] and adoc["content_hash"] == idoc["content_hash"]

    # the seed's own machine installs from its local CAS: nothing but the skeleton is fetched
    own = ato(["install", "local/seed-app", "--registry", registry.url, "--json", *install_flags()])
    assert own.code == 0, own.stderr
    assert own.json()["transfer"]["chunks_downloaded"] == 0

    # human output of install names the path and the run command
    human = ato(["install", "local/seed-app", "--registry", registry.url, *install_flags()], env=consumer_env(tmp_path, "c2"))
    assert human.code == 0 and "Installed local/seed-app 0.1.0" in human.stdout and "ato run" in human.stdout

    search = ato(["search", "seed", "--registry", registry.url, "--json"])
    assert search.code == 0, search.stderr
    sdoc = search.json()
    assert_schema(sdoc, "search")
    assert [c["scoped_id"] for c in sdoc["capsules"]] == ["local/seed-app"]
    assert ato(["search", "nothing-like-this", "--registry", registry.url, "--json"]).json()["capsules"] == []
    assert "local/seed-app" in ato(["search", "--registry", registry.url]).stdout

    detail = registry.get("/v1/capsules/by/local/seed-app").json()
    assert detail["manifest"]["name"] == "seed-app" and detail["latestVersion"] == "0.1.0"
    assert detail["readme_markdown"].startswith("# seed-app") and detail["readme_source"] == "artifact"
    assert [r["version"] for r in detail["releases"]] == ["0.1.0"]
    assert detail["releases"][0]["content_hash"] == "blake3:" + want["blake3"]
    assert detail["description"] == "seed flow capsule"

    dl = registry.get("/v1/capsules/by/local/seed-app/download?version=0.1.0", follow_redirects=False)
    assert dl.status_code == 302
    location = dl.headers["location"]
    assert location.endswith("/v1/artifacts/local/seed-app/0.1.0/seed-app-0.1.0.capsule")
    assert httpx.get(location, timeout=30).content == artifact.read_bytes()
    dist = registry.get("/v1/capsules/by/local/seed-app/distributions").json()
    assert dist["blake3"] == "blake3:" + want["blake3"] and dist["file_name"] == "seed-app-0.1.0.capsule"
    well_known = registry.get("/.well-known/capsule.json").json()
    assert well_known["version"] == "1" and well_known["write_auth_required"] is True

    # the same version again: E202 with the three next actions, nothing written
    before = snapshot(registry)
    dup = ato(["publish", "--artifact", f"./{artifact.name}", "--registry", registry.url, "--json"], cwd=project,
              env={"ATO_TOKEN": TOKEN})
    assert dup.code == 1
    err = stderr_error(dup)
    assert err["code"] == "E202" and len(err["details"]["next_actions"]) == 3
    assert "--allow-existing" in err["details"]["next_actions"][1]
    assert snapshot(registry) == before
    dup_human = ato(["publish", "--artifact", f"./{artifact.name}", "--registry", registry.url], cwd=project,
                    env={"ATO_TOKEN": TOKEN})
    assert dup_human.code == 1 and "E202" in dup_human.stderr and "--allow-existing" in dup_human.stderr

    # --allow-existing: idempotent by digest, 200 already_existed, nothing written
    ok = ato(["publish", "--artifact", f"./{artifact.name}", "--registry", registry.url, "--allow-existing",
              "--deploy", "--json"], cwd=project, env={"ATO_TOKEN": TOKEN})
    assert ok.code == 0, ok.stderr
    odoc = ok.json()
    assert_schema(odoc, "publish")
    assert odoc["publish"]["already_existed"] is True and odoc["publish"]["transfer"]["chunks_uploaded"] == 0
    assert snapshot(registry) == before

    # a different artifact under the same version is still E202, even with --allow-existing
    (project / "main.py").write_text("print('changed')\n")
    rebuilt = ato(["build", ".", "--json"], cwd=project)
    assert rebuilt.code == 0
    other = ato(["publish", "--artifact", f"./{artifact.name}", "--registry", registry.url, "--allow-existing",
                 "--json"], cwd=project, env={"ATO_TOKEN": TOKEN})
    assert other.code == 1 and stderr_error(other)["code"] == "E202"
    assert snapshot(registry) == before


@sqlite_index_only
def test_publish_runs_all_phases_from_a_project(ato, tmp_path: Path, registry: Registry) -> None:
    project = make_project(tmp_path / "phases", "phases-app", "1.0.0")
    (project / "capsule.toml").write_text((project / "capsule.toml").read_text() +
                                          '\n[build.lifecycle]\nprepare = "echo prepared > prepared.txt"\n')
    res = ato(["publish", "--registry", registry.url, "--scoped-id", "team-x/phases-app", "--json"], cwd=project,
              env={"ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "publish")
    assert [(p["name"], p["status"]) for p in doc["phases"]] == [("prepare", "ok"), ("build", "ok"),
                                                                 ("deploy", "ok")]
    assert (project / "prepared.txt").read_text().strip() == "prepared"
    assert doc["build"]["artifact"].endswith("phases/phases-app.capsule")
    assert doc["scoped_id"] == "team-x/phases-app"
    assert registry.get("/v1/capsules/by/team-x/phases-app").status_code == 200

    # only the selected phases run
    only = ato(["publish", "--registry", registry.url, "--build", "--json"], cwd=project)
    assert only.code == 0, only.stderr
    odoc = only.json()
    assert odoc["code"] == "PUBLISH_PHASES_COMPLETED" and odoc["publish"] is None
    assert [(p["name"], p["status"]) for p in odoc["phases"]] == [("prepare", "skipped"), ("build", "ok"),
                                                                  ("deploy", "skipped")]
    # --prepare alone with no hook configured fails
    bare = make_project(tmp_path / "bare", "bare-app")
    res = ato(["publish", "--registry", registry.url, "--prepare"], cwd=bare)
    assert res.code == 1 and "no prepare step" in res.stderr


@sqlite_index_only
def test_dry_run_reports_and_writes_nothing(ato, tmp_path: Path, registry: Registry) -> None:
    project = make_project(tmp_path / "dry", "dry-app")
    built = ato(["build", ".", "--json"], cwd=project)
    artifact = Path(built.json()["artifact"])
    before = snapshot(registry)
    res = ato(["publish", "--dry-run", "--artifact", str(artifact), "--registry", registry.url, "--json"],
              cwd=project, env={"ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "publish")
    assert doc["code"] == "PUBLISH_DRY_RUN_COMPLETED" and doc["publish"] is None
    report = doc["dry_run_report"]
    assert report["negotiated"] is True and report["chunks_to_upload"] == report["chunks_total"] >= 1
    assert report["auth_ready"] is True
    assert snapshot(registry) == before
    # without an artifact: nothing is built, nothing uploaded
    project2 = make_project(tmp_path / "dry2", "dry-two")
    res = ato(["publish", "--dry-run", "--registry", registry.url], cwd=project2)
    assert res.code == 0, res.stderr
    assert "No upload performed" in res.stdout
    assert not list(project2.glob("*.capsule"))
    assert snapshot(registry) == before


@pytest.mark.parametrize("args, needle", [
    (["--ci", "--deploy"], "--ci cannot be combined with --prepare/--build/--deploy"),
    (["--dry-run", "--build"], "--dry-run cannot be combined with --prepare/--build/--deploy"),
    (["--dry-run", "--allow-existing"], "--dry-run cannot be combined"),
    (["--ci", "--dry-run"], "--ci cannot be combined with --dry-run"),
    (["--registry", "http://127.0.0.1:9", "--allow-existing", "--build"], "--allow-existing is only available"),
    (["--registry", "https://api.ato.run", "--allow-existing"], "--allow-existing is only available"),
    (["--registry", "http://127.0.0.1:9", "--legacy-full-publish"], "only available for official registry"),
    (["--registry", "https://api.ato.run", "--legacy-full-publish", "--build"], "cannot be combined"),
    (["--registry", "http://127.0.0.1:9", "--artifact", "x.capsule", "--build"], "needs the deploy phase"),
    (["--registry", "http://127.0.0.1:9", "--scoped-id", "Not Valid"], "--scoped-id must be publisher/slug"),
    ([], "No default publish target found"),
])
def test_publish_flag_rules(ato, tmp_path: Path, args: list[str], needle: str) -> None:
    project = make_project(tmp_path / "flags", "flags-app")
    res = ato(["publish", *args, "--json"], cwd=project)
    assert res.code == 1, res.stdout
    assert needle in stderr_error(res)["message"]


def handoff_without_workflow(res) -> dict:
    """The project has no CI workflow: the full hand-off is printed, and the failing check fails the command."""
    assert res.code == 1, res.stderr
    assert stderr_error(res)["code"] == "E230"
    doc = res.json()
    assert doc["ok"] is False and doc["handoff"]["diagnosis"][0]["ok"] is False
    return doc


def test_official_registry_is_a_ci_handoff_without_network(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "official", "official-app", "2.0.0")
    # any request would fail here (no network, and the proxy points nowhere)
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    res = ato(["publish", "--registry", "https://api.ato.run", "--json"], cwd=project, env=env)
    doc = handoff_without_workflow(res)
    assert_schema(doc, "publish")
    assert doc["code"] == "CI_HANDOFF" and doc["route"] == "official"
    assert [(p["name"], p["selected"]) for p in doc["phases"]] == [("prepare", False), ("build", False),
                                                                   ("deploy", True)]
    assert doc["handoff"]["network_requests"] == 0 and "git tag v2.0.0" in doc["handoff"]["next_steps"]
    assert not list(project.glob("*.capsule"))
    human = ato(["publish", "--registry", "https://staging.api.ato.run"], cwd=project, env=env)
    assert human.code == 1 and "CI hand-off" in human.stdout and "FAIL workflow_check" in human.stdout
    assert "error[E230]" in human.stderr
    # explicit --build: a local build check, then the hand-off
    built = ato(["publish", "--registry", "https://api.ato.run", "--build", "--deploy", "--json"], cwd=project,
                env=env)
    assert [p["status"] for p in handoff_without_workflow(built)["phases"]] == ["skipped", "ok", "ok"]
    # legacy full publish: all phases, a deprecation warning, still no upload
    legacy = ato(["publish", "--registry", "https://api.ato.run", "--legacy-full-publish", "--json"], cwd=project,
                 env=env)
    ldoc = handoff_without_workflow(legacy)
    assert "deprecated" in legacy.stderr and ldoc["warnings"] and "deprecated" in ldoc["warnings"][0]
    assert all(p["selected"] for p in ldoc["phases"]) and ldoc["handoff"] is not None


@sqlite_index_only
def test_auth_and_network_failures(ato, tmp_path: Path, registry: Registry) -> None:
    project = make_project(tmp_path / "auth", "auth-app")
    artifact = Path(ato(["build", ".", "--json"], cwd=project).json()["artifact"])
    for env, says in (({}, "requires a token"), ({"ATO_TOKEN": "wrong"}, "rejected the token")):
        res = ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], cwd=project,
                  env=env)
        assert res.code == 1
        lines = res.stderr_json_lines()
        assert any(d.get("code") == "ATO_ERR_AUTH_REQUIRED" for d in lines), res.stderr
        assert stderr_error(res)["code"] == "E201" and says in stderr_error(res)["message"]
        human = ato(["publish", "--artifact", str(artifact), "--registry", registry.url], cwd=project, env=env)
        assert human.code == 1 and says in human.stderr and ("required" in human.stderr) == (not env)
    # reads stay open: search works without a token
    assert ato(["search", "--registry", registry.url, "--json"]).code == 0
    # nothing listens on port 9: exit code 3 and a clear message
    down = ato(["install", "local/auth-app", "--registry", "http://127.0.0.1:9", "--json"])
    assert down.code == 3 and "cannot reach registry" in stderr_error(down)["message"]
    down = ato(["publish", "--artifact", str(artifact), "--registry", "http://127.0.0.1:9"], cwd=project,
               env={"ATO_TOKEN": TOKEN})
    assert down.code == 3 and "cannot reach registry" in down.stderr
    missing = ato(["install", "local/nope", "--registry", registry.url])
    assert missing.code == 1 and "not found" in missing.stderr
    noscope = ato(["install", "nope", "--registry", registry.url])
    assert noscope.code == 1 and "scoped_id_required" in noscope.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_json_envelope(tmp_path: Path, workers: int) -> None:
    from tests.conftest import cli_path
    proc = subprocess.Popen([cli_path("ato"), "registry", "serve", "--port", "0", "--data-dir",
                             str(tmp_path / "d"), "--workers", str(workers), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        text = ""
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            text += line
            if line.startswith("}"):
                break
        doc = json.loads(text)
        assert_schema(doc, "registry-serve")
        assert doc["write_auth_required"] is False and doc["port"] > 0 and doc["workers"] == workers
        assert doc["database"] == f"sqlite:///{tmp_path / 'd' / 'registry.sqlite3'}"
        assert httpx.get(doc["url"] + "/.well-known/capsule.json", timeout=10).json()["write_auth_required"] is False
    finally:
        proc.terminate()
        proc.wait(10)
