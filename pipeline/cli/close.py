"""`ato close --id|--name [--all] [--force]`: stop background capsules."""

from __future__ import annotations

import click

from pipeline.cli.common import emit, info, json_option, warn
from pipeline.cli.help import examples
from pipeline.errors import E_USAGE, AtoError


@click.command("close", epilog=examples("ato close --name hello-ato", "ato close --all"))
@click.option("--id", "run_id", metavar="ID", help="The capsule id (from `ato ps`).")
@click.option("--name", metavar="NAME", help="Stop the capsule with this name (case-insensitive).")
@click.option("--all", "all_", is_flag=True, help="Every running capsule (or every match of --name).")
@click.option("--force", is_flag=True, help="SIGKILL at once instead of a graceful stop.")
@json_option
def close_cmd(run_id: str | None, name: str | None, all_: bool, force: bool) -> None:
    """Stop a background capsule and every service it started.

    Its supervisor gets SIGTERM and stops the services in order; --force sends SIGKILL.
    """
    from pipeline.runtime import session, table

    if not run_id and not name and not all_:
        raise AtoError(E_USAGE, "either --id, --name, or --all is required")
    if run_id:
        found = table.find(run_id, None)
        if not found:
            raise AtoError("E100", f"no capsule found with id {run_id}", details={"id": run_id})
        targets = found
    elif name:
        targets = [r for r in table.find(None, name) if r.get("status") in table.ACTIVE]
        if not targets:
            if not table.find(None, name):
                raise AtoError("E100", f"no capsule found with name: {name}", details={"name": name})
            warn(f"no running capsule found with name: {name}")
        if len(targets) > 1 and not all_:
            listing = ", ".join(f"{r['id']} (pid {r.get('pid')})" for r in targets)
            raise AtoError(E_USAGE, f"multiple running capsules are named '{name}': {listing}; use --all to stop "
                                    "all of them")
    else:
        targets = [r for r in table.all_records() if r.get("status") in table.ACTIVE]
        if not targets:
            info("No active capsules.")
    results = []
    from pipeline.ipc import client as ipc

    for record in targets:
        was_running = session.stop(record, force=force)
        ipc.detach(record["id"])  # at once (the broker would notice the gone consumer itself within a moment)
        current = table.read(record["id"]) or record
        if was_running:
            info(f"✅ stopped: {record['name']} ({record['id']})")
        else:
            warn(f"capsule {record['id']} is not running")
        results.append({"id": record["id"], "name": record.get("name"), "was_running": was_running,
                        "status": current.get("status"), "exit_code": current.get("exit_code")})
    emit({"schema_version": "1", "stopped": results, "total": sum(1 for r in results if r["was_running"])},
         "run-close")


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(close_cmd)
