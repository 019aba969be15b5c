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


def test_a_verdict_passed_along_is_judged_as_the_file_would_be(tmp_path: Path) -> None:
    """Install verifies a download once and hands the verdict to the trust port: a verdict judged under a
    higher ceiling, or a skeleton's, never stands in for the port's own check of the file."""
    from stages.capsule import Limits, verdict_under, verify, verify_skeleton
    from stages.trust_port import GatedPort

    art = build(make_project(tmp_path / "u"), tmp_path / "u.capsule")
    gate.configure(allow_unsigned=True, limits=Limits(max_payload=16))
    port = gate.port()
    lenient = verify(art, Limits(max_payload=None))
    assert lenient.ok and lenient.limits == Limits(max_payload=None)
    assert verdict_under(lenient, lenient.limits) is lenient  # passed along, not read again
    with pytest.raises(AtoError) as err:
        port.accept(lenient, None)
    assert err.value.code == "E212"
    seen: list[object] = []
    with pytest.raises(AtoError):
        GatedPort(port, seen.append).accept(lenient, None)
    assert seen == []  # the gate runs only after the artifact was accepted
    gate.configure(allow_unsigned=True)
    fine = gate.port()
    verdict = verify(art, fine.limits)
    gated = GatedPort(fine, seen.append)
    assert gated.accept(verdict, None)["signed"] is False and seen == [verdict]
    data = art.read_bytes()
    capsule = verdict.capsule
    assert capsule is not None
    start, end = capsule.payload_offset, capsule.payload_offset + capsule.payload_size
    skeleton = verify_skeleton(data[:start], end - start, data[end:])
    with pytest.raises(ValueError):
        verdict_under(skeleton, fine.limits)
