"""What ``ato cas gc`` needs from the rest of ``ATO_HOME``: the roots it keeps, the temp files it sweeps.

Roots: latest build of every project, every installed artifact, every fetched artifact.
A root that cannot be read is reported and kept conservative: gc refuses to run
rather than delete what a damaged record might still need.

Temp files: those killed processes left in every place ato writes (``paths.temp_sites``);
only entries whose owner process is gone count (``cas.tempfiles``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cas.payload_manifest import PayloadManifest, PayloadManifestError
from cas.tempfiles import SweepReport, sweep
from pipeline import paths
from pipeline.errors import E_INTEGRITY, AtoError
from stages.capsule import read_capsule
from stages.payload import RECORD_NAME, record_artifact_hash


def _excluded(path: Path, excluded: frozenset[str]) -> bool:
    return str(path) in excluded


def _from_build_records(excluded: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for record in sorted(paths.build_cache_dir().glob(f"*/{RECORD_NAME}")):
        if _excluded(record.parent, excluded):
            continue
        try:
            out.append(record_artifact_hash(record.read_bytes()))
        except (ValueError, KeyError, OSError) as exc:
            raise AtoError(E_INTEGRITY, f"cannot read build record {record}: {exc}; refusing to collect garbage",
                           hint="delete that build record or rebuild the project") from None
    return out


def _from_capsules(root: Path, excluded: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for capsule in sorted(root.rglob("*.capsule")) if root.is_dir() else []:
        if _excluded(capsule, excluded):
            continue
        out.append(read_capsule(capsule).payload_manifest.artifact_hash)
    return out


def _from_fetches(excluded: frozenset[str] = frozenset()) -> list[str]:
    out = []
    root = paths.fetches_dir()
    for manifest in sorted(root.glob("*/artifact/payload.v3.manifest.json")) if root.is_dir() else []:
        if _excluded(manifest.parent.parent, excluded):
            continue
        try:
            out.append(PayloadManifest.from_json(json.loads(manifest.read_bytes())).artifact_hash)
        except (ValueError, PayloadManifestError) as exc:
            raise AtoError(E_INTEGRITY, f"cannot read {manifest}: {exc}; refusing to collect garbage") from None
    return out


def live_payloads(excluded: Iterable[Path | str] = ()) -> list[str]:
    """Every payload still in use; ``excluded`` (store capsules, fetch dirs, build state dirs) are treated
    as already gone, so a dry run of a removal reports what the CAS would then free."""
    gone = frozenset(str(p) for p in excluded)
    return sorted(set(_from_build_records(gone) + _from_capsules(paths.store_dir(), gone) + _from_fetches(gone)))


def sweep_temps(*, dry_run: bool = False, skip: Path | None = None) -> SweepReport:
    """Sweep (or, with ``dry_run``, list) the leftover temp files of every site but ``skip``."""
    report = SweepReport()
    for site, recursive in paths.temp_sites():
        if skip is not None and site == skip:
            continue
        report.add(sweep([site], recursive=recursive, dry_run=dry_run))
    return report
