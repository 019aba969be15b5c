"""Projection: desktop entries (escaping, desktop-file-validate), command symlinks, conflicts, the
ok/broken inspection, and unproject removing exactly what project created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cas.digest import label
from cas.tree import tree_digest
from pipeline import native_delivery, paths
from pipeline.errors import AtoError
from stages import finalize as finalize_stage
from stages import project as project_stage
from stages.project import escape_exec_arg, escape_string, render_desktop, sanitize_command
from tests.conftest import assert_schema
from tests.native_support import build_in_process, native_project, snapshot, trust

PROJECT_FIELDS = ["projection_id", "metadata_path", "launcher_dir", "projected_path", "derived_app_path",
                  "parent_digest", "derived_digest", "state", "problems", "created", "schema_version"]
UNPROJECT_FIELDS = ["projection_id", "metadata_path", "projected_path", "removed_projected_path", "removed_metadata",
                    "state_before", "problems_before", "schema_version"]
VALIDATE = shutil.which("desktop-file-validate")


@pytest.fixture(scope="module")
def native_capsule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("ATO_HOME", str(root / "home" / ".ato"))
        return Path(build_in_process(native_project(root / "proj"))["artifact"])


def derive(capsule_path: Path, out: Path) -> Path:
    cache = Path(native_delivery.fetch_local(capsule_path, trust=trust())["cache_dir"])
    return finalize_stage.finalize(cache, out, trust=trust()).derived_app


def refused(fn, *args, **kwargs) -> AtoError:
    if fn is project_stage.project:
        kwargs.setdefault("trust", trust())
    with pytest.raises(AtoError) as info:
        fn(*args, **kwargs)
    return info.value


def launcher_state(home: Path) -> dict:
    return {"applications": snapshot(paths.applications_dir()), "bin": snapshot(paths.user_bin_dir()),
            "local": snapshot(home / ".local"), "records": project_stage.load_records()}


# ---------------------------------------------------------------- names and escaping


@pytest.mark.parametrize(("raw", "want"), [("My App", "my-app"), ("My...App", "my-app"), ("my___app", "my___app"),
                                           ("---", "ato-app"), ("Ünïcode app", "n-code-app"), ("", "ato-app")])
def test_sanitize_command(raw: str, want: str) -> None:
    assert sanitize_command(raw) == want


def test_escaping_follows_the_desktop_entry_spec() -> None:
    assert escape_string("a\\b\nc\td\re") == "a\\\\b\\nc\\td\\re"
    assert escape_string(" lead") == "\\slead"
    assert escape_exec_arg("/home/u/.local/bin/app") == "/home/u/.local/bin/app"
    assert escape_exec_arg("/home/my user/bin/app") == '"/home/my user/bin/app"'
    # inside quotes " ` $ \ are backslash-escaped, then the string escape doubles every backslash
    assert escape_exec_arg('/a"b$c`d\\e') == '"/a\\\\"b\\\\$c\\\\`d\\\\\\\\e"'
    assert escape_exec_arg("/a/100%") == "/a/100%%"
    with pytest.raises(AtoError):
        render_desktop("x", "/a\x01b", "/a")


@pytest.mark.skipif(VALIDATE is None, reason="desktop-file-validate (desktop-file-utils) is not installed")
@pytest.mark.parametrize("path", ["/home/u/.local/bin/app", "/home/my user/bin/app", '/tmp/we"ird $dir/`x`\\y/100%',
                                  "/tmp/tab\there/app", "/tmp/ünï/app"])
def test_rendered_entries_pass_desktop_file_validate(path: str, tmp_path: Path) -> None:
    f = tmp_path / "app.desktop"
    f.write_bytes(render_desktop(" My App\\", path, path.rsplit("/", 1)[0]))
    proc = subprocess.run([VALIDATE, str(f)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


# ---------------------------------------------------------------- project / ls / unproject


def test_project_ls_unproject_lifecycle(native_capsule: Path, tmp_path: Path, isolated_home: Path) -> None:
    app = derive(native_capsule, tmp_path / "dist")
    before = launcher_state(isolated_home)
    doc = project_stage.project(app, trust=trust())
    assert list(doc) == PROJECT_FIELDS
    assert_schema(doc, "project")
    desktop = paths.applications_dir() / "hello-native.desktop"
    command = paths.user_bin_dir() / "hello-native"
    assert (doc["projected_path"], doc["launcher_dir"]) == (str(desktop), str(paths.applications_dir()))
    assert (doc["state"], doc["problems"], doc["created"]) == ("ok", [], True)
    assert doc["derived_digest"] == label(tree_digest(app))
    assert desktop.read_text() == ("[Desktop Entry]\nType=Application\nVersion=1.0\nName=hello\n"
                                   f"Exec={command}\nPath={app.parent}\nTerminal=false\n")
    assert os.readlink(command) == str(app)
    assert subprocess.run([str(command)], capture_output=True, text=True).stdout == "hello from native\n"
    record = json.loads(Path(doc["metadata_path"]).read_text())
    assert_schema(record, "projection-record")
    assert record["projection_kind"] == "linux-desktop-entry"
    assert set(record["created_dirs"]) >= {str(paths.applications_dir()), str(paths.user_bin_dir())}
    # the same derived app again: a no-op returning the existing projection
    again = project_stage.project(app, trust=trust())
    assert again["created"] is False and again["projection_id"] == doc["projection_id"]
    listing = project_stage.list_projections()
    assert_schema(listing, "project-ls")
    assert (listing["total"], listing["broken"]) == (1, 0)
    assert listing["projections"][0]["state"] == "ok"
    assert listing["projections"][0]["projection_kind"] == "linux-desktop-entry"
    # move the derived app away: broken, derived_app_missing
    moved = tmp_path / "moved"
    app.rename(moved)
    item = project_stage.list_projections()["projections"][0]
    assert (item["state"], item["problems"]) == ("broken", ["derived_app_missing"])
    moved.rename(app)
    out = project_stage.unproject(doc["projection_id"])
    assert list(out) == UNPROJECT_FIELDS
    assert_schema(out, "unproject")
    assert (out["removed_projected_path"], out["removed_metadata"], out["state_before"]) == (True, True, "ok")
    after = launcher_state(isolated_home)
    assert after["applications"] == before["applications"] and after["bin"] == before["bin"]
    assert after["local"] == before["local"]
    assert project_stage.list_projections() == {"projections": [], "total": 0, "broken": 0}
    assert app.is_file()  # never touches the derived app


def test_unproject_keeps_launcher_dirs_that_existed(native_capsule: Path, tmp_path: Path, isolated_home: Path) -> None:
    paths.applications_dir().mkdir(parents=True)
    (paths.applications_dir() / "other.desktop").write_text("[Desktop Entry]\n")
    paths.user_bin_dir().mkdir(parents=True)
    before = launcher_state(isolated_home)
    doc = project_stage.project(derive(native_capsule, tmp_path / "dist"), trust=trust())
    record = json.loads(Path(doc["metadata_path"]).read_text())
    assert record["created_dirs"] == []
    project_stage.unproject(doc["projected_path"])  # by launcher path
    after = launcher_state(isolated_home)
    assert after["applications"] == before["applications"] and after["bin"] == before["bin"]


def test_conflicts_are_refused_and_leave_nothing(native_capsule: Path, tmp_path: Path, isolated_home: Path) -> None:
    app = derive(native_capsule, tmp_path / "dist")
    paths.applications_dir().mkdir(parents=True)
    foreign = paths.applications_dir() / "hello-native.desktop"
    foreign.write_text("[Desktop Entry]\nName=not ours\n")
    before = launcher_state(isolated_home)
    err = refused(project_stage.project, app)
    assert err.message == f"Projection name conflict: launcher path already exists: {foreign}"
    assert launcher_state(isolated_home) == before
    foreign.unlink()
    paths.user_bin_dir().mkdir(parents=True)
    (paths.user_bin_dir() / "hello-native").write_text("#!/bin/sh\n")
    before = launcher_state(isolated_home)
    err = refused(project_stage.project, app)
    assert err.message == f"Projection command conflict: command path already exists: {paths.user_bin_dir() / 'hello-native'}"
    assert launcher_state(isolated_home) == before
    (paths.user_bin_dir() / "hello-native").unlink()
    # a second derived app of the same capsule wants the same launcher name
    first = project_stage.project(app, trust=trust())
    other = derive(native_capsule, tmp_path / "dist2")
    err = refused(project_stage.project, other)
    assert err.message == (f"Projection name conflict: '{first['projected_path']}' is already managed by projection "
                           f"{first['projection_id']}")
    # a broken projection of the same derived app is not silently replaced
    (paths.user_bin_dir() / "hello-native").unlink()
    err = refused(project_stage.project, app)
    assert err.message.startswith("Derived app is already projected via ") and "Use 'ato unproject' first." in err.message


def test_broken_states_and_unproject_refusals(native_capsule: Path, tmp_path: Path) -> None:
    app = derive(native_capsule, tmp_path / "dist")
    doc = project_stage.project(app, trust=trust())
    desktop, command = Path(doc["projected_path"]), paths.user_bin_dir() / "hello-native"

    def problems() -> list[str]:
        return project_stage.list_projections()["projections"][0]["problems"]

    command.unlink()
    assert problems() == ["projected_command_missing"]
    command.symlink_to("/bin/sh")
    assert problems() == ["projected_command_target_mismatch"]
    err = refused(project_stage.unproject, doc["projection_id"])
    assert err.message.startswith(f"Refusing to remove unexpected projected path: {command} (not the command symlink")
    assert desktop.exists() and Path(doc["metadata_path"]).exists()  # nothing removed
    command.unlink()
    command.symlink_to(app)
    original = desktop.read_bytes()
    desktop.write_bytes(original + b"X-Edited=true\n")
    assert problems() == ["projected_desktop_entry_mismatch"]
    err = refused(project_stage.unproject, doc["projection_id"])
    assert "its content is not the desktop entry ato project wrote" in err.message
    desktop.write_bytes(original)
    desktop.unlink()
    assert problems() == ["projected_path_missing"]
    desktop.write_bytes(original)
    with open(app, "ab") as fh:
        fh.write(b"\0")
    assert problems() == ["derived_digest_mismatch"]
    out = project_stage.unproject(str(app))  # by derived app path; works on a broken projection
    assert (out["state_before"], out["problems_before"]) == ("broken", ["derived_digest_mismatch"])
    assert not desktop.exists() and not os.path.lexists(command)


def test_project_refuses_an_altered_or_unfinalized_app(native_capsule: Path, tmp_path: Path) -> None:
    app = derive(native_capsule, tmp_path / "dist")
    want = label(tree_digest(app))
    app.chmod(0o700)
    err = refused(project_stage.project, app)
    assert err.code == "E208"
    assert err.message == f"Derived artifact digest mismatch: expected {want}, got {label(tree_digest(app))}"
    app.chmod(0o755)
    prov = app.parent / "local-derivation.json"
    doc = json.loads(prov.read_text())
    doc["local_signature"]["signature"] = doc["local_signature"]["signature"][:-4] + "AAA="
    prov.write_text(json.dumps(doc))
    err = refused(project_stage.project, app)
    assert "failed its local derivation check (derived_signature_invalid)" in err.message
    loose = tmp_path / "loose"
    loose.write_bytes(app.read_bytes())
    err = refused(project_stage.project, loose)
    assert err.message.startswith("ato project requires an ato finalize output containing local-derivation.json")
    assert not paths.applications_dir().exists() and not paths.user_bin_dir().exists()
    assert project_stage.load_records() == []


def test_a_dir_app_needs_exactly_one_command(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "bin").mkdir(parents=True)
    for name in ("a", "b"):
        (app / "bin" / name).write_text("#!/bin/sh\n")
        (app / "bin" / name).chmod(0o755)
    err = refused(project_stage.command_target, app)
    assert err.message == ("Projection input contains multiple executable command candidates within 3 levels of "
                           f"{app}: bin/a, bin/b")
    (app / "app").write_text("#!/bin/sh\n")
    (app / "app").chmod(0o755)
    assert project_stage.command_target(app) == app / "app"  # <dir>/<stem> wins
    (app / "app").unlink()
    (app / "bin" / "b").chmod(0o644)
    assert project_stage.command_target(app) == app / "bin" / "a"


def test_macos_symlink_projection(native_capsule: Path, tmp_path: Path) -> None:
    """The darwin path (kind ``symlink``), exercised on any host with a finalize output made by hand
    (its origin is a real fetch: project checks the artifact a derived app came from)."""
    fetched = native_delivery.fetch_local(native_capsule, trust=trust())
    origin = json.loads((Path(fetched["cache_dir"]) / "fetch.json").read_text())
    out = tmp_path / "derived-20260101T000000Z-0a0b0c0d"
    macos = out / "My App.app" / "Contents" / "MacOS"
    macos.mkdir(parents=True)
    (macos / "My App").write_text("bin")
    (macos / "My App").chmod(0o755)
    app = out / "My App.app"
    digest = label(tree_digest(app))
    prov = {"schema_version": "0.1", "scoped_id": "acme/my-app", "version": "1.0.0", "registry": "http://r",
            "artifact_blake3": origin["artifact_blake3"], "parent_digest": origin["parent_digest"],
            "derived_digest": digest, "framework": "tauri",
            "target": "darwin/arm64", "finalized_locally": True, "finalize_tool": "codesign",
            "finalized_at": "2026-01-01T00:00:00Z"}
    (out / "local-derivation.json").write_text(json.dumps(prov))
    launcher = tmp_path / "Applications"
    err = refused(project_stage.project, app, launcher)
    assert err.message == ("Projection input target 'darwin/arm64' is unsupported on this host; expected a "
                           "linux/<arch> target")
    doc = project_stage.project(app, launcher, host="darwin/arm64", trust=trust())
    assert doc["projected_path"] == str(launcher / "My App.app")
    assert os.readlink(launcher / "My App.app") == str(app)
    record = json.loads(Path(doc["metadata_path"]).read_text())
    assert record["projection_kind"] == "symlink" and "projected_command_path" not in record
    assert_schema(record, "projection-record")
    out_doc = project_stage.unproject(doc["projection_id"])
    assert out_doc["removed_projected_path"] is True
    assert not os.path.lexists(launcher / "My App.app") and not launcher.exists()


def test_unproject_errors(native_capsule: Path, tmp_path: Path) -> None:
    err = refused(project_stage.unproject, "0123456789abcdef")
    assert err.message == f"No projection metadata found in {paths.projections_dir()}"
    project_stage.project(derive(native_capsule, tmp_path / "dist"), trust=trust())
    err = refused(project_stage.unproject, "0123456789abcdef")
    assert err.message == "Projection not found: 0123456789abcdef"
    (paths.projections_dir() / "garbage.json").write_text("{not json")
    err = refused(project_stage.list_projections)
    assert err.code == "E208" and "garbage.json" in err.message
