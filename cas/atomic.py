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
def atomic_writer(target: Path, *, mode: int = 0o644, no_clobber: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it becomes ``target`` atomically.

    On any exception the temp file is removed and ``target`` is untouched.
    With ``no_clobber`` an existing target is kept (the new bytes are dropped),
    which is the right thing for content-addressed objects.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)
        if no_clobber:
            try:
                os.link(tmp_path, target)
            except FileExistsError:
                pass
            tmp_path.unlink()
        else:
            os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(target: Path, data: bytes, *, mode: int = 0o644, no_clobber: bool = False) -> None:
    with atomic_writer(target, mode=mode, no_clobber=no_clobber) as fh:
        fh.write(data)


def write_text_atomic(target: Path, text: str, *, mode: int = 0o644) -> None:
    write_bytes_atomic(target, text.encode("utf-8"), mode=mode)
