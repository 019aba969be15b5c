"""The outer tar of a ``.capsule``: writing it, and the one strict reader of it.

An uncompressed tar with members in a fixed order (CONTRACTS.md §3), every header normalized
(uid/gid 0, no names, mtime SOURCE_DATE_EPOCH or 0, mode 0644), so two builds of the same inputs
are byte-identical on any machine. Because the writer is deterministic, the reader can demand
exactly its bytes: every header must equal the header the writer produces for that member, the
members must be the capsule layout in order (so there are no duplicates and no strangers),
every small member is bounded in size, every padding byte and the end-of-archive blocks are
zero, and the file ends exactly where the writer would have ended it. Anything else — a
truncated file, a file cut inside its trailing padding, appended bytes, a PAX header, a changed
mode — is refused with E208, naming the offset.

The reader works on a :class:`Source`: a file, or an install's *skeleton* (the published bytes
around ``payload.tar.zst`` without the payload itself), so an artifact can be judged by its
small members before its payload is downloaded.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import blake3

from cas.atomic import atomic_writer
from cas.stoppoints import stop_point
from pipeline.errors import E_INTEGRITY, E_TRUNCATED
from stages.capsule import tar_header
from stages.capsule.errors import CapsuleError

PAYLOAD = "payload.tar.zst"
PAYLOAD_MANIFEST = "payload.v3.manifest.json"
MEMBER_ORDER = ("capsule.toml", "capsule.lock.json", "sbom.spdx.json", "signature.json", PAYLOAD, PAYLOAD_MANIFEST)
README_NAMES = ("README.md", "README.mdx", "README.txt", "README")
RECORD = tarfile.RECORDSIZE
BLOCK = tar_header.BLOCK
MAX_MEMBER = 16 << 20  # any member but the payload: a 200 MiB payload's chunk list is ~2 MB
COPY = 1 << 20


def _fail(message: str, *, code: str = E_INTEGRITY, **details: object) -> CapsuleError:
    return CapsuleError("archive", message, code=code, **details)


# ---------------------------------------------------------------- where the bytes come from


class Source(Protocol):
    """Random access to an artifact's bytes (a file, or a skeleton without its payload)."""

    size: int

    def read_at(self, offset: int, n: int) -> bytes: ...


class FileSource:
    """An open artifact file, read with ``pread`` (the file position is never shared)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fd = fh.fileno()
        self.size = os.fstat(self.fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)


class SkeletonSource:
    """``prefix ‖ <payload_size bytes not present> ‖ suffix``: the artifact as a registry's
    skeleton describes it. Reading inside the payload is a bug of the caller."""

    def __init__(self, prefix: bytes, payload_size: int, suffix: bytes) -> None:
        self.prefix, self.payload_size, self.suffix = prefix, payload_size, suffix
        self.size = len(prefix) + payload_size + len(suffix)

    def read_at(self, offset: int, n: int) -> bytes:
        end = min(offset + n, self.size)
        hole = len(self.prefix)
        after = hole + self.payload_size
        if offset < hole and end <= hole:
            return self.prefix[offset:end]
        if offset >= after:
            return self.suffix[offset - after:end - after]
        raise _fail(f"bytes {offset}..{end} lie in the payload, which a skeleton does not hold: the skeleton's "
                    "prefix does not end where the payload begins")


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Span:
    name: str
    offset: int  # of the member's data
    size: int


@dataclass(frozen=True)
class Layout:
    """Where each member's data lies in an artifact whose framing is exactly canonical."""

    members: tuple[Span, ...]
    epoch: int
    size: int  # of the whole file

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def span(self, name: str) -> Span:
        return next(m for m in self.members if m.name == name)

    @property
    def payload(self) -> Span:
        return self.span(PAYLOAD)

    @property
    def readme(self) -> str | None:
        return next((m.name for m in self.members if m.name in README_NAMES), None)


def _expected(index: int) -> tuple[str, ...]:
    return (MEMBER_ORDER[index],) if index < len(MEMBER_ORDER) else README_NAMES if index == len(MEMBER_ORDER) else ()


