"""The source walk: one scandir per directory, the same entries as a plain os.walk + lstat reference."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import AtoError
from stages.sources import PRUNED_DIRS, PackFilter, collect


def reference(root: Path, pack_filter: PackFilter) -> list[tuple]:
    """An independent walk: os.walk, a venv test by pyvenv.cfg, one lstat per admitted name."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        kept = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                filenames.append(d)
            elif d not in PRUNED_DIRS and not os.path.exists(os.path.join(full, "pyvenv.cfg")):
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not pack_filter.admits(rel):
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out.append((rel, full, "symlink", 0o777, 0, os.readlink(full), None))
            elif stat.S_ISREG(st.st_mode):
                out.append((rel, full, "file", 0o755 if st.st_mode & 0o111 else 0o644, st.st_size, None,
                            (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
    return sorted(out, key=lambda t: t[0].encode())


def test_the_walk_finds_what_a_plain_os_walk_finds(tmp_path: Path) -> None:
    root = tmp_path / "p"
    for rel in ("a.txt", "src/m.py", "src/deep/er/x.js", "node_modules/dep/i.js", ".git/HEAD", "env/pyvenv.cfg",
                "env/lib/site.py", "notenv/pyvenv.cfg.bak", "z/.env", "z/.env.example", "secret.pem", "b.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "bin.sh").write_text("#!/bin/sh\n")
    (root / "bin.sh").chmod(0o755)
    (root / "to-src").symlink_to("src")  # a symlink to a directory: packed as a symlink, not followed
    (root / "to-a").symlink_to("a.txt")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")  # not project content
    linkvenv = root / "lv"
    linkvenv.mkdir()
    (linkvenv / "pyvenv.cfg").symlink_to("../nowhere.cfg")  # a broken pyvenv.cfg link: not a virtualenv
    (linkvenv / "kept.txt").write_text("kept")
    pack_filter = PackFilter(None, ("b.txt",))
    got = [(e.relpath, str(e.abspath), e.kind, e.mode, e.size, e.link_target, e.stat_key)
           for e in collect(root, pack_filter)]
    assert got == reference(root, pack_filter)
    names = [g[0] for g in got]
    assert "to-src" in names and "src/deep/er/x.js" in names and "z/.env.example" in names
    assert not any(n.startswith(("env/", "node_modules/", ".git/")) or n in ("fifo", "b.txt", "z/.env")
                   for n in names)


def test_a_path_too_long_for_a_capsule_is_refused_where_something_below_would_be_packed(tmp_path: Path) -> None:
    root = tmp_path / "p"
    deep = root.joinpath(*["d"] * 260)  # deeper than MAX_DEPTH (256)
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("x")
    with pytest.raises(AtoError) as err:
        collect(root, PackFilter(None, ()))
    assert err.value.code == "E108"
    assert collect(root, PackFilter(None, ("d/**",))) == []  # excluded: nothing below is packed, no error
