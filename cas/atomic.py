"""Atomic file writes: temp file in the target dir, fsync, rename.

A reader never sees a half-written file, and a crash leaves either the old file
or the new one. ``no_clobber`` publishes with link() so concurrent writers of
the same content-addressed object cannot overwrite each other.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _synced_temp(target: Path, mode: int) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file beside ``target``, fsynced and chmodded on clean exit, removed on error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp_path
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(target: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``target`` atomically.

    On any exception the temp file is removed and ``target`` is untouched.
    """
    target = Path(target)
    with _synced_temp(target, mode) as (fh, tmp_path):
        yield fh
    try:
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(target: Path, data: bytes, *, mode: int = 0o644, no_clobber: bool = False) -> bool:
    """Write ``data`` to ``target`` atomically; returns False when ``no_clobber`` kept an existing file."""
    target = Path(target)
    if not no_clobber:
        with atomic_writer(target, mode=mode) as fh:
            fh.write(data)
        return True
    with _synced_temp(target, mode) as (fh, tmp_path):
        fh.write(data)
    try:
        os.link(tmp_path, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str, *, mode: int = 0o644) -> None:
    write_bytes_atomic(target, text.encode("utf-8"), mode=mode)
