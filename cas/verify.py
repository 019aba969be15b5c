"""fsck for the CAS: every pack the index names is there with the size it had; every chunk in it
decodes to the bytes its name promises (frame BLAKE3, then raw BLAKE3); every stored payload
manifest is intact and names only chunks the store has. Chunks still in the one-file-per-chunk
layout of earlier versions are checked the same way. Pack files the index does not know are listed
(``ato cas gc`` removes them); they do not make the store unsound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import blake3

from cas.digest import label
from cas.frames import ChunkError, decompress_frame
from cas.payload_manifest import PayloadManifestError
from cas.store import CasStore


@dataclass
class VerifyReport:
    objects_checked: int = 0  # chunks (packed and legacy)
    objects_ok: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    manifests_checked: int = 0
    manifests_broken: list[dict[str, str]] = field(default_factory=list)
    packs_checked: int = 0
    packs_broken: list[dict[str, str]] = field(default_factory=list)
    unindexed_packs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.manifests_broken or self.packs_broken)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "objects_checked": self.objects_checked, "objects_ok": self.objects_ok,
                "corrupt": self.corrupt, "missing": self.missing, "manifests_checked": self.manifests_checked,
                "manifests_broken": self.manifests_broken, "packs_checked": self.packs_checked,
                "packs_broken": self.packs_broken, "unindexed_packs": self.unindexed_packs}


def verify_store(store: CasStore) -> VerifyReport:
    report = VerifyReport()
    corrupt: set[str] = set()
    _packs(store, report, corrupt)
    for hex_digest in store.objects.iter_hexes():
        report.objects_checked += 1
        try:
            store.objects.get(hex_digest)
            report.objects_ok += 1
        except ChunkError:
            corrupt.add(hex_digest)
    missing: set[str] = set()
    for artifact_hash in store.iter_manifest_hashes():
        report.manifests_checked += 1
        try:
            manifest = store.get_manifest(artifact_hash)
        except (PayloadManifestError, ChunkError, ValueError) as exc:
            report.manifests_broken.append({"artifact_hash": label(artifact_hash), "problem": str(exc)})
            continue
        gone = store.missing_chunks(manifest)
        if gone:
            missing.update(gone)
            report.manifests_broken.append({"artifact_hash": label(artifact_hash),
                                            "problem": f"{len(gone)} chunk(s) missing"})
    report.corrupt = sorted(label(h) for h in corrupt)
    report.missing = sorted(label(h) for h in missing)
    return report


def _packs(store: CasStore, report: VerifyReport, corrupt: set[str]) -> None:
    packs = store.packs
    rows = packs.index.packs()
    known = {r.name for r in rows}
    report.unindexed_packs = [name for name in packs.files() if name not in known]
    for row in rows:
        report.packs_checked += 1
        path = packs.directory / row.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            report.packs_broken.append({"pack": row.name, "problem": "the pack file is missing"})
            corrupt.update(e.hash for e in packs.index.pack_entries(row.name))
            continue
        if size != row.size:
            report.packs_broken.append({"pack": row.name, "problem": f"{size} bytes on disk, the index says {row.size}"})
        with open(path, "rb") as fh:
            for entry in packs.index.pack_entries(row.name):
                report.objects_checked += 1
                fh.seek(entry.offset)
                frame = fh.read(entry.length)
                raw = decompress_frame(frame, entry.raw_size) if blake3.blake3(frame).digest() == entry.frame_hash \
                    else None
                if raw is None or blake3.blake3(raw).hexdigest() != entry.hash:
                    corrupt.add(entry.hash)
                else:
                    report.objects_ok += 1
