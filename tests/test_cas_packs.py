"""The pack store: packs + index, manifests stored in pages, verify, gc, the old layout, crashes, races."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import blake3
import pytest

from cas import tempfiles
from cas.frames import ChunkError, compress
from cas.gc import collect_garbage
from cas.index import PackEntry
from cas.objects import ObjectStore
from cas.payload_manifest import ChunkRef, PayloadManifest
from cas.store import CasStore
from cas.verify import verify_store

ROOT = Path(__file__).resolve().parents[1]


def chunk(i: int, size: int = 5000) -> tuple[str, bytes, bytes]:
    """(hex, raw, frame) of a deterministic chunk."""
    raw = random.Random(i).randbytes(size // 2) + bytes([i % 256]) * (size - size // 2)
    return blake3.blake3(raw).hexdigest(), raw, compress(raw)


def write_pack(store: CasStore, ids: list[int]) -> tuple[str, list[ChunkRef]]:
    refs = []
    with store.packs.writer() as w:
        for i in ids:
            h, raw, frame = chunk(i)
            w.add(h, frame, len(raw))
            refs.append(ChunkRef(h, len(raw), len(frame)))
        name = w.commit()
    assert name is not None
    return name, refs


def test_a_pack_is_its_frames_back_to_back_and_every_chunk_reads_back(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    name, refs = write_pack(store, [1, 2, 1, 3])  # a repeated chunk is written once
    data = (tmp_path / "packs" / name).read_bytes()
    assert data == b"".join(chunk(i)[2] for i in (1, 2, 3))
    for i in (1, 2, 3):
        h, raw, frame = chunk(i)
        assert store.raw(h) == raw and store.frame(h, len(raw)) == frame
    manifest = PayloadManifest(refs)
    store.put_manifest(manifest)
    assert b"".join(store.iter_frames(manifest)) == b"".join(chunk(i)[2] for i in (1, 2, 1, 3))
    assert store.missing_chunks(manifest) == []
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []
    report = verify_store(store)
    assert report.ok and (report.packs_checked, report.objects_checked) == (1, 3)


def test_reads_never_create_an_index(tmp_path: Path) -> None:
    store = CasStore(tmp_path / "cas")
    assert store.locate("ab" * 32) is None and not store.has_chunk("ab" * 32)
    assert list(store.iter_manifest_hashes()) == [] and verify_store(store).ok
    assert not (tmp_path / "cas").exists()


def test_manifests_round_trip_and_a_small_change_adds_one_or_two_pages(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    rng = random.Random(5)
    chunks = [ChunkRef(rng.randbytes(32).hex(), rng.randrange(1, 1 << 18), rng.choice([None, rng.randrange(1 << 18)]))
              for _ in range(3000)]
    first = PayloadManifest(chunks)
    store.put_manifest(first)
    assert store.get_manifest(first.artifact_hash).to_bytes() == first.to_bytes()
    conn = store.packs.index._conn()
    pages_before = conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0]
    assert 20 <= pages_before <= 200  # pages of about 32 entries
    edited = list(chunks)
    edited[1500] = ChunkRef(rng.randbytes(32).hex(), 1234, 99)
    second = PayloadManifest(edited)
    store.put_manifest(second)
    assert store.get_manifest(second.artifact_hash).to_bytes() == second.to_bytes()
    assert conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0] - pages_before <= 2
    store.remove_manifests([first.artifact_hash])
    assert store.get_manifest(second.artifact_hash).chunks == edited  # shared pages survive
    assert list(store.iter_manifest_hashes()) == [second.artifact_hash]


def test_a_one_chunk_change_grows_a_new_index_by_a_few_kilobytes(tmp_path: Path) -> None:
    """The bytes a one-file rebuild adds to the index: its new chunk-list pages and payload row, in 1 KiB
    database pages (with 4 KiB pages each took a whole page plus overflow: 12 KiB for the bench tree)."""
    store = CasStore(tmp_path)
    rng = random.Random(7)
    chunks = [ChunkRef(rng.randbytes(32).hex(), rng.randrange(1, 1 << 18), rng.randrange(1 << 18)) for _ in range(2400)]
    store.put_manifest(PayloadManifest(chunks))
    conn = store.packs.index._conn()
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 1024

    def size() -> int:
        return conn.execute("PRAGMA page_count").fetchone()[0] * 1024

    grown = []
    for i in (300, 1200, 2100):
        before = size()
        edited = list(chunks)
        edited[i] = ChunkRef(rng.randbytes(32).hex(), 1234, 99)
        store.put_manifest(PayloadManifest(edited))
        grown.append(size() - before)
    assert max(grown) <= 8 * 1024, grown


def test_a_damaged_pack_is_found_by_the_frame_check_and_by_verify(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    name, refs = write_pack(store, [1, 2, 3])
    path = tmp_path / "packs" / name
    data = bytearray(path.read_bytes())
    where = store.locate(refs[1].raw_hash)
    assert where is not None
    data[where.offset + where.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkError) as err:
        store.frame(refs[1].raw_hash)
    assert err.value.kind == "corrupt"
    report = verify_store(store)
    assert not report.ok and report.corrupt == [f"blake3:{refs[1].raw_hash}"] and report.objects_ok == 2
    path.unlink()
    report = verify_store(store)
    assert not report.ok and report.packs_broken[0]["pack"] == name


def test_gc_drops_dead_packs_repacks_mostly_dead_ones_and_keeps_installed_artifacts(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    dead_pack, dead_refs = write_pack(store, [10, 11])
    mixed_pack, mixed_refs = write_pack(store, [20, 21, 22, 23])
    live = PayloadManifest([mixed_refs[0]])
    store.put_manifest(live)
    store.put_manifest(PayloadManifest(dead_refs))
    # an installed artifact: adopted as a pack and hard-linked from outside packs/
    installed = tmp_path / "store" / "a.capsule"
    installed.parent.mkdir()
    h, raw, frame = chunk(30)
    installed.write_bytes(b"head" + frame + b"tail")
    store.packs.adopt(installed, "a" * 64 + ".capsule",
                      [PackEntry(h, 4, len(frame), len(raw), blake3.blake3(frame).digest())])
    report = collect_garbage(store, [live.artifact_hash])
    assert (report.manifests_removed, report.packs_repacked) == (1, 1)
    names = sorted(p.name for p in (tmp_path / "packs").iterdir())
    assert dead_pack not in names and mixed_pack not in names and "a" * 64 + ".capsule" in names
    assert store.raw(mixed_refs[0].raw_hash) == chunk(20)[1]
    assert store.raw(h) == raw  # the installed artifact's chunks stay served
    assert all(store.locate(r.raw_hash) is None for r in dead_refs + mixed_refs[1:])
    assert verify_store(store).ok
    # once the artifact is uninstalled (no other link), its pack goes too
    installed.unlink()
    collect_garbage(store, [live.artifact_hash])
    assert not (tmp_path / "packs" / ("a" * 64 + ".capsule")).exists() and store.locate(h) is None


def test_an_old_one_file_per_chunk_store_is_read_then_moved_into_a_pack(tmp_path: Path) -> None:
    old = ObjectStore(tmp_path)
    refs = []
    for i in range(5):
        h, raw, frame = chunk(40 + i)
        old.put(raw)
        refs.append(ChunkRef(h, len(raw), len(frame)))
    dead_h = old.put(b"nobody needs this" * 300)[0]
    manifest = PayloadManifest(refs)
    legacy = tmp_path / "manifests" / "blake3" / f"{manifest.artifact_hash}.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(manifest.to_bytes())
    store = CasStore(tmp_path)
    assert list(store.iter_manifest_hashes()) == [manifest.artifact_hash]
    assert b"".join(store.iter_raw(store.get_manifest(manifest.artifact_hash))) == b"".join(
        chunk(40 + i)[1] for i in range(5))
    assert verify_store(store).ok
    report = collect_garbage(store, [manifest.artifact_hash])
    assert (report.legacy_objects_migrated, report.objects_removed) == (5, 1)
    assert not (tmp_path / "objects").exists() and not legacy.exists()
    assert store.locate(dead_h) is None and all(store.locate(r.raw_hash) for r in refs)
    assert b"".join(store.iter_frames(manifest)) == b"".join(chunk(40 + i)[2] for i in range(5))
    assert verify_store(store).ok


WRITER = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    import blake3
    from cas.frames import compress
    from cas.payload_manifest import ChunkRef, PayloadManifest
    from cas.store import CasStore

    store, seed, packs = CasStore(Path(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    for n in range(packs):
        refs = []
        with store.shared(), store.packs.writer() as w:
            for _ in range(40):
                i = rng.randrange(200)  # writers overlap: the same chunks in several packs
                raw = random.Random(i).randbytes(3000) + bytes([i]) * 20000
                h = blake3.blake3(raw).hexdigest()
                w.add(h, compress(raw), len(raw))
                refs.append(ChunkRef(h, len(raw)))
            w.commit()
            store.put_manifest(PayloadManifest(refs))
        print(n, flush=True)
""")


