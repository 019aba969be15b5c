"""Temp files and dirs: one name for all of them, so what a crash leaves behind is found and swept.

Every writer of ato names its temp files (and temp dirs) with :func:`temp_name`::

    .<what, cut to 64 chars>.<pid>-<start>.<8 hex>.ato-tmp

``pid`` and ``start`` identify the process that owns it (``start`` is the process's start time
in clock ticks after boot, read from ``/proc``, so a recycled PID is not taken for the owner;
0 where there is no ``/proc``). A sweep removes an entry only when its owner is gone, so it never
deletes what another running ato process is still writing, however long that takes. A process
that is killed (``kill -9``, power loss) cannot clean up after itself; the next ``ato cas gc``,
build, install or registry start does.

The name ends in ``.ato-tmp`` and starts with a dot, so it is hidden from listings and never
looks like a ``.capsule`` or a CAS object; ``stages.sources`` also excludes it from every build.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SUFFIX = ".ato-tmp"
GLOB = f".*{SUFFIX}"  # the glob that finds them (a pattern for excludes, too)
_STEM_MAX = 64  # keeps every temp name far below NAME_MAX (255 bytes) whatever the target's name
_NAME = re.compile(r"^\..*\.(\d+)-(\d+)\.[0-9a-f]{8}" + re.escape(SUFFIX) + r"$", re.DOTALL)


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` (field 22 of /proc/<pid>/stat); None if there is no such process.

    A zombie (killed, not yet reaped by its parent) counts as gone: it writes nothing any more.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


@cache
def _proc_available() -> bool:
    return os.path.isdir("/proc/self")


_own: dict[int, str] = {}


def _identity() -> str:
    """``<pid>-<start>`` of this process (recomputed after a fork: the child is another owner)."""
    pid = os.getpid()
    ident = _own.get(pid)
    if ident is None:
        start = (_start_ticks(pid) or 0) if _proc_available() else 0
        ident = _own[pid] = f"{pid}-{start}"
    return ident


def temp_name(what: str) -> str:
    """A fresh temp name owned by this process, for a file or dir that will become ``what``."""
    stem = what.encode("utf-8")[:_STEM_MAX].decode("utf-8", "ignore").replace("/", "_") or "tmp"
    return f".{stem}.{_identity()}.{secrets.token_hex(4)}{SUFFIX}"


def temp_path(target: Path, directory: Path | None = None) -> Path:
    """A temp name for ``target``: beside it (same filesystem, so a rename publishes it) or in ``directory``."""
    target = Path(target)
    return (Path(directory) if directory is not None else target.parent) / temp_name(target.name)


def is_temp(name: str) -> bool:
    return _NAME.match(name) is not None


def owner_alive(name: str) -> bool:
    """Is the process that named this temp entry still running (and the same process, not a recycled PID)?"""
    m = _NAME.match(name)
    if m is None:
        return False
    pid, start = int(m.group(1)), int(m.group(2))
    if pid == os.getpid():
        return _identity() == f"{pid}-{start}"
    if _proc_available():
        now = _start_ticks(pid)
        return now is not None and (start == 0 or now in (0, start))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept_live: int = 0  # temp entries whose owner is still running

    def add(self, other: SweepReport) -> None:
        self.removed += other.removed
        self.bytes_freed += other.bytes_freed
        self.kept_live += other.kept_live


def find(root: Path, *, recursive: bool = False) -> Iterator[Path]:
    """Temp entries under ``root`` (only in ``root`` itself unless ``recursive``); never follows symlinks."""
    root = Path(root)
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if is_temp(entry.name):
                yield Path(entry.path)
            elif recursive and entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))


def _size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for base, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, f)).st_size
    return total


def sweep(roots: Iterable[Path], *, recursive: bool = False, dry_run: bool = False) -> SweepReport:
    """Remove the temp entries under ``roots`` whose owner process is gone; report what went."""
    report = SweepReport()
    for root in roots:
        for path in find(root, recursive=recursive):
            if owner_alive(path.name):
                report.kept_live += 1
                continue
            size = _size(path)
            if not dry_run:
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:
                    continue  # another sweep got there first
                except OSError:
                    continue
            report.removed.append(str(path))
            report.bytes_freed += size
    return report


def shown_name(name: str) -> str:
    """The name a temp entry will be published under (``.NAME.<pid>-<start>.<hex>.ato-tmp`` -> ``NAME``),
    for messages about it: a person knows the artifact, not this process's temp file. Other names as given."""
    m = _NAME.match(name)
    return name[1:m.start(1) - 1] if m else name
