"""Progress bars on a terminal (rich), and nothing anywhere else.

:func:`reporter` is what a command passes down to its stages: a live rich bar on stderr when
stderr is a terminal, ``--json`` is off and ``output.progress`` is not ``never``
(:func:`pipeline.cli.term.live`); otherwise :data:`pipeline.progress.SILENT`. rich is imported
only when a bar is actually shown, so `ato --version` and `ato ps` never pay for it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from pipeline.cli.term import decorated, live
from pipeline.progress import SILENT, Progress, Task


class _RichTask:
    def __init__(self, owner: RichProgress, task_id: Any, chunks: int | None) -> None:
        self.owner = owner
        self.task_id = task_id
        self.chunks_total = chunks
        self.chunks_done = 0

    def advance(self, amount: int = 1, *, chunks: int = 0) -> None:
        self.chunks_done += chunks
        fields = {"chunks": self._chunks_text()} if self.chunks_total is not None else {}
        self.owner.bars.update(self.task_id, advance=amount, **fields)

    def update(self, *, completed: int | None = None, total: int | None = None, label: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if label is not None:
            kwargs["description"] = label
        self.owner.bars.update(self.task_id, **kwargs)

    def _chunks_text(self) -> str:
        return f"{self.chunks_done}/{self.chunks_total} chunks"

    def __enter__(self) -> _RichTask:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        task = self.owner.bars.tasks[self.owner.index(self.task_id)]
        if exc_type is None and task.total is not None:
            self.owner.bars.update(self.task_id, completed=task.total)
        elif exc_type is None:  # an open-ended task: a full bar, no amount
            self.owner.bars.update(self.task_id, total=1, completed=1, unit="done")
        self.owner.bars.stop_task(self.task_id)


_ACTIVE: list[RichProgress] = []


def active() -> RichProgress | None:
    """The bars on screen now, if any (a message meant for stderr must be printed above them)."""
    return _ACTIVE[-1] if _ACTIVE and _ACTIVE[-1].bars is not None else None


class RichProgress:
    """Bars on ``stream`` (stderr), one line per task, started with the first task."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bars: Any = None
        self.lock = threading.Lock()

    def print(self, text: str) -> None:
        """A line of text above the bars (writing to the stream directly would tear them)."""
        from rich.text import Text

        self.bars.console.print(Text.from_ansi(text), highlight=False, emoji=False, soft_wrap=True)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import Progress as Bars

        console = Console(file=self.stream, force_terminal=True, no_color=not decorated(self.stream),
                          highlight=False)
        self.bars = Bars(*_columns(), console=console, transient=False, redirect_stdout=False,
                         redirect_stderr=False, refresh_per_second=8)
        self.bars.start()

    def index(self, task_id: Any) -> int:
        return next(i for i, t in enumerate(self.bars.tasks) if t.id == task_id)

    def task(self, label: str, total: int | None = None, unit: str = "bytes", chunks: int | None = None) -> Task:
        with self.lock:
            if self.bars is None:
                self._start()
        task_id = self.bars.add_task(label, total=total, unit=unit,
                                     chunks=f"0/{chunks} chunks" if chunks is not None else "")
        return _RichTask(self, task_id, chunks)

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()


def _columns() -> tuple[Any, ...]:
    """label, bar, percent, amount (``12.3/105.5 MB`` or ``12/340 files``), rate, ETA, chunk count."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Amount(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.download = DownloadColumn()

        def render(self, task: Any) -> Any:
            if task.total is None or task.fields.get("unit") == "done":  # open-ended ("Verifying")
                return Text("")
            if task.fields.get("unit") == "bytes":
                return self.download.render(task)
            total = "?" if task.total is None else str(int(task.total))
            return Text(f"{int(task.completed)}/{total} {task.fields.get('unit')}", style="progress.download")

    class Rate(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.speed = TransferSpeedColumn()

        def render(self, task: Any) -> Any:
            return self.speed.render(task) if task.fields.get("unit") == "bytes" and task.total else Text("")

    class Remaining(TimeRemainingColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if task.total else Text("")

    return (TextColumn("{task.description:<12}"), BarColumn(bar_width=28), TaskProgressColumn(), Amount(), Rate(),
            Remaining(), TextColumn("{task.fields[chunks]}"))


@contextlib.contextmanager
def reporter(*, json: bool = False, stream: TextIO | None = None) -> Iterator[Progress]:
    """The progress reporter a command passes to its stages (see the module docstring)."""
    out = stream or sys.stderr
    if json or not live(out):
        yield SILENT
        return
    bars = RichProgress(out)
    _ACTIVE.append(bars)
    try:
        yield bars  # type: ignore[misc]
    finally:
        _ACTIVE.remove(bars)
        bars.stop()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Take the bars off the screen while the user answers a prompt, and put them back after."""
    bars = active()
    if bars is None:
        yield
        return
    bars.bars.stop()
    try:
        yield
    finally:
        bars.bars.start()
