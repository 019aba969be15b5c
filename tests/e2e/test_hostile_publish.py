"""Hostile artifacts against a real `ato registry serve`, from the publishing side: `ato publish`
refuses every class of issue 12 before uploading (the same code as every other entry point), and a
raw upload of the same bytes is refused by the registry (413/422) with its data dir unchanged; bombs
cost neither the client nor the server more than 200 MB. What a registry would serve anyway is in
test_hostile_registry.py."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import blake3
import httpx
import pytest

from stages.capsule import keys, read_capsule
from tests.e2e.hostile_cases import (
    BOMBS,
    CASES,
    MAIN,
    MAX_RSS,
    TRUST_ONLY,
    VERSION,
    _tampered,
    assert_refused,
    run_ato,
    slug,
    vm_hwm,
)
from tests.e2e.registry_support import TOKEN, Registry, settle, snapshot
from tests.hostile_support import Entry, capsule, with_signature

AUTH = {"Authorization": f"Bearer {TOKEN}"}




@pytest.mark.parametrize("case", sorted(CASES))
def test_publish_refuses_before_uploading_and_the_registry_refuses_the_bytes(
        case: str, hostile_artifacts: dict[str, Path], hostile_registry: Registry) -> None:
    art = hostile_artifacts[case]
    before = snapshot(hostile_registry.data_dir)
    res, rss = run_ato(["publish", "--artifact", str(art), "--registry", hostile_registry.url],
                       env={"ATO_TOKEN": TOKEN})
    if case in TRUST_ONLY:  # a registry stores any signer's artifact: trust is each consumer's decision
        assert res.code == 0, res.stderr
        return
    assert_refused(res, CASES[case].code, f"publish of {case}")
    assert snapshot(hostile_registry.data_dir) == before
    data = art.read_bytes()
    r = httpx.put(f"{hostile_registry.url}/v1/local/capsules/local/{slug(case)}/{VERSION}",
                  params={"file_name": art.name}, content=data, timeout=120,
                  headers={**AUTH, "x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                           "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest()})
    assert r.status_code == (413 if CASES[case].code == "E212" else 422), r.text
    assert r.json()["error"] in ("invalid_artifact", "unsafe_payload", "payload_too_large")
    assert r.json()["message"].startswith(f"{art.name}: "), r.text  # the upload's name, not a temp file's
    assert settle(hostile_registry.data_dir, before) == before
    if case in BOMBS:
        assert rss < MAX_RSS, f"publish of {case}: peak RSS {rss / 1e6:.0f} MB"
        assert vm_hwm(hostile_registry.proc.pid) < MAX_RSS, "the registry's decoding did not stay flat"


def _large(tmp: Path, name: str, *tail: Entry, edit: Callable[[dict], bytes] | None = None) -> Path:
    """An artifact large enough that publish judges its payload while it uploads (stages.publish.OVERLAP_BYTES);
    ``edit``: signed, then its signature.json document changed."""
    from stages.publish import OVERLAP_BYTES

    blob = Entry("blob.bin", os.urandom(OVERLAP_BYTES + (2 << 20)))  # incompressible: the file is as large
    out = tmp / f"{name}-{VERSION}.capsule"
    if edit is not None:
        return with_signature(out, name, VERSION, [MAIN, blob, *tail], keys.generate_key(), edit)
    return capsule(out, name, VERSION, [MAIN, blob, *tail])


@pytest.mark.parametrize("case", ["dotdot-last", "tampered-signature"])
def test_a_large_hostile_artifact_is_refused_before_its_last_byte_and_never_stored(
        case: str, tmp_path: Path, hostile_registry: Registry) -> None:
    name = f"h-large-{case}"
    if case == "dotdot-last":  # found by the stream, while most of the file is already on its way
        art = _large(tmp_path, name, Entry("../../escape.txt", b"owned\n"))
    else:  # found in the small members, before anything is sent
        art = _large(tmp_path, name, edit=_tampered)
    expected = run_ato(["verify", str(art)])[0]
    assert_refused(expected, "E208", f"verify of {name}")
    before = snapshot(hostile_registry.data_dir)
    res, _rss = run_ato(["publish", "--artifact", str(art), "--registry", hostile_registry.url],
                        env={"ATO_TOKEN": TOKEN})
    assert_refused(res, "E208", f"publish of {name}")
    error_line = next(line for line in res.stderr.splitlines() if line.startswith("error["))
    assert error_line == next(line for line in expected.stderr.splitlines() if line.startswith("error["))
    assert settle(hostile_registry.data_dir, before) == before  # a partial upload was dropped
    r = httpx.get(f"{hostile_registry.url}/v1/capsules/by/local/{name}", timeout=30)
    assert r.status_code == 404, r.text


def test_a_large_artifact_goes_whole_and_the_line_says_so(tmp_path: Path, hostile_registry: Registry) -> None:
    art = _large(tmp_path, "large-ok")
    res, _rss = run_ato(["publish", "--artifact", str(art), "--registry", hostile_registry.url, "--json"],
                        env={"ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    transfer = doc["publish"]["transfer"]
    deploy = next(p for p in doc["phases"] if p["name"] == "deploy")
    assert deploy["message"].startswith("uploaded the whole artifact ("), deploy
    size = art.stat().st_size
    layout = read_capsule(art)
    ahead = layout.payload_offset + (size - layout.payload_offset - layout.payload_size)
    assert transfer["mode"] == "full" and transfer["bytes_total"] == size
    assert transfer["bytes_uploaded"] == size + ahead  # the small members went ahead: judged as it arrived
    assert transfer["chunks_uploaded"] == transfer["chunks_total"] > 0
    data = art.read_bytes()
    r = httpx.get(f"{hostile_registry.url}/v1/artifacts/local/large-ok/{VERSION}/{art.name}", timeout=60)
    assert r.status_code == 200 and r.content == data
    again, _rss = run_ato(["publish", "--artifact", str(art), "--registry", hostile_registry.url,
                           "--allow-existing"], env={"ATO_TOKEN": TOKEN})
    assert again.code == 0 and "Existing release reused" in again.stdout, again.stderr
