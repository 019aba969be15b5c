"""Pack files: many chunk frames to a file, found through the index (:mod:`cas.index`).

Under the CAS root::

    packs/<32 hex>.pack       frames written back to back by one build, migration or repack
    packs/<64 hex>.capsule    an adopted artifact, named by the BLAKE3 of its bytes: its
                              ``payload.tar.zst`` is the concatenation of its chunk frames, so
                              the artifact file is itself a pack and is stored once
    tmp/                      packs being written (named by cas.tempfiles, swept once their writer is gone)
    index.sqlite              chunk -> (pack, offset, length, raw size, frame BLAKE3); manifests

A pack is written to ``tmp/``, fsynced once, renamed into ``packs/`` (and the directory synced),
and only then recorded in the index in one transaction: a reader never finds a chunk whose bytes
are not durable, and a writer killed at any point leaves at worst a temp file or an unindexed
pack, which ``ato cas gc`` removes. Packs are never modified after the rename; space comes back
when gc deletes or repacks them. Each frame's BLAKE3 is kept in the index, so a frame copied into
an artifact is checked without decoding it; a full check (decode, raw BLAKE3) is
:meth:`PackStore.read_raw` and ``ato cas verify``.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import fsync_dir
from cas.frames import ChunkError, decompress_frame
from cas.index import Location, PackEntry, PackIndex
from cas.stoppoints import stop_point
from cas.tempfiles import temp_path

PACK_SUFFIX = ".pack"
CAPSULE_SUFFIX = ".capsule"
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def frames_at(offset: int, frames: Iterable[Any]) -> list[PackEntry]:
    """Pack entries of frames that lie back to back from ``offset`` (an artifact's payload): each
    frame an object with ``raw_hash``, ``raw_size``, ``frame_size`` and ``frame_blake3`` (hex)."""
    out = []
    for f in frames:
        out.append(PackEntry(f.raw_hash, offset, f.frame_size, f.raw_size, bytes.fromhex(f.frame_blake3)))
        offset += f.frame_size
    return out


@dataclass(frozen=True)
class FrameSpan:
    """A run of bytes inside one pack: frames that sit back to back there."""

    pack: str
    offset: int
    length: int


class _OpenPacks:
    """Read-only memory maps of pack files, shared by the threads of a process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}  # kept open while mapped: the kernel can copy from them (copy_file_range)
        self._lock = threading.Lock()

    def view(self, pack: str, offset: int, length: int) -> memoryview:
        return self.located(pack, offset, length)[0]

    def located(self, pack: str, offset: int, length: int) -> tuple[memoryview, int]:
        """The bytes (a view of the map) and an open descriptor of the pack file they are in."""
        with self._lock:
            mm = self._maps.get(pack)
            if mm is None:
                try:
                    fd = os.open(self.directory / pack, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise ChunkError("missing", "", f"pack file {pack} is missing") from None
                try:
                    size = os.fstat(fd).st_size
                    mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
                except BaseException:
                    os.close(fd)
                    raise
                if mm is None:
                    os.close(fd)
                    raise ChunkError("corrupt", "", f"pack file {pack} is empty")
                self._maps[pack] = mm
                self._fds[pack] = fd
            fd = self._fds[pack]
        if offset < 0 or offset + length > len(mm):
            raise ChunkError("corrupt", "", f"pack file {pack} is shorter than the index says")
        return memoryview(mm)[offset:offset + length], fd

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():  # the maps close themselves; the descriptors do not
            try:
                os.close(fd)
            except OSError:
                pass

    def drop(self, pack: str) -> None:
        with self._lock:
            mm = self._maps.pop(pack, None)
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still in use: the map goes when it does
                pass


class PackWriter:
    """Writes one new pack: ``add`` frames, then ``commit`` (or ``abort``). Not thread-safe.

    A chunk added twice is written once. The frames of a cold build are added in payload order,
    so the pack is that payload's ``payload.tar.zst`` less repeated chunks.
    """

    def __init__(self, store: PackStore, kind: str = "pack") -> None:
        self.store = store
        self.kind = kind
        store.tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(store.directory / "new.pack", store.tmp)
        self._fh = open(self.tmp, "xb")  # noqa: SIM115 - closed by commit/abort
        self.entries: list[PackEntry] = []
        self._by_hash: dict[str, PackEntry] = {}
        self.size = 0

    def __contains__(self, hex_digest: str) -> bool:
        return hex_digest in self._by_hash

    def add(self, hex_digest: str, frame: bytes | memoryview, raw_size: int, frame_hash: bytes | None = None) -> PackEntry:
        """Append one frame (unless this pack already has the chunk); returns where it is in the pack."""
        known = self._by_hash.get(hex_digest)
        if known is not None:
            return known
        self._fh.write(frame)
        return self._enter(hex_digest, len(frame), raw_size, frame_hash or blake3.blake3(frame).digest())

    def _enter(self, hex_digest: str, length: int, raw_size: int, frame_hash: bytes) -> PackEntry:
        """Record a frame of ``length`` bytes at the pack's current end."""
        entry = PackEntry(hex_digest, self.size, length, raw_size, frame_hash)
        self.size += length
        self.entries.append(entry)
        self._by_hash[hex_digest] = entry
        return entry

    def add_many(self, frames: list[tuple[str, bytes, int, bytes]]) -> list[PackEntry]:
        """Append ``(BLAKE3 hex, frame, raw size, frame BLAKE3)`` frames with as few writes as possible;
        returns the entries of the frames this pack did not have yet."""
        added, views = [], []
        for hex_digest, frame, raw_size, frame_hash in frames:
            if hex_digest in self._by_hash:
                continue
            added.append(self._enter(hex_digest, len(frame), raw_size, frame_hash))
            views.append(memoryview(frame))
        self._write_all(views)
        return added

    def _write_all(self, views: list[memoryview]) -> None:
        """``writev`` of whole buffers (IOV_MAX at a time), resuming after a partial write."""
        self._fh.flush()
        fd = self._fh.fileno()
        i = 0
        while i < len(views):
            n = os.writev(fd, views[i:i + _IOV_MAX])
            while i < len(views) and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]

    def commit(self) -> str | None:
        """fsync, rename into ``packs/``, record in the index; returns the pack name (None if empty)."""
        if not self.entries:
            self.abort()
            return None
        try:
            self._fh.flush()
            stop_point("cas.publish-temps")  # crash tests: the new frames in a temp pack, not renamed
            os.fsync(self._fh.fileno())
            self._fh.close()
            name = secrets.token_hex(16) + PACK_SUFFIX
            self.store.directory.mkdir(parents=True, exist_ok=True)
            target = self.store.directory / name
            os.rename(self.tmp, target)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.store.directory)
        stop_point("cas.pack-renamed")  # crash tests: the pack in place, not yet in the index
        self.store.index.add_pack(name, self.size, self.kind, self.entries)
        return name

    def abort(self) -> None:
        """Drop the temp pack. On a full disk ``close`` flushes and fails again: unlink regardless."""
        try:
            if not self._fh.closed:
                self._fh.close()
        except OSError:
            pass  # the error that got us here is already on its way up
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


