"""The payload stage: project files -> normalized tar -> content-defined chunks in one new pack.

Cold: every file is opened and read once, straight into a segment buffer of the tar; the same
bytes give its BLAKE3 (the inputs digest), its SHA-256 (the SBOM) and its part of the tar. The tar
is never written out: each full segment is cut into chunks by content, the chunks are hashed and
looked up in the store, and the new ones are compressed (one deterministic zstd frame per chunk)
on zstd's own threads while this thread reads on; the files' digests are taken on a pool thread.
New frames go into one pack, in payload order; ``payload.tar.zst`` is the concatenation of the
frames, so the artifact and the store hold the very same bytes and a chunk is compressed once.

Incremental (the previous build's record and the list of files doit found changed): only the
changed files are read. The new tar is described as runs of bytes that are unchanged from the
previous tar (shifted) and runs that are new. Content-defined chunking decides a cut from the bytes
since the previous cut alone, so wherever a cut of the new tar lands, inside an unchanged run, on
a cut of the previous tar, every following chunk of that run is the previous chunk again: those
are reused without reading anything, and only the regions around the changes are chunked, from
the bytes of the changed files and of the previous chunks. The result is the cold result, bit for
bit (tests check it), at the cost of the change.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import struct
import tarfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from cas.chunker import DEFAULT_PARAMS, chunk_spans
from cas.frames import compress, compress_spans
from cas.index import Location
from cas.packs import FrameSpan, PackWriter
from cas.payload_manifest import ChunkRef, PayloadManifest
from cas.store import CasStore
from cas.streams import ChunkStream
from pipeline.errors import E_LOCKFILE, AtoError
from pipeline.progress import SILENT, Progress
from stages.capsule import tar_header
from stages.capsule.archive import FileRange
from stages.sources import SourceEntry, with_blake3

COPY_SIZE = 1 << 20
WHOLE_FILE = 8 << 20  # files up to this size are read with one read() call
TRAILER = b"\0" * (tar_header.BLOCK * 2)
ZEROS = bytes(tar_header.BLOCK)
RECORD_NAME = "payload.record"  # in a build's state dir (a gc root: pipeline.cas_roots reads it)
RECORD_MAGIC = b"ato-payload-record/2\n"
STATS_MAGIC = b"ato-payload-stats/1\n"
_LEN = struct.Struct(">I")
_ROW = struct.Struct(">?HQ32s32s")  # symlink?, mode, size, BLAKE3, SHA-256
_STAT = struct.Struct(">qqqq")  # size, mtime_ns, ctime_ns, inode
_NO_DIGEST = bytes(32)
_NO_STAT = (-1, -1, -1, -1)
INCREMENTAL_MAX_BYTES = 64 << 20  # changed files are held in memory: more than this makes the build cold


@dataclass(frozen=True)
class PackedFile:
    """What the SBOM needs of one payload file."""

    path: str
    sha256: str


@dataclass
class PayloadResult:
    manifest: PayloadManifest
    entries: list[SourceEntry]  # with their BLAKE3s
    files: list[PackedFile]  # SHA-256 of each regular file, for the SBOM
    # BLAKE3 of payload.tar.zst (the frames in order) when the step saw every frame go by (cold, stored);
    # None when most frames were taken unread from the last build: the artifact step hashes them as it copies
    payload_blake3: str | None
    new_pack: str | None
    chunks_inserted: int
    bytes_inserted: int
    mode: str  # "cold" | "incremental" | "stored"
    files_read: int = 0
    read_paths: set[str] | None = None  # the files read (incremental); None: every file was read


# ---------------------------------------------------------------- the tar, entry by entry


def header(entry: SourceEntry, epoch: int) -> bytes:
    if entry.kind == "symlink":
        return tar_header.header(entry.relpath, mode=entry.mode, mtime=epoch, symlink_to=entry.link_target or "")
    return tar_header.header(entry.relpath, size=entry.size, mode=entry.mode, mtime=epoch)


def header_size(entry: SourceEntry | RecordedEntry) -> int:
    """The size of :func:`header`'s output, without building it when it is one plain ustar block."""
    link = entry.link_target or ""
    if len(entry.relpath) <= 100 and entry.relpath.isascii() and len(link) <= 100 and link.isascii() \
            and entry.size < 8**11:
        return tar_header.BLOCK
    return len(header(entry, 0))


def _changed_while_packing(entry: SourceEntry) -> AtoError:
    return AtoError(E_LOCKFILE, f"file changed while packaging: {entry.relpath}", details={"path": entry.relpath})