def _writer(root: Path, seed: int, packs: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed), str(packs)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_and_readers_leave_a_sound_store(tmp_path: Path) -> None:
    procs = [_writer(tmp_path, seed, 6) for seed in range(4)]
    store = CasStore(tmp_path)
    errors: list[BaseException] = []

    def reader() -> None:  # threads of one process reading while the processes write
        try:
            while any(p.poll() is None for p in procs):
                for h in store.packs.index.payload_hashes():
                    for frame in store.iter_frames(store.get_manifest(h)):
                        assert frame
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for p in procs:
        assert p.wait(timeout=300) == 0
    for t in threads:
        t.join()
    assert not errors, errors
    report = verify_store(store)
    assert report.ok and report.manifests_checked == 24 and report.packs_checked == 24, report.to_json()
    assert list(tempfiles.find(tmp_path, recursive=True)) == [] and report.unindexed_packs == []


def test_kill_9_while_writing_packs_leaves_a_sound_store_and_gc_sweeps_the_rest(tmp_path: Path) -> None:
    for attempt in range(4):
        proc = _writer(tmp_path, 100 + attempt, 50)
        assert proc.stdout is not None
        proc.stdout.readline()  # one pack committed: the next is somewhere in flight
        time.sleep(random.Random(attempt).random() * 0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = verify_store(CasStore(tmp_path))
        assert report.ok, report.to_json()
    store = CasStore(tmp_path)
    # a pack renamed into place but never recorded (killed between rename and commit)
    (tmp_path / "packs" / ("f" * 32 + ".pack")).write_bytes(chunk(1)[2])
    assert "f" * 32 + ".pack" in verify_store(store).unindexed_packs
    collect_garbage(store, list(store.iter_manifest_hashes()))
    report = verify_store(store)
    assert report.ok and list(tempfiles.find(tmp_path, recursive=True)) == [] and report.unindexed_packs == []


def test_gc_waits_for_an_operation_in_flight_and_keeps_what_it_then_references(tmp_path: Path) -> None:
    store = CasStore(tmp_path)
    gc_script = "import sys; from pathlib import Path; from cas.store import CasStore; from cas.gc import " \
                "collect_garbage; import json; r = collect_garbage(CasStore(Path(sys.argv[1])), json.loads(sys.argv[2]));" \
                " print(r.packs_removed)"
    with store.shared():  # a build: chunks written, its record (the gc root) not yet
        _name, refs = write_pack(store, [50, 51])
        manifest = PayloadManifest(refs)
        gc = subprocess.Popen([sys.executable, "-c", gc_script, str(tmp_path), json.dumps([manifest.artifact_hash])],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _blocked_on_flock(gc.pid):  # wait until gc is really queued behind us
            assert gc.poll() is None and time.monotonic() < deadline, "gc did not wait for the shared lock"
            time.sleep(0.02)
        store.put_manifest(manifest)
    out, _ = gc.communicate(timeout=60)
    assert gc.returncode == 0 and out.strip() == "0"
    assert store.raw(refs[0].raw_hash) == chunk(50)[1] and verify_store(store).ok


def _blocked_on_flock(pid: int) -> bool:
    """True when ``pid`` waits for a file lock (/proc/locks shows waiters with '->')."""
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "->" in parts:  # "N: -> FLOCK ADVISORY WRITE <pid> <dev:inode> ..."
            i = parts.index("->")
            if parts[i + 1:i + 2] == ["FLOCK"] and parts[i + 4:i + 5] == [str(pid)]:
                return True
    return False
