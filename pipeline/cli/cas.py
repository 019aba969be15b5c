"""``ato cas verify`` and ``ato cas gc``: fsck and garbage collection of the local CAS."""

from __future__ import annotations

import click

from cas.gc import collect_garbage
from cas.store import CasStore
from cas.verify import verify_store
from pipeline import paths
from pipeline.cas_roots import live_payloads, sweep_temps
from pipeline.cli.common import emit, json_mode, json_option
from pipeline.cli.help import examples, group
from pipeline.errors import E_INTEGRITY, AtoError
from pipeline.progress import human_bytes

SCHEMA_VERSION = "1"


@group("cas", epilog=examples("ato cas verify", "ato cas gc --dry-run"))
def cas_group() -> None:
    """Inspect and maintain the local content-addressed store."""


@cas_group.command("verify", epilog=examples("ato cas verify", "ato cas verify --json"))
@json_option
def verify_cmd() -> None:
    """Re-hash every object and check every stored payload manifest (fsck).

    Leftover temp files of interrupted writers are listed too.
    """
    store = CasStore(paths.cas_root())
    report = verify_store(store)
    leftovers = sweep_temps(dry_run=True)
    doc = {"schema_version": SCHEMA_VERSION, "root": str(store.root), **report.to_json(),
           "leftover_temps": leftovers.removed, "leftover_temp_bytes": leftovers.bytes_freed}
    human = (f"{report.objects_ok}/{report.objects_checked} objects ok, "
             f"{report.manifests_checked} payload manifests checked")
    if leftovers.removed:
        human += (f"; {len(leftovers.removed)} temp file(s) ({human_bytes(leftovers.bytes_freed)}) left by killed "
                  "processes: `ato cas gc` removes them")
    else:
        human += "; no leftover temp files"
    if report.ok:
        emit(doc, "cas-verify", human)
        return
    if json_mode():
        emit(doc, "cas-verify")
    problems = report.corrupt[:3] + report.missing[:3] + [m["artifact_hash"] for m in report.manifests_broken[:3]]
    raise AtoError(E_INTEGRITY, f"CAS verification failed: {len(report.corrupt)} corrupt object(s), "
                   f"{len(report.missing)} missing, {len(report.manifests_broken)} broken manifest(s): "
                   f"{', '.join(problems)}", hint="rebuild or reinstall the affected capsules; "
                   "`ato cas gc` removes what nothing uses")


@cas_group.command("gc", epilog=examples("ato cas gc --dry-run", "ato cas gc --json"))
@click.option("--dry-run", is_flag=True, help="Report what would be removed, remove nothing.")
@json_option
def gc_cmd(dry_run: bool) -> None:
    """Remove the payload manifests and chunks that nothing uses any more.

    Nothing uses them when no build, install or fetch names them; leftover temp files go too.
    """
    store = CasStore(paths.cas_root())
    report = collect_garbage(store, live_payloads(), dry_run=dry_run)
    others = sweep_temps(dry_run=dry_run, skip=store.root)  # the store's own were swept under its lock
    report.temps_removed += len(others.removed)
    report.temp_bytes_freed += others.bytes_freed
    doc = {"schema_version": SCHEMA_VERSION, **report.to_json()}
    verb = "would remove" if dry_run else "removed"
    emit(doc, "cas-gc", f"{verb} {report.objects_removed} objects ({human_bytes(report.bytes_freed)}), "
                        f"{report.manifests_removed} payload manifests and {report.temps_removed} leftover temp "
                        f"files ({human_bytes(report.temp_bytes_freed)}); kept {report.objects_kept} objects")


def register(group: click.Group) -> None:
    group.add_command(cas_group)
