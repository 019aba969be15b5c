"""Hostile artifacts against a real `ato registry serve`, from the publishing side: `ato publish`
refuses every class of issue 12 before uploading (the same code as every other entry point), and a
raw upload of the same bytes is refused by the registry (413/422) with its data dir unchanged; bombs
cost neither the client nor the server more than 200 MB. What a registry would serve anyway is in
test_hostile_registry.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import httpx
import pytest

from tests.e2e.hostile_cases import (
    BOMBS,
    CASES,
    MAX_RSS,
    TRUST_ONLY,
    VERSION,
    assert_refused,
    run_ato,
    slug,
    vm_hwm,
)
from tests.e2e.registry_support import TOKEN, Registry, settle, snapshot

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
