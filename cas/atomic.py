"""Atomic file writes: temp file in the target dir, fsync, rename.

A reader never sees a half-written file, and a crash leaves either the old file
or the new one (plus a temp file named by :mod:`cas.tempfiles`, which the next
sweep removes). ``no_clobber`` publishes with link() so concurrent writers of
the same content-addressed object cannot overwrite each other. ``temp_dir`` puts
the temp file elsewhere on the same filesystem (the CAS keeps all of its temps in
one directory, so a sweep need not walk the store).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cas.tempfiles import temp_path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _synced_temp(target: Path, mode: int, temp_dir: Path | None = None) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file for ``target``, fsynced and chmodded on clean exit, removed on error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path(target, temp_dir)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
def atomic_writer(target: Path, *, mode: int = 0o644, temp_dir: Path | None = None,
                  check: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``target`` atomically.

    On any exception the temp file is removed and ``target`` is untouched. ``check`` is called with
    the complete, fsynced temp file before it replaces ``target``: raise there to keep ``target`` as it
    is (a download that must verify before it may replace the last good copy).
    """
    target = Path(target)
    with _synced_temp(target, mode, temp_dir) as (fh, tmp_path):
        yield fh
    try:
        if check is not None:
            check(tmp_path)
        _replace(tmp_path, target, mode)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _replace(tmp_path: Path, target: Path, mode: int) -> None:
    """Rename into place; a temp on another filesystem is first copied to a temp beside ``target``."""
    try:
        os.replace(tmp_path, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with _synced_temp(target, mode) as (fh, near), open(tmp_path, "rb") as src:
        shutil.copyfileobj(src, fh, 1 << 20)
    try:
        os.replace(near, target)
    except BaseException:
        near.unlink(missing_ok=True)
        raise
    tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(target: Path, data: bytes, *, mode: int = 0o644, no_clobber: bool = False,
                       temp_dir: Path | None = None) -> bool:
    """Write ``data`` to ``target`` atomically; returns False when ``no_clobber`` kept an existing file."""
    target = Path(target)
    if not no_clobber:
        with atomic_writer(target, mode=mode, temp_dir=temp_dir) as fh:
            fh.write(data)
        return True
    with _synced_temp(target, mode, temp_dir) as (fh, tmp_path):
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
