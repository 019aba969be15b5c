"""Garbage collection: drop payload manifests nobody uses and chunks no manifest names.

The caller supplies the roots (payloads still in use); everything reachable from
them is kept. Runs under the store's exclusive lock so a concurrent build, which
holds the shared lock while it writes chunks and its record, is never cut short.
It also sweeps the temp files killed processes left in the store (:mod:`cas.tempfiles`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cas.digest import parse
from cas.payload_manifest import PayloadManifestError
from cas.store import CasStore
from cas.tempfiles import is_temp, sweep

STALE_TEMP_SECONDS = 3600


@dataclass
class GcReport:
    dry_run: bool
    roots: int
    manifests_removed: int
    objects_removed: int
    objects_kept: int
    bytes_freed: int  # the objects' sizes
    temps_removed: int = 0
    temp_bytes_freed: int = 0
    disk_bytes_freed: int = 0  # disk usage given back (blocks, what `du` counts), manifests included

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_garbage(store: CasStore, roots: Iterable[str], *, dry_run: bool = False) -> GcReport:
    root_set = {parse(r) for r in roots}
    with store.exclusive():
        live: set[str] = set()
        manifests_removed = 0
        disk = 0
        for artifact_hash in list(store.iter_manifest_hashes()):
            if artifact_hash in root_set:
                try:
                    live.update(c.raw_hash for c in store.get_manifest(artifact_hash).chunks)
                except PayloadManifestError:
                    pass
                continue
            manifests_removed += 1
            with contextlib.suppress(OSError):
                disk += store.manifest_path(artifact_hash).stat().st_blocks * 512
            if not dry_run:
                store.manifest_path(artifact_hash).unlink(missing_ok=True)
        removed = kept = freed = 0
        for hex_digest in list(store.objects.iter_hexes()):
            if hex_digest in live:
                kept += 1
                continue
            removed += 1
            path = store.objects.path(hex_digest)
            with contextlib.suppress(OSError):
                disk += path.stat().st_blocks * 512
            freed += path.stat().st_size if dry_run else store.objects.remove(hex_digest)
        temps = sweep([store.root], recursive=True, dry_run=dry_run)
        if not dry_run:
            _remove_legacy_temps(store)
    return GcReport(dry_run, len(root_set), manifests_removed, removed, kept, freed, len(temps.removed),
                    temps.bytes_freed, disk)


def _remove_legacy_temps(store: CasStore) -> None:
    """``.*.tmp`` files of ato versions before cas.tempfiles named its temps: by age, they carry no owner."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for p in store.root.rglob(".*.tmp"):
        try:
            if not is_temp(p.name) and p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass
