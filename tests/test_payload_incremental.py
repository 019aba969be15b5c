"""An incremental payload equals a cold one, bit for bit, and reads only what changed.

Random trees with files large enough to span several chunks, random edits (content changed in
the middle, appended, truncated, files added, removed, renamed, modes flipped, symlinks retargeted),
then the incremental packer against a cold pack of the edited tree into a fresh store.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cas.store import CasStore
from cas.verify import verify_store
from pipeline.errors import AtoError
from stages.payload import Previous, pack_cold, pack_incremental, payload_hash
from stages.sources import PackFilter, collect
from tests.hostile_support import never_blocks

EPOCH = 0


def make_tree(root: Path, rng: random.Random, files: int) -> None:
    for i in range(files):
        path = root / f"d{i % 4}" / f"f{i:03d}.{rng.choice(['py', 'bin', 'txt'])}"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 10, 900, 5_000, 70_000, 300_000, 700_000])
        data = rng.randbytes(size // 2) + bytes([i % 251]) * (size - size // 2)
        path.write_bytes(data)
    (root / "link").symlink_to("d0")


def edit(root: Path, rng: random.Random) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    victim = rng.choice(files)
    kind = rng.choice(["middle", "append", "truncate", "add", "remove", "rename", "chmod", "relink", "same"])
    data = victim.read_bytes()
    if kind == "middle" and data:
        at = rng.randrange(len(data))
        victim.write_bytes(data[:at] + rng.randbytes(rng.randrange(1, 50)) + data[at + 1:])
    elif kind == "append":
        victim.write_bytes(data + rng.randbytes(rng.randrange(1, 100_000)))
    elif kind == "truncate":
        victim.write_bytes(data[: len(data) // 3])
    elif kind == "add":
        (victim.parent / f"new{rng.randrange(10**6)}.dat").write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
    elif kind == "remove":
        victim.unlink()
    elif kind == "rename":
        victim.rename(victim.with_name("renamed-" + victim.name))
    elif kind == "chmod":
        victim.chmod(0o755 if not os.access(victim, os.X_OK) else 0o644)
    elif kind == "relink":
        (root / "link").unlink()
        (root / "link").symlink_to(rng.choice(["d1", "d2", "d3/f003.py"]))
    else:
        victim.write_bytes(data)  # touched: new mtime, same bytes
    return kind


def cold(root: Path, store_root: Path):
    return pack_cold(collect(root, PackFilter(None, ())), CasStore(store_root), EPOCH)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_cold_after_random_edits(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "tree"
    make_tree(root, rng, 30)
    store_root = tmp_path / "store"
    store = CasStore(store_root)
    result = cold(root, store_root)
    store.put_manifest(result.manifest)
    for step in range(4):
        before = {e.relpath: e.stat_key for e in collect(root, PackFilter(None, ()))}
        kinds = [edit(root, rng) for _ in range(rng.randrange(1, 3))]
        entries = collect(root, PackFilter(None, ()))
        changed = {e.relpath for e in entries if before.get(e.relpath) != e.stat_key}
        prev = Previous(result.entries, {f.path: f.sha256 for f in result.files}, result.manifest, EPOCH)
        inc = pack_incremental(entries, store, EPOCH, prev, changed)
        assert inc is not None
        store.put_manifest(inc.manifest)
        ref = cold(root, tmp_path / f"fresh-{step}")
        assert [c.raw_hash for c in inc.manifest.chunks] == [c.raw_hash for c in ref.manifest.chunks], kinds
        assert inc.manifest.to_bytes() == ref.manifest.to_bytes()
        assert inc.payload_blake3 is None  # the artifact step hashes the frames as it copies them
        assert payload_hash(store, inc.manifest) == ref.payload_blake3
        assert inc.files == ref.files and [e.blake3 for e in inc.entries] == [e.blake3 for e in ref.entries]
        assert inc.files_read <= len(changed)
        result = inc
    assert verify_store(store).ok


def test_a_one_byte_change_reads_one_file_and_stores_about_one_chunk(tmp_path: Path) -> None:
    rng = random.Random(99)
    root = tmp_path / "tree"
    for i in range(200):
        p = root / f"f{i:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(20_000))
    store = CasStore(tmp_path / "store")
    first = cold(root, tmp_path / "store")
    store.put_manifest(first.manifest)
    victim = root / "f100.txt"
    data = bytearray(victim.read_bytes())
    data[10_000] ^= 1
    victim.write_bytes(bytes(data))
    entries = collect(root, PackFilter(None, ()))
    prev = Previous(first.entries, {f.path: f.sha256 for f in first.files}, first.manifest, EPOCH)
    inc = pack_incremental(entries, store, EPOCH, prev, {"f100.txt"})
    assert inc is not None and inc.files_read == 1
    assert 1 <= inc.chunks_inserted <= 2, inc.chunks_inserted
    assert inc.bytes_inserted < 3 * 64 * 1024


def test_a_changed_file_replaced_by_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The incremental step reads the changed files itself: a FIFO put in one's place after the walk
    must be refused as a changed file (E102), as the cold packer does, instead of waiting for a writer."""
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.txt").write_bytes(bytes([65 + i]) * 3000)
    store = CasStore(tmp_path / "store")
    first = cold(root, tmp_path / "store")
    store.put_manifest(first.manifest)
    (root / "f2.txt").write_bytes(b"changed" * 500)
    entries = collect(root, PackFilter(None, ()))
    (root / "f2.txt").unlink()
    os.mkfifo(root / "f2.txt")
    prev = Previous(first.entries, {f.path: f.sha256 for f in first.files}, first.manifest, EPOCH)

    with never_blocks("the incremental step, on a FIFO"), pytest.raises(AtoError) as err:
        pack_incremental(entries, store, EPOCH, prev, {"f2.txt"})
    assert err.value.code == "E102" and "f2.txt" in str(err.value)
