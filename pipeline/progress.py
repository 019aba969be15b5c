"""Progress of long operations, reported by stages and shown (or not) by the CLI; one byte format.

Stages never print. A stage that moves many bytes takes a :class:`Progress` and reports into it;
the default, :data:`SILENT`, does nothing, so callers that do not care pass nothing. The CLI
passes a live bar (rich, on a terminal only) or :data:`SILENT` (pipes, ``--json``, CI logs).

    with progress.task("Uploading", total=size, unit="bytes") as task:
        for piece in pieces:
            send(piece)
            task.advance(len(piece))

:func:`human_bytes` is the one human byte format (decimal units, as rich's bars show them):
every human line that states a size uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Protocol

_UNITS = ("kB", "MB", "GB", "TB", "PB")


def human_bytes(n: int | float) -> str:
    """``512 B``, ``1.2 kB``, ``105.5 MB``: powers of 1000, one decimal."""
    n = float(n)
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in _UNITS:
        n /= 1000
        if abs(n) < 1000 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


class Task(Protocol):
    """One bar: a label, a total (None when unknown), how much is done, and optionally a chunk count."""

    def advance(self, amount: int = 1, *, chunks: int = 0) -> None: ...
    def update(self, *, completed: int | None = None, total: int | None = None,
               label: str | None = None) -> None: ...
    def __enter__(self) -> Task: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Progress(Protocol):
    """Where a stage reports progress; ``unit`` is ``"bytes"`` or a count (``"files"``); ``chunks`` is the
    number of chunks the bytes come in, when the task counts those too."""

    def task(self, label: str, total: int | None = None, unit: str = "bytes", chunks: int | None = None) -> Task: ...


class _SilentTask:
    def advance(self, amount: int = 1, *, chunks: int = 0) -> None:
        pass

    def update(self, *, completed: int | None = None, total: int | None = None, label: str | None = None) -> None:
        pass

    def __enter__(self) -> _SilentTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Silent:
    """The no-op default: reports go nowhere."""

    def task(self, label: str, total: int | None = None, unit: str = "bytes", chunks: int | None = None) -> Task:
        return _SilentTask()


SILENT: Progress = _Silent()

SILENT_TASK: Task = _SilentTask()


def counted(pieces: Iterable[bytes], task: Task) -> Iterator[bytes]:
    """``pieces`` unchanged, advancing ``task`` by each piece's size as it passes (downloads, uploads)."""
    for piece in pieces:
        task.advance(len(piece))
        yield piece
