"""The CAS layer: tree digest, Merkle root, objects, chunking, canonical JSON, verify, gc."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
import rfc8785

from cas.canonical import canonical_json
from cas.chunker import chunk_spans
from cas.gc import collect_garbage
from cas.merkle import merkle_root
from cas.objects import ObjectError, ObjectStore
from cas.payload_manifest import ChunkRef, PayloadManifest, PayloadManifestError
from cas.store import CasStore
from cas.tree import TreeDigestError, tree_digest
from cas.verify import verify_store
from stages.payload import ChunkSink, FrameSink


def _independent_tree_digest(root: Path) -> str:
    """CONTRACTS.md §2 written out again from the text, sharing no code with cas.tree."""
    h = blake3.blake3()

    def visit(path: Path, rel: str) -> None:
        st = path.lstat()
        if path.is_symlink():
            h.update(f"symlink\0{rel}\0{0}\0".encode() + os.readlink(path).encode() + b"\0")
        elif path.is_dir():
            if rel:
                h.update(f"dir\0{rel}\0{st.st_mode:o}\0".encode())
            for child in sorted(os.listdir(path), key=os.fsencode):
                visit(path / child, f"{rel}/{child}" if rel else child)
        else:
            data = path.read_bytes()
            h.update(f"file\0{rel}\0{st.st_mode:o}\0{len(data)}\0".encode() + data + b"\0")

    visit(root, "")
    return h.hexdigest()


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "b" / "nested" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b" / "nested" / "data.bin").write_bytes(bytes(range(256)) * 10)
    tool = root / "b" / "run.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (root / "Z-upper").write_text("sorted by bytes: Z before a\n")
    os.symlink("b/run.sh", root / "link")
    return root


def test_tree_digest_matches_independent_implementation(sample_tree: Path) -> None:
    assert tree_digest(sample_tree) == _independent_tree_digest(sample_tree)


def test_tree_digest_sees_modes_content_and_links_but_not_mtime(sample_tree: Path) -> None:
    base = tree_digest(sample_tree)
    os.utime(sample_tree / "a.txt", (1, 1))
    assert tree_digest(sample_tree) == base
    (sample_tree / "a.txt").chmod(0o600)
    assert tree_digest(sample_tree) != base
    (sample_tree / "a.txt").chmod(0o644)
    assert tree_digest(sample_tree) == base
    (sample_tree / "link").unlink()
    os.symlink("a.txt", sample_tree / "link")
    assert tree_digest(sample_tree) != base


def test_tree_digest_of_single_file_uses_empty_relpath(tmp_path: Path) -> None:
    f = tmp_path / "one"
    f.write_bytes(b"xyz")
    mode = f.lstat().st_mode
    expected = blake3.blake3(f"file\0\0{mode:o}\0{3}\0".encode() + b"xyz\0").hexdigest()
    assert tree_digest(f) == expected


def test_tree_digest_refuses_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(TreeDigestError, match="pipe"):
        tree_digest(tmp_path)


def test_merkle_root_rules() -> None:
    a, b, c = (blake3.blake3(x).hexdigest() for x in (b"a", b"b", b"c"))
    assert merkle_root([]) == blake3.blake3(b"").hexdigest()
    assert merkle_root([a]) == a
    ab = blake3.blake3(bytes.fromhex(a) + bytes.fromhex(b)).digest()
    cc = blake3.blake3(bytes.fromhex(c) + bytes.fromhex(c)).digest()
    assert merkle_root([a, b, c]) == blake3.blake3(ab + cc).hexdigest()


def test_the_old_one_file_per_chunk_layout_reads_and_detects_corruption(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    hex_digest, frame, inserted = store.put(b"hello world" * 100)
    assert inserted and store.get(hex_digest) == b"hello world" * 100
    path = store.path(hex_digest)
    assert path.relative_to(tmp_path).parts[:4] == ("objects", "blake3", hex_digest[:2], hex_digest[2:4])
    assert store.put(b"hello world" * 100)[2] is False
    path.write_bytes(frame[:-3] + b"\0\0\0")
    with pytest.raises(ObjectError) as err:
        store.get(hex_digest)
    assert err.value.kind == "corrupt"
    # The next put of the same bytes heals the damaged object.
    store.put(b"hello world" * 100)
    assert store.get(hex_digest) == b"hello world" * 100


def test_missing_object_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ObjectError) as err:
        ObjectStore(tmp_path).get("ab" * 32)
    assert err.value.kind == "missing"


def _sink_chunks(data: bytes, tmp_path: Path, piece: int) -> list[ChunkRef]:
    store = CasStore(tmp_path / f"cas-{piece}")
    with ThreadPoolExecutor(2) as pool, store.packs.writer() as writer:
        frames = FrameSink(writer)
        sink = ChunkSink(store, frames, pool, 2, segment=300_000)
        for i in range(0, len(data), piece):
            sink.write(data[i:i + piece])
        sink.close()
        writer.commit()
    return frames.refs


def test_streaming_chunking_equals_whole_buffer_chunking(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(3_000_000)
    whole = [blake3.blake3(data[o:o + n]).hexdigest() for o, n in chunk_spans(data)]
    for piece in (4096, 100_003, 1_000_000):
        assert [r.raw_hash for r in _sink_chunks(data, tmp_path, piece)] == whole


def test_content_defined_chunks_survive_an_insertion() -> None:
    data = random.Random(1).randbytes(2_000_000)
    edited = data[:1_000_000] + b"inserted bytes" + data[1_000_000:]
    before = {blake3.blake3(data[o:o + n]).digest() for o, n in chunk_spans(data)}
    after = [blake3.blake3(edited[o:o + n]).digest() for o, n in chunk_spans(edited)]
    changed = [h for h in after if h not in before]
    assert 1 <= len(changed) <= 3, "an insertion should only change the chunks around it"


def _random_doc(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-(2**40), 2**40)
    if kind == 1:
        return "".join(rng.choice("ab\"\\\n\t\x01é€😀 /") for _ in range(rng.randrange(8)))
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.random() * 1000  # floats take the rfc8785 path
    if kind in (4, 5):
        return {"".join(rng.choice("zyxaAé😀_") for _ in range(rng.randrange(1, 5))): _random_doc(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [_random_doc(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_canonical_json_is_rfc8785() -> None:
    rng = random.Random(42)
    for _ in range(500):
        doc = _random_doc(rng)
        assert canonical_json(doc) == rfc8785.dumps(doc)


def test_payload_manifest_hash_and_tamper_detection() -> None:
    m = PayloadManifest([ChunkRef("11" * 32, 10, 5), ChunkRef("22" * 32, 20, None)])
    doc = json.loads(m.to_bytes())
    assert doc["total_raw_size"] == 30
    assert PayloadManifest.from_json(doc).artifact_hash == m.artifact_hash
    # Size hints are not part of the identity.
    doc2 = dict(doc, chunks=[dict(c, zstd_size_hint=999) for c in doc["chunks"]])
    assert PayloadManifest.from_json(doc2).artifact_hash == m.artifact_hash
    doc["chunks"][0]["raw_size"] = 11
    doc["total_raw_size"] = 31
    with pytest.raises(PayloadManifestError, match="artifact_hash mismatch"):
        PayloadManifest.from_json(doc)


def test_verify_and_gc(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    kept = [store.objects.put(bytes([i]) * 5000)[0] for i in range(3)]
    orphan = store.objects.put(b"orphan" * 1000)[0]
    live = PayloadManifest([ChunkRef(h, 5000, None) for h in kept])
    dead = PayloadManifest([ChunkRef(orphan, 6000, None)])
    store.put_manifest(live)
    store.put_manifest(dead)
    assert verify_store(store).ok
    report = collect_garbage(store, [live.artifact_hash], dry_run=True)
    assert (report.objects_removed, report.manifests_removed) == (1, 1)
    assert store.objects.has(orphan)
    report = collect_garbage(store, [live.artifact_hash])
    assert (report.objects_removed, report.objects_kept, report.manifests_removed) == (1, 3, 1)
    # the live chunks moved from the old one-file-per-chunk layout into a pack
    assert not store.has_chunk(orphan) and all(store.locate(h) for h in kept)
    assert [store.raw(h) for h in kept] == [bytes([i]) * 5000 for i in range(3)]
    pack = next((tmp_path / "packs").iterdir())
    where = store.locate(kept[0])
    data = bytearray(pack.read_bytes())
    data[where.offset + 5] ^= 1
    pack.write_bytes(bytes(data))
    bad = verify_store(store)
    assert not bad.ok and bad.corrupt == [f"blake3:{kept[0]}"]