class PackStore:
    """The pack files and index of one CAS root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.directory = self.root / "packs"
        self.tmp = self.root / "tmp"
        self.index = PackIndex(self.root / "index.sqlite")
        self._open = _OpenPacks(self.directory)

    # ---------------------------------------------------------------- lookups

    def locate(self, hex_digest: str) -> Location | None:
        return self.index.locate(hex_digest)

    def locate_many(self, hexes: Iterable[str]) -> dict[str, Location]:
        return self.index.locate_many(hexes)

    def _stored(self, hex_digest: str, where: Location | None) -> tuple[Location, memoryview]:
        """Where a chunk is and the bytes there (not yet checked)."""
        where = where or self.locate(hex_digest)
        if where is None:
            raise ChunkError("missing", hex_digest, f"CAS chunk blake3:{hex_digest} is not stored")
        try:
            return where, self._open.view(where.pack, where.offset, where.length)
        except ChunkError as exc:
            raise ChunkError(exc.kind, hex_digest, f"CAS chunk blake3:{hex_digest}: {exc}") from None

    def frame_view(self, hex_digest: str, where: Location | None = None) -> memoryview:
        """The stored frame of a chunk, checked against the frame BLAKE3 the index holds."""
        where, view = self._stored(hex_digest, where)
        if blake3.blake3(view).digest() != where.frame_hash:
            raise ChunkError("corrupt", hex_digest,
                             f"CAS chunk blake3:{hex_digest} in pack {where.pack} is damaged (frame digest differs)")
        return view

    def read_raw(self, hex_digest: str, expected_size: int | None = None, where: Location | None = None) -> bytes:
        """The raw chunk, decoded and checked against its name (the full check)."""
        where, view = self._stored(hex_digest, where)
        size = where.raw_size if expected_size is None else expected_size
        raw = decompress_frame(view, size)
        if raw is None or len(raw) != size or blake3.blake3(raw).hexdigest() != hex_digest:
            raise ChunkError("corrupt", hex_digest, f"CAS chunk blake3:{hex_digest} in pack {where.pack} is damaged")
        return raw

    def spans(self, hexes: Iterable[str], locations: dict[str, Location]) -> Iterator[tuple[FrameSpan, list[Location]]]:
        """The frames of ``hexes`` in order as runs of contiguous bytes (one copy per run, not per frame)."""
        run: FrameSpan | None = None
        members: list[Location] = []
        for h in hexes:
            where = locations[h]
            if run is not None and run.pack == where.pack and run.offset + run.length == where.offset:
                run = FrameSpan(run.pack, run.offset, run.length + where.length)
                members.append(where)
                continue
            if run is not None:
                yield run, members
            run, members = FrameSpan(where.pack, where.offset, where.length), [where]
        if run is not None:
            yield run, members

    def span_source(self, span: FrameSpan) -> tuple[memoryview, int, int]:
        """A run of frames as (its bytes, an open descriptor of its pack, its offset there), unchecked:
        for a writer that copies it file to file and hashes the view."""
        view, fd = self._open.located(span.pack, span.offset, span.length)
        return view, fd, span.offset

    def checked_span(self, span: FrameSpan, frames: list[Location]) -> memoryview:
        """The bytes of a run of frames, each checked against its frame digest."""
        view = self._open.view(span.pack, span.offset, span.length)
        for where in frames:
            lo = where.offset - span.offset
            if blake3.blake3(view[lo:lo + where.length]).digest() != where.frame_hash:
                raise ChunkError("corrupt", "", f"a CAS chunk in pack {span.pack} at offset {where.offset} is damaged "
                                                "(frame digest differs); `ato cas verify` lists it")
        return view

    # ---------------------------------------------------------------- writing

    def writer(self, kind: str = "pack") -> PackWriter:
        return PackWriter(self, kind)

    def adopt(self, path: Path, name: str, entries: list[PackEntry]) -> Path:
        """Make an existing, synced file a pack: hard-link it into ``packs/`` and record its frames.

        For an installed artifact (``name`` is ``<its BLAKE3>.capsule``): the artifact and its pack are
        one inode, so its bytes are on disk once. Returns the pack's path; when the pack was adopted
        before (same name, same bytes), that path, and ``path`` is not linked.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / name
        if target.is_file() and self.index.pack_entries(name):
            return target
        try:
            os.link(path, target)
        except FileExistsError:  # a pack file the index never recorded (a killed install): replace it
            link = temp_path(target, self.tmp)
            self.tmp.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
            os.replace(link, target)
        fsync_dir(self.directory)
        stop_point("cas.pack-renamed")  # crash tests: the pack in place, not yet in the index
        self.index.add_pack(name, target.stat().st_size, "capsule", entries)
        return target

    def remove_pack(self, name: str) -> int:
        """Forget a pack in the index, then delete its file; returns the bytes freed."""
        self.index.remove_pack(name)
        self._open.drop(name)
        try:
            path = self.directory / name
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def files(self) -> list[str]:
        """Names of the pack files on disk (indexed or not)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir()
                      if p.name.endswith((PACK_SUFFIX, CAPSULE_SUFFIX)) and not p.name.startswith("."))
