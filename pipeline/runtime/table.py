"""The process table: one JSON record per background run under ``$ATO_HOME/run``, reconciled with the OS.

Records are written atomically under a per-record lock. Every read reconciles
an active record with the OS: a supervisor or entry process that is gone (or a
pid now owned by a different process, told apart by its start time) is shown as
exited — never as running — with the exit code the supervisor recorded, or none
when nobody was left to observe it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cas.atomic import write_text_atomic
from pipeline import paths

ACTIVE = ("starting", "ready", "running")
SCHEMA_VERSION = "1"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    return f"capsule-{secrets.token_hex(4)}"


def record_path(run_id: str) -> Path:
    return paths.run_dir() / f"{run_id}.json"


def log_path(run_id: str) -> Path:
    return paths.logs_dir() / f"{run_id}.log"


def plan_path(run_id: str) -> Path:
    return paths.run_dir() / f"{run_id}.plan.json"


@contextlib.contextmanager
def locked(run_id: str) -> Iterator[None]:
    paths.run_dir().mkdir(parents=True, exist_ok=True)
    with open(paths.run_dir() / f".{run_id}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def proc_alive(pid: int | None, start: str | None = None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
        state = data[data.rfind(")") + 2:].split()[0]
        if state in ("Z", "X"):
            return False
    except OSError:
        return False
    return start is None or proc_start_time(pid) == start


def write(record: dict[str, Any]) -> None:
    paths.run_dir().mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_path(record["id"]), json.dumps(record, indent=2) + "\n")


def update(run_id: str, **changes: Any) -> dict[str, Any] | None:
    with locked(run_id):
        record = _load(run_id)
        if record is None:
            return None
        record.update(changes)
        write(record)
        return record


def _load(run_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(run_id).read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def reconcile(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The record as the OS sees it now; the flag says whether it changed."""
    if record.get("status") not in ACTIVE:
        return record, False
    supervisor_alive = proc_alive(record.get("supervisor_pid"), record.get("supervisor_start"))
    main_alive = proc_alive(record.get("pid"), record.get("pid_start")) if record.get("pid") else supervisor_alive
    if supervisor_alive and main_alive:
        return record, False
    if supervisor_alive and not main_alive:
        return record, False  # the supervisor has seen it go and is stopping the rest; it writes the outcome
    from pipeline.runtime.containment import remove_cgroup

    remove_cgroup(record.get("cgroup"), wait=0)  # nobody is left to remove the run's (empty) cgroup
    changed = dict(record)
    changed["status"] = "failed" if record.get("status") == "starting" else "exited"
    changed["ended_at"] = record.get("ended_at") or now()
    changed["last_event"] = "process_exited"
    if not changed.get("last_error"):
        changed["last_error"] = ("process exited before readiness" if record.get("status") == "starting"
                                 else "process is gone (killed from outside?); no exit code was observed")
    return changed, True


def read(run_id: str) -> dict[str, Any] | None:
    with locked(run_id):
        record = _load(run_id)
        if record is None:
            return None
        record, changed = reconcile(record)
        if changed:
            write(record)
        return record


def all_records() -> list[dict[str, Any]]:
    root = paths.run_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.glob("capsule-*.json")):
        if p.name.endswith(".plan.json"):
            continue
        record = read(p.stem)
        if record is not None:
            out.append(record)
    out.sort(key=lambda r: r.get("started_at") or "")
    return out


def remove(run_id: str) -> None:
    with locked(run_id):
        for path in (record_path(run_id), plan_path(run_id)):
            path.unlink(missing_ok=True)
    (paths.run_dir() / f".{run_id}.lock").unlink(missing_ok=True)


def find(run_id: str | None, name: str | None) -> list[dict[str, Any]]:
    records = all_records()
    if run_id:
        return [r for r in records if r["id"] == run_id]
    wanted = (name or "").lower()
    return [r for r in records if str(r.get("name", "")).lower() == wanted]


def uptime(record: dict[str, Any]) -> str:
    try:
        start = datetime.strptime(record["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (KeyError, ValueError):
        return "unknown"
    end = datetime.now(UTC)
    if record.get("status") not in ACTIVE and record.get("ended_at"):
        with contextlib.suppress(ValueError):
            end = datetime.strptime(record["ended_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    secs = max(0, int((end - start).total_seconds()))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m}m {s}s" if h else f"{m}m {s}s" if m else f"{s}s"


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as ``ps --json`` / ``run --background --json`` show it."""
    keys = ("id", "name", "scoped_id", "pid", "supervisor_pid", "status", "runtime", "target", "route", "tier",
            "manifest_path", "log_path", "port", "url", "started_at", "ready_at", "ended_at", "exit_code",
            "last_event", "last_error", "services")
    out = {k: record.get(k) for k in keys}
    out["uptime"] = uptime(record)
    out["services"] = list(record.get("services") or [])
    units = {s.get("name"): s for s in out["services"]}
    # [dependencies.<alias>]: each provider is a unit of this run (named after its alias), with its state
    out["dependencies"] = [{k: d.get(k) for k in ("alias", "provider", "version", "contract")} |
                           {"pid": (units.get(d.get("unit")) or {}).get("pid"),
                            "status": (units.get(d.get("unit")) or {}).get("status") or "pending"}
                           for d in record.get("dependencies") or []]
    return out
