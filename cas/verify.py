"""fsck for the CAS: every object decodes to the bytes its name promises, every
stored payload manifest is intact and names only objects that exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cas.digest import label
from cas.objects import ObjectError
from cas.payload_manifest import PayloadManifestError
from cas.store import CasStore


@dataclass
class VerifyReport:
    objects_checked: int = 0
    objects_ok: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    manifests_checked: int = 0
    manifests_broken: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.manifests_broken)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "objects_checked": self.objects_checked, "objects_ok": self.objects_ok,
                "corrupt": self.corrupt, "missing": self.missing, "manifests_checked": self.manifests_checked,
                "manifests_broken": self.manifests_broken}


def verify_store(store: CasStore) -> VerifyReport:
    report = VerifyReport()
    for hex_digest in store.objects.iter_hexes():
        report.objects_checked += 1
        try:
            store.objects.get(hex_digest)
            report.objects_ok += 1
        except ObjectError:
            report.corrupt.append(label(hex_digest))
    missing: set[str] = set()
    for artifact_hash in store.iter_manifest_hashes():
        report.manifests_checked += 1
        try:
            manifest = store.get_manifest(artifact_hash)
        except (PayloadManifestError, ObjectError, ValueError) as exc:
            report.manifests_broken.append({"artifact_hash": label(artifact_hash), "problem": str(exc)})
            continue
        gone = store.missing_chunks(manifest)
        if gone:
            missing.update(gone)
            report.manifests_broken.append({"artifact_hash": label(artifact_hash),
                                            "problem": f"{len(gone)} chunk(s) missing"})
    report.missing = sorted(label(h) for h in missing)
    return report
