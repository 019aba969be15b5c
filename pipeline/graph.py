"""Stage chains as doit tasks, with up-to-date checks by BLAKE3 digest.

A chain is a list of :class:`Step` (a name, a function, the digest of its inputs
and a check that its outputs are still there). doit decides which steps run:
a step is up to date when the inputs digest it recorded last time equals the
current one and its outputs check out, so unchanged inputs do no work. doit's
dependency database lives under ``$ATO_HOME/state``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doit.cmd_base import TaskLoader2
from doit.doit_cmd import DoitMain
from doit.task import dict_to_task

from cas.filelock import flocked
from pipeline.errors import E_INTERNAL, AtoError
from stages import build as build_stage


@dataclass
class Step:
    """One stage in a chain: runs ``action`` unless its inputs and outputs are unchanged."""

    name: str
    action: Callable[[], dict[str, Any]]
    inputs_digest: str
    outputs_ok: Callable[[dict[str, Any]], bool] = lambda _values: True
    depends_on: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


@dataclass
class StepReport:
    name: str
    inputs_digest: str
    status: str = "pending"  # "ran" | "up-to-date" | "failed" | "pending"
    values: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "inputs_digest": self.inputs_digest, "values": self.values}


class _Recorder:
    """A doit reporter that records what ran instead of printing."""

    desc = "records task status for ato"
    current: dict[str, StepReport] = {}

    def __init__(self, outstream: Any, options: Any) -> None:
        self.failures: list[Any] = []

    def initialize(self, tasks: Any, selected_tasks: Any) -> None: ...
    def get_status(self, task: Any) -> None: ...
    def execute_task(self, task: Any) -> None: ...
    def add_success(self, task: Any) -> None:
        if task.name in self.current:
            self.current[task.name].status = "ran"
    def skip_uptodate(self, task: Any) -> None:
        if task.name in self.current:
            self.current[task.name].status = "up-to-date"
    def skip_ignore(self, task: Any) -> None: ...
    def add_failure(self, task: Any, fail: Any) -> None:
        if task.name in self.current:
            self.current[task.name].status = "failed"
        self.failures.append(fail)
    def cleanup_error(self, exception: Any) -> None: ...
    def runtime_error(self, msg: str) -> None:
        self.failures.append(msg)
    def teardown_task(self, task: Any) -> None: ...
    def complete_run(self) -> None: ...


class _Loader(TaskLoader2):
    def __init__(self, tasks: list[dict[str, Any]], db_path: Path) -> None:
        super().__init__()
        self.tasks = tasks
        self.db_path = db_path

    def setup(self, opt_values: Any) -> None: ...

    def load_doit_config(self) -> dict[str, Any]:
        return {"dep_file": str(self.db_path), "backend": "json", "verbosity": 0,
                "reporter": _Recorder, "check_file_uptodate": "md5"}

    def load_tasks(self, cmd: Any, pos_args: Any) -> list[Any]:
        return [dict_to_task(t) for t in self.tasks]


def locked(state_dir: Path) -> AbstractContextManager[None]:
    """Serialize chains that share a state dir (two builds of one project)."""
    return flocked(state_dir / ".lock")


def run_chain(steps: list[Step], state_dir: Path) -> list[StepReport]:
    """Run ``steps`` through doit; AtoErrors raised by an action propagate unchanged."""
    reports = {s.name: StepReport(s.name, s.inputs_digest) for s in steps}
    errors: list[BaseException] = []

    def wrap(step: Step) -> Callable[[], dict[str, Any]]:
        def action() -> dict[str, Any] | bool:
            try:
                values = step.action()
            except BaseException as exc:  # noqa: BLE001 - re-raised after doit unwinds
                errors.append(exc)
                return False
            values = dict(values)
            values["inputs_digest"] = step.inputs_digest
            reports[step.name].values = values
            return values
        return action

    def uptodate(step: Step) -> Callable[[Any, dict[str, Any]], bool]:
        def check(task: Any, values: dict[str, Any]) -> bool:  # doit passes these by name
            del task
            if values.get("inputs_digest") != step.inputs_digest:
                return False
            try:
                ok = step.outputs_ok(values)
            except (OSError, ValueError, AtoError):
                return False
            if ok:
                reports[step.name].values = dict(values)
            return bool(ok)
        return check

    tasks = [{
        "name": s.name,
        "actions": [(wrap(s), [], {})],
        "uptodate": [uptodate(s)],
        "task_dep": list(s.depends_on),
        "targets": list(s.targets),
        "verbosity": 0,
    } for s in steps]
    db_path = state_dir / "doit.json"
    with locked(state_dir):
        _Recorder.current = reports
        sink = io.StringIO()
        cwd = os.getcwd()
        try:
            with redirect_stdout(sink), redirect_stderr(sink):
                code = DoitMain(_Loader(tasks, db_path), config_filenames=()).run(["run"])
        finally:
            os.chdir(cwd)
            _Recorder.current = {}
    if errors:
        raise errors[0]
    if code != 0:
        raise AtoError(E_INTERNAL, f"internal error: the task engine failed: {sink.getvalue().strip()[:300]}")
    return [reports[s.name] for s in steps]


def build_chain(plan: build_stage.BuildPlan) -> list[Step]:
    """lock -> payload -> artifact for one build plan."""
    return [
        Step("lock", lambda: build_stage.write_lock(plan), plan.lock_inputs,
             lambda v: build_stage.lock_ok(plan, v)),
        Step("payload", lambda: build_stage.pack(plan), plan.payload_inputs,
             lambda v: build_stage.payload_ok(plan, v), depends_on=["lock"]),
        Step("artifact", lambda: build_stage.assemble(plan), plan.artifact_inputs,
             lambda v: build_stage.artifact_ok(plan, v), depends_on=["payload"], targets=[str(plan.out_path)]),
    ]


def run_build(plan: build_stage.BuildPlan) -> dict:
    """Run a build plan and return its validated envelope."""
    build_stage.sweep_leftovers(plan)
    reports = run_chain(build_chain(plan), plan.state_dir)
    return build_stage.build_envelope(plan, [r.as_dict() for r in reports])