def read_file(entry: SourceEntry, sink: Callable[[bytes | memoryview], None] | None = None) -> tuple[str, str, bytes | None]:
    """One read of a payload file: (BLAKE3 hex, SHA-256 hex, the bytes when no ``sink`` takes them).

    The size must be the size the walk saw: a file that grows or shrinks meanwhile is refused.
    """
    if entry.data is not None:
        if sink is not None:
            sink(entry.data)
        return blake3.blake3(entry.data).hexdigest(), hashlib.sha256(entry.data).hexdigest(), \
            None if sink else entry.data
    b3, sha = blake3.blake3(), hashlib.sha256()
    kept: list[bytes] = []
    with open(_open_payload_file(entry), "rb") as fh:  # non-blocking: a FIFO swapped in is refused, not waited on
        remaining = entry.size
        while remaining > 0:
            piece = fh.read(min(remaining, WHOLE_FILE))
            if not piece:
                raise _changed_while_packing(entry)
            b3.update(piece)
            sha.update(piece)
            if sink is not None:
                sink(piece)
            else:
                kept.append(piece)
            remaining -= len(piece)
        if fh.read(1):
            raise _changed_while_packing(entry)
    return b3.hexdigest(), sha.hexdigest(), None if sink else b"".join(kept)


# ---------------------------------------------------------------- chunks: hash, look up, compress


@dataclass
class Prepared:
    ref: ChunkRef
    frame: bytes | memoryview
    frame_hash: bytes
    new: bool  # not in the store before this build


def _prepare_known(store: CasStore, hex_digest: str, view: bytes | memoryview, where: Location | None,
                   legacy: bool = True) -> Prepared:
    """The frame of one chunk whose BLAKE3 is known: the stored one when the store has it, else a new one.

    ``legacy`` False skips the look-up in the one-file-per-chunk layout (a store that has none).
    """
    if where is not None and where.raw_size == len(view):
        try:
            frame = bytes(store.packs.frame_view(hex_digest, where))
            return Prepared(ChunkRef(hex_digest, len(view), len(frame)), frame, where.frame_hash, False)
        except Exception:  # noqa: BLE001 - a damaged stored frame: store a fresh one instead
            store.packs.index.forget_location(hex_digest, where.pack)
    if where is None and legacy and store.objects.has(hex_digest):  # the layout of earlier versions
        try:
            frame = store.objects.read_frame(hex_digest, len(view))
            return Prepared(ChunkRef(hex_digest, len(view), len(frame)), frame, blake3.blake3(frame).digest(), True)
        except Exception:  # noqa: BLE001 - damaged: compressed again below
            pass
    frame = compress(view)
    return Prepared(ChunkRef(hex_digest, len(view), len(frame)), frame, blake3.blake3(frame).digest(), True)


def _prepare(store: CasStore, view: bytes | memoryview) -> Prepared:
    hex_digest = blake3.blake3(view).hexdigest()
    return _prepare_known(store, hex_digest, view, store.locate(hex_digest))


class FrameSink:
    """Takes prepared chunks in payload order: hashes the frames (payload.tar.zst) and packs the new ones."""

    def __init__(self, writer: PackWriter) -> None:
        self.writer = writer
        self.refs: list[ChunkRef] = []
        self.hasher = blake3.blake3()
        self.inserted = 0
        self.bytes_inserted = 0

    def take_many(self, prepared: list[Prepared]) -> None:
        new = []
        for p in prepared:
            self.hasher.update(p.frame)
            self.refs.append(p.ref)
            if p.new and p.ref.raw_hash not in self.writer:
                new.append((p.ref.raw_hash, p.frame, p.ref.raw_size, p.frame_hash))
        for entry in self.writer.add_many(new):
            self.inserted += 1
            self.bytes_inserted += entry.length


@dataclass
class _Segment:
    """One buffer of tar bytes, cut: its chunks, those the store has, and the frames of the new ones."""

    buf: bytearray
    spans: list[tuple[int, int]] = field(default_factory=list)
    hexes: list[str] = field(default_factory=list)
    known: dict[int, Prepared] = field(default_factory=dict)
    fresh: list[int] = field(default_factory=list)
    frames: Future[list[memoryview]] | None = None
    files: list[tuple[int, int, int]] = field(default_factory=list)  # (entry index, offset, size) read into it
    digests: Future[list[tuple[int, str, str]]] | None = None  # their BLAKE3 and SHA-256, on a pool thread
    written: Future[None] | None = None  # its frames hashed and packed, in order, on the pack thread

    def prepared(self) -> list[Prepared]:
        """The chunks in order (waits for the new frames)."""
        made = iter(zip(self.fresh, self.frames.result() if self.frames is not None else [], strict=True))
        out = []
        for k, h in enumerate(self.hexes):
            p = self.known.get(k)
            if p is None:
                j, frame = next(made)
                assert j == k
                p = Prepared(ChunkRef(h, self.spans[k][1], len(frame)), frame, blake3.blake3(frame).digest(), True)
            out.append(p)
        return out


