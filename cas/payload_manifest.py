"""``payload.v3.manifest.json``: the ordered chunk list of a payload tar.

``artifact_hash`` is BLAKE3 of the JCS of everything but itself and the size
hints, so the identity of a payload depends only on its raw chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import blake3

from cas.canonical import canonical_json
from cas.chunker import DEFAULT_PARAMS, MAX_SIZE, CdcParams
from cas.digest import is_label, label, parse

SCHEMA_VERSION = 3
MAX_CHUNK = MAX_SIZE  # no chunk may claim more: a decoder never holds more than this of one chunk


class PayloadManifestError(ValueError):
    """A payload manifest that is malformed or whose artifact_hash does not match."""


@dataclass(frozen=True)
class ChunkRef:
    raw_hash: str  # hex
    raw_size: int
    zstd_size_hint: int | None = None


@dataclass
class PayloadManifest:
    chunks: list[ChunkRef] = field(default_factory=list)
    params: CdcParams = DEFAULT_PARAMS

    @property
    def total_raw_size(self) -> int:
        return sum(c.raw_size for c in self.chunks)

    def _core(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "cdc_params": self.params.to_json(),
            "total_raw_size": self.total_raw_size,
            "chunks": [{"raw_hash": label(c.raw_hash), "raw_size": c.raw_size} for c in self.chunks],
        }

    def _plain(self, core: dict[str, Any], hints: bool) -> bool:
        """Every integer in the document is a chunk size (at most max_size), their sum, a CDC parameter or
        (``hints``) a compressed size: when all are below 2**53 the document is plain, and canonical_json
        can skip the check that walks all of it (the bytes are the same)."""
        limit = 2**53
        params = core["cdc_params"].values()
        return all(type(v) is str or (type(v) is int and -limit < v < limit) for v in params) \
            and core["total_raw_size"] < limit and all(0 < c.raw_size <= self.params.max_size for c in self.chunks) \
            and (not hints or all(c.zstd_size_hint is None or (type(c.zstd_size_hint) is int
                                                              and 0 <= c.zstd_size_hint < limit) for c in self.chunks))

    @functools.cached_property
    def artifact_hash(self) -> str:
        """Hex identity of the payload (computed once: a manifest is not changed after construction)."""
        core = self._core()
        return blake3.blake3(canonical_json(core, plain=self._plain(core, False))).hexdigest()

    def to_json(self) -> dict[str, Any]:
        core = self._core()
        return {
            "schema_version": SCHEMA_VERSION,
            "artifact_hash": label(self.artifact_hash),
            "cdc_params": core["cdc_params"],
            "total_raw_size": core["total_raw_size"],
            "chunks": [{"raw_hash": label(c.raw_hash), "raw_size": c.raw_size, "zstd_size_hint": c.zstd_size_hint}
                       for c in self.chunks],
        }

    def to_bytes(self) -> bytes:
        """Canonical (JCS) bytes: what goes into the artifact and the CAS."""
        doc = self.to_json()
        return canonical_json(doc, plain=self._plain(doc, True))

    @classmethod
    def from_json(cls, doc: Any) -> PayloadManifest:
        """Parse and check a manifest, including its artifact_hash."""
        try:
            if doc.get("schema_version") != SCHEMA_VERSION:
                raise PayloadManifestError(f"schema_version must be {SCHEMA_VERSION}")
            p = doc["cdc_params"]
            params = CdcParams(str(p["algorithm"]), int(p["min_size"]), int(p["avg_size"]), int(p["max_size"]),
                               int(p["seed"]))
            if params.algorithm != "fastcdc" or not 0 < params.min_size <= params.avg_size <= params.max_size:
                raise PayloadManifestError("cdc_params are invalid")
            if params.max_size > MAX_CHUNK:
                raise PayloadManifestError(f"cdc_params.max_size {params.max_size} is over the {MAX_CHUNK}-byte "
                                           "chunk ceiling")
            if not isinstance(doc["chunks"], list):
                raise PayloadManifestError("chunks must be a list")
            chunks = []
            for c in doc["chunks"]:
                size = c["raw_size"]
                if not is_label(c["raw_hash"]) or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                    raise PayloadManifestError(f"invalid chunk entry {str(c)[:200]}")
                if size > params.max_size:
                    raise PayloadManifestError(f"chunk {c['raw_hash']} claims {size} bytes, more than the CDC "
                                               f"max_size {params.max_size}: a chunk decodes to at most max_size")
                hint = c.get("zstd_size_hint")
                chunks.append(ChunkRef(parse(c["raw_hash"]), c["raw_size"], hint if isinstance(hint, int) else None))
            manifest = cls(chunks, params)
            if manifest.total_raw_size != doc["total_raw_size"]:
                raise PayloadManifestError("total_raw_size does not equal the sum of chunk sizes")
            claimed = parse(str(doc["artifact_hash"]))
        except PayloadManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PayloadManifestError(f"malformed payload manifest: {exc}") from None
        if claimed != manifest.artifact_hash:
            raise PayloadManifestError(
                f"payload manifest artifact_hash mismatch: claims blake3:{claimed}, "
                f"content hashes to blake3:{manifest.artifact_hash}")
        return manifest
