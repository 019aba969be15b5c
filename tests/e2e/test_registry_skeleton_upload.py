"""The registry's skeleton-ahead upload (``PUT`` with ``x-ato-skeleton``): the bytes around the
artifact's payload come first, so that the artifact is judged as it arrives. Whatever the skeleton
claims, what is stored is the artifact's own bytes, judged whole by the one verifier, and a refusal
is the one a plain upload of the same bytes gets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import httpx
import pytest

from stages.capsule import read_capsule
from tests.e2e.hostile_cases import MAIN
from tests.e2e.registry_support import TOKEN, Registry, settle, snapshot
from tests.hostile_support import Entry, capsule

VERSION = "1.0.0"


@pytest.fixture
def registry(hostile_registry: Registry) -> Registry:
    return hostile_registry  # an empty registry for this module's uploads (tests/conftest.py)


def skeleton_of(path: Path) -> tuple[bytes, bytes]:
    c = read_capsule(path)
    data = path.read_bytes()
    return data[:c.payload_offset], data[c.payload_offset + c.payload_size:]


def put(reg: Registry, name: str, data: bytes, skeleton: tuple[bytes, bytes] | None,
        header: str | None = None) -> httpx.Response:
    head = skeleton[0] + skeleton[1] if skeleton else b""
    headers = {"Authorization": f"Bearer {TOKEN}", "x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
               "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest(),
               "x-ato-skeleton": header or (f"{len(skeleton[0])},{len(skeleton[1])}" if skeleton else "")}
    if not headers["x-ato-skeleton"]:
        del headers["x-ato-skeleton"]
    return httpx.put(f"{reg.url}/v1/local/capsules/local/{name}/{VERSION}", params={"file_name": f"{name}-{VERSION}.capsule"},
                     content=head + data, headers=headers, timeout=120)


def test_an_artifact_with_its_skeleton_ahead_is_stored_as_itself(registry: Registry, tmp_path: Path) -> None:
    art = capsule(tmp_path / f"ahead-{VERSION}.capsule", "ahead", VERSION, [MAIN, Entry("data.bin", b"x" * 300_000)])
    data = art.read_bytes()
    r = put(registry, "ahead", data, skeleton_of(art))
    assert r.status_code == 201, r.text
    assert r.json()["blake3"] == "blake3:" + blake3.blake3(data).hexdigest() and r.json()["size_bytes"] == len(data)
    got = httpx.get(f"{registry.url}/v1/artifacts/local/ahead/{VERSION}/{art.name}", timeout=60)
    assert got.status_code == 200 and got.content == data


def test_a_hostile_payload_behind_its_own_skeleton_is_refused_as_a_plain_upload_is(
        registry: Registry, tmp_path: Path) -> None:
    art = capsule(tmp_path / f"behind-{VERSION}.capsule", "behind", VERSION,
                  [MAIN, Entry("data.bin", b"y" * 300_000), Entry("../../escape.txt", b"owned\n")])
    data = art.read_bytes()
    before = snapshot(registry.data_dir)
    plain = put(registry, "behind", data, None)
    ahead = put(registry, "behind", data, skeleton_of(art))
    assert plain.status_code == ahead.status_code == 422, (plain.text, ahead.text)
    assert ahead.json() == plain.json() and ahead.json()["error"] == "unsafe_payload"
    assert ahead.json()["message"].startswith(f"{art.name}: "), ahead.text
    assert settle(registry.data_dir, before) == before


def test_a_lying_skeleton_decides_nothing(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = capsule(tmp_path / "good" / f"liar-{VERSION}.capsule", "liar", VERSION, [MAIN, Entry("a.txt", b"a\n")])
    bad = capsule(tmp_path / "bad" / f"liar-{VERSION}.capsule", "liar", VERSION,
                  [MAIN, Entry("a.txt", b"a\n"), Entry("../../escape.txt", b"owned\n")])
    before = snapshot(registry.data_dir)
    # hostile bytes behind an honest artifact's skeleton: refused as themselves
    r = put(registry, "liar", bad.read_bytes(), skeleton_of(good))
    assert r.status_code == 422 and r.json()["error"] == "unsafe_payload", r.text
    assert settle(registry.data_dir, before) == before
    # good bytes behind a hostile artifact's skeleton: stored, and what is stored is the good artifact
    data = good.read_bytes()
    r = put(registry, "liar", data, skeleton_of(bad))
    assert r.status_code == 201, r.text
    got = httpx.get(f"{registry.url}/v1/artifacts/local/liar/{VERSION}/{good.name}", timeout=60)
    assert got.status_code == 200 and got.content == data


@pytest.mark.parametrize("header", ["12", "1,2,3", "a,b", "-1,5", "99999999,1"])
def test_a_malformed_skeleton_header_is_refused(registry: Registry, tmp_path: Path, header: str) -> None:
    art = capsule(tmp_path / f"malformed-{VERSION}.capsule", "malformed", VERSION, [MAIN])
    before = snapshot(registry.data_dir)
    r = put(registry, "malformed", art.read_bytes(), None, header=header)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    assert settle(registry.data_dir, before) == before
