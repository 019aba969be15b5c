"""Readable streams over bytes that are not one plain file: a window of a file, or a
sequence of chunks. Both feed ``tarfile``/``zstandard`` stream readers so payloads are
read in place, never copied whole into memory."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, BinaryIO


class FileSlice(io.RawIOBase):
    """A read-only window ``[offset, offset+size)`` of an open file (e.g. one tar member)."""

    def __init__(self, fh: BinaryIO, offset: int, size: int) -> None:
        self.fh, self.pos, self.end = fh, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.pos)  # seek every time: the file object may be shared
        data = self.fh.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class ChunkStream(io.RawIOBase):
    """A readable stream over an iterable of byte strings (CAS chunks, downloaded frames)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(chunks)
        self.buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not len(self.buf):
            try:
                self.buf = memoryview(next(self.chunks))
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n
