"""The one safe unpacker: a verified payload into an empty directory, never through a symlink.

``fetch`` and ``run`` both unpack with :func:`unpack_payload`. It decodes the payload again
(checking every chunk's BLAKE3 on the way, so what lands on disk is what was verified even if
the file changed since) and replays it through the same :class:`~stages.capsule.entries.TreeModel`
rules the verifier applied. Writing is descriptor-based: each parent directory is opened from the
root one component at a time with ``O_NOFOLLOW | O_DIRECTORY``, and files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to it, so no write can pass through a symlink. Hard
links are made from an earlier regular file with ``linkat`` (no following). Symlinks are created
last, once every symlink has been resolved on the complete tree and found to stay inside it.

Before anything is written, the free space of the target filesystem must exceed the payload's
decoded size (the decoded tar is an upper bound of what its files take).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from cas.streams import ChunkStream, FileSlice
from pipeline.errors import E_DISK_FULL, E_NAME_TOO_LONG, E_USAGE, AtoError
from stages.capsule.entries import DIR_MODE, Placed, TreeModel, UnsafeEntry
from stages.capsule.errors import CapsuleError
from stages.capsule.payload import READ, PayloadCorrupt, iter_chunks, refusal
from stages.capsule.payload_tar import TarFormatError, TarReader
from stages.capsule.reader import Capsule

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Unpacked:
    root: Path
    entries: int
    files: int
    bytes: int


def check_free_space(dest: Path, needed: int) -> None:
    """Refuse to start an unpack the filesystem cannot hold."""
    st = os.statvfs(dest)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise AtoError(E_DISK_FULL, f"not enough free space to unpack: the payload needs up to {needed} bytes, "
                                   f"{dest} has {free} free", details={"path": str(dest), "needed": needed,
                                                                       "free": free},
                       hint="free some disk space (ato cas gc drops unused chunks) and retry")


class _Tree:
    """Directory descriptors for one unpack root; every lookup is O_NOFOLLOW, one component at a time."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._cached: tuple[str, int] | None = None  # the last parent dir used: entries come sorted

    def close(self) -> None:
        self._drop()
        os.close(self.root_fd)

    def _drop(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def parent(self, rel: str) -> tuple[int, str]:
        """(fd of the directory holding ``rel``, its last component); missing directories are created."""
        head, _, name = rel.rpartition("/")
        if self._cached is not None and self._cached[0] == head:
            return self._cached[1], name
        self._drop()
        fd = os.dup(self.root_fd)
        try:
            for part in head.split("/") if head else []:
                created = True
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    created = False
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
                if created:
                    os.fchmod(fd, DIR_MODE)  # whatever the umask: modes are part of the tree digest
        except BaseException:
            os.close(fd)
            raise
        self._cached = (head, fd)
        return fd, name


def _write_file(tree: _Tree, placed: Placed, data: Iterator[bytes], durable: bool) -> int:
    dir_fd, name = tree.parent(placed.rel)
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
    written = 0
    try:
        for piece in data:
            view = memoryview(piece)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
        if durable:
            os.fsync(fd)
        os.fchmod(fd, placed.mode)
    finally:
        os.close(fd)
    return written


def _place(tree: _Tree, reader: TarReader, placed: Placed, durable: bool, links: list[Placed],
           counts: list[int]) -> None:
    if placed.kind == "directory":
        dir_fd, name = tree.parent(placed.rel)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchmod(sub, placed.mode)
        finally:
            os.close(sub)
    elif placed.kind == "file":
        counts[1] += _write_file(tree, placed, reader.data(), durable)
        counts[0] += 1
    elif placed.kind == "hardlink":
        assert placed.link is not None
        src_fd, src_name = tree.parent(placed.link)
        src_fd = os.dup(src_fd)
        try:
            dst_fd, dst_name = tree.parent(placed.rel)
            os.link(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            os.close(src_fd)
        counts[0] += 1
    else:
        links.append(placed)  # symlinks last: nothing is written after a link exists


def unpack_payload(capsule: Capsule, dest: Path, *, durable: bool = False) -> Unpacked:
    """Unpack the payload of a verified artifact into the existing, empty directory ``dest``.

    ``durable`` fsyncs every file (the caller fsyncs the directories). Raises E208 for anything
    the payload should not hold (then ``dest`` holds a partial tree: unpack into a temp dir and
    rename it into place only on success).
    """
    if capsule.path is None:
        raise ValueError("a skeleton has no payload to unpack")
    dest = Path(dest)
    check_free_space(dest, capsule.payload_manifest.total_raw_size)
    tree = _Tree(dest)
    links: list[Placed] = []
    counts = [0, 0]
    model = TreeModel()
    try:
        with open(capsule.path, "rb") as fh:
            window = io.BufferedReader(FileSlice(fh, capsule.payload_offset, capsule.payload_size), READ)
            chunks = iter_chunks(window, capsule.payload_manifest, blake3.blake3())
            reader = TarReader(io.BufferedReader(ChunkStream(chunks), READ))
            for entry in reader:
                placed = model.add(entry)
                if placed is not None:
                    _place(tree, reader, placed, durable, links, counts)
            model.finish()
            for _rest in chunks:
                pass
        for placed in links:
            dir_fd, name = tree.parent(placed.rel)
            os.symlink(placed.link or "", name, dir_fd=dir_fd)
        return Unpacked(dest, reader.entries, counts[0], counts[1])
    except (UnsafeEntry, TarFormatError, PayloadCorrupt) as exc:
        raise refusal(exc) from None
    except OSError as exc:
        raise _os_error(exc, dest) from None
    finally:
        tree.close()


def _os_error(exc: OSError, dest: Path) -> AtoError:
    if exc.errno == errno.ENOSPC:
        return AtoError(E_DISK_FULL, f"the disk filled up while unpacking into {dest}",
                        details={"path": str(dest)}, hint="free some disk space and retry")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
        return CapsuleError("digests", f"refusing to unpack: an entry would be written through a symlink or over "
                                       f"another entry ({exc.strerror})", reason="unsafe_entry")
    if exc.errno == errno.ENAMETOOLONG:
        return CapsuleError("digests", "a payload path is too long for this filesystem", code=E_NAME_TOO_LONG,
                            reason="name_too_long")
    return AtoError(E_USAGE, f"cannot unpack into {dest}: {exc.strerror}", details={"path": str(dest)})


def write_root_file(dest: Path, name: str, data: bytes, mode: int = 0o644) -> None:
    """Put ``name`` (one component) at the root of an unpacked tree, replacing a file or symlink of
    that name from the payload; never written through a symlink. A directory there is refused."""
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        try:
            os.unlink(name, dir_fd=root_fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise CapsuleError("digests", f"the payload holds a directory named {name}, which the artifact's own "
                                          f"{name} must replace", reason="unsafe_entry") from None
        fd = os.open(name, _NEW_FILE, mode, dir_fd=root_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
