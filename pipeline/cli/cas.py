"""``ato cas verify`` and ``ato cas gc``: fsck and garbage collection of the local CAS."""

from __future__ import annotations

from pathlib import Path

import click

from cas.gc import collect_garbage
from cas.store import CasStore
from cas.tempfiles import sweep
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


@cas_group.command("verify", epilog=examples("ato cas verify --json",
                                                "ato cas verify --root /mnt/old-home/.ato/cas"))
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Check the store at DIR (another ATO_HOME's cas/) instead of $ATO_HOME/cas.")
@json_option
def verify_cmd(root: Path | None) -> None:
    """Check every chunk, pack and payload manifest in the store (fsck).

    Each chunk is decoded and re-hashed; packs the index does not know and temp files left by
    killed processes are listed (`ato cas gc` removes them).
    """
    store = CasStore(root if root is not None else paths.cas_root())
    report = verify_store(store)
    leftovers = sweep([store.root], recursive=True, dry_run=True) if root is not None else sweep_temps(dry_run=True)
    doc = {"schema_version": SCHEMA_VERSION, "root": str(store.root), **report.to_json(),
           "leftover_temps": leftovers.removed, "leftover_temp_bytes": leftovers.bytes_freed}
    human = (f"{report.objects_ok}/{report.objects_checked} chunks ok in {report.packs_checked} packs, "
             f"{report.manifests_checked} payload manifests checked")
    if report.unindexed_packs:
        human += f"; {len(report.unindexed_packs)} pack(s) a killed writer never recorded (`ato cas gc` removes them)"
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
    problems = report.corrupt[:3] + report.missing[:3] + [m["artifact_hash"] for m in report.manifests_broken[:3]] + \
        [p["pack"] for p in report.packs_broken[:3]]
    raise AtoError(E_INTEGRITY, f"CAS verification failed: {len(report.corrupt)} corrupt chunk(s), "
                   f"{len(report.missing)} missing, {len(report.manifests_broken)} broken manifest(s), "
                   f"{len(report.packs_broken)} broken pack(s): "
                   f"{', '.join(problems)}", hint="rebuild or reinstall the affected capsules; "
                   "`ato cas gc` removes what nothing uses")


@cas_group.command("gc", epilog=examples("ato cas gc --dry-run", "ato cas gc --json"))
@click.option("--dry-run", is_flag=True, help="Report what would be removed, remove nothing.")
@json_option
def gc_cmd(dry_run: bool) -> None:
    """Remove what no build, install or fetch uses, and leftover temp files.

    Payload manifests nothing names go, packs holding only dead chunks are deleted, mostly dead
    packs are repacked, and chunks in the one-file-per-chunk layout of earlier versions are moved
    into a pack.
    """
    store = CasStore(paths.cas_root())
    report = collect_garbage(store, live_payloads(), dry_run=dry_run)
    others = sweep_temps(dry_run=dry_run, skip=store.root)  # the store's own were swept under its lock
    report.temps_removed += len(others.removed)
    report.temp_bytes_freed += others.bytes_freed
    doc = {"schema_version": SCHEMA_VERSION, **report.to_json()}
    verb = "would remove" if dry_run else "removed"
    emit(doc, "cas-gc", f"{verb} {report.objects_removed} chunks ({human_bytes(report.bytes_freed)}; "
                        f"{report.packs_removed} packs, {report.packs_repacked} repacked), "
                        f"{report.manifests_removed} payload manifests and {report.temps_removed} leftover temp "
                        f"files ({human_bytes(report.temp_bytes_freed)}); kept {report.objects_kept} chunks")


def register(group: click.Group) -> None:
    group.add_command(cas_group)
