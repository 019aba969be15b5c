"""cas.tempfiles: one name shape for every temp file, and sweeps that spare live owners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cas import tempfiles
from cas.atomic import write_bytes_atomic
from tests.conftest import process_state


def test_names_are_recognizable_and_fit_any_filesystem(tmp_path: Path) -> None:
    name = tempfiles.temp_name("x" * 300 + ".capsule")
    assert len(name.encode()) < 120 and tempfiles.is_temp(name) and name.endswith(tempfiles.SUFFIX)
    (tmp_path / name).write_bytes(b"ok")  # no ENAMETOOLONG however long the target's name
    assert tempfiles.owner_alive(name)
    assert not tempfiles.is_temp(".a.capsule.k3j2h1g0.tmp") and not tempfiles.is_temp("a.ato-tmp")
    assert tempfiles.temp_name("é" * 100).encode().decode("utf-8")  # never cuts a character in half


def test_an_atomic_write_that_fails_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"

    class Boom(Exception):
        pass

    try:
        from cas.atomic import atomic_writer

        with atomic_writer(target) as fh:
            fh.write(b"half")
            raise Boom
    except Boom:
        pass
    assert list(tmp_path.iterdir()) == []
    write_bytes_atomic(target, b"whole", temp_dir=tmp_path / "tmp")
    assert target.read_bytes() == b"whole" and list((tmp_path / "tmp").iterdir()) == []


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_writers_temp_is_swept_even_before_it_is_reaped(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from cas import tempfiles
        open({str(tmp_path)!r} + "/" + tempfiles.temp_name("obj.zst"), "wb").write(b"partial")
        os.kill(os.getpid(), signal.SIGSTOP)
    """)])
    try:
        wait_for(lambda: process_state(child.pid) == "T")  # it wrote its temp file and stopped itself
        (left,) = tempfiles.find(tmp_path)
        assert tempfiles.sweep([tmp_path]).kept_live == 1 and left.exists()  # stopped, not dead: kept
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: process_state(child.pid) == "Z")  # a zombie: killed, not reaped by its parent (this test) yet
        report = tempfiles.sweep([tmp_path])
        assert report.removed == [str(left)] and report.bytes_freed == len(b"partial")
    finally:
        child.kill()
        child.wait()


def test_a_dry_run_lists_and_removes_nothing(tmp_path: Path) -> None:
    dead = tmp_path / f".x.zst.999999999-1.0badf00d{tempfiles.SUFFIX}"
    (dead / "inner").mkdir(parents=True)
    (dead / "inner" / "f").write_bytes(b"12345")
    listed = tempfiles.sweep([tmp_path], dry_run=True)
    assert listed.removed == [str(dead)] and listed.bytes_freed == 5 and dead.exists()
    assert tempfiles.sweep([tmp_path]).removed == [str(dead)] and not dead.exists()


def test_a_temp_name_is_shown_as_the_name_it_will_be_published_under() -> None:
    for name in ("acme-1.0.0.capsule", "a.b.c", "x"):
        assert tempfiles.shown_name(tempfiles.temp_name(name)) == name
    assert tempfiles.shown_name("plain.capsule") == "plain.capsule"
    assert tempfiles.shown_name(".hidden.ato-tmp") == ".hidden.ato-tmp"  # not one of ours: as given