def _hash_files(data: bytearray, files: list[tuple[int, int, int]]) -> list[tuple[int, str, str]]:
    """(entry index, BLAKE3, SHA-256) of the files read into a segment."""
    view = memoryview(data)
    return [(i, blake3.blake3(view[o:o + n]).hexdigest(), hashlib.sha256(view[o:o + n]).hexdigest())
            for i, o, n in files]


class ChunkSink:
    """The payload tar, written into segment buffers that are cut into chunks as they fill.

    Files are read straight into a segment buffer (not copied). A full segment is cut by content;
    its chunks are hashed and looked up in the store on this thread, and two jobs go to the pool:
    the digests of the files read into it (BLAKE3, SHA-256), and the compression of its new chunks
    by zstd's own threads (:func:`compress_spans`, one call that waits without the GIL). A third
    goes to the one pack thread, which takes the segments' frames in order (their digests, the
    payload's BLAKE3, the pack write: ``FrameSink``). So the reading thread, the one that cannot
    be split, keeps only the reads, the cuts and the chunk digests (on the bench tree 0.4 s of CPU,
    from 0.68 s), and the rest runs beside it: under load a process gets CPU per runnable thread,
    and its busiest thread sets its wall-clock time.

    Only the bytes after the last cut are carried into the next segment: FastCDC decides a cut
    from the bytes since the previous cut alone, so every cut but the last in a segment is final.
    A few segments are in flight, so memory stays bounded.
    """

    FLUSH_AT = 4 << 20  # bytes per segment (more than the largest chunk, so every cut makes progress)

    def __init__(self, store: CasStore, frames: FrameSink, pool: ThreadPoolExecutor, workers: int,
                 segment: int | None = None) -> None:
        segment = segment or self.FLUSH_AT
        if segment <= DEFAULT_PARAMS.max_size:
            raise ValueError("a segment must hold more than the largest chunk")
        self.store = store
        self.frames = frames
        self.pool = pool
        self.workers = workers
        self.max_pending = workers + 2
        self.legacy = store.objects.objects.is_dir()  # chunks of an earlier version's layout to look up
        self.digests: dict[int, tuple[str, str]] = {}  # entry index -> (BLAKE3, SHA-256) of files read whole
        self.pending: deque[_Segment] = deque()
        self._free: list[bytearray] = []
        self._packer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ato-pack")  # one: frames in order
        self.seg = _Segment(bytearray(segment))
        self.view = memoryview(self.seg.buf)
        self.fill = 0

    @property
    def room(self) -> int:
        return len(self.seg.buf) - self.fill

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n <= len(self.seg.buf) - self.fill:  # the common case: it fits
            self.seg.buf[self.fill:self.fill + n] = data
            self.fill += n
            return
        pos = 0
        while pos < n:
            if self.room == 0:
                self._cut(final=False)
            take = min(self.room, n - pos)
            self.seg.buf[self.fill:self.fill + take] = data[pos:pos + take]
            self.fill += take
            pos += take

    def small_file_limit(self) -> int:
        """Files up to this size are read into one segment whole."""
        return len(self.seg.buf) - DEFAULT_PARAMS.max_size

    def read_small(self, index: int, fd: int, size: int, probe: bytearray) -> int:
        """Read a file of ``size`` bytes (at most ``small_file_limit``) into the segment (hashed with it
        by a pool thread); returns the bytes read.

        One ``readv`` of one byte more than ``size`` for most files: fewer bytes mean it shrank, more
        that it grew (the caller refuses both).
        """
        if self.room < size:
            self._cut(final=False)
        start = self.fill
        got = 0
        while True:
            n = os.readv(fd, [self.view[start + got:start + size], probe])
            got += n
            if n == 0 or got >= size:
                break
        if got == size:
            self.seg.files.append((index, start, size))
            self.fill += size
        return got

    def read_big(self, fd: int, size: int, hashers: tuple[Any, Any]) -> int:
        """Stream a large file through the segments, hashing it as it goes; returns the bytes read."""
        got = 0
        while got < size:
            if self.room == 0:
                self._cut(final=False)
            take = min(self.room, size - got)
            dest = self.view[self.fill:self.fill + take]
            n = os.readv(fd, [dest])
            if n == 0:
                break
            for h in hashers:
                h.update(dest[:n])
            self.fill += n
            got += n
        return got

    def _cut(self, final: bool) -> None:
        seg, view, store = self.seg, self.view, self.store
        spans = list(chunk_spans(view[:self.fill]))
        if not final and spans:
            spans.pop()  # the tail may continue in the next segment
        seg.spans = spans
        seg.hexes = [blake3.blake3(view[o:o + n]).hexdigest() for o, n in spans]
        found = store.packs.locate_many(seg.hexes)
        for k, (h, (o, n)) in enumerate(zip(seg.hexes, spans, strict=True)):
            where = found.get(h)
            if (where is not None and where.raw_size == n) or (where is None and self.legacy and store.objects.has(h)):
                seg.known[k] = _prepare_known(store, h, view[o:o + n], where, self.legacy)
            else:
                seg.fresh.append(k)
        if seg.files:
            seg.digests = self.pool.submit(_hash_files, seg.buf, seg.files)
        if seg.fresh:
            seg.frames = self.pool.submit(compress_spans, seg.buf, [spans[k] for k in seg.fresh], self.workers)
        seg.written = self._packer.submit(self._pack, seg)
        self.pending.append(seg)
        end = spans[-1][0] + spans[-1][1] if spans else 0
        tail = self.fill - end
        buf = self._free.pop() if self._free else bytearray(len(seg.buf))
        buf[:tail] = view[end:self.fill]
        self.seg = _Segment(buf)
        self.view = memoryview(buf)
        self.fill = tail
        self._drain(0 if final else self.max_pending)

    def _drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            seg = self.pending.popleft()
            if seg.digests is not None:
                for i, b3, sha in seg.digests.result():
                    self.digests[i] = (b3, sha)
            assert seg.written is not None
            seg.written.result()
            self._free.append(seg.buf)

    def _pack(self, seg: _Segment) -> None:
        self.frames.take_many(seg.prepared())

    def close(self) -> None:
        self._cut(final=True)
        self._packer.shutdown()

    def abandon(self) -> None:
        futures = [f for seg in self.pending for f in (seg.written, seg.frames, seg.digests) if f is not None]
        for fut in futures:
            fut.cancel()
        for fut in futures:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - cleaning up after the first error
                pass
        self.pending.clear()
        self._packer.shutdown()


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- cold


