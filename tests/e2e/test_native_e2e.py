"""Native delivery end to end on Linux, through the installed ``ato`` and a real ``ato registry serve``:
build (command mode, gcc) -> publish -> install --yes --project -> run -> project ls -> break -> unproject,
plus fetch/finalize by hand, every envelope's fields in order and schema-valid, and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from pipeline import paths
from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry
from tests.native_support import (
    HOST_TARGET,
    build_in_process,
    independent_tree_digest,
    mac_app_project,
    native_project,
    snapshot,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="native delivery on Linux hosts")

BUILD_FIELDS = ["ok", "kind", "artifact", "build_strategy", "schema_version", "target", "derived_from"]
FETCH_FIELDS = ["schema_version", "scoped_id", "version", "cache_dir", "artifact_dir", "parent_digest", "registry"]
RECORD_FIELDS = ["schema_version", "scoped_id", "version", "registry", "fetched_at", "parent_digest",
                 "artifact_blake3"]
FINALIZE_FIELDS = ["fetched_dir", "output_dir", "derived_app_path", "provenance_path", "parent_digest",
                   "derived_digest", "schema_version"]
PROVENANCE_FIELDS = ["schema_version", "scoped_id", "version", "registry", "artifact_blake3", "parent_digest",
                     "derived_digest", "framework", "target", "finalized_locally", "finalize_tool", "finalized_at"]
PROJECT_FIELDS = ["projection_id", "metadata_path", "launcher_dir", "projected_path", "derived_app_path",
                  "parent_digest", "derived_digest", "state", "problems", "created", "schema_version"]
LS_ITEM_FIELDS = ["projection_id", "metadata_path", "launcher_dir", "projected_path", "derived_app_path",
                  "parent_digest", "derived_digest", "state", "problems", "projected_at", "projection_kind",
                  "schema_version"]
UNPROJECT_FIELDS = ["projection_id", "metadata_path", "projected_path", "removed_projected_path", "removed_metadata",
                    "state_before", "problems_before", "schema_version"]
INSTALL_FIELDS = ["capsule_id", "scoped_id", "publisher", "slug", "version", "path", "content_hash", "install_kind",
                  "launchable", "local_derivation", "projection"]
LOCAL_DERIVATION_FIELDS = ["schema_version", "performed", "fetched_dir", "derived_app_path", "provenance_path",
                           "parent_digest", "derived_digest"]
PROJECTION_FIELDS = ["performed", "projection_id", "projected_path", "state", "schema_version", "metadata_path"]
DIGEST = r"^blake3:[0-9a-f]{64}$"


def ok(res) -> dict:
    assert res.code == 0, res.stderr
    return res.json()


def error_of(res) -> dict:
    assert res.code != 0, res.stdout
    docs = [d for d in res.stderr_json_lines() if "error" in d]
    assert docs, res.stderr
    return docs[-1]["error"]


def launcher_dirs(home: Path) -> dict:
    return {"applications": snapshot(paths.applications_dir()), "bin": snapshot(paths.user_bin_dir()),
            "local": snapshot(home / ".local")}


def types_ok(doc: dict, spec: dict) -> None:
    for key, kind in spec.items():
        assert isinstance(doc[key], kind), (key, doc[key])


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "registry-data", token=TOKEN)
    yield reg
    reg.stop()


def test_build_publish_install_project_run_unproject(ato, tmp_path: Path, isolated_home: Path,
                                                     registry: Registry) -> None:
    project = native_project(tmp_path / "hello-native", message="hello from native")
    key = tmp_path / "publisher-key.json"
    ok(ato(["key", "gen", "--out", str(key), "--json"]))
    built = ok(ato(["build", ".", "--key", str(key), "--json"], cwd=project))
    assert list(built)[:7] == BUILD_FIELDS
    assert_schema(built, "build")
    assert (built["build_strategy"], built["schema_version"], built["target"]) == ("native-delivery", "0.1",
                                                                                   HOST_TARGET)
    assert built["derived_from"] == str(project / "dist" / "hello")
    artifact = Path(built["artifact"])
    ok(ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], cwd=project,
           env={"ATO_TOKEN": TOKEN}))

    before = launcher_dirs(isolated_home)
    store = paths.store_dir() / "local" / "hello-native" / "0.1.0" / "hello-native-0.1.0.capsule"
    # non-interactive without --yes: fails closed, names --yes, stores nothing
    refused = ato(["install", "local/hello-native", "--registry", registry.url, "--json"])
    assert refused.code == 1 and "--yes" in refused.stderr
    assert not store.exists() and not paths.apps_dir().exists()

    inst = ok(ato(["install", "local/hello-native", "--registry", registry.url, "--yes", "--project", "--json"]))
    assert_schema(inst, "install")
    assert list(inst)[:11] == INSTALL_FIELDS
    assert (inst["install_kind"], inst["scoped_id"], inst["version"]) == ("NativeRequiresLocalDerivation",
                                                                          "local/hello-native", "0.1.0")
    assert inst["path"] == str(store) and inst["content_hash"] == "blake3:" + blake3.blake3(store.read_bytes()).hexdigest()
    app = Path(inst["launchable"]["DerivedApp"]["path"])
    assert list(inst["launchable"]) == ["DerivedApp"]
    ld = inst["local_derivation"]
    assert list(ld) == LOCAL_DERIVATION_FIELDS
    types_ok(ld, {"schema_version": str, "performed": bool, "fetched_dir": str, "derived_app_path": str,
                  "provenance_path": str, "parent_digest": str, "derived_digest": str})
    assert (ld["schema_version"], ld["performed"], ld["derived_app_path"]) == ("0.1", True, str(app))
    proj = inst["projection"]
    assert list(proj) == PROJECTION_FIELDS
    assert (proj["performed"], proj["state"], proj["schema_version"]) == (True, "ok", "0.1")
    assert app.parent.parent == paths.apps_dir() / "local" / "hello-native" / ld["parent_digest"][7:]

    # launchable.path runs
    run = subprocess.run([str(app)], capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, "hello from native\n")
    # digests recomputed independently
    fetched = Path(ld["fetched_dir"])
    assert independent_tree_digest(fetched / "artifact") == ld["parent_digest"]
    assert independent_tree_digest(app) == ld["derived_digest"]
    provenance = json.loads(Path(ld["provenance_path"]).read_text())
    assert list(provenance)[:12] == PROVENANCE_FIELDS
    assert_schema(provenance, "local-derivation")
    types_ok(provenance, {k: str for k in PROVENANCE_FIELDS if k != "finalized_locally"})
    assert provenance["registry"] == registry.url and provenance["finalize_tool"] == "ato-sign"
    # the launcher is a valid desktop entry, and the command is on ~/.local/bin
    desktop = Path(proj["projected_path"])
    assert desktop.parent == paths.applications_dir()
    validate = shutil.which("desktop-file-validate")
    assert validate, "desktop-file-validate missing: `make test` installs desktop-file-utils"
    check = subprocess.run([validate, str(desktop)], capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
    command = paths.user_bin_dir() / "hello-native"
    assert subprocess.run([str(command)], capture_output=True, text=True).stdout == "hello from native\n"

    ls = ok(ato(["project", "ls", "--json"]))
    assert_schema(ls, "project-ls")
    assert list(ls) == ["projections", "total", "broken"] and (ls["total"], ls["broken"]) == (1, 0)
    item = ls["projections"][0]
    assert list(item) == LS_ITEM_FIELDS
    assert (item["projection_id"], item["state"], item["problems"]) == (proj["projection_id"], "ok", [])

    # installing again is a no-op: same derived app, no new derived dir
    again = ok(ato(["install", "local/hello-native", "--registry", registry.url, "--yes", "--project", "--json"]))
    assert again["up_to_date"] is True and again["launchable"] == inst["launchable"]
    assert again["projection"] == proj
    assert len(list(app.parent.parent.glob("derived-*"))) == 1

    # the advanced surface by hand: fetch from the registry, finalize twice
    fetch = ok(ato(["fetch", "local/hello-native", "--registry", registry.url, "--json"]))
    assert list(fetch) == FETCH_FIELDS
    assert_schema(fetch, "fetch")
    assert (fetch["parent_digest"], fetch["cache_dir"], fetch["registry"]) == (ld["parent_digest"], ld["fetched_dir"],
                                                                               registry.url)
    record = json.loads((Path(fetch["cache_dir"]) / "fetch.json").read_text())
    assert list(record) == RECORD_FIELDS
    assert_schema(record, "fetch-record")
    assert record["artifact_blake3"] == inst["content_hash"]
    dist = tmp_path / "dist"
    first = ok(ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(dist), "--json"]))
    second = ok(ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(dist),
                     "--json"]))
    for doc in (first, second):
        assert list(doc) == FINALIZE_FIELDS
        assert_schema(doc, "finalize")
        assert_schema(json.loads(Path(doc["provenance_path"]).read_text()), "local-derivation")
        assert independent_tree_digest(Path(doc["derived_app_path"])) == doc["derived_digest"]
    assert first["output_dir"] != second["output_dir"] and first["parent_digest"] == second["parent_digest"]
    assert first["parent_digest"] == ld["parent_digest"]
    # projecting a second derived copy of the same app collides with the installed launcher: refused, nothing made
    snap = launcher_dirs(isolated_home)
    clash = ato(["project", first["derived_app_path"], "--json"])
    assert "Projection name conflict" in error_of(clash)["message"]
    assert launcher_dirs(isolated_home) == snap

    # remove the derived app: broken, derived_app_missing
    moved = tmp_path / "moved-app"
    app.rename(moved)
    ls = ok(ato(["project", "ls", "--json"]))
    assert (ls["broken"], ls["projections"][0]["state"], ls["projections"][0]["problems"]) == \
        (1, "broken", ["derived_app_missing"])
    un = ok(ato(["unproject", proj["projection_id"], "--json"]))
    assert list(un) == UNPROJECT_FIELDS
    assert_schema(un, "unproject")
    assert (un["projection_id"], un["removed_projected_path"], un["removed_metadata"], un["state_before"],
            un["problems_before"]) == (proj["projection_id"], True, True, "broken", ["derived_app_missing"])
    assert launcher_dirs(isolated_home) == before
    assert ok(ato(["project", "ls", "--json"]))["total"] == 0
    # the fetched parent is unchanged by finalize and projection
    assert independent_tree_digest(fetched / "artifact") == ld["parent_digest"]


def test_native_install_needs_yes_and_leaves_nothing(ato, tmp_path: Path, registry: Registry) -> None:
    project = native_project(tmp_path / "hello-native")
    artifact = Path(ok(ato(["build", ".", "--json"], cwd=project))["artifact"])
    ok(ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], cwd=project,
           env={"ATO_TOKEN": TOKEN}))
    res = ato(["install", "local/hello-native", "--registry", registry.url, "--allow-unsigned", "--json"])
    err = error_of(res)
    assert err["message"] == ("This app requires local finalize, but no interactive consent is available. "
                              "Re-run with --yes.")
    assert any(d.get("code") == "ATO_ERR_CONSENT_REQUIRED" for d in res.stderr_json_lines())
    assert not paths.store_dir().exists() and not paths.apps_dir().exists() and not paths.fetches_dir().exists()
    plain = ato(["install", "local/hello-native", "--registry", registry.url, "--allow-unsigned"])
    assert plain.code == 1 and "Re-run with --yes." in plain.stderr
    # --no-project: installed and finalized, no launcher
    doc = ok(ato(["install", "local/hello-native", "--registry", registry.url, "--allow-unsigned", "--yes",
                  "--no-project", "--json"]))
    assert doc["projection"] == {"performed": False, "projection_id": None, "projected_path": None,
                                 "state": "skipped", "schema_version": "0.1", "metadata_path": None}
    assert not paths.applications_dir().exists() and not paths.user_bin_dir().exists()


BASE_INLINE = '\n[artifact]\nframework = "c"\nstage = "unsigned"\ntarget = "{target}"\ninput = "{input}"\n' \
              '\n[finalize]\ntool = "{tool}"\nargs = {args}\n'
REFUSED_BUILDS = {
    "partial-inline": ('\n[artifact]\nframework = "c"\ntarget = "linux/x86_64"\ninput = "dist/hello"\n',
                       "capsule.toml: finalize: [artifact] is declared without [finalize]; native delivery metadata "
                       "needs both tables or neither"),
    "dotdot-input": (BASE_INLINE.format(target=HOST_TARGET, input="../hello", tool="ato-sign", args='["../hello"]'),
                     "capsule.toml: artifact.input: \"../hello\" must not contain '..' (it would escape the project)"),
    "absolute-input": (BASE_INLINE.format(target=HOST_TARGET, input="/usr/bin/true", tool="ato-sign",
                                          args='["/usr/bin/true"]'),
                       'capsule.toml: artifact.input: "/usr/bin/true" must be a relative path inside the project, '
                       "not an absolute path"),
    "bad-target-os": (BASE_INLINE.format(target="solaris/x86_64", input="dist/hello", tool="ato-sign",
                                         args='["dist/hello"]'),
                      'capsule.toml: artifact.target: expected darwin|linux|windows with arm64|x86_64, got string '
                      '"solaris/x86_64"'),
    "bad-target-shape": (BASE_INLINE.format(target="linux", input="dist/hello", tool="ato-sign", args='["dist/hello"]'),
                         'capsule.toml: artifact.target: expected "<os>/<arch>" (e.g. "linux/x86_64"), got string '
                         '"linux"'),
    "codesign-args": (BASE_INLINE.format(target="darwin/arm64", input="dist/hello", tool="codesign",
                                         args='["--deep", "--rm", "dist/hello"]'),
                      'capsule.toml: finalize.args[1]: "--rm" is not an allowed codesign argument (allowed: --deep, '
                      "--entitlements, --force, --identifier, --options, --prefix, --requirements, --sign, --strict, "
                      "--timestamp, --verbose, and the artifact input)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BUILDS))
def test_bad_native_metadata_is_refused_before_anything_runs(ato, tmp_path: Path, case: str) -> None:
    inline, message = REFUSED_BUILDS[case]
    project = native_project(tmp_path / "proj", inline=inline)
    res = ato(["build", ".", "--json"], cwd=project)
    assert error_of(res)["message"] == message
    assert not list(project.glob("*.capsule")) and not (project / "dist").exists()  # the build command never ran


def test_tampered_fetch_is_refused_by_finalize(ato, tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj")
    artifact = ok(ato(["build", ".", "--json"], cwd=project))["artifact"]
    fetch = ok(ato(["fetch", artifact, "--json"]))
    assert fetch["registry"] == Path(artifact).as_uri() and fetch["scoped_id"] == "local/hello-native"
    binary = Path(fetch["artifact_dir"]) / "dist" / "hello"
    data = bytearray(binary.read_bytes())
    data[-1] ^= 1
    binary.write_bytes(bytes(data))
    res = ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(tmp_path / "out"),
               "--json"])
    err = error_of(res)
    assert err["code"] == "E208" and err["message"].startswith(
        f"Fetched artifact integrity mismatch: expected {fetch['parent_digest']}, got blake3:")
    assert not list((tmp_path / "out").glob("derived-*")) if (tmp_path / "out").exists() else True
    no_flag = ato(["finalize", fetch["cache_dir"], "--output-dir", str(tmp_path / "out")])
    assert "finalize requires --allow-external-finalize for any external signing step" in no_flag.stderr
    # fetching again repairs the cache entry, and finalize then succeeds
    ok(ato(["fetch", artifact, "--json"]))
    ok(ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(tmp_path / "out"),
            "--json"]))


def test_a_derived_app_without_an_executable_is_refused(ato, tmp_path: Path) -> None:
    from stages import native_build
    sh = "mkdir -p dist/app\necho 'not a program' > dist/app/readme.txt\n"
    with pytest.MonkeyPatch.context() as mp:  # not monkeypatch.undo(): that would also undo the isolated HOME
        mp.setattr(native_build, "check_app", lambda *a, **k: None)
        mp.setattr(native_build, "check_payload_input", lambda *a, **k: None)
        artifact = build_in_process(native_project(tmp_path / "proj", input_="dist/app", build_sh=sh))["artifact"]
    fetch = ok(ato(["fetch", artifact, "--json"]))
    res = ato(["finalize", fetch["cache_dir"], "--allow-external-finalize", "--output-dir", str(tmp_path / "out"),
               "--json"])
    assert error_of(res)["message"].startswith("native delivery fetched input is missing a regular ELF executable")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("derived-*"))
    # and project refuses a finalize output whose app has no command to launch
    out = tmp_path / "by-hand" / "derived-20260101T000000Z-00000000"
    shutil.copytree(Path(fetch["artifact_dir"]) / "dist" / "app", out / "app")
    from cas.tree import tree_digest
    digest = "blake3:" + tree_digest(out / "app")
    origin = json.loads((Path(fetch["cache_dir"]) / "fetch.json").read_text())
    (out / "local-derivation.json").write_text(json.dumps({
        "schema_version": "0.1", "scoped_id": origin["scoped_id"], "registry": origin["registry"],
        "artifact_blake3": origin["artifact_blake3"], "parent_digest": fetch["parent_digest"], "derived_digest": digest,
        "framework": "c", "target": HOST_TARGET, "finalized_locally": True, "finalize_tool": "none",
        "finalized_at": "2026-01-01T00:00:00Z"}))
    res = ato(["project", str(out / "app"), "--json"])
    assert error_of(res)["message"] == ("Projection input is missing an executable command within 3 levels of "
                                        f"{out / 'app'}")
    assert not paths.applications_dir().exists() and not paths.user_bin_dir().exists()


def test_a_refused_native_install_leaves_nothing_in_the_store(ato, tmp_path: Path, registry: Registry) -> None:
    """A native install refused after its artifact was verified (here: a darwin/arm64 app cannot be
    finalized on a Linux host) takes the artifact back out of the store: `ato verify` and `ato run` do
    not find it installed, and asking run to install it again is refused again."""
    proj = mac_app_project(tmp_path / "mac", "my-mac-app")
    artifact = Path(ok(ato(["build", str(proj), "--json"]))["artifact"])
    ok(ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"], env={"ATO_TOKEN": TOKEN}))
    res = ato(["install", "local/my-mac-app", "--registry", registry.url, "--yes", "--json"])
    assert res.code == 1 and "darwin/arm64" in error_of(res)["message"], res.stderr
    store = paths.store_dir()
    assert not store.exists() or not list(store.rglob("*.capsule")), list(store.rglob("*"))
    assert not paths.apps_dir().exists() or not list(paths.apps_dir().rglob("derived-*"))
    not_installed = ato(["verify", "local/my-mac-app"])
    assert not_installed.code == 1 and "is not installed" in not_installed.stderr
    again = ato(["run", "local/my-mac-app", "--registry", registry.url, "--yes"])  # run does not store it either
    assert again.code == 1 and again.stderr.startswith("error[E100]: local/my-mac-app is a native app"), again.stderr
    assert not store.exists() or not list(store.rglob("*.capsule"))
