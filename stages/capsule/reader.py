"""Reading an artifact's small members: the one reader every entry point uses.

:func:`read_capsule` takes the strict layout (:mod:`stages.capsule.archive`) and parses each
small member — ``signature.json`` (JSON, canonical, schema), then every other member's bytes
against the BLAKE3 it lists, then ``capsule.toml``, the lock, the SBOM and the payload manifest
(whose chunk sizes are capped: :mod:`cas.payload_manifest`). The payload stays on disk; its
bytes are judged by :mod:`stages.capsule.payload`. Anything malformed is E208 naming the check
(``archive`` or ``members``) that failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas.payload_manifest import PayloadManifest, PayloadManifestError
from pipeline.errors import E_TRUNCATED
from stages.capsule import signature
from stages.capsule.archive import (
    MEMBER_ORDER,
    PAYLOAD,
    PAYLOAD_MANIFEST,
    FileSource,
    Layout,
    SkeletonSource,
    Source,
    read_layout,
)
from stages.capsule.distribution import parse_manifest_bytes
from stages.capsule.errors import CapsuleError


@dataclass(frozen=True)
class Capsule:
    """An artifact whose framing and small members are well formed (its payload not yet judged)."""

    path: Path | None  # None for a skeleton
    layout: Layout
    raw: dict[str, bytes]  # every member but the payload, as stored
    signature_doc: dict[str, Any]
    manifest: dict[str, Any]
    lock: Any
    sbom: Any
    payload_manifest: PayloadManifest

    @property
    def name(self) -> Any:
        return self.manifest.get("name")

    @property
    def version(self) -> Any:
        return self.manifest.get("version")

    @property
    def members(self) -> list[str]:
        return self.layout.names

    @property
    def payload_offset(self) -> int:
        return self.layout.payload.offset

    @property
    def payload_size(self) -> int:
        return self.layout.payload.size

    @property
    def readme_name(self) -> str | None:
        return self.layout.readme

    @property
    def readme(self) -> str | None:
        name = self.layout.readme
        return self.raw[name].decode("utf-8", "replace") if name else None

    def small_members(self) -> dict[str, bytes]:
        """The members signature.json lists (all but itself and the payload)."""
        return {n: b for n, b in self.raw.items() if n != signature.MEMBER}


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CapsuleError("members", f"{name} is not JSON: {str(exc)[:200]}", member=name) from None


def read_source(src: Source, path: Path | None = None) -> Capsule:
    """The layout and parsed small members of the artifact ``src`` holds (E208 for anything malformed)."""
    layout = read_layout(src)
    raw: dict[str, bytes] = {}
    for span in layout.members:
        if span.name == PAYLOAD:
            continue
        data = src.read_at(span.offset, span.size)
        if len(data) != span.size:
            raise CapsuleError("archive", f"member {span.name} is truncated", code=E_TRUNCATED, member=span.name)
        raw[span.name] = data
    doc = signature.parse_member(raw[signature.MEMBER])
    small = {n: b for n, b in raw.items() if n != signature.MEMBER}
    readme = layout.readme
    signature.check_member_digests(doc, small, MEMBER_ORDER + ((readme,) if readme else ()))
    manifest = parse_manifest_bytes(raw["capsule.toml"])
    lock = _json("capsule.lock.json", raw["capsule.lock.json"])
    sbom = _json("sbom.spdx.json", raw["sbom.spdx.json"])
    try:
        payload = PayloadManifest.from_json(_json(PAYLOAD_MANIFEST, raw[PAYLOAD_MANIFEST]))
    except PayloadManifestError as exc:
        raise CapsuleError("members", f"{PAYLOAD_MANIFEST}: {exc}", member=PAYLOAD_MANIFEST) from None
    return Capsule(path, layout, raw, doc, manifest, lock, sbom, payload)


def read_capsule(path: Path) -> Capsule:
    """:func:`read_source` of a file (E208 when it cannot be read at all)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return read_source(FileSource(fh), path)
    except OSError as exc:
        raise CapsuleError("archive", f"cannot read {path}: {exc.strerror}", path=str(path)) from None


def read_skeleton(prefix: bytes, payload_size: int, suffix: bytes) -> Capsule:
    """:func:`read_source` of the bytes around a payload, before the payload is downloaded."""
    return read_source(SkeletonSource(prefix, payload_size, suffix))
