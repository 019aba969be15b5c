"""Hostile artifacts through the registry's chunk protocol, the way `ato publish` uploads a delta:
the frames to ``/v1/sync/chunks`` (one session), then the skeleton to ``/v1/sync/commit``; and a
bomb frame straight to ``PUT /v1/chunks/{hash}``. A client that skips `ato publish`'s own check
gets the same refusal as a whole upload (test_hostile_publish.py): nothing is stored, the data dir
is unchanged, and a bomb costs the server under 200 MB of memory."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import time
from pathlib import Path

import blake3
import httpx
import pytest

from stages.capsule.payload import read_frame
from tests.e2e.hostile_cases import BOMBS, CASES, MAX_RSS, TRUST_ONLY, VERSION, slug, vm_hwm
from tests.e2e.registry_support import TOKEN, Registry, snapshot

AUTH = {"Authorization": f"Bearer {TOKEN}"}




def _state(reg: Registry, before: dict | None = None) -> dict:
    """The data dir once in-flight cleanup has finished, less the empty sessions dir this server
    process keeps in tmp/ once its first chunk session was opened (it holds no data; it goes at shutdown)."""
    deadline = time.monotonic() + 30
    while True:
        snap = snapshot(reg.data_dir)
        snap = {k: v for k, v in snap.items() if not (k.startswith("tmp/.sessions.") and v == ("dir",)
                                                      and not any(o.startswith(k + "/") for o in snap))}
        if before is None or snap == before or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def _members(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) of each outer-tar member, read by hand (as a hostile client would;
    every case keeps its members whole, even the one cut in its trailing padding)."""
    out, pos = {}, 0
    while pos + 512 <= len(data) and data[pos:pos + 512].strip(b"\0"):
        head = data[pos:pos + 512]
        name = head[:100].split(b"\0", 1)[0].decode()
        size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        out[name] = (pos + 512, size)
        pos += 512 + size + (-size % 512)
    return out


def _frames(payload: bytes) -> list[bytes]:
    fh, frames = io.BytesIO(payload), []
    while (frame := read_frame(fh, limit=len(payload) + 1)) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize("case", sorted(set(CASES) - set(TRUST_ONLY)))
def test_the_chunk_protocol_refuses_what_a_whole_upload_refuses(case: str, hostile_artifacts: dict[str, Path],
                                                                hostile_registry: Registry) -> None:
    data = hostile_artifacts[case].read_bytes()
    members = _members(data)
    p_off, p_size = members["payload.tar.zst"]
    m_off, m_size = members["payload.v3.manifest.json"]
    chunks = json.loads(data[m_off:m_off + m_size])["chunks"]
    before = _state(hostile_registry)
    session = secrets.token_hex(16)

    staged = httpx.post(f"{hostile_registry.url}/v1/sync/chunks", params={"session": session}, headers=AUTH,
                        timeout=300, content=b"".join(_frames(data[p_off:p_off + p_size])))
    if case == "single-chunk-bomb":  # a frame that declares more than one chunk: refused while staging
        assert staged.status_code == 422 and staged.json()["error"] == "chunk_validation_failed", staged.text
    else:
        assert staged.status_code == 200, staged.text
        commit = {"publisher": "local", "slug": slug(case), "version": VERSION,
                  "file_name": f"{slug(case)}-{VERSION}.capsule",
                  "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                  "blake3": "blake3:" + blake3.blake3(data).hexdigest(),
                  "prefix": base64.b64encode(data[:p_off]).decode(),
                  "suffix": base64.b64encode(data[p_off + p_size:]).decode(),
                  "chunks": [{"raw_hash": c["raw_hash"], "raw_size": c["raw_size"]} for c in chunks]}
        r = httpx.post(f"{hostile_registry.url}/v1/sync/commit", params={"session": session}, json=commit, headers=AUTH,
                       timeout=300)
        # the same answer as PUT of the whole artifact (test_hostile_publish.py)
        assert r.status_code == (413 if CASES[case].code == "E212" else 422), r.text
        assert r.json()["error"] in ("invalid_artifact", "unsafe_payload", "payload_too_large")
        assert r.json()["message"].startswith(f"{commit['file_name']}: "), r.text
    assert _state(hostile_registry, before) == before
    assert hostile_registry.get(f"/v1/capsules/by/local/{slug(case)}").status_code == 404
    if case in BOMBS:
        assert vm_hwm(hostile_registry.proc.pid) < MAX_RSS, "the registry's decoding did not stay flat"


def test_a_bomb_frame_put_on_its_own_is_refused(hostile_artifacts: dict[str, Path], hostile_registry: Registry) -> None:
    """``PUT /v1/chunks/{hash}`` with the single-chunk bomb's frame: whether the uploader claims its true
    size or a small one, the frame is refused before it is decoded past one chunk, and nothing is stored."""
    data = hostile_artifacts["single-chunk-bomb"].read_bytes()
    members = _members(data)
    p_off, p_size = members["payload.tar.zst"]
    m_off, m_size = members["payload.v3.manifest.json"]
    (chunk,) = json.loads(data[m_off:m_off + m_size])["chunks"]
    (frame,) = _frames(data[p_off:p_off + p_size])
    before = _state(hostile_registry)
    for claimed in (chunk["raw_size"], 4096):
        for params in ({}, {"session": secrets.token_hex(16)}):
            r = httpx.put(f"{hostile_registry.url}/v1/chunks/{chunk['raw_hash']}", params=params, content=frame,
                          headers={**AUTH, "x-raw-size": str(claimed)}, timeout=120)
            assert r.status_code == 422 and r.json()["error"] == "chunk_validation_failed", r.text
    assert _state(hostile_registry, before) == before
    assert vm_hwm(hostile_registry.proc.pid) < MAX_RSS, "the registry's decoding did not stay flat"
