"""The process tree of one run: every process a capsule starts is found and stopped together.

A unit's own process group is not enough: ``npm start`` runs ``sh`` which runs
``node``, a daemon double-forks into a new session, ``podman run`` hands the
container to ``conmon``. The supervisor that runs the units therefore contains
them three ways, the strongest the host offers first:

* **cgroup v2** (where the host lets us create one): every unit joins a cgroup
  made for the run; ``cgroup.procs`` lists every member whatever it did, and
  ``cgroup.kill`` ends them all at once.
* **child subreaper** (``PR_SET_CHILD_SUBREAPER``): an orphaned descendant is
  re-parented to the supervisor instead of PID 1, so walking ``/proc`` by parent
  pid finds the whole tree.
* **process groups**: each unit leads its own group.

The supervisor itself dies with the ``ato run`` that started it
(``PR_SET_PDEATHSIG``), so even ``kill -9`` of the CLI stops the whole tree:
SIGTERM first, SIGKILL after the grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.02
CGROUP_PREFIX = "ato-"


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it (Linux); False where unsupported."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    return _prctl(PR_SET_PDEATHSIG, sig)


# ------------------------------------------------------------------ /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has already stopped running)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one pass over /proc."""
    out: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None or len(fields) < 2:
            continue
        out.setdefault(int(fields[1]), []).append(int(name))
    return out


def descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree (not ``root`` itself)."""
    tree = children_map()
    out: list[int] = []
    stack = list(tree.get(root, ()))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(tree.get(pid, ()))
    return out


# ------------------------------------------------------------------ cgroup v2


def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        return None
    return None


def _own_cgroup2() -> str | None:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def create_cgroup(name: str) -> Path | None:
    """A fresh cgroup v2 below ours, or None where the host does not allow it (never an error)."""
    mount, own = _cgroup2_mount(), _own_cgroup2()
    if mount is None or own is None:
        return None
    path = mount / own.lstrip("/") / f"{CGROUP_PREFIX}{name}"
    try:
        path.mkdir()
    except OSError:
        return None
    if not (path / "cgroup.procs").exists():
        _remove_cgroup(path)
        return None
    return path


def cgroup_pids(path: Path | None) -> list[int]:
    if path is None:
        return []
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_cgroup(path: Path | None) -> None:
    """SIGKILL every member of the cgroup (``cgroup.kill``, or one by one on older kernels)."""
    if path is None:
        return
    try:
        (path / "cgroup.kill").write_text("1")
        return
    except OSError:
        pass
    for pid in cgroup_pids(path):
        _signal(pid, signal.SIGKILL)


def remove_cgroup(path: str | Path | None, wait: float = 2.0) -> None:
    """Remove a run's (empty) cgroup; only ever one of ours."""
    if path and Path(path).name.startswith(CGROUP_PREFIX):
        _remove_cgroup(Path(path), wait)


def _remove_cgroup(path: Path | None, wait: float = 2.0) -> None:
    if path is None:
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(POLL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ the tree


class Tree:
    """The processes of one run, rooted at this (supervisor) process.

    ``join()`` is run in each unit's child between fork and exec; ``terminate()``
    stops every member; ``close()`` removes the cgroup.
    """

    def __init__(self, name: str, *, cgroup: bool = True) -> None:
        self.root = os.getpid()
        self.subreaper = become_subreaper()
        self.cgroup = create_cgroup(name) if cgroup else None
        self._procs_fd: int | None = None
        if self.cgroup is not None:
            try:
                self._procs_fd = os.open(self.cgroup / "cgroup.procs", os.O_WRONLY)
            except OSError:
                _remove_cgroup(self.cgroup)
                self.cgroup = None

    def join(self) -> None:
        """In a child before exec: move into the run's cgroup (best effort; the subreaper still holds it)."""
        if self._procs_fd is not None:
            try:
                os.write(self._procs_fd, b"0")
            except OSError:
                pass

    def members(self) -> set[int]:
        """Every process of the run still known to the kernel, except this supervisor."""
        pids = set(cgroup_pids(self.cgroup)) | set(descendants(self.root))
        pids.discard(self.root)
        return pids

    def live_members(self) -> set[int]:
        return {p for p in self.members() if alive(p)}

    def reap(self, keep: Iterable[int] = ()) -> None:
        """Collect zombie orphans re-parented to us (never the units' own Popen children in ``keep``)."""
        kept = set(keep)
        for pid in children_map().get(self.root, ()):
            if pid in kept:
                continue
            fields = _stat_fields(pid)
            if fields and fields[0] == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def terminate(self, grace: float, *, keep: Iterable[int] = (), force: bool = False,
                  wait: Callable[[], None] | None = None) -> bool:
        """SIGTERM every member, SIGKILL what is left after ``grace`` seconds; True when none remains."""
        kept = set(keep)
        if not force:
            for pid in self.live_members():
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.live_members():
                if wait:
                    wait()
                self.reap(kept)
                time.sleep(POLL)
        deadline = time.monotonic() + 5
        while True:
            left = self.live_members()
            if not left:
                break
            kill_cgroup(self.cgroup)
            for pid in left:
                _signal(pid, signal.SIGKILL)
            if wait:
                wait()
            self.reap(kept)
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        self.reap(kept)
        return True

    def close(self) -> None:
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None
        _remove_cgroup(self.cgroup)


def stop_recorded(supervisor: int | None, cgroup: str | None, *, force: bool) -> set[int]:
    """``ato close --force``: signal a background run's whole tree from outside it; the pids signalled."""
    pids = set(descendants(supervisor)) if supervisor else set()
    path = Path(cgroup) if cgroup and Path(cgroup).name.startswith(CGROUP_PREFIX) else None
    pids |= set(cgroup_pids(path))
    sig = signal.SIGKILL if force else signal.SIGTERM
    if force:
        kill_cgroup(path)
    for pid in pids:
        _signal(pid, sig)
    if supervisor:
        _signal(supervisor, sig)
    return pids
