"""The background supervisor: ``python -m pipeline.runtime.supervisor --id <run-id>``.

Started detached (own session, stdio on the run's log file) by ``ato run
--background``. It runs the prepared units with the same lifecycle runner as a
foreground run and keeps the process record current: ``starting`` -> ``ready`` ->
``exited``/``failed``/``stopped`` with the exit code it observed. SIGTERM (what
``ato close`` sends) stops every unit gracefully.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from pipeline.errors import AtoError
from pipeline.runtime import table
from pipeline.runtime.lifecycle import Runner, Unit


def log(message: str) -> None:
    sys.stderr.write(f"ato: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ato-supervisor")
    parser.add_argument("--id", required=True)
    ns = parser.parse_args(argv)
    run_id = ns.id
    plan_file = table.plan_path(run_id)
    try:
        plan = json.loads(plan_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        table.update(run_id, status="failed", last_error=f"cannot read the launch plan: {exc}",
                     ended_at=table.now())
        return 2
    plan_file.unlink(missing_ok=True)  # it holds the environment; nobody needs it after this
    units = [Unit.from_json(u) for u in plan["units"]]
    services: dict[str, dict[str, Any]] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "started":
            services[data["name"]] = {"name": data["name"], "kind": data["kind"], "pid": data["pid"],
                                      "status": "starting"}
            changes: dict[str, Any] = {"services": list(services.values())}
            if data.get("entry"):
                changes.update(pid=data["pid"], pid_start=table.proc_start_time(data["pid"]))
            table.update(run_id, **changes)
        elif kind == "ready":
            services[data["name"]]["status"] = "ready"
            table.update(run_id, services=list(services.values()))
            if data.get("url"):
                log(f"service '{data['name']}' is available at {data['url']}")
        elif kind == "all_ready":
            table.update(run_id, status="ready", ready_at=table.now(), last_event="ready")
            log("ready")
        elif kind == "exited":
            services[data["name"]].update(status="exited", exit_code=data["code"])
            table.update(run_id, services=list(services.values()))
            log(f"{data['kind']} '{data['name']}' exited with code {data['code']}")

    runner = Runner(units, prefix=plan["prefix"], on_event=on_event)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: runner.request_stop(signum))
    try:
        code = runner.run()
    except AtoError as err:
        log(err.human_line())
        table.update(run_id, status="failed", last_error=err.message, last_event="failed",
                     exit_code=err.details.get("exit_code", err.exit_code), ended_at=table.now(),
                     services=list(services.values()))
        return err.exit_code
    status = "stopped" if runner.stop_requested is not None else "exited"
    table.update(run_id, status=status, exit_code=code, ended_at=table.now(), last_event=status,
                 services=list(services.values()))
    log(f"{status} with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
