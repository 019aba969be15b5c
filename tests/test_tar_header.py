"""Hand-written tar headers: readable by tarfile and GNU tar, identical to ustar for plain names."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from stages.capsule.tar_header import header, padding

NAMES = ["a/b.py", "x" * 100, "y" * 101, "dir/é.txt", "日本/ファイル.md", "a b/c", "d/" + "z" * 300]


def _archive(names: list[str]) -> bytes:
    buf = io.BytesIO()
    for i, name in enumerate(names):
        data = bytes(range(i + 3))
        buf.write(header(name, size=len(data), mode=0o755 if i % 2 else 0o644, mtime=1_700_000_000))
        buf.write(data + padding(len(data)))
    buf.write(header("link", symlink_to="t/" + "q" * 150, mode=0o777, mtime=1_700_000_000))
    buf.write(b"\0" * 1024)
    return buf.getvalue()


def test_tarfile_reads_every_member_exactly() -> None:
    with tarfile.open(fileobj=io.BytesIO(_archive(NAMES))) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [*NAMES, "link"]
        for i, m in enumerate(members[:-1]):
            assert tf.extractfile(m).read() == bytes(range(i + 3))
            assert m.mode == (0o755 if i % 2 else 0o644) and m.mtime == 1_700_000_000
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert members[-1].issym() and members[-1].linkname == "t/" + "q" * 150


def test_gnu_tar_lists_it(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    path.write_bytes(_archive(NAMES))
    out = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [*NAMES, "link"]


@pytest.mark.parametrize("name", ["a/b.py", "src/main.py", "x" * 100])
def test_plain_names_match_ustar_bytes(name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = 10, 0o644, 0
    expected = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")
    # tarfile writes empty device fields as zeros in some releases and NULs in others; we write NULs.
    assert header(name, size=10)[:329] == expected[:329]
