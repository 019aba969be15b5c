"""The payload stage: project files -> normalized tar -> content-defined chunks in the CAS.

The tar is written once to a temp file, cut into chunks by content, and each
chunk is hashed, compressed (one deterministic zstd frame per chunk, in a thread
pool) and stored. ``payload.tar.zst`` is the concatenation of those frames, so
the artifact and the CAS hold the very same bytes and a chunk is compressed once.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3

from cas.chunker import chunk_spans
from cas.objects import ObjectError, compress
from cas.payload_manifest import ChunkRef, PayloadManifest
from cas.store import CasStore
from cas.streams import ChunkStream
from pipeline.errors import E_LOCKFILE, AtoError
from pipeline.progress import SILENT, SILENT_TASK, Progress, Task
from stages.capsule import tar_header
from stages.sources import SourceEntry

COPY_SIZE = 1 << 20


@dataclass(frozen=True)
class PackedFile:
    """What the SBOM needs of one payload file."""

    path: str
    sha256: str


@dataclass
class PayloadResult:
    manifest: PayloadManifest
    files: list[PackedFile]
    chunks_inserted: int
    bytes_inserted: int
    compressed_size: int


def _header(entry: SourceEntry, epoch: int) -> bytes:
    if entry.kind == "symlink":
        return tar_header.header(entry.relpath, mode=entry.mode, mtime=epoch, symlink_to=entry.link_target or "")
    return tar_header.header(entry.relpath, size=entry.size, mode=entry.mode, mtime=epoch)


def write_tar(entries: Iterable[SourceEntry], out, epoch: int, task: Task = SILENT_TASK) -> list[PackedFile]:
    """Write the normalized payload tar to ``out``; returns each file's SHA-256 (``task`` counts file bytes)."""
    files: list[PackedFile] = []
    for entry in entries:
        out.write(_header(entry, epoch))
        if entry.kind != "file":
            continue
        sha = hashlib.sha256()
        if entry.data is not None:
            out.write(entry.data)
            sha.update(entry.data)
            task.advance(len(entry.data))
            out.write(tar_header.padding(entry.size))
            files.append(PackedFile(entry.relpath, sha.hexdigest()))
            continue
        remaining = entry.size
        with open(entry.abspath, "rb") as fh:
            while remaining > 0:
                chunk = fh.read(min(COPY_SIZE, remaining))
                if not chunk:
                    break
                sha.update(chunk)
                out.write(chunk)
                remaining -= len(chunk)
                task.advance(len(chunk))
            grew = fh.read(1)
        if remaining or grew:
            raise AtoError(E_LOCKFILE, f"file changed while packaging: {entry.relpath}",
                           details={"path": entry.relpath})
        out.write(tar_header.padding(entry.size))
        files.append(PackedFile(entry.relpath, sha.hexdigest()))
    out.write(b"\0" * (tar_header.BLOCK * 2))
    return files


def _prepare_chunk(store: CasStore, view: memoryview) -> tuple[ChunkRef, bytes, Path | None]:
    """Hash and compress one chunk; stage a temp object unless the CAS already has it intact."""
    hex_digest = blake3.blake3(view).hexdigest()
    if store.has_chunk(hex_digest):
        try:
            frame = store.frame(hex_digest, len(view))
            return ChunkRef(hex_digest, len(view), len(frame)), frame, None
        except ObjectError:
            store.objects.remove(hex_digest)  # damaged: replaced by the fresh frame below
    frame = compress(view)
    return ChunkRef(hex_digest, len(view), len(frame)), frame, store.objects.write_temp(hex_digest, frame)


def _prepare_batch(store: CasStore, pieces: list[bytes]) -> list[tuple[ChunkRef, bytes, Path | None]]:
    done: list[tuple[ChunkRef, bytes, Path | None]] = []
    try:
        for p in pieces:
            done.append(_prepare_chunk(store, memoryview(p)))
    except BaseException:
        for _ref, _frame, tmp in done:  # the batch fails as a whole: its staged objects go too
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return done


class ChunkSink:
    """A file-like sink for the payload tar that chunks, compresses and stores as it goes.

    Writing the tar (main thread: file reads, SHA-256) overlaps with hashing and
    compressing chunks (worker threads), and the tar never touches the disk. Only
    the bytes after the last cut are held back: FastCDC decides a cut from the
    bytes since the previous cut alone, so every cut but the last in the buffer is
    final. Frames are written to ``frames_out`` in order, which makes that file
    ``payload.tar.zst``.
    """

    FLUSH_AT = 8 << 20

    def __init__(self, store: CasStore, frames_out: BinaryIO, pool: ThreadPoolExecutor, workers: int) -> None:
        self.store = store
        self.out = frames_out
        self.pool = pool
        self.workers = workers
        self.max_pending = workers * 4
        self.buf = bytearray()
        self.pending: deque[Future[list[tuple[ChunkRef, bytes, Path | None]]]] = deque()
        self.refs: list[ChunkRef] = []
        self.staged: list[tuple[str, Path]] = []
        self.new_bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.buf += data
        if len(self.buf) >= self.FLUSH_AT:
            self._cut(final=False)

    def _cut(self, final: bool) -> None:
        spans = list(chunk_spans(memoryview(self.buf)))
        if not final:
            spans = spans[:-1]  # the tail may continue in the next write
        if spans:
            end = spans[-1][0] + spans[-1][1]
            pieces = [bytes(self.buf[o:o + n]) for o, n in spans]
            # One task per cut (hundreds of chunks), not per chunk: less hand-over between threads.
            half = max(1, len(pieces) // self.workers)
            for i in range(0, len(pieces), half):
                self.pending.append(self.pool.submit(_prepare_batch, self.store, pieces[i:i + half]))
            del self.buf[:end]
        self._drain(0 if final else self.max_pending)

    def _drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            batch = self.pending.popleft().result()
            # recorded before anything else can fail, so abandon() finds every temp object of the batch
            self.staged += [(ref.raw_hash, tmp) for ref, _frame, tmp in batch if tmp is not None]
            for ref, frame, tmp in batch:
                self.out.write(frame)
                self.refs.append(ref)
                if tmp is not None:
                    self.new_bytes += len(frame)

    def close(self) -> None:
        self._cut(final=True)

    def abandon(self) -> None:
        """On failure: wait for in-flight chunks and delete every staged temp object."""
        for fut in self.pending:
            try:
                for ref, _frame, tmp in fut.result():
                    if tmp is not None:
                        self.staged.append((ref.raw_hash, tmp))
            except Exception:  # noqa: BLE001 - cleaning up after the first error
                pass
        self.pending.clear()
        for _hex, tmp in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged.clear()


def pack_payload(entries: list[SourceEntry], store: CasStore, epoch: int, frames_out: Path,
                 reporter: Progress = SILENT) -> PayloadResult:
    """Pack ``entries`` into the CAS and write ``payload.tar.zst`` to ``frames_out``."""
    frames_out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, open(frames_out, "wb") as out:
        sink = ChunkSink(store, out, pool, workers)
        total = sum(e.size for e in entries if e.kind == "file")
        try:
            with reporter.task("Packing", total=total) as task:
                files = write_tar(entries, sink, epoch, task)
                sink.close()
        except BaseException:
            sink.abandon()
            raise
    inserted = store.objects.publish_temps(sink.staged)
    manifest = PayloadManifest(sink.refs)
    store.put_manifest(manifest)
    compressed = sum(c.zstd_size_hint or 0 for c in manifest.chunks)
    return PayloadResult(manifest, files, inserted, sink.new_bytes if inserted else 0, compressed)


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