def read_layout(src: Source) -> Layout:
    """Walk the outer tar and require exactly the bytes the deterministic writer produces."""
    total = src.size
    members: list[Span] = []
    epoch: int | None = None
    offset = 0
    while True:
        block = src.read_at(offset, BLOCK)
        if len(block) < BLOCK:
            raise _fail(f"archive is truncated at offset {offset} (size {total})", code=E_TRUNCATED, offset=offset)
        if block == tar_header.ZERO_BLOCK:
            break
        allowed = _expected(len(members))
        if not allowed:
            raise _fail(f"block at offset {offset} after the last member is not the zero end-of-archive marker",
                        offset=offset)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except (tarfile.TarError, ValueError, OverflowError) as exc:
            raise _fail(f"tar header #{len(members) + 1} (expected {' or '.join(allowed)}) at offset {offset} is "
                        f"corrupt: {exc}", offset=offset) from None
        if info.name not in allowed:
            raise _fail(f"member #{len(members) + 1} at offset {offset} is {info.name!r}, expected "
                        f"{' or '.join(allowed)}: the members are not the capsule layout", offset=offset)
        if epoch is None:
            epoch = int(info.mtime)
        if block != tar_header.header(info.name, size=info.size, mtime=epoch):
            raise _fail(f"tar header of {info.name!r} at offset {offset} differs from the canonical header "
                        "(mode, owner, mtime, type or format was changed)", offset=offset)
        if info.name != PAYLOAD and info.size > MAX_MEMBER:
            raise _fail(f"member {info.name!r} is {info.size} bytes, over the {MAX_MEMBER}-byte limit for small "
                        "members", offset=offset)
        data_at = offset + BLOCK
        end = data_at + info.size
        pad = (-info.size) % BLOCK
        if end + pad > total:
            raise _fail(f"member {info.name!r} runs past the end of the file (truncated)", code=E_TRUNCATED,
                        offset=offset)
        if pad and src.read_at(end, pad) != b"\0" * pad:
            raise _fail(f"padding after member {info.name!r} (offset {end}) is not zero", offset=end)
        members.append(Span(info.name, data_at, info.size))
        offset = end + pad
    if len(members) < len(MEMBER_ORDER):
        raise _fail(f"the archive ends after {len(members)} members; a capsule has "
                    f"{', '.join(MEMBER_ORDER)} (and an optional README)", members=[m.name for m in members])
    want_total = offset + 2 * BLOCK
    want_total += (-want_total) % RECORD
    if total != want_total:
        what = "data appended after the archive" if total > want_total else "truncated in its end-of-archive padding"
        raise _fail(f"file is {total} bytes but its members give {want_total} ({what})", size=total,
                    expected=want_total, code=E_INTEGRITY if total > want_total else E_TRUNCATED)
    tail = src.read_at(offset, total - offset)
    if len(tail) != total - offset or tail.count(0) != len(tail):
        raise _fail(f"end-of-archive blocks/padding after offset {offset} are not zero", offset=offset)
    return Layout(tuple(members), epoch or 0, total)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class FileRange:
    """Bytes that also lie at ``offset`` of the open file ``fd`` (a run of frames in a pack).

    ``view`` is the same bytes in memory (a map of that file), which the writer hashes; the copy into
    the artifact is made by the kernel (``copy_file_range``), so they never pass through Python.
    """

    view: memoryview
    fd: int
    offset: int


@dataclass
class Member:
    name: str
    data: bytes | None = None
    path: Path | None = None  # streamed from a file
    pieces: Iterable[bytes | memoryview | FileRange] | None = None  # payload.tar.zst from its packs
    length: int | None = None  # the size of ``pieces``, which the header needs before they are read

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.pieces is not None:
            assert self.length is not None
            return self.length
        return os.path.getsize(self.path)  # type: ignore[arg-type]


class _HashingWriter:
    """Writes through to a file while hashing and counting, for the artifact digest."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self.size = 0
        self.kernel_copy = hasattr(os, "copy_file_range")

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def copy(self, piece: FileRange) -> None:
        """Append ``piece``: copied file to file by the kernel where it can, else written from its view."""
        self.hasher.update(piece.view)
        n = len(piece.view)
        self.fh.flush()  # what is buffered goes first: the copy appends at the file's own offset
        done = 0
        if self.kernel_copy:
            try:
                while done < n:
                    step = os.copy_file_range(piece.fd, self.fh.fileno(), n - done, piece.offset + done)
                    if step <= 0:
                        raise OSError(f"copy_file_range copied nothing at offset {piece.offset + done}")
                    done += step
            except OSError:
                # not supported here (another filesystem, an old kernel): the rest is written from the view
                # (a real I/O error shows again there); the file offset has moved by exactly ``done``
                self.kernel_copy = False
        if done < n:
            self.fh.write(piece.view[done:])
        self.size += n


def capsule_size(sizes: Iterable[int]) -> int:
    """The size of the file :func:`write_capsule` writes for members of these sizes."""
    total = sum(BLOCK + s + (-s) % BLOCK for s in sizes) + 2 * BLOCK
    return total + (-total) % RECORD


def write_capsule(out_path: Path, members: list[Member], epoch: int,
                  temp_dir: Path | None = None) -> tuple[str, int]:
    """Write the outer tar atomically (its temp file in ``temp_dir``); returns (blake3 hex of the file, size)."""
    with atomic_writer(out_path, temp_dir=temp_dir) as fh:
        w = _HashingWriter(fh)
        for m in members:
            w.write(tar_header.header(m.name, size=m.size, mtime=epoch))
            if m.data is not None:
                w.write(m.data)
            elif m.pieces is not None:
                start = w.size
                for piece in m.pieces:
                    if isinstance(piece, FileRange):
                        w.copy(piece)
                    else:
                        w.write(piece)
                if w.size - start != m.size:
                    raise _fail(f"{m.name} came out {w.size - start} bytes long, not {m.size}")
            else:
                with open(m.path, "rb") as src:  # type: ignore[arg-type]
                    while chunk := src.read(COPY):
                        w.write(chunk)
            w.write(tar_header.padding(m.size))
        w.write(b"\0" * (2 * BLOCK))
        pad = (-w.size) % RECORD
        if pad:
            w.write(b"\0" * pad)
        stop_point("artifact.written")  # crash tests: the whole artifact in its temp file, not renamed
        return w.hasher.hexdigest(), w.size
