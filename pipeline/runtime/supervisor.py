"""The supervisor: ``python -m pipeline.runtime.supervisor --id <run-id> [--foreground ...]``.

Every ``ato run`` starts its units through this process, never directly, so that
one process outlives the CLI and owns the whole tree
(:class:`~pipeline.runtime.containment.Tree`: subreaper, a cgroup where the host
allows). Whatever ends the run — a unit exits, a probe fails, ``ato close``,
Ctrl-C, or ``kill -9`` of ``ato run`` itself — the supervisor stops every process
the run started (SIGTERM, then SIGKILL after the grace period) before it exits.

* ``--background`` (the default): started detached by ``ato run --background``; it
  keeps the process record current: ``starting`` -> ``ready`` ->
  ``exited``/``failed``/``stopped`` with the exit code it observed. SIGTERM (what
  ``ato close`` sends) stops every unit gracefully.
* ``--foreground``: a child of ``ato run`` in its own process group, with the
  CLI's stdio. It dies with the CLI (``PR_SET_PDEATHSIG``) and reports to it over
  ``--events-fd`` as JSON lines (``ready``, ``error``, ``exit``); the CLI prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import AtoError, printable
from pipeline.runtime import containment, table
from pipeline.runtime.lifecycle import Runner, Unit, grace_seconds


def log(message: str) -> None:
    sys.stderr.write(f"ato: {printable(message)}\n")
    sys.stderr.flush()


class RecordReporter:
    """Background runs: events go into the process record and the run's log."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.services: dict[str, dict[str, Any]] = {}

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        run_id = self.run_id
        if kind == "started":
            self.services[data["name"]] = {"name": data["name"], "kind": data["kind"], "pid": data["pid"],
                                           "status": "starting"}
            changes: dict[str, Any] = {"services": list(self.services.values())}
            if data.get("entry"):
                changes.update(pid=data["pid"], pid_start=table.proc_start_time(data["pid"]))
            table.update(run_id, **changes)
        elif kind == "ready":
            self.services[data["name"]]["status"] = "ready"
            table.update(run_id, services=list(self.services.values()))
            if data.get("url"):
                log(f"service '{data['name']}' is available at {data['url']}")
        elif kind == "all_ready":
            table.update(run_id, status="ready", ready_at=table.now(), last_event="ready")
            log("ready")
        elif kind == "exited":
            self.services[data["name"]].update(status="exited", exit_code=data["code"])
            table.update(run_id, services=list(self.services.values()))
            log(f"{data['kind']} '{data['name']}' exited with code {data['code']}")

    def failed(self, err: AtoError) -> None:
        log(err.human_line())
        table.update(self.run_id, status="failed", last_error=err.message, last_event="failed",
                     exit_code=err.details.get("exit_code", err.exit_code), ended_at=table.now(),
                     services=list(self.services.values()))

    def finished(self, code: int, stopped: bool) -> None:
        status = "stopped" if stopped else "exited"
        table.update(self.run_id, status=status, exit_code=code, ended_at=table.now(), last_event=status,
                     services=list(self.services.values()))
        log(f"{status} with code {code}")


class PipeReporter:
    """Foreground runs: events go to the CLI as JSON lines; a closed pipe means the CLI is gone."""

    def __init__(self, fd: int, on_lost: Any) -> None:
        self.fd = fd
        self.on_lost = on_lost

    def send(self, doc: dict[str, Any]) -> None:
        data = (json.dumps(doc) + "\n").encode("utf-8")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self.on_lost()

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "ready":
            self.send({"event": "ready", "name": data["name"], "url": data.get("url"), "entry": data.get("entry")})

    def failed(self, err: AtoError) -> None:
        self.send({"event": "error", "code": err.code, "message": err.message, "details": err.details,
                   "hint": err.hint, "problems": [p.to_json() for p in err.problems]})

    def finished(self, code: int, stopped: bool) -> None:
        self.send({"event": "exit", "code": code})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ato-supervisor")
    parser.add_argument("--id", required=True)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--events-fd", type=int)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--tty-home", type=int)
    ns = parser.parse_args(argv)
    run_id = ns.id
    stop_early: list[int] = []
    if ns.foreground:
        # Die with the CLI: the kernel sends SIGTERM when it goes, however it goes.
        containment.die_with_parent(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: stop_early.append(signum))
        if ns.parent_pid and os.getppid() != ns.parent_pid:
            stop_early.append(signal.SIGTERM)  # it died before we could ask
    plan_file = table.plan_path(run_id)
    try:
        plan = json.loads(plan_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        if not ns.foreground:
            table.update(run_id, status="failed", last_error=f"cannot read the launch plan: {exc}",
                         ended_at=table.now())
        else:
            log(f"cannot read the launch plan: {exc}")
        return 2
    plan_file.unlink(missing_ok=True)  # it holds the environment; nobody needs it after this
    units = [Unit.from_json(u) for u in plan["units"]]
    scratch = list(plan.get("scratch_dirs") or [])
    try:
        for path in plan.get("make_dirs") or []:
            os.makedirs(path, exist_ok=True)
        for path in scratch:
            os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        log(f"cannot create the run's directories: {exc}")
        return 2
    tree = containment.Tree(run_id)
    runner: Runner | None = None

    def lost() -> None:
        if runner is not None:
            runner.request_stop(signal.SIGTERM)
        else:
            stop_early.append(signal.SIGTERM)

    reporter: RecordReporter | PipeReporter
    if ns.foreground and ns.events_fd is not None:
        reporter = PipeReporter(ns.events_fd, lost)
    else:
        reporter = RecordReporter(run_id)
        table.update(run_id, cgroup=str(tree.cgroup) if tree.cgroup else None)
    runner = Runner(units, prefix=plan["prefix"], on_event=reporter.on_event, tree=tree,
                    foreground_tty=bool(plan.get("tty")) and ns.tty_home is not None, tty_home=ns.tty_home)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: runner.request_stop(signum))
    if stop_early:
        runner.request_stop(stop_early[0])
    try:
        _hold(plan.get("hold_locks") or [])
        code = runner.run()
        reporter.finished(code, runner.stop_requested is not None)
    except AtoError as err:
        reporter.failed(err)
        code = err.exit_code
    finally:
        tree.terminate(grace_seconds())  # whatever a unit left behind (a daemon, a grandchild) goes too
        tree.close()
        for path in [plan.get("request_dir"), *scratch]:
            if path:
                shutil.rmtree(path, ignore_errors=True)
    return code


def _hold(locks: list[str]) -> None:
    """Take the run's locks (a dependency's state) for as long as this process lives; the fds stay open."""
    from pipeline.runtime.dependencies import try_lock

    for path in locks:
        if try_lock(Path(path)) is None:
            raise AtoError("ATO_ERR_STATE_IN_USE", f"the state {Path(path).with_suffix('')} is in use by another run; "
                                                   "stop that run first (ato ps, ato close)", details={"state": path})


if __name__ == "__main__":
    sys.exit(main())
