"""Managing what is installed, against a real `ato registry serve`: `ato list`, `install --bin` shims,
`ato upgrade` (delta, --keep), `ato uninstall` (files and launchers checked on disk), `ato gc --keep-last`
with the bytes it reports compared with `du`, and the safety rules (ownership, symlinks, interrupted runs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import assert_schema, cli_path
from tests.e2e.registry_support import TOKEN, Registry

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None or shutil.which("npm") is None, reason="node and npm are not installed")
OFFLINE = {"ATO_OFFLINE": "1"}


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "registry-data", token=TOKEN)
    yield reg
    reg.stop()


@pytest.fixture
def consumer(tmp_path: Path) -> dict[str, str]:
    """Another machine's HOME: the artifacts are foreign there (unsigned -> --allow-unsigned)."""
    home = tmp_path / "consumer"
    home.mkdir()
    return {"HOME": str(home), "ATO_HOME": str(home / ".ato"), "XDG_DATA_HOME": str(home / ".local" / "share")}


def du(path: Path) -> int:
    """Disk usage in bytes as GNU du counts it (the independent measure of what gc frees)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def ok(res) -> dict:
    assert res.code == 0, res.stderr
    return res.json()


def publish_version(ato, project: Path, version: str, registry: Registry, *, body: str | None = None,
                    blob: bytes | None = None) -> None:
    manifest = project / "capsule.toml"
    text = manifest.read_text()
    old = next(line for line in text.splitlines() if line.startswith("version = "))
    manifest.write_text(text.replace(old, f'version = "{version}"  # bumped by the test'))
    if body is not None:
        (project / "main.js").write_text(body)
    if blob is not None:
        (project / "assets").mkdir(exist_ok=True)
        (project / "assets" / "blob.bin").write_bytes(blob)
    ok(ato(["lock", str(project), "--json"], env=OFFLINE))
    artifact = Path(ok(ato(["build", str(project), "--json"]))["artifact"])
    res = ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"],
              env={"ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr


def tool_project(ato, root: Path) -> Path:
    ok(ato(["init", str(root), "--template", "tool", "--name", "greet", "--json"], env=OFFLINE))
    return root


def store(env: dict[str, str]) -> Path:
    return Path(env["ATO_HOME"]) / "store"


@needs_node
def test_install_bin_list_upgrade_uninstall_a_tool(ato, tmp_path, registry, consumer):
    project = tool_project(ato, tmp_path / "greet")
    publish_version(ato, project, "0.1.0", registry, body="console.log('v1 says', ...process.argv.slice(2));\n",
                    blob=os.urandom(600_000))  # an asset that stays the same: the upgrade reuses its chunks
    shim = Path(consumer["HOME"]) / ".local" / "bin" / "greet"

    doc = ok(ato(["install", "local/greet", "--registry", registry.url, "--bin", "--yes", "--allow-unsigned",
                  "--json"], env=consumer))
    assert_schema(doc, "install")
    assert doc["launchers"][0]["path"] == str(shim) and doc["launchers"][0]["flags"] == ["--allow-unsigned", "--yes"]
    assert shim.is_file() and os.access(shim, os.X_OK)
    run = subprocess.run([str(shim), "a", "b"], capture_output=True, text=True, env={**os.environ, **consumer},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "v1 says a b\n"

    listing = ok(ato(["list", "--json"], env=consumer))
    assert_schema(listing, "list")
    [cap] = listing["capsules"]
    [v1] = cap["versions"]
    assert (cap["scoped_id"], v1["version"], v1["type"], v1["trust"], v1["registry"]) == \
        ("local/greet", "0.1.0", "tool", "unsigned", registry.url)
    assert v1["launchers"] == [{"kind": "bin", "path": str(shim), "state": "ok"}]
    assert v1["size_bytes"] == (store(consumer) / "local/greet/0.1.0/greet-0.1.0.capsule").stat().st_size
    human = ato(["list"], env=consumer).stdout
    assert "local/greet" in human and "~/.local/bin/greet" in human and "unsigned" in human

    # a newer version: the dry run changes nothing, the upgrade moves the command to it
    publish_version(ato, project, "0.2.0", registry, body="console.log('v2 says', ...process.argv.slice(2));\n")
    before = sorted(str(p) for p in store(consumer).rglob("*"))
    dry = ok(ato(["upgrade", "--all", "--dry-run", "--json"], env=consumer))
    assert_schema(dry, "upgrade")
    assert [(r["status"], r["from"], r["to"]) for r in dry["results"]] == [("would-upgrade", "0.1.0", "0.2.0")]
    assert sorted(str(p) for p in store(consumer).rglob("*")) == before
    up = ok(ato(["upgrade", "local/greet", "--allow-unsigned", "--json"], env=consumer))
    assert_schema(up, "upgrade")
    [result] = up["results"]
    assert (result["status"], result["to"], result["removed_versions"]) == ("upgraded", "0.2.0", ["0.1.0"])
    assert result["transfer"]["mode"] == "delta" and result["transfer"]["chunks_reused"] > 0
    assert not (store(consumer) / "local/greet/0.1.0").exists()
    assert "local/greet@0.2.0" in shim.read_text()
    run = subprocess.run([str(shim), "c"], capture_output=True, text=True, env={**os.environ, **consumer}, timeout=120)
    assert run.stdout == "v2 says c\n", run.stderr
    again = ok(ato(["upgrade", "local/greet", "--json"], env=consumer))
    assert again["results"][0]["status"] == "up-to-date"

    # --keep 1: the previous version stays
    publish_version(ato, project, "0.3.0", registry, body="console.log('v3');\n")
    up = ok(ato(["upgrade", "local/greet", "--allow-unsigned", "--keep", "1", "--json"], env=consumer))
    assert up["results"][0]["removed_versions"] == []
    versions = ok(ato(["list", "--json"], env=consumer))["capsules"][0]["versions"]
    assert [v["version"] for v in versions] == ["0.3.0", "0.2.0"]
    assert [len(v["launchers"]) for v in versions] == [1, 0]  # the command belongs to the newest only

    # uninstall one version, then all: store, shim and the chunks nothing else uses are gone
    dry = ok(ato(["uninstall", "local/greet@0.2.0", "--dry-run", "--json"], env=consumer))
    assert_schema(dry, "uninstall")
    assert (store(consumer) / "local/greet/0.2.0").is_dir()
    ok(ato(["uninstall", "local/greet@0.2.0", "--json"], env=consumer))
    assert not (store(consumer) / "local/greet/0.2.0").exists() and shim.is_file()
    gone = ok(ato(["uninstall", "local/greet", "--json"], env=consumer))
    assert {i["kind"] for i in gone["removed"]} >= {"launcher", "capsule", "record"}
    assert not shim.exists() and not (store(consumer) / "local").exists()
    objects = Path(consumer["ATO_HOME"]) / "cas" / "objects"
    assert not [p for p in objects.rglob("*") if p.is_file()]  # no build or install references a chunk now
    assert ok(ato(["list", "--json"], env=consumer))["capsules"] == []
    res = ato(["uninstall", "local/greet"], env=consumer)
    assert res.code == 1 and "not installed" in res.stderr


@needs_node
def test_upgrade_when_the_newest_is_already_installed_leaves_one_version_with_the_command(ato, tmp_path, registry,
                                                                                         consumer):
    """install 0.1.0 --bin, then install 0.2.0 by hand: `ato upgrade` has nothing to download, yet it still
    moves the command to 0.2.0 and removes 0.1.0, so `ato list` shows one version."""
    project = tool_project(ato, tmp_path / "greet")
    publish_version(ato, project, "0.1.0", registry, body="console.log('one');\n")
    publish_version(ato, project, "0.2.0", registry, body="console.log('two');\n")
    shim = Path(consumer["HOME"]) / ".local" / "bin" / "greet"
    ok(ato(["install", "local/greet@0.1.0", "--registry", registry.url, "--bin", "--yes", "--allow-unsigned",
            "--json"], env=consumer))
    ok(ato(["install", "local/greet@0.2.0", "--registry", registry.url, "--allow-unsigned", "--json"], env=consumer))
    assert [v["version"] for v in ok(ato(["list", "--json"], env=consumer))["capsules"][0]["versions"]] == \
        ["0.2.0", "0.1.0"]
    assert "local/greet@0.1.0" in shim.read_text()

    dry = ok(ato(["upgrade", "local/greet", "--dry-run", "--json"], env=consumer))
    assert_schema(dry, "upgrade")
    assert [(r["status"], r["removed_versions"]) for r in dry["results"]] == [("up-to-date", ["0.1.0"])]
    assert (store(consumer) / "local/greet/0.1.0").is_dir() and "local/greet@0.1.0" in shim.read_text()

    before = du(Path(consumer["ATO_HOME"]))
    doc = ok(ato(["upgrade", "local/greet", "--json"], env=consumer))
    assert_schema(doc, "upgrade")
    [result] = doc["results"]
    assert (result["status"], result["from"], result["to"], result["removed_versions"], result["transfer"]) == \
        ("up-to-date", "0.2.0", "0.2.0", ["0.1.0"], None)
    assert result["bytes_freed"] == dry["results"][0]["bytes_freed"] > 0
    assert before - du(Path(consumer["ATO_HOME"])) == result["bytes_freed"]
    listing = ok(ato(["list", "--json"], env=consumer))
    [cap] = listing["capsules"]
    [only] = cap["versions"]
    assert only["version"] == "0.2.0" and only["launchers"] == [{"kind": "bin", "path": str(shim), "state": "ok"}]
    assert not (store(consumer) / "local/greet/0.1.0").exists()
    run = subprocess.run([str(shim)], capture_output=True, text=True, env={**os.environ, **consumer}, timeout=120)
    assert run.stdout == "two\n", run.stderr
    assert ok(ato(["upgrade", "--all", "--json"], env=consumer))["results"][0]["removed_versions"] == []


@needs_node
def test_bin_refuses_what_ato_did_not_create(ato, tmp_path, registry, consumer):
    project = tool_project(ato, tmp_path / "greet")
    publish_version(ato, project, "1.0.0", registry)
    bin_dir = Path(consumer["HOME"]) / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "greet").write_text("#!/bin/sh\necho mine\n")
    res = ato(["install", "local/greet", "--registry", registry.url, "--bin", "--allow-unsigned"], env=consumer)
    assert res.code == 1 and "not created by ato" in res.stderr
    assert (bin_dir / "greet").read_text() == "#!/bin/sh\necho mine\n"

    (bin_dir / "greet").unlink()
    res = ato(["install", "local/greet", "--registry", registry.url, "--bin", "--allow-unsigned"], env=consumer)
    assert res.code == 0, res.stderr
    assert f"Note: {bin_dir} is not on your PATH" in res.stdout  # pipx's hint
    res = ato(["install", "local/greet", "--registry", registry.url, "--bin", "--allow-unsigned"],
              env={**consumer, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert res.code == 0 and "not on your PATH" not in res.stdout, res.stderr
    (bin_dir / "greet").write_text("#!/bin/sh\necho edited by hand\n")  # now someone else's
    res = ato(["uninstall", "local/greet"], env=consumer)
    assert res.code == 1 and "changed since" in res.stderr and "nothing was removed" in res.stderr
    assert (bin_dir / "greet").read_text() == "#!/bin/sh\necho edited by hand\n"
    assert (store(consumer) / "local/greet/1.0.0/greet-1.0.0.capsule").is_file()


def test_bin_is_only_for_tools(ato, tmp_path, registry, consumer):
    project = tmp_path / "site"
    (project / "public").mkdir(parents=True)
    (project / "public" / "index.html").write_text("<p>hi</p>\n")
    ok(ato(["init", str(project), "--json"], env=OFFLINE))
    publish_version(ato, project, "1.0.0", registry)
    res = ato(["install", "local/site", "--registry", registry.url, "--bin", "--allow-unsigned"], env=consumer)
    assert res.code == 1 and "only type = \"tool\" capsules" in res.stderr
    assert not (Path(consumer["HOME"]) / ".local" / "bin").exists()


def run_installed(ato, ref: str, env: dict[str, str]) -> None:
    res = ato(["run", ref, "-y", "--allow-unsigned"], env=env)
    assert res.code == 0, res.stderr


@needs_node
def test_gc_keep_last_frees_what_it_reports(ato, tmp_path, registry, consumer):
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "big-app", "version": "1.0.0", "main": "main.js"}))
    (project / "main.js").write_text("console.log('big app');\n")
    ok(ato(["init", str(project), "--json"], env=OFFLINE))
    for i, version in enumerate(("1.0.0", "1.1.0", "2.0.0")):
        publish_version(ato, project, version, registry, blob=os.urandom(300_000) + bytes([i]) * 200_000)
        ok(ato(["install", f"local/big-app@{version}", "--registry", registry.url, "--allow-unsigned", "--json"],
               env=consumer))
        run_installed(ato, f"local/big-app@{version}", consumer)  # leaves an unpacked copy per version
    # a build of a project that is then deleted leaves build state behind
    gone = tmp_path / "gone"
    shutil.copytree(project, gone)
    ok(ato(["build", str(gone), "--json"], env=consumer))
    shutil.rmtree(gone)
    home = Path(consumer["ATO_HOME"])
    assert len(list((home / "unpacked").iterdir())) == 3 and len(list((home / "state" / "builds").iterdir())) == 1

    before = du(home)
    dry = ok(ato(["gc", "--keep-last", "1", "--dry-run", "--json"], env=consumer))
    assert_schema(dry, "gc")
    assert du(home) == before
    real = ok(ato(["gc", "--keep-last", "1", "--json"], env=consumer))
    assert_schema(real, "gc")
    after = du(home)
    assert real["bytes_freed"] == dry["bytes_freed"]
    assert before - after == real["bytes_freed"], (before, after, real["bytes_freed"])
    assert real["bytes_freed"] > 1_000_000
    kinds = {i["kind"] for i in real["removed"]}
    assert {"capsule", "record", "unpacked", "build"} <= kinds and real["cas"]["objects_removed"] > 0
    assert sorted(p.name for p in (store(consumer) / "local" / "big-app").iterdir()) == ["2.0.0"]
    assert len(list((home / "unpacked").iterdir())) == 1 and not list((home / "state" / "builds").iterdir())
    run_installed(ato, "local/big-app", consumer)  # what stays still runs
    res = ato(["cas", "verify", "--json"], env=consumer)
    assert res.code == 0, res.stderr
    nothing = ok(ato(["gc", "--json"], env=consumer))
    assert nothing["removed"] == [] and nothing["bytes_freed"] == 0


def test_gc_never_follows_symlinks_out_of_ato_home(ato, tmp_path, consumer):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("keep me\n")
    home = Path(consumer["ATO_HOME"])
    for where in (home / "unpacked", home / "fetches", home / "state" / "builds", home / "store" / "evil"):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.mkdir(exist_ok=True)
        os.symlink(outside, where / "link")
    os.symlink(outside, home / "store" / "acme")  # a publisher dir that is a symlink
    (home / ".trash").mkdir()
    os.symlink(outside, home / ".trash" / "link")
    res = ato(["gc", "--keep-last", "1", "--json"], env=consumer)
    assert res.code == 0, res.stderr
    assert (outside / "data.txt").read_text() == "keep me\n"
    assert ok(ato(["list", "--json"], env=consumer))["capsules"] == []
    res = ato(["uninstall", "acme/link"], env=consumer)
    assert res.code == 1 and (outside / "data.txt").is_file()


@needs_node
def test_an_interrupted_uninstall_leaves_a_consistent_store(ato, tmp_path, registry, consumer):
    """kill -9 at any moment: what is listed still runs, and running uninstall or gc again finishes the job."""
    project = tool_project(ato, tmp_path / "greet")
    publish_version(ato, project, "1.0.0", registry, blob=os.urandom(2_000_000))
    home = Path(consumer["ATO_HOME"])
    for delay in (0.05, 0.3, 0.8):
        ok(ato(["install", "local/greet", "--registry", registry.url, "--bin", "--yes", "--allow-unsigned",
                "--json"], env=consumer))
        run_installed(ato, "local/greet", consumer)
        proc = subprocess.Popen([cli_path("ato"), "uninstall", "local/greet"], env={**os.environ, **consumer},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listing = ok(ato(["list", "--json"], env=consumer))
        for cap in listing["capsules"]:
            for v in cap["versions"]:
                assert Path(v["path"]).is_file()
                run_installed(ato, f"{cap['scoped_id']}@{v['version']}", consumer)
        res = ato(["uninstall", "local/greet", "--json"], env=consumer)
        assert res.code in (0, 1), res.stderr
        if res.code == 1:
            assert "not installed" in res.stderr
        ok(ato(["gc", "--json"], env=consumer))
        assert not (home / "store" / "local").exists()
        assert not (Path(consumer["HOME"]) / ".local" / "bin" / "greet").exists()
        assert not (home / ".trash").exists()
        assert not list((home / "unpacked").iterdir())


def test_uninstall_a_native_app_takes_back_its_projection_derived_app_and_fetch(ato, tmp_path, registry, consumer):
    from tests.native_support import native_project

    project = native_project(tmp_path / "hello-native", message="native hi")
    artifact = Path(ok(ato(["build", str(project), "--json"]))["artifact"])
    ok(ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], env={"ATO_TOKEN": TOKEN}))
    inst = ok(ato(["install", "local/hello-native", "--registry", registry.url, "--yes", "--project",
                   "--allow-unsigned", "--json"], env=consumer))
    home, ato_home = Path(consumer["HOME"]), Path(consumer["ATO_HOME"])
    desktop = Path(inst["projection"]["projected_path"])
    command = home / ".local" / "bin" / "hello-native"
    derived = Path(inst["local_derivation"]["derived_app_path"])
    fetched = Path(inst["local_derivation"]["fetched_dir"])
    assert desktop.is_file() and command.is_symlink() and derived.exists() and fetched.is_dir()

    [cap] = ok(ato(["list", "--json"], env=consumer))["capsules"]
    [version] = cap["versions"]
    assert version["install_kind"] == "NativeRequiresLocalDerivation"
    assert {"kind": "desktop", "path": str(desktop), "state": "ok"} in version["launchers"]
    assert version["disk_bytes"] > version["size_bytes"]  # the derived app and the fetch count too

    doc = ok(ato(["uninstall", "local/hello-native", "--json"], env=consumer))
    assert_schema(doc, "uninstall")
    assert {"projection", "derived_app", "fetch", "capsule", "record"} <= {i["kind"] for i in doc["removed"]}
    assert not desktop.exists() and not os.path.lexists(command)
    assert not derived.exists() and not fetched.exists()
    assert not (ato_home / "store" / "local").exists()
    assert not list((ato_home / "native-delivery" / "projections").glob("*.json"))
    assert not (ato_home / "apps").exists() or not any((ato_home / "apps").rglob("local-derivation.json"))


def test_gc_leaves_a_young_orphan_cache_for_its_first_hour(ato, consumer):
    """An unpacked copy no record explains may belong to a run that is starting: it waits an hour."""
    home = Path(consumer["ATO_HOME"])
    orphan = home / "unpacked" / ("ab" * 32)
    orphan.mkdir(parents=True)
    (orphan / "main.js").write_text("1;\n")
    assert ok(ato(["gc", "--json"], env=consumer))["removed"] == []
    assert orphan.is_dir()
    hour_ago = time.time() - 3700
    os.utime(orphan, (hour_ago, hour_ago))
    doc = ok(ato(["gc", "--json"], env=consumer))
    assert [(i["kind"], i["path"]) for i in doc["removed"] if i["kind"] != "directory"] == [("unpacked", str(orphan))]
    assert not orphan.exists()


@needs_node
def test_failed_upgrade_keeps_the_old_version_signed_upgrade_pins_and_purge_takes_the_data(ato, tmp_path, registry,
                                                                                          consumer):
    """An upgrade the trust policy refuses changes nothing; a signed one is pinned, listed with its signer,
    and its command no longer passes --allow-unsigned; uninstall --purge also takes the saved state and
    the consent approvals."""
    project = tool_project(ato, tmp_path / "greet")
    with (project / "capsule.toml").open("a") as f:
        f.write('\n[state.data]\nkind = "filesystem"\ndurability = "persistent"\npurpose = "notes"\n')
    note = ("const fs = require('fs');\n"
            "fs.writeFileSync(require('path').join(process.env.ATO_STATE_DATA, 'note.txt'), 'VERSION');\n"
            "console.log('VERSION');\n")
    publish_version(ato, project, "0.1.0", registry, body=note.replace("VERSION", "one"))
    shim = Path(consumer["HOME"]) / ".local" / "bin" / "greet"
    ok(ato(["install", "local/greet", "--registry", registry.url, "--bin", "--yes", "--allow-unsigned", "--json"],
           env=consumer))
    shell = {**os.environ, **consumer}
    assert subprocess.run([str(shim)], capture_output=True, text=True, env=shell, timeout=120).stdout == "one\n"
    ato_home = Path(consumer["ATO_HOME"])
    state = ato_home / "capsule-state" / "greet"
    assert (state / "data" / "note.txt").read_text() == "one"

    # 0.2.0 is unsigned and this upgrade does not allow it: refused, nothing changes
    publish_version(ato, project, "0.2.0", registry, body=note.replace("VERSION", "two"))
    before = sorted(str(p) for p in (ato_home / "store").rglob("*"))
    shim_bytes = shim.read_bytes()
    res = ato(["upgrade", "local/greet", "--json"], env=consumer)
    assert res.code == 1
    doc = res.json()
    assert_schema(doc, "upgrade")
    assert (doc["failed"], doc["results"][0]["status"], doc["results"][0]["error"]["code"]) == (1, "failed", "E301")
    assert (doc["results"][0]["from"], doc["results"][0]["to"]) == ("0.1.0", "0.2.0")
    assert sorted(str(p) for p in (ato_home / "store").rglob("*")) == before and shim.read_bytes() == shim_bytes
    assert subprocess.run([str(shim)], capture_output=True, text=True, env=shell, timeout=120).stdout == "one\n"

    # 0.3.0 is signed: pinned on first sight (--yes), listed with its signer, the shim runs fail-closed again
    key = ok(ato(["key", "gen", "--json"]))
    (project / "main.js").write_text(note.replace("VERSION", "three"))
    text = (project / "capsule.toml").read_text()
    (project / "capsule.toml").write_text(text.replace('version = "0.2.0"', 'version = "0.3.0"'))
    ok(ato(["lock", str(project), "--json"], env=OFFLINE))
    artifact = Path(ok(ato(["build", str(project), "--key", key["path"], "--json"]))["artifact"])
    ok(ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], env={"ATO_TOKEN": TOKEN}))
    up = ok(ato(["upgrade", "local/greet", "--yes", "--json"], env=consumer))
    assert (up["results"][0]["status"], up["results"][0]["removed_versions"]) == ("upgraded", ["0.1.0"])
    [cap] = ok(ato(["list", "--json"], env=consumer))["capsules"]
    [v3] = cap["versions"]
    assert (v3["version"], v3["signed"], v3["trust"]) == ("0.3.0", True, "pinned")
    assert v3["signer"] == {"key_id": key["key_id"], "short_fingerprint": key["short_fingerprint"]}
    assert "pinned " + key["short_fingerprint"] in ato(["list"], env=consumer).stdout
    assert "--allow-unsigned" not in shim.read_text() and "local/greet@0.3.0 --yes" in shim.read_text()
    assert subprocess.run([str(shim)], capture_output=True, text=True, env=shell, timeout=120).stdout == "three\n"

    consent = ato_home / "consent" / "executionplan_v1.jsonl"
    assert '"local/greet"' in consent.read_text()
    gone = ok(ato(["uninstall", "local/greet", "--purge", "--json"], env=consumer))
    assert_schema(gone, "uninstall")
    assert "purge" in {i["kind"] for i in gone["removed"]}
    assert not state.exists() and not shim.exists()
    assert '"local/greet"' not in (consent.read_text() if consent.exists() else "")


def test_gc_takes_a_fetch_nothing_installed_uses_once_an_hour_old(ato, tmp_path, consumer):
    """`ato fetch` by hand leaves a cache no install record explains: gc leaves it for an hour (a command
    may still be using it), then frees it, and the bytes it reports are what du sees. What `ato finalize`
    wrote where the user asked is theirs: gc never touches it."""
    from tests.native_support import native_project

    project = native_project(tmp_path / "hello-native", message="by hand")
    artifact = ok(ato(["build", str(project), "--json"], env=consumer))["artifact"]
    fetch = ok(ato(["fetch", artifact, "--json"], env=consumer))
    out = tmp_path / "my-apps"
    ok(ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(out), "--json"],
           env=consumer))
    cache, home = Path(fetch["cache_dir"]), Path(consumer["ATO_HOME"])
    mine = sorted(str(p) for p in out.rglob("*"))
    assert cache.is_dir() and home in cache.parents and mine
    assert ok(ato(["gc", "--json"], env=consumer))["removed"] == []
    hour_ago = time.time() - 3700
    os.utime(cache, (hour_ago, hour_ago))
    before = du(home)
    doc = ok(ato(["gc", "--json"], env=consumer))
    assert_schema(doc, "gc")
    assert [i["path"] for i in doc["removed"] if i["kind"] == "fetch"] == [str(cache)]
    assert not cache.exists()
    assert before - du(home) == doc["bytes_freed"] > 0
    assert sorted(str(p) for p in out.rglob("*")) == mine and Path(artifact).is_file()
    assert ok(ato(["cas", "verify", "--json"], env=consumer))


@pytest.mark.parametrize(("args", "message"), [
    (["uninstall", "a/b@"], "invalid capsule reference"),
    (["uninstall", "../x"], "invalid capsule reference"),
    (["uninstall", "a/b@1.0.0/../x"], "invalid capsule reference"),
    (["uninstall", "a/b"], "a/b is not installed"),
    (["upgrade"], "name one capsule (publisher/slug) or pass --all"),
    (["upgrade", "a/b", "--all"], "name one capsule (publisher/slug) or pass --all"),
    (["upgrade", "a/b"], "a/b is not installed"),
    (["gc", "--keep-last", "0"], "--keep-last"),
])
def test_management_refusals_are_one_line_e100(ato, consumer, args, message):
    res = ato([*args, "--json"], env=consumer)
    assert res.code == 1 and res.stdout == ""
    err = json.loads(res.stderr.strip().splitlines()[-1])["error"]
    assert err["code"] == "E100" and message in err["message"]
    human = ato(args, env=consumer)
    assert human.code == 1 and "Traceback" not in human.stderr and message in human.stderr
    assert not (Path(consumer["ATO_HOME"]) / "store").exists()


@needs_node
def test_uninstall_never_removes_a_file_an_edited_record_points_at(ato, tmp_path, registry, consumer):
    """install.json lives in ATO_HOME; if something rewrites it to name a file of the user's (with that
    file's true digest), uninstall keeps the file: ato removes commands only from ~/.local/bin. A record
    that is not ato's shape names nothing outside ATO_HOME at all."""
    import blake3

    project = tool_project(ato, tmp_path / "greet")
    publish_version(ato, project, "1.0.0", registry)
    home = Path(consumer["HOME"])
    precious = home / ".bashrc"
    precious.write_text("export KEEP=1\n")
    record_path = store(consumer) / "local/greet/1.0.0/install.json"

    for tamper in ("path", "shape"):
        ok(ato(["install", "local/greet", "--registry", registry.url, "--bin", "--allow-unsigned", "--json"],
               env=consumer))
        record = json.loads(record_path.read_text())
        if tamper == "path":
            record["launchers"][0]["path"] = str(precious)
            record["launchers"][0]["blake3"] = "blake3:" + blake3.blake3(precious.read_bytes()).hexdigest()
        else:
            record["launchers"][0]["path"] = str(precious)
            record["launchers"][0]["unexpected"] = True
        record_path.write_text(json.dumps(record))
        doc = ok(ato(["uninstall", "local/greet", "--json"], env=consumer))
        assert_schema(doc, "uninstall")
        assert precious.read_text() == "export KEEP=1\n", tamper
        assert str(precious) not in {i["path"] for i in doc["removed"]}
        assert not (store(consumer) / "local").exists()
        (home / ".local" / "bin" / "greet").unlink()  # the shim no record names now: the user's to remove
