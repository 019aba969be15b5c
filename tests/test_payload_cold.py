"""The cold packer: the payload it packs is the contract's tar, cut and compressed, whatever the
segment size; files that change size while they are read are refused; a second cold pack into the
same store adds nothing and yields the same payload.

The expected bytes are built here from the contract alone (ustar headers, padding, two zero
blocks; FastCDC 16/64/256 KiB; one zstd level-3 frame per chunk with its content size), not by
the code under test.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import blake3
import pytest
import zstandard
from fastcdc import fastcdc_cy

from cas.store import CasStore
from cas.verify import verify_store
from pipeline.errors import AtoError
from stages.capsule import tar_header
from stages.payload import iter_payload_views, pack_cold
from stages.sources import PackFilter, SourceEntry, collect
from tests.hostile_support import never_blocks

EPOCH = 1_700_000_000


def make_tree(root: Path) -> None:
    rng = random.Random(5)
    for i in range(60):
        size = rng.choice([0, 1, 511, 512, 513, 4_000, 40_000, 150_000])
        path = root / f"d{i % 3}" / f"f{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size // 2) + b"text " * ((size - size // 2) // 5) + b"x" * ((size - size // 2) % 5))
    (root / "big.bin").write_bytes(rng.randbytes(1_300_000))  # more than a small segment: streamed through several
    (root / "huge.txt").write_bytes(b"".join(b"line %d\n" % i for i in range(400_000)))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("d0")


def expected(entries: list[SourceEntry]) -> tuple[bytes, list[tuple[str, int]], dict[str, tuple[str, str]]]:
    """(payload.tar.zst, [(chunk BLAKE3, raw size)], {path: (BLAKE3, SHA-256)}) from the contract."""
    tar = bytearray()
    digests = {}
    for e in entries:
        if e.kind == "symlink":
            tar += tar_header.header(e.relpath, mode=e.mode, mtime=EPOCH, symlink_to=e.link_target)
            continue
        data = e.data if e.data is not None else Path(e.abspath).read_bytes()
        tar += tar_header.header(e.relpath, size=len(data), mode=e.mode, mtime=EPOCH)
        tar += data + b"\0" * (-len(data) % 512)
        digests[e.relpath] = (blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest())
    tar += b"\0" * 1024
    comp = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    frames, chunks = [], []
    for c in fastcdc_cy.fastcdc_cy(bytes(tar), 16 * 1024, 64 * 1024, 256 * 1024, fat=False, hf=None):
        raw = bytes(tar[c.offset:c.offset + c.length])
        frames.append(comp.compress(raw))
        chunks.append((blake3.blake3(raw).hexdigest(), len(raw)))
    return b"".join(frames), chunks, digests


@pytest.mark.parametrize("segment", [300_000, 1_000_000, None])
def test_cold_pack_is_the_contract_whatever_the_segment_size(tmp_path: Path, segment: int | None) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    entries = collect(root, PackFilter(None, ()))
    entries.append(SourceEntry("zz-generated.toml", "zz-generated.toml", "file", 0o644, 12, data=b"generated=1\n"))
    payload, chunks, digests = expected(entries)
    store = CasStore(tmp_path / "cas")
    result = pack_cold(entries, store, EPOCH, segment=segment)
    assert [(c.raw_hash, c.raw_size) for c in result.manifest.chunks] == chunks
    assert b"".join(bytes(v) for v in iter_payload_views(store, result.manifest)) == payload
    assert result.payload_blake3 == blake3.blake3(payload).hexdigest()
    assert {e.relpath: e.blake3 for e in result.entries if e.kind == "file"} == {k: v[0] for k, v in digests.items()}
    assert {f.path: f.sha256 for f in result.files} == {k: v[1] for k, v in digests.items()}
    assert [e.relpath for e in result.entries] == [e.relpath for e in entries]
    assert result.chunks_inserted == len({h for h, _ in chunks}) and result.bytes_inserted > 0
    report = verify_store(store)
    assert report.ok and report.objects_checked == len({h for h, _ in chunks})
    # the same payload again into the same store: every chunk is found, nothing is added
    again = pack_cold(collect(root, PackFilter(None, ())) + entries[-1:], store, EPOCH, segment=segment)
    assert again.manifest.chunks == result.manifest.chunks and again.payload_blake3 == result.payload_blake3
    assert again.new_pack is None and again.chunks_inserted == 0


@pytest.mark.parametrize("name", ["f00.txt", "big.bin"])
@pytest.mark.parametrize("change", ["grew", "shrank"])
def test_a_file_that_changed_size_since_the_walk_is_refused(tmp_path: Path, name: str, change: str) -> None:
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f00.txt").write_bytes(b"a" * 5_000)
    (root / "big.bin").write_bytes(random.Random(1).randbytes(700_000))
    entries = collect(root, PackFilter(None, ()))
    target = next(root.rglob(name))
    data = target.read_bytes()
    target.write_bytes(data + b"more" if change == "grew" else data[:-10])
    store = CasStore(tmp_path / "cas")
    with pytest.raises(AtoError) as err:
        pack_cold(entries, store, EPOCH, segment=300_000)
    assert err.value.code == "E102" and name in str(err.value)
    assert not [p for p in (store.root / "tmp").glob("*") if p.is_file()], "the temp pack is removed"
    assert not (store.root / "packs").exists() or not list((store.root / "packs").iterdir())


def test_a_pack_write_error_leaves_no_temp_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    entries = collect(root, PackFilter(None, ()))
    store = CasStore(tmp_path / "cas")

    def full(*_a: object) -> int:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError):
        pack_cold(entries, store, EPOCH, segment=300_000)
    assert not [p for p in (store.root / "tmp").glob("*") if p.is_file()]


def test_a_file_replaced_by_a_fifo_after_the_walk_is_refused_not_waited_on(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_bytes(b"a" * 100)
    entries = collect(root, PackFilter(None, ()))
    (root / "a.txt").unlink()
    os.mkfifo(root / "a.txt")

    with never_blocks("the packer, on a FIFO"), pytest.raises(AtoError) as err:
        pack_cold(entries, CasStore(tmp_path / "cas"), EPOCH)
    assert err.value.code == "E102" and "a.txt" in str(err.value)