def _open_payload_file(entry: SourceEntry) -> int:
    """Open a file the walk saw as a regular file. Non-blocking: a FIFO put in its place meanwhile
    reads as empty at once (and is refused as a changed file) instead of waiting for a writer."""
    return os.open(entry.abspath, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


def pack_cold(entries: list[SourceEntry], store: CasStore, epoch: int, reporter: Progress = SILENT, *,
              segment: int | None = None) -> PayloadResult:
    """Read every file once and pack the payload; the new frames go into one new pack.

    Each file is opened once and read straight into a segment buffer of the tar (``segment`` bytes,
    :class:`ChunkSink`); each full segment is cut, and its files are hashed and its new chunks
    compressed on other threads while this thread reads the next files. A file larger than a
    segment is streamed through several, hashed here as it goes.
    """
    workers = _workers()
    total = sum(e.size for e in entries if e.kind == "file")
    inline: dict[int, tuple[str, str]] = {}  # digests taken on this thread (generated and large files)
    probe = bytearray(1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ato-chunk") as pool, \
            store.packs.writer() as writer, reporter.task("Packing", total=total) as task:
        frames = FrameSink(writer)
        sink = ChunkSink(store, frames, pool, workers, segment)
        small = sink.small_file_limit()
        pad = b""  # the padding of the last file, written with the next header (one call for both)
        try:
            for i, entry in enumerate(entries):
                sink.write(pad + header(entry, epoch) if pad else header(entry, epoch))
                pad = b""
                if entry.kind != "file":
                    continue
                if entry.data is not None:
                    if len(entry.data) != entry.size:
                        raise _changed_while_packing(entry)
                    sink.write(entry.data)
                    inline[i] = (blake3.blake3(entry.data).hexdigest(), hashlib.sha256(entry.data).hexdigest())
                else:
                    fd = _open_payload_file(entry)
                    try:
                        if entry.size <= small:
                            got = sink.read_small(i, fd, entry.size, probe)
                        else:
                            b3, sha = blake3.blake3(), hashlib.sha256()
                            got = sink.read_big(fd, entry.size, (b3, sha))
                            if got == entry.size and os.read(fd, 1):
                                got += 1
                            inline[i] = (b3.hexdigest(), sha.hexdigest())
                    finally:
                        os.close(fd)
                    if got != entry.size:
                        raise _changed_while_packing(entry)
                task.advance(entry.size)
                pad = ZEROS[:(-entry.size) % tar_header.BLOCK]
            sink.write(pad + TRAILER)
            sink.close()
        except BaseException:
            sink.abandon()
            raise
        new_pack = writer.commit()
    digests = {**sink.digests, **inline}
    hashed: list[SourceEntry] = []
    files: list[PackedFile] = []
    for i, entry in enumerate(entries):
        if entry.kind != "file":
            hashed.append(entry)
            continue
        b3, sha = digests[i]
        hashed.append(with_blake3(entry, b3))
        files.append(PackedFile(entry.relpath, sha))
    return PayloadResult(PayloadManifest(frames.refs), hashed, files, frames.hasher.hexdigest(), new_pack,
                         frames.inserted, frames.bytes_inserted, "cold", len(files))


# ---------------------------------------------------------------- incremental


class RecordedEntry(NamedTuple):
    """An entry as a build record keeps it: what the next build compares against. A tuple, not a
    :class:`SourceEntry`: a rebuild decodes ten thousand of them."""

    relpath: str
    kind: str
    mode: int
    size: int
    link_target: str | None
    blake3: str | None


@dataclass
class Previous:
    """What the last build of this project left: its entries (with SHA-256s) and its payload manifest.

    Stored as a compact binary record (``encode``/``decode``): read and written on every build
    that packs, so it must cost little for ten thousand files. Any record that does not decode
    exactly (another version, a truncated file) means a cold build.
    """

    entries: list[SourceEntry] | list[RecordedEntry]
    sha256: dict[str, str]
    manifest: PayloadManifest
    epoch: int

    def encode(self) -> bytes:
        names = "\0".join(e.relpath for e in self.entries).encode("utf-8")
        links = "\0".join(e.link_target or "" for e in self.entries if e.kind == "symlink").encode("utf-8")
        meta = json.dumps({"epoch": self.epoch, "artifact_hash": self.manifest.artifact_hash,
                           "count": len(self.entries)}).encode()
        rows = b"".join(_ROW.pack(e.kind == "symlink", e.mode, e.size,
                                  bytes.fromhex(e.blake3 or "") if e.kind == "file" else _NO_DIGEST,
                                  bytes.fromhex(self.sha256[e.relpath]) if e.kind == "file" else _NO_DIGEST)
                         for e in self.entries)
        return b"".join([RECORD_MAGIC, _LEN.pack(len(meta)), meta, _LEN.pack(len(names)), names,
                         _LEN.pack(len(links)), links, rows])

    @classmethod
    def decode(cls, data: bytes, store: CasStore, whole: dict[str, PayloadManifest] | None = None) -> Previous | None:
        """The record, when it decodes exactly and its payload is still fully in the store (``whole``: manifests
        this process has just read and found whole, by artifact hash)."""
        try:
            if not data.startswith(RECORD_MAGIC):
                return None
            pos = len(RECORD_MAGIC)
            parts = []
            for _ in range(3):
                (n,) = _LEN.unpack_from(data, pos)
                parts.append(data[pos + _LEN.size:pos + _LEN.size + n])
                pos += _LEN.size + n
            meta = json.loads(parts[0])
            count = int(meta["count"])
            names = parts[1].decode("utf-8").split("\0") if count else []
            links = iter(parts[2].decode("utf-8").split("\0"))
            if len(names) != count or len(data) - pos != count * _ROW.size:
                return None
            entries: list[RecordedEntry] = []
            sha = {}
            add, new = entries.append, tuple.__new__
            for rel, (symlink, mode, size, b3, digest) in zip(names, _ROW.iter_unpack(data[pos:]), strict=True):
                if symlink:
                    add(new(RecordedEntry, (rel, "symlink", mode, 0, next(links), None)))
                else:
                    add(new(RecordedEntry, (rel, "file", mode, size, None, b3.hex())))
                    sha[rel] = digest.hex()
            manifest = (whole or {}).get(meta["artifact_hash"])
            if manifest is None:
                manifest = store.get_manifest(meta["artifact_hash"])
                if store.missing_chunks(manifest):
                    return None
            return cls(entries, sha, manifest, int(meta["epoch"]))
        except Exception:  # noqa: BLE001 - any problem with the record means a cold build
            return None


def record_artifact_hash(data: bytes) -> str:
    """The payload a build record names (a gc root), without reading the rest."""
    if not data.startswith(RECORD_MAGIC):
        raise ValueError("not a build record of this ato")
    (n,) = _LEN.unpack_from(data, len(RECORD_MAGIC))
    start = len(RECORD_MAGIC) + _LEN.size
    return str(json.loads(data[start:start + n])["artifact_hash"])


def encode_stats(entries: list[SourceEntry], keys: list[list[int] | None], run: dict[str, Any]) -> bytes:
    """How the last payload step went (``run``), and the stat each entry was read with (None: re-read it)."""
    meta = json.dumps({**run, "count": len(entries)}).encode()
    rows = b"".join(_STAT.pack(*(k if k is not None else _NO_STAT)) for k in keys)
    return b"".join([STATS_MAGIC, _LEN.pack(len(meta)), meta, rows])


def decode_stats(data: bytes, entries: list[SourceEntry] | list[RecordedEntry]
                 ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(run facts, stat by path) from :func:`encode_stats` for the record's ``entries``; empty when unusable."""
    try:
        if not data.startswith(STATS_MAGIC):
            return {}, {}
        (n,) = _LEN.unpack_from(data, len(STATS_MAGIC))
        start = len(STATS_MAGIC) + _LEN.size
        meta = json.loads(data[start:start + n])
        rows = data[start + n:]
        if meta.get("count") != len(entries) or len(rows) != len(entries) * _STAT.size:
            return meta, {}
        return meta, {e.relpath: k for e, k in zip(entries, _STAT.iter_unpack(rows), strict=True) if k != _NO_STAT}
    except (ValueError, TypeError, struct.error):
        return {}, {}


@dataclass
class _Run:
    """Bytes ``[start, end)`` of the new tar: new bytes, or the previous tar's bytes from ``old``."""

    start: int
    end: int
    data: bytes | None = None
    old: int | None = None


@dataclass
class _Layout:
    runs: list[_Run] = field(default_factory=list)
    size: int = 0

    def add(self, data: bytes | None = None, old: int | None = None, length: int = 0) -> None:
        n = len(data) if data is not None else length
        if n == 0:
            return
        last = self.runs[-1] if self.runs else None
        if old is not None and last is not None and last.old is not None and last.old + (last.end - last.start) == old:
            last.end += n
        elif data is not None and last is not None and last.data is not None:
            last.data += data
            last.end += n
        else:
            self.runs.append(_Run(self.size, self.size + n, data, old))
        self.size += n


class _OldTar:
    """Reads bytes of the previous payload tar from its chunks in the store (decoded, checked, cached)."""

    def __init__(self, store: CasStore, manifest: PayloadManifest) -> None:
        self.store = store
        self.refs = manifest.chunks
        self.starts: list[int] = []
        offset = 0
        for c in self.refs:
            self.starts.append(offset)
            offset += c.raw_size
        self.size = offset
        self.cut_index = {o: k for k, o in enumerate(self.starts)}
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def _chunk(self, k: int) -> bytes:
        raw = self._cache.get(k)
        if raw is None:
            c = self.refs[k]
            raw = self.store.raw(c.raw_hash, c.raw_size)
            self._cache[k] = raw
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        return raw

    def read(self, start: int, n: int) -> bytes:
        out = []
        k = bisect.bisect_right(self.starts, start) - 1
        while n > 0:
            raw = self._chunk(k)
            lo = start - self.starts[k]
            piece = raw[lo:lo + n]
            out.append(piece)
            start += len(piece)
            n -= len(piece)
            k += 1
        return b"".join(out)


class _NewTar:
    """Random reads of the new tar, from its runs."""

    def __init__(self, layout: _Layout, old: _OldTar) -> None:
        self.layout = layout
        self.old = old
        self.starts = [r.start for r in layout.runs]

    def run_at(self, pos: int) -> _Run:
        return self.layout.runs[bisect.bisect_right(self.starts, pos) - 1]

    def read(self, start: int, n: int) -> bytes:
        out = []
        while n > 0 and start < self.layout.size:
            run = self.run_at(start)
            take = min(n, run.end - start)
            if run.data is not None:
                out.append(run.data[start - run.start:start - run.start + take])
            else:
                assert run.old is not None
                out.append(self.old.read(run.old + start - run.start, take))
            start += take
            n -= take
        return b"".join(out)


def _layout(entries: list[SourceEntry], contents: dict[str, bytes], prev: Previous, epoch: int) -> _Layout:
    """The new tar as runs: each entry's header, data and padding, taken from the previous tar when equal.

    A header is a function of the entry's fields (and the epoch, which is the same, or the build is
    cold): an entry whose fields are unchanged has the previous header, and none is rebuilt.
    """
    old_at: dict[str, tuple[SourceEntry | RecordedEntry, int, int]] = {}
    offset = 0
    for e in prev.entries:
        hsize = header_size(e)
        old_at[e.relpath] = (e, offset, hsize)
        offset += hsize + (e.size + (-e.size) % tar_header.BLOCK if e.kind == "file" else 0)
    old_trailer = offset
    layout = _Layout()
    for e in entries:
        old_e, old_off, hsize = old_at.get(e.relpath) or (None, 0, 0)
        pad = (-e.size) % tar_header.BLOCK if e.kind == "file" else 0
        same_data = old_e is not None and e.kind == "file" and old_e.kind == "file" and old_e.blake3 == e.blake3 \
            and e.relpath not in contents
        if old_e is not None and (old_e.kind, old_e.mode, old_e.size, old_e.link_target) == \
                (e.kind, e.mode, e.size, e.link_target):
            if same_data or e.kind != "file":  # the common case, an entry as it was: one run for all of it
                layout.add(old=old_off, length=hsize + (e.size + pad if same_data else 0))
                continue
            layout.add(old=old_off, length=hsize)
        else:
            layout.add(data=header(e, epoch))
        if e.kind != "file":
            continue
        if same_data:
            layout.add(old=old_off + hsize, length=e.size + pad)
        else:
            layout.add(data=contents[e.relpath])
            layout.add(data=b"\0" * pad)
    layout.add(old=old_trailer, length=len(TRAILER))
    return layout


def _rechunk(new: _NewTar, old: _OldTar, emit_old: Callable[[int], None], emit_new: Callable[[bytes], None]) -> None:
    """Cut the new tar exactly as a cold build would, reusing previous chunks wherever the cuts meet."""
    size = new.layout.size
    max_chunk = DEFAULT_PARAMS.max_size
    window = max(4 * max_chunk, 1 << 20)
    cut = 0
    while cut < size:
        run = new.run_at(cut)
        if run.old is not None:
            k = old.cut_index.get(run.old + cut - run.start)
            old_end = run.old + (run.end - run.start)
            reused = False
            while k is not None and k < len(old.refs):
                c = old.refs[k]
                end = old.starts[k] + c.raw_size
                if end > old_end:
                    break
                if end == old.size and run.end != size:
                    break  # the previous tar's last chunk was cut by its end: only the same end cuts it alike
                emit_old(k)
                cut += c.raw_size
                k += 1
                reused = True
            if reused:
                continue
        # Chunk from this cut until a cut lands where the previous tar had one, inside an unchanged run.
        while cut < size:
            data = new.read(cut, min(window, size - cut))
            spans = list(chunk_spans(data))
            if cut + len(data) < size:
                spans = spans[:-1]  # the last span may continue past the window
            resynced = False
            for o, n in spans:
                emit_new(data[o:o + n])
                cut += n
                if cut < size:
                    run = new.run_at(cut)
                    if run.old is not None and old.cut_index.get(run.old + cut - run.start) is not None:
                        resynced = True
                        break
            if resynced:
                break


def pack_incremental(entries: list[SourceEntry], store: CasStore, epoch: int, prev: Previous,
                     changed: set[str], reporter: Progress = SILENT) -> PayloadResult | None:
    """Pack from the previous build, reading only ``changed`` files (and files it does not know).

    None when the previous build cannot help (another epoch, or more changed bytes than it holds in memory).
    """
    if prev.epoch != epoch or prev.manifest.params != DEFAULT_PARAMS:
        return None
    before = {e.relpath: e for e in prev.entries}
    contents: dict[str, bytes] = {}
    hashed: list[SourceEntry] = []
    files: list[PackedFile] = []
    read_paths: set[str] = set()
    held = 0
    for e in entries:
        if e.kind != "file":
            hashed.append(e)
            continue
        old_e = before.get(e.relpath)
        if old_e is not None and old_e.kind == "file" and old_e.size == e.size and e.relpath not in changed \
                and e.data is None and old_e.blake3 and e.relpath in prev.sha256:
            hashed.append(with_blake3(e, old_e.blake3))
            files.append(PackedFile(e.relpath, prev.sha256[e.relpath]))
            continue
        held += e.size
        if held > INCREMENTAL_MAX_BYTES:
            return None
        read_paths.add(e.relpath)
        with reporter.task(f"Packing {e.relpath}", total=e.size) as task:
            b3, sha, data = read_file(e)
            task.advance(e.size)
        assert data is not None
        if old_e is not None and old_e.kind == "file" and old_e.blake3 == b3:
            hashed.append(with_blake3(e, b3))  # touched, same bytes: still taken from the previous tar
        else:
            contents[e.relpath] = data
            hashed.append(with_blake3(e, b3))
        files.append(PackedFile(e.relpath, sha))
    old = _OldTar(store, prev.manifest)
    layout = _layout(hashed, contents, prev, epoch)
    new = _NewTar(layout, old)
    refs: list[ChunkRef] = []
    fresh: list[tuple[int, bytes]] = []

    def emit_old(k: int) -> None:
        refs.append(prev.manifest.chunks[k])

    def emit_new(data: bytes) -> None:
        fresh.append((len(refs), data))
        refs.append(ChunkRef("", len(data)))

    _rechunk(new, old, emit_old, emit_new)
    with store.packs.writer() as writer:
        inserted = bytes_inserted = 0
        with ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="ato-chunk") as pool:
            prepared = list(pool.map(lambda item: _prepare(store, item[1]), fresh))
        for (i, _data), p in zip(fresh, prepared, strict=True):
            refs[i] = p.ref
            if p.new and p.ref.raw_hash not in writer:
                writer.add(p.ref.raw_hash, p.frame, p.ref.raw_size, p.frame_hash)
                inserted += 1
                bytes_inserted += len(p.frame)
        new_pack = writer.commit()
    manifest = PayloadManifest(refs)
    # The frames reused from the last build are this store's own, immutable since they were written and
    # fsynced: like restic or git, a rebuild does not re-hash each of them (`ato cas verify` does, and every
    # consumer of the artifact decodes and checks every chunk). Nor does it hash payload.tar.zst here: the
    # artifact step hashes the frames once, as it copies them.
    return PayloadResult(manifest, hashed, files, None, new_pack, inserted, bytes_inserted, "incremental",
                         len(contents), read_paths)


def payload_hash(store: CasStore, manifest: PayloadManifest, *, check_frames: bool = True) -> str:
    """BLAKE3 of payload.tar.zst, from the stored frames (each checked against its frame digest unless
    ``check_frames`` is false)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for view in iter_payload_views(store, manifest, check_frames=check_frames):
        hasher.update(view)
    return hasher.hexdigest()


def _payload_runs(store: CasStore, manifest: PayloadManifest) -> Iterator[bytes | tuple[FrameSpan, list[Location]]]:
    """payload.tar.zst in order: runs of frames that sit back to back in one pack (span, frames), and the
    (decoded and checked) frames of chunks still in the one-file-per-chunk layout of earlier versions."""
    hexes = [c.raw_hash for c in manifest.chunks]
    found = store.packs.locate_many(hexes)
    i = 0
    while i < len(hexes):
        if hexes[i] not in found:
            yield store.frame(hexes[i], manifest.chunks[i].raw_size)
            i += 1
            continue
        j = i
        while j < len(hexes) and hexes[j] in found:
            j += 1
        yield from store.packs.spans(hexes[i:j], found)
        i = j


def iter_payload_views(store: CasStore, manifest: PayloadManifest, *,
                       check_frames: bool = True) -> Iterator[memoryview | bytes]:
    """The bytes of payload.tar.zst in order, as few large views of the packs as possible.

    Each frame is checked against the frame digest the index holds (unless the caller checks the
    whole against a known BLAKE3); chunks still in the one-file-per-chunk layout of earlier
    versions are decoded and checked.
    """
    for run in _payload_runs(store, manifest):
        yield run if isinstance(run, bytes) else store.packs.checked_span(run[0], run[1] if check_frames else [])


def iter_payload_pieces(store: CasStore, manifest: PayloadManifest) -> Iterator[bytes | FileRange]:
    """The bytes of payload.tar.zst in order, unchecked, for the artifact writer: runs of frames in a pack
    as :class:`FileRange` (copied file to file by the kernel), other chunks as their frames."""
    for run in _payload_runs(store, manifest):
        yield run if isinstance(run, bytes) else FileRange(*store.packs.span_source(run[0]))


# ---------------------------------------------------------------- a payload taken from the store


def list_stored_payload(store: CasStore, manifest: PayloadManifest) -> tuple[list[SourceEntry], list[PackedFile]]:
    """Read a payload tar back from the CAS (every chunk verified): its entries and file SHA-256s."""
    entries: list[SourceEntry] = []
    files: list[PackedFile] = []
    with tarfile.open(fileobj=io.BufferedReader(ChunkStream(store.iter_raw(manifest)), COPY_SIZE), mode="r|") as tf:
        for info in tf:
            if info.issym():
                entries.append(SourceEntry(info.name, Path(info.name), "symlink", 0o777, 0, link_target=info.linkname))
            elif info.isfile():
                fh = tf.extractfile(info)
                assert fh is not None
                sha, b3 = hashlib.sha256(), blake3.blake3()
                while chunk := fh.read(COPY_SIZE):
                    sha.update(chunk)
                    b3.update(chunk)
                entries.append(SourceEntry(info.name, Path(info.name), "file", info.mode & 0o777, info.size,
                                           blake3=b3.hexdigest()))
                files.append(PackedFile(info.name, sha.hexdigest()))
    return entries, files


def stored_result(store: CasStore, manifest: PayloadManifest, entries: list[SourceEntry],
                  files: list[PackedFile]) -> PayloadResult:
    """The result for a payload that is already in the store (``source_digest`` builds)."""
    return PayloadResult(manifest, entries, files, payload_hash(store, manifest), None, 0, 0, "stored")

