"""The payload stage: project files -> normalized tar -> content-defined chunks in the CAS.

The tar is written once to a temp file, cut into chunks by content, and each
chunk is hashed, compressed (one deterministic zstd frame per chunk, in a thread
pool) and stored. ``payload.tar.zst`` is the concatenation of those frames, so
the artifact and the CAS hold the very same bytes and a chunk is compressed once.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from cas.chunker import chunk_spans
from cas.objects import compress
from cas.payload_manifest import ChunkRef, PayloadManifest
from cas.store import CasStore
from pipeline.errors import E_LOCKFILE, AtoError
from stages.sources import SourceEntry

BLOCK = tarfile.BLOCKSIZE
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
    info = tarfile.TarInfo(entry.relpath)
    info.mtime = epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = entry.mode
    if entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link_target or ""
        info.size = 0
    else:
        info.type = tarfile.REGTYPE
        info.size = entry.size
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def write_tar(entries: Iterable[SourceEntry], out, epoch: int) -> list[PackedFile]:
    """Write the normalized payload tar to ``out``; returns each file's SHA-256."""
    files: list[PackedFile] = []
    for entry in entries:
        out.write(_header(entry, epoch))
        if entry.kind != "file":
            continue
        sha = hashlib.sha256()
        if entry.data is not None:
            out.write(entry.data)
            sha.update(entry.data)
            out.write(b"\0" * ((-entry.size) % BLOCK))
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
            grew = fh.read(1)
        if remaining or grew:
            raise AtoError(E_LOCKFILE, f"file changed while packaging: {entry.relpath}",
                           details={"path": entry.relpath})
        pad = (-entry.size) % BLOCK
        if pad:
            out.write(b"\0" * pad)
        files.append(PackedFile(entry.relpath, sha.hexdigest()))
    out.write(b"\0" * (BLOCK * 2))
    return files


def _store_chunk(store: CasStore, view: memoryview) -> tuple[ChunkRef, bool, int]:
    hex_digest = blake3.blake3(view).hexdigest()
    objects = store.objects
    if objects.has(hex_digest):
        try:
            frame = objects.read_frame(hex_digest, len(view))
            return ChunkRef(hex_digest, len(view), len(frame)), False, 0
        except Exception:  # noqa: BLE001 - a damaged object is rewritten below
            pass
    frame = compress(view)
    inserted = objects.put_frame(hex_digest, frame)
    return ChunkRef(hex_digest, len(view), len(frame)), inserted, len(frame) if inserted else 0


def chunk_into_store(tar_path: Path, store: CasStore, workers: int | None = None) -> tuple[PayloadManifest, int, int]:
    """Cut a tar file into chunks and store each; returns (manifest, inserted, bytes inserted)."""
    size = tar_path.stat().st_size
    with open(tar_path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            spans = list(chunk_spans(view))
            workers = workers or max(1, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(lambda s: _store_chunk(store, view[s[0]:s[0] + s[1]]), spans))
        finally:
            view.release()
    manifest = PayloadManifest([r[0] for r in results])
    store.put_manifest(manifest)
    return manifest, sum(1 for r in results if r[1]), sum(r[2] for r in results)


def pack_payload(entries: list[SourceEntry], store: CasStore, scratch_dir: Path, epoch: int) -> PayloadResult:
    """Pack ``entries`` into the CAS; the temp tar in ``scratch_dir`` is always removed."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    tar_path = scratch_dir / f".payload.{os.getpid()}.tar"
    try:
        with open(tar_path, "wb") as out:
            files = write_tar(entries, out, epoch)
        manifest, inserted, bytes_inserted = chunk_into_store(tar_path, store)
    finally:
        tar_path.unlink(missing_ok=True)
    compressed = sum(c.zstd_size_hint or 0 for c in manifest.chunks)
    return PayloadResult(manifest, files, inserted, bytes_inserted, compressed)


def list_stored_payload(store: CasStore, manifest: PayloadManifest) -> tuple[list[SourceEntry], list[PackedFile]]:
    """Read a payload tar back from the CAS (every chunk verified): its entries and file SHA-256s."""
    import io

    class _ChunkStream(io.RawIOBase):
        def __init__(self) -> None:
            self._chunks = store.iter_raw(manifest)
            self._buf = b""

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            while not self._buf:
                try:
                    self._buf = next(self._chunks)
                except StopIteration:
                    return 0
            n = min(len(b), len(self._buf))
            b[:n] = self._buf[:n]
            self._buf = self._buf[n:]
            return n

    entries: list[SourceEntry] = []
    files: list[PackedFile] = []
    with tarfile.open(fileobj=io.BufferedReader(_ChunkStream(), COPY_SIZE), mode="r|") as tf:
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
