"""`ato ps`: background runs, reconciled with the OS (a dead process is never shown running)."""

from __future__ import annotations

import sys

import click

from pipeline.cli.common import emit, json_option
from pipeline.cli.help import examples
from pipeline.cli.term import decorated

DOTS = {"starting": "🟡", "ready": "🟢", "running": "🟢", "exited": "⚪", "failed": "🔴", "stopped": "⚪"}


def _status(status: str, fancy: bool, width: int = 12) -> str:
    """The STATUS cell: a coloured dot on a terminal, padded by what the terminal shows (a dot is 2 columns)."""
    if fancy and status in DOTS:
        return f"{DOTS[status]} {status}" + " " * max(0, width - len(status) - 3)
    return f"{status:<{width}}"


@click.command("ps", epilog=examples("ato ps", "ato ps --prune --json"))
@click.option("--all", "show_all", is_flag=True, help="Accepted for compatibility; ps always lists every record.")
@click.option("--prune", is_flag=True, help="Remove the records of runs that are no longer running.")
@json_option
def ps_cmd(show_all: bool, prune: bool) -> None:
    """List background capsules (running, and finished ones until pruned)."""
    from pipeline.runtime import table  # the process table only: ps must start fast

    records = table.all_records()
    if prune:
        for r in records:
            if r.get("status") not in table.ACTIVE:
                table.remove(r["id"])
        records = [r for r in records if r.get("status") in table.ACTIVE]
    docs = [table.public_record(r) for r in records]
    lines = []
    if not docs:
        lines.append("No capsules found.")
    else:
        lines.append(f"{'ID':<18} {'NAME':<20} {'PID':>8} {'STATUS':<12} {'EXIT':>5} {'RUNTIME':<16} UPTIME")
        fancy = decorated(sys.stdout)
        for d in docs:
            exit_code = "" if d["exit_code"] is None else str(d["exit_code"])
            lines.append(f"{d['id']:<18} {str(d['name'])[:20]:<20} {str(d['pid'] or '-'):>8} "
                         f"{_status(d['status'], fancy)} {exit_code:>5} {str(d['runtime'])[:16]:<16} "
                         f"{d['uptime']}")
            for dep in d.get("dependencies") or []:  # its [dependencies.<alias>] providers, units of this run
                lines.append(f"  └ {dep['alias']}: {dep['provider']}@{dep['version'] or '-'} ({dep['contract']}) "
                             f"pid {dep['pid'] or '-'} {dep['status']}")
        lines.append(f"Total: {len(docs)} capsule(s)")
    ipc = _ipc_services()
    if ipc["services"]:
        lines += ["", "IPC services (the broker's providers and their consumers):",
                  f"{'SERVICE':<20} {'PROVIDER':<18} {'PID':>8} {'STATE':<9} {'SHARING':<10} CONSUMERS"]
        for s in ipc["services"]:
            who = ", ".join(c["id"] for c in s["consumers"]) or (f"none (stops at {s['stops_at']})" if s["stops_at"]
                                                                 else "none")
            lines.append(f"{s['service'][:20]:<20} {str(s['provider']['run_id'] or '-'):<18} "
                         f"{str(s['provider']['pid'] or '-'):>8} {s['state']:<9} {s['sharing']:<10} "
                         f"{s['consumer_count']}: {who}")
    emit({"schema_version": "1", "processes": docs, "total": len(docs),
          "running": sum(1 for d in docs if d["status"] in table.ACTIVE), "ipc": ipc}, "ps",
         human="\n".join(lines))


def _ipc_services() -> dict:
    """The IPC broker's providers, consumers and counts (none when no broker runs; ps never starts one)."""
    from pipeline.ipc import client

    state = client.status()
    if not state or not state.get("ok"):
        return {"broker": None, "services": []}
    return {"broker": {"pid": state["broker"]["pid"], "socket": state["broker"]["socket"]},
            "services": state.get("services") or []}


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(ps_cmd)
