"""The run-time gate (pipeline/trust/gate.py): what `ato run` calls before unpacking an artifact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import paths
from pipeline.errors import AtoError
from pipeline.trust import gate
from pipeline.trust import store as trust_store
from stages.capsule import keys as sign
from tests.conftest import forget_local_builds
from tests.test_trust_sign import build, make_project


@pytest.fixture(autouse=True)
def fresh_config():
    gate.configure()
    yield
    gate.configure()


def test_unconfigured_gate_fails_closed(tmp_path: Path) -> None:
    unsigned = build(make_project(tmp_path / "u"), tmp_path / "u.capsule")
    forget_local_builds()
    with pytest.raises(AtoError) as err:
        gate.verify_before_run(unsigned)
    assert err.value.code == "E301"
    signed = build(make_project(tmp_path / "s"), tmp_path / "s.capsule", sign.generate_key())
    with pytest.raises(AtoError) as err:
        gate.verify_before_run(signed)
    assert err.value.problems[0].code == "ATO_ERR_CONSENT_REQUIRED"


def test_installed_artifact_is_checked_against_its_publisher_and_revocation(tmp_path: Path) -> None:
    k = sign.generate_key()
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", k)
    dest = paths.store_dir() / "acme" / "signed-app" / "1.0.0" / "signed-app-1.0.0.capsule"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(art, dest)
    notes: list[str] = []
    gate.configure(assume_yes=True, notify=notes.append)
    summary = gate.verify_before_run(dest)
    assert summary["signed"] and summary["trust"]["identity"] == "acme" and notes
    gate.configure()
    assert gate.verify_before_run(dest)["trust"]["status"] == "pinned"
    with trust_store.transaction() as s:
        s.revoke(k.did, "leaked", "local")
    with pytest.raises(AtoError) as err:
        gate.verify_before_run(dest)
    assert err.value.code == "E208" and "revoked" in err.value.message


def test_allow_unsigned_and_tampering(tmp_path: Path) -> None:
    art = build(make_project(tmp_path / "u"), tmp_path / "u.capsule")
    gate.configure(allow_unsigned=True)
    assert gate.verify_before_run(art)["signed"] is False
    data = bytearray(art.read_bytes())
    data[len(data) // 3] ^= 1
    art.write_bytes(bytes(data))
    with pytest.raises(AtoError) as err:
        gate.verify_before_run(art)
    assert err.value.code == "E208"
