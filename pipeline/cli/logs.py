"""`ato logs --id|--name [--follow] [--tail N]`: a background run's log file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from pipeline.cli.common import info, warn
from pipeline.cli.help import examples
from pipeline.errors import E_USAGE, AtoError


def pick(run_id: str | None, name: str | None) -> dict:
    from pipeline.runtime import table

    if not run_id and not name:
        raise AtoError(E_USAGE, "either --id or --name is required")
    found = table.find(run_id, name)
    if not found:
        what = f"id {run_id}" if run_id else f"name {name}"
        raise AtoError("E100", f"no capsule found with {what}", details={"id": run_id, "name": name})
    if len(found) > 1:
        warn(f"multiple capsules found with name '{name}'; using the most recent one ({found[-1]['id']})")
    return found[-1]


def _tail(data: bytes, n: int) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:]) if n > 0 else b""


@click.command("logs", epilog=examples("ato logs --name hello-ato", "ato logs --id 3f2a9c --follow --tail 50"))
@click.option("--id", "run_id", metavar="ID", help="The capsule id (from `ato ps`).")
@click.option("--name", metavar="NAME", help="The capsule name (case-insensitive).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the capsule stops.")
@click.option("--tail", type=int, default=None, metavar="N", help="Only the last N lines.")
def logs_cmd(run_id: str | None, name: str | None, follow: bool, tail: int | None) -> None:
    """Print the log of a background capsule."""
    from pipeline.runtime import table

    record = pick(run_id, name)
    path = Path(record.get("log_path") or table.log_path(record["id"]))
    if not path.is_file():
        raise AtoError("E100", f"log file not found: {path}", details={"path": str(path)})
    out = sys.stdout.buffer
    with open(path, "rb") as fh:
        data = fh.read()
        out.write(_tail(data, tail) if tail is not None else data)
        out.flush()
        if not follow:
            return
        info(f"📜 following logs: {path} (Ctrl+C to stop)")
        idle_after_exit = 0
        while True:
            chunk = fh.read()
            if chunk:
                out.write(chunk)
                out.flush()
                idle_after_exit = 0
                continue
            current = table.read(record["id"])
            if current is None or current.get("status") not in table.ACTIVE:
                idle_after_exit += 1
                if idle_after_exit >= 3:  # drained what the supervisor wrote while stopping
                    return
            time.sleep(0.1)
            if os.environ.get("ATO_LOGS_FOLLOW_ONCE") == "1":
                return


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(logs_cmd)
