"""Stage chains as doit tasks: doit decides what is up to date and what changed.

A chain is a list of :class:`Step`. Each becomes a doit task with its real dependencies:

* ``file_dep``: the files the step reads. They are checked by :class:`StatThenBlake3` (plugged
  into doit as its file checker): a file whose size, mtime, ctime and inode are as recorded is
  unchanged without being read; otherwise its BLAKE3 decides. doit hands the step the list of
  files that changed (its ``changed`` argument), which is what makes a rebuild incremental.
* ``config``: every other input (manifest, options, ...), through doit's ``config_changed``.
* ``after``: steps whose *result* this one consumes (doit's ``result_dep``), passed to the
  action through doit's ``getargs``.
* ``outputs_ok``: a check that what the step wrote last time is still there and intact.

doit's dependency database (SQLite) lives in the chain's state dir; ``--explain`` asks doit for
its reasons (``get_status`` with the log on) before running. Nothing here is module-level state:
each run builds its own reporter and checker classes, so chains can run one after another or
nested in one process.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cas.digest import blake3_file
from cas.filelock import flocked
from pipeline.errors import E_INTERNAL, AtoError
from stages import build as build_stage

RACY_SECONDS = 3  # a file written this recently may change again within the same timestamp


@dataclass
class Step:
    """One stage in a chain.

    ``action`` may take ``changed`` (the ``file_dep`` paths doit found changed) and, by name, the
    result of each step in ``after``; it gets only the ones its signature names. ``config`` is a
    dict or a digest string. ``depends_on`` orders steps without consuming their results.
    """

    name: str
    action: Callable[..., dict[str, Any]]
    config: dict[str, Any] | str
    outputs_ok: Callable[[dict[str, Any]], bool] = lambda _values: True
    depends_on: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    file_dep: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


@dataclass
class StepReport:
    name: str
    status: str = "pending"  # "ran" | "up-to-date" | "failed" | "pending"
    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, Any] = field(default_factory=dict)  # doit's own, with --explain


def stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestMemo:
    """BLAKE3s computed during one run (by the checker, or by a step that read the file anyway)."""

    def __init__(self, digests: dict[str, tuple[list[int], str]] | None = None, *, reported: bool = False,
                 stats: dict[str, list[int]] | None = None) -> None:
        self.digests = digests if digests is not None else {}
        # the stat key each file was walked with (the planner's one lstat per file): doit's checker takes it
        # instead of calling stat again
        self.stats = stats if stats is not None else {}
        # reported: the step records the digest of every file it used (a build's payload step does), so a
        # file whose digest is not here under its current stat changed after the step read it
        self.reported = reported
        # files whose stat changed but whose bytes did not (touched): their new state, saved after the run
        self.touched: dict[str, list[Any]] = {}

    def record(self, path: str, key: list[int], digest: str) -> None:
        self.digests[path] = (key, digest)

    def get(self, path: str, key: list[int]) -> str | None:
        found = self.digests.get(path)
        return found[1] if found and found[0] == key else None


def _checker_class(memo: DigestMemo) -> type:
    from doit.dependency import FileChangedChecker

    class StatThenBlake3(FileChangedChecker):
        """doit's file checker: stat first, BLAKE3 only when the stat differs.

        State saved per file: ``[size, mtime_ns, ctime_ns, inode, blake3]``. The BLAKE3 saved is
        always that of the bytes the step used (from the memo), never one computed afterwards. A
        file written so recently that it could change again within one timestamp tick is saved
        without its times (the next run hashes it); one changed while the step ran is saved with
        size -1 (the next run takes it as changed).
        """

        def info(self, file_path: str) -> list[int]:
            """The file's stat key: the walk's when it walked this file, else a stat now (OSError: missing)."""
            known = memo.stats.get(file_path)
            return known if known is not None else stat_key(os.stat(file_path))

        def check_modified(self, file_path: str, file_stat: list[int], state: Any) -> bool:
            key = file_stat
            if state[:4] == key:
                return False
            if key[0] != state[0]:
                return True
            digest = memo.get(file_path, key) or blake3_file(file_path)
            memo.record(file_path, key, digest)
            if digest == state[4] and max(key[1], key[2]) <= (time.time() - RACY_SECONDS) * 1e9:
                memo.touched[file_path] = [*key, digest]
            return digest != state[4]

        def get_state(self, dep: str, current_state: Any) -> Any:
            known = memo.digests.get(dep)
            if known is not None and current_state is not None and list(current_state[:4]) == known[0] \
                    and current_state[4] == known[1]:
                return None  # used as saved: no stat needed (a later change shows in its stat next time)
            if known is None and current_state is not None and current_state[:4] == memo.stats.get(dep):
                return None  # not read, and as saved when walked: the saved state stands (a later change shows
                # in its stat next time)
            try:
                key = stat_key(os.stat(dep))  # after the step: the file may have changed since the walk
            except OSError:
                key = [0, 0, 0, 0]
            digest = memo.get(dep, key)
            recent = max(key[1], key[2]) > (time.time() - RACY_SECONDS) * 1e9
            if digest is None:
                if current_state is not None and list(current_state[:4]) == key and not recent:
                    return None  # unchanged and not read: the saved state stands
                if memo.reported:
                    old = current_state[4] if current_state is not None else ""
                    return [-1, 0, 0, 0, old]  # changed behind the step's back: the next run takes it as changed
                digest = blake3_file(dep)
            return [key[0], 0, 0, 0, digest] if recent else [*key, digest]

    return StatThenBlake3


def _state_db() -> type:
    from doit.dependency import SqliteDB

    class StateDB(SqliteDB):
        """doit's SQLite backend, in WAL mode without an fsync per commit.

        The database says what is up to date; it is not the only record of a build (the payload step
        checks the stats its own record holds, and every step checks its outputs), so losing the last
        commit to a power cut costs a rebuild, never a wrong result. SQLite keeps each commit atomic
        either way; a rollback journal with full sync would sync a megabyte-sized row twice per build.
        """

        def _sqlite3(self, name: str) -> Any:
            conn = super()._sqlite3(name)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

    return StateDB


def _reporter_class(reports: dict[str, StepReport], failures: list[Any]) -> type:
    seen: dict[str, tuple[str, Any]] = {}

    class Recorder:
        """A doit reporter that records what ran instead of printing."""

        desc = "records task status for ato"

        def __init__(self, outstream: Any, options: Any) -> None: ...
        def initialize(self, tasks: Any, selected_tasks: Any) -> None: ...
        def get_status(self, task: Any) -> None: ...
        def execute_task(self, task: Any) -> None: ...

        def add_success(self, task: Any) -> None:
            seen[task.name] = ("ran", task)

        def skip_uptodate(self, task: Any) -> None:
            seen[task.name] = ("up-to-date", task)  # doit sets task.values just after this call

        def skip_ignore(self, task: Any) -> None: ...

        def add_failure(self, task: Any, fail: Any) -> None:
            seen[task.name] = ("failed", task)
            failures.append(fail)

        def cleanup_error(self, exception: Any) -> None: ...
        def runtime_error(self, msg: str) -> None:
            failures.append(msg)
        def teardown_task(self, task: Any) -> None: ...

        def complete_run(self) -> None:
            for name, (status, task) in seen.items():
                if name in reports:
                    reports[name].status = status
                    reports[name].values = {k: v for k, v in (task.values or {}).items() if not k.startswith("_")}

    return Recorder


def locked(state_dir: Path) -> AbstractContextManager[None]:
    """Serialize chains that share a state dir (two builds of one project)."""
    return flocked(state_dir / ".lock")


def _task_dicts(steps: list[Step], errors: list[BaseException]) -> list[dict[str, Any]]:
    from doit.task import result_dep
    from doit.tools import config_changed

    tasks = []
    for step in steps:
        def action(step: Step = step, **kwargs: Any) -> dict[str, Any] | bool:
            try:
                return dict(step.action(**kwargs))
            except BaseException as exc:  # noqa: BLE001 - re-raised after doit unwinds
                errors.append(exc)
                return False

        def intact(task: Any, values: dict[str, Any], step: Step = step) -> bool:  # doit passes these by name
            del task
            try:
                return bool(values) and bool(step.outputs_ok(values))
            except (OSError, ValueError, AtoError):
                return False

        # doit passes ``changed`` and each getargs value by the action's parameter names
        accepted = inspect.signature(step.action).parameters
        action.__signature__ = _signature([p for p in ("changed", *step.after) if p in accepted])  # type: ignore[attr-defined]
        tasks.append({
            "name": step.name,
            "actions": [(action, [], {})],
            "file_dep": list(step.file_dep),
            "task_dep": list(step.depends_on),
            "targets": list(step.targets),
            "getargs": {name: (name, None) for name in step.after},
            "uptodate": [config_changed(step.config), *[result_dep(name) for name in step.after], intact],
            "verbosity": 0,
        })
    return tasks


def _signature(params: list[str]) -> Any:
    return inspect.Signature([inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY) for p in params])


def run_chain(steps: list[Step], state_dir: Path, *, memo: DigestMemo | None = None,
              explain: bool = False) -> list[StepReport]:
    """Run ``steps`` through doit; AtoErrors raised by an action propagate unchanged.

    doit's own runner, task control and dependency manager, driven directly rather than through its
    command line (which would look up plugins among every installed package's entry points, twice,
    on each build, and register the dependency manager in doit's process-wide ``Globals``).
    """
    from doit.control import TaskControl
    from doit.dependency import Dependency
    from doit.runner import Runner
    from doit.task import Stream, dict_to_task

    memo = memo or DigestMemo()
    reports = {s.name: StepReport(s.name) for s in steps}
    errors: list[BaseException] = []
    failures: list[Any] = []
    checker = _checker_class(memo)
    db_path = state_dir / "doit.sqlite"
    tasks = _task_dicts(steps, errors)

    state_dir.mkdir(parents=True, exist_ok=True)
    with locked(state_dir):
        if explain:
            _explain(steps, tasks, db_path, checker, reports)
        sink = io.StringIO()
        cwd = os.getcwd()
        try:
            with redirect_stdout(sink), redirect_stderr(sink):
                control = TaskControl([dict_to_task(t) for t in tasks])
                control.process(None)  # every task, in the order given
                runner = Runner(Dependency(_state_db(), str(db_path), checker_cls=checker),
                                _reporter_class(reports, failures)(sink, {}), stream=Stream(0))
                code = runner.run_all(control.task_dispatcher())  # closes (and saves) the dependency DB
        except Exception as exc:  # noqa: BLE001 - doit's own errors (a damaged database, a bad task)
            if errors:
                raise errors[0] from None
            raise AtoError(E_INTERNAL, f"internal error: the task engine failed: {exc}"[:300]) from None
        finally:
            os.chdir(cwd)
    if errors:
        raise errors[0]
    _save_touched(steps, reports, memo, db_path, checker)
    for s in steps:  # doit's probe cannot know that a step's inputs will change when an earlier step runs
        report = reports[s.name]
        if explain and report.status == "ran" and not report.reasons:
            report.reasons = {"result_dep": [a for a in s.after if reports[a].status == "ran"]}
    if code != 0:
        detail = sink.getvalue().strip() or "; ".join(str(f) for f in failures)
        raise AtoError(E_INTERNAL, f"internal error: the task engine failed: {detail[:300]}")
    return [reports[s.name] for s in steps]


def _save_touched(steps: list[Step], reports: dict[str, StepReport], memo: DigestMemo, db_path: Path,
                  checker: type) -> None:
    """Save the new stat of files an up-to-date step found touched but unchanged.

    doit saves file states only when a task runs; without this, every later run would hash
    those files again to find them unchanged again.
    """
    from doit.dependency import Dependency

    pending = {s.name: [p for p in s.file_dep if p in memo.touched] for s in steps
               if reports[s.name].status == "up-to-date" and s.file_dep}
    pending = {name: deps for name, deps in pending.items() if deps}
    if not pending:
        return
    dep = Dependency(_state_db(), str(db_path), checker_cls=checker)
    for name, deps in pending.items():
        dep.backend.get(name, "deps:")  # loads the task's saved state: set() alone would replace all of it
        for path in deps:
            dep.backend.set(name, path, memo.touched[path])
    dep.close()


def _explain(steps: list[Step], tasks: list[dict[str, Any]], db_path: Path, checker: type,
             reports: dict[str, StepReport]) -> None:
    """doit's own reasons for each task, from its dependency database (read only: nothing is saved)."""
    from doit.dependency import Dependency
    from doit.task import dict_to_task

    if not db_path.exists():
        for s in steps:
            reports[s.name].reasons = {"never_ran": True}
        return
    dep = Dependency(_state_db(), str(db_path), checker_cls=checker)
    try:
        task_objs = {t["name"]: dict_to_task(dict(t)) for t in tasks}
        for name, task in task_objs.items():
            status = dep.get_status(task, task_objs, get_log=True)
            reports[name].reasons = {k: _plain(v) for k, v in status.reasons.items()}
    finally:
        dep.backend._conn.close()  # read only: never dump (that would save the probe's state)


def _plain(value: Any) -> Any:
    """A reason's argument as JSON-able text (doit gives file lists, or the uptodate callables)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def build_chain(plan: build_stage.BuildPlan) -> list[Step]:
    """payload -> lock -> artifact for one build plan."""
    return [
        Step("payload", lambda changed: build_stage.pack(plan, changed), plan.payload_config_digest,
             file_dep=plan.file_deps, outputs_ok=lambda v: build_stage.payload_ok(plan, v)),
        Step("lock", lambda changed, payload: build_stage.write_lock(plan, payload), plan.lock_config,
             after=["payload"], outputs_ok=lambda v: build_stage.lock_ok(plan, v)),
        Step("artifact", lambda changed, payload, lock: build_stage.assemble(plan, payload, lock),
             plan.artifact_config, after=["payload", "lock"], outputs_ok=lambda v: build_stage.artifact_ok(plan, v),
             targets=[str(plan.out_path)]),
    ]


@contextlib.contextmanager
def few_collections(gen0: int = 50_000) -> Iterator[None]:
    """Keep Python's cyclic garbage collector mostly out of a build's way, and restore it after.

    A build makes tens of thousands of short-lived objects (entries, stat keys, records' rows) and
    next to no reference cycles; with the default threshold (700) the collector runs hundreds of times
    per build, its full passes walking every object the imports made: a tenth of a rebuild's time.
    The objects alive at the start are frozen (never walked again) and a collection waits for
    ``gen0`` allocations.
    """
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(gen0, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def run_build(plan: build_stage.BuildPlan, *, explain: bool = False) -> dict[str, Any]:
    """Run a build plan and return its validated envelope."""
    build_stage.sweep_leftovers(plan)
    stats = {str(e.abspath): list(e.stat_key) for e in plan.entries if e.stat_key is not None}
    reports = run_chain(build_chain(plan), plan.state_dir,
                        memo=DigestMemo(plan.read_digests, reported=True, stats=stats), explain=explain)
    return build_stage.build_envelope(plan, [r.__dict__ for r in reports])
