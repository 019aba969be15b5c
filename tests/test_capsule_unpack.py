"""The safe unpacker (stages/capsule/unpack.py) on its own: what it writes, what it never follows,
and what it checks before it writes anything."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cas.tree import tree_digest
from pipeline.errors import E_DISK_FULL, AtoError
from stages.capsule import NO_CEILING, read_capsule, unpack_payload, verify, write_root_file
from stages.capsule import unpack as unpack_module
from tests.hostile_support import Entry, capsule


def _unpack(tmp_path: Path, entries: list[Entry]) -> Path:
    art = capsule(tmp_path / "a.capsule", "a", "1.0.0", entries)
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack_payload(read_capsule(art), dest)
    return dest


def test_files_dirs_links_and_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        dest = _unpack(tmp_path, [Entry("bin/tool", b"#!/bin/sh\n", mode=0o700), Entry("lib/a.txt", b"a\n", mode=0o600),
                                  Entry("lib/h", kind="hardlink", link="lib/a.txt"), Entry("empty", kind="dir"),
                                  Entry("lib/up", kind="symlink", link="../bin/tool")])
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.lstat(dest / p).st_mode)  # noqa: E731
    assert (mode("bin/tool"), mode("lib/a.txt"), mode("lib"), mode("empty")) == (0o755, 0o644, 0o755, 0o755)
    assert os.path.samefile(dest / "lib/a.txt", dest / "lib/h")
    assert os.readlink(dest / "lib/up") == "../bin/tool" and (dest / "lib/up").read_bytes() == b"#!/bin/sh\n"
    # the same payload gives the same tree digest however often it is unpacked
    again = tmp_path / "again"
    again.mkdir()
    unpack_payload(read_capsule(tmp_path / "a.capsule"), again)
    assert tree_digest(again) == tree_digest(dest)


def test_the_unpacker_refuses_on_its_own_what_the_verifier_refuses(tmp_path: Path) -> None:
    """Even for an artifact nobody verified, nothing is written through or outside the tree."""
    (tmp_path / "outside").mkdir()
    art = capsule(tmp_path / "evil.capsule", "evil", "1.0.0",
                  [Entry("a/b/l", kind="symlink", link="../.."), Entry("esc", kind="symlink", link="a/b/l/../../.."),
                   Entry("z", b"late file\n")])
    assert verify(art, NO_CEILING).error is not None
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(AtoError) as err:
        unpack_payload(read_capsule(art), dest)
    assert err.value.code == "E208" and "resolves outside the payload root" in err.value.message
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["dest"]
    assert not any(p.is_symlink() for p in dest.rglob("*")), "no symlink is created before the tree is judged"


def test_free_space_is_checked_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = capsule(tmp_path / "a.capsule", "a", "1.0.0", [Entry("big.bin", os.urandom(100_000))])
    dest = tmp_path / "dest"
    dest.mkdir()
    real = os.statvfs

    class Tiny:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize, self.f_bavail = st.f_frsize, 1

    monkeypatch.setattr(unpack_module.os, "statvfs", lambda p: Tiny(real(p)))
    with pytest.raises(AtoError) as err:
        unpack_payload(read_capsule(art), dest)
    assert err.value.code == E_DISK_FULL and "not enough free space" in err.value.message
    assert list(dest.iterdir()) == []


def test_root_files_replace_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("keep\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(str(target), dest / "capsule.toml")  # as if a payload had planted it
    write_root_file(dest, "capsule.toml", b"name = 'x'\n")
    assert target.read_text() == "keep\n"
    assert not (dest / "capsule.toml").is_symlink() and (dest / "capsule.toml").read_bytes() == b"name = 'x'\n"
    (dest / "capsule.lock.json").mkdir()
    with pytest.raises(AtoError) as err:
        write_root_file(dest, "capsule.lock.json", b"{}")
    assert err.value.code == "E208"
