"""The native install chain (pipeline.native_delivery): fetch -> finalize -> project as doit steps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline import native_delivery, paths
from pipeline.errors import AtoError
from stages import project as project_stage
from tests.e2e.registry_support import forge_capsule
from tests.native_support import build_in_process, independent_tree_digest, native_project, trust

LABELS = {"scoped_id": "local/hello-native", "registry": "http://127.0.0.1:9"}


def _build(root: Path, **kwargs) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("ATO_HOME", str(root / "home" / ".ato"))
        return Path(build_in_process(native_project(root / "proj", **kwargs))["artifact"])


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("v1"), message="hello v1")


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("v2"), version="0.2.0", message="hello v2")


def install(capsule: Path, version: str = "0.1.0", project: bool = True) -> dict:
    return native_delivery.install_native(capsule, version=version, project=project, trust=trust(), **LABELS)


def launcher_output() -> str:
    return subprocess.run([str(paths.user_bin_dir() / "hello-native")], capture_output=True, text=True).stdout


def test_install_is_a_noop_the_second_time_and_repairs_an_altered_app(v1: Path) -> None:
    first = install(v1)
    assert first["install_kind"] == "NativeRequiresLocalDerivation"
    app = Path(first["launchable"]["DerivedApp"]["path"])
    assert first["local_derivation"]["derived_app_path"] == str(app)
    assert first["projection"]["state"] == "ok" and launcher_output() == "hello v1\n"
    second = install(v1)
    assert second == first
    assert len(list(app.parent.parent.glob("derived-*"))) == 1
    # the derived app was altered: the next install derives a fresh one and moves the launcher to it
    with open(app, "ab") as fh:
        fh.write(b"\0")
    third = install(v1)
    new_app = Path(third["launchable"]["DerivedApp"]["path"])
    assert new_app != app and independent_tree_digest(new_app) == third["local_derivation"]["derived_digest"]
    assert third["projection"]["state"] == "ok" and third["projection"]["projection_id"] != \
        first["projection"]["projection_id"]
    assert [r["derived_app_path"] for _p, r in project_stage.load_records()] == [str(new_app)]


def test_a_new_version_moves_the_launcher(v1: Path, v2: Path) -> None:
    one = install(v1)
    two = install(v2, "0.2.0")
    assert one["local_derivation"]["parent_digest"] != two["local_derivation"]["parent_digest"]
    assert two["projection"]["state"] == "ok" and launcher_output() == "hello v2\n"
    assert len(project_stage.load_records()) == 1
    assert Path(one["launchable"]["DerivedApp"]["path"]).is_file()  # the old derived app is kept


def test_a_failed_projection_does_not_fail_the_install(v1: Path) -> None:
    paths.applications_dir().mkdir(parents=True)
    (paths.applications_dir() / "hello-native.desktop").write_text("[Desktop Entry]\nName=someone else's\n")
    doc = install(v1)
    assert doc["projection"] == {"performed": False, "projection_id": None, "projected_path": None,
                                 "state": "failed", "schema_version": "0.1", "metadata_path": None}
    assert Path(doc["launchable"]["DerivedApp"]["path"]).is_file()
    assert not paths.user_bin_dir().exists()


def test_no_project_skips_the_launcher(v1: Path) -> None:
    doc = install(v1, project=False)
    assert doc["projection"]["state"] == "skipped" and not paths.applications_dir().exists()


def test_payload_delivery_detects_native_artifacts(v1: Path, tmp_path: Path) -> None:
    assert b"[artifact]" in native_delivery.payload_delivery(v1)
    plain = forge_capsule(tmp_path / "plain.capsule", "plain", "0.1.0", members=[("main.py", b"print(1)\n")])
    assert native_delivery.payload_delivery(plain) is None


def test_consent_gate() -> None:
    native_delivery.consent_gate(yes=True, interactive=False, ask=None)
    native_delivery.consent_gate(yes=False, interactive=True, ask=lambda _q: True)
    with pytest.raises(AtoError) as info:
        native_delivery.consent_gate(yes=False, interactive=False, ask=lambda _q: True)
    assert info.value.message.endswith("Re-run with --yes.")
    assert [p.code for p in info.value.problems] == ["ATO_ERR_CONSENT_REQUIRED"]
    with pytest.raises(AtoError) as info:
        native_delivery.consent_gate(yes=False, interactive=True, ask=lambda _q: False)
    assert "--yes" in info.value.message
