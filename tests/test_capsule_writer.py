"""The artifact writer: pieces copied file to file by the kernel give the same bytes as pieces written."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import blake3
import pytest

from stages.capsule import archive


def _members(source: Path, data: bytes) -> tuple[list[archive.Member], list[archive.Member]]:
    fd = os.open(source, os.O_RDONLY)
    mm = mmap.mmap(fd, len(data), access=mmap.ACCESS_READ)
    view = memoryview(mm)
    ranges = [archive.FileRange(view[0:1000], fd, 0), b"written between",
              archive.FileRange(view[1000:len(data)], fd, 1000)]
    plain = [bytes(view[0:1000]), b"written between", bytes(view[1000:len(data)])]
    size = len(data) + len(b"written between")

    def layout(pieces: list) -> list[archive.Member]:
        return [archive.Member("capsule.toml", b"a = 1\n"), archive.Member("payload.tar.zst", pieces=pieces,
                                                                          length=size),
                archive.Member("payload.v3.manifest.json", b"{}")]
    return layout(ranges), layout(plain)


@pytest.mark.parametrize("kernel", ["copy_file_range", "unsupported", "short copies"])
def test_file_ranges_are_copied_to_the_same_bytes_and_digest(tmp_path: Path, kernel: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(7).randbytes(3 << 20)
    source = tmp_path / "pack"
    source.write_bytes(data)
    ranged, plain = _members(source, data)
    real = os.copy_file_range
    if kernel == "unsupported":  # another filesystem, or a kernel without it: written from the view instead
        def refuse(*_a: object, **_k: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif kernel == "short copies":  # the kernel may copy less than asked: the writer goes on from there
        monkeypatch.setattr(os, "copy_file_range", lambda src, dst, n, off: real(src, dst, min(n, 4097), off))
    got = archive.write_capsule(tmp_path / "ranged.capsule", ranged, 0)
    want = archive.write_capsule(tmp_path / "plain.capsule", plain, 0)
    assert (tmp_path / "ranged.capsule").read_bytes() == (tmp_path / "plain.capsule").read_bytes()
    assert got == want and got[0] == blake3.blake3((tmp_path / "plain.capsule").read_bytes()).hexdigest()
