"""Build a ``.sync`` from one payload file: manifest, digests, signature, deterministic ZIP.

Same inputs (payload, options, ``created_at``, key) give the same bytes on any machine: the
members are stored in a fixed order with fixed timestamps, and Ed25519 is deterministic.
An unsigned package that this ATO_HOME built is recorded like an unsigned ``.capsule`` built
here (:mod:`stages.provenance`), so it opens on this machine without ``--allow-unsigned``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import blake3
import tomli_w

from cas.digest import label
from pipeline.errors import E_USAGE, AtoError
from stages.capsule.keys import SigningKey
from stages.provenance import record_local_build
from stages.sync import signature as sig
from stages.sync.archive import CAPS, CONTEXT, MAX_PAYLOAD, WASM, WASM_STUB, write_sync
from stages.sync.manifest import (
    DEFAULT_TIMEOUT,
    check_source_url,
    format_time,
    manifest_document,
    parse_manifest,
)

UNSIGNED_CREATOR = "ato"


def _file_digest(path: Path) -> tuple[str, int]:
    hasher, size = blake3.blake3(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return label(hasher.hexdigest()), size


def build_sync(payload: Path, out: Path, *, content_type: str, display_ext: str, ttl: int, created_at: float,
               timeout: int = DEFAULT_TIMEOUT, source_url: str | None = None, key: SigningKey | None = None,
               context: dict[str, Any] | None = None, allow_hosts: tuple[str, ...] = (),
               variant: str = "plain") -> dict[str, Any]:
    """Write ``out`` and return the ``sync-build`` envelope."""
    payload = Path(payload)
    if not payload.is_file():
        raise AtoError(E_USAGE, f"payload {payload} is not a file (a .sync carries one file)",
                       details={"payload": str(payload)})
    if source_url:
        check_source_url(source_url, "--source")
    payload_hash, payload_size = _file_digest(payload)
    if payload_size > MAX_PAYLOAD:
        raise AtoError("E212", f"payload is {payload_size} bytes, over the {MAX_PAYLOAD}-byte ceiling",
                       details={"size": payload_size})
    others: dict[str, bytes] = {WASM: WASM_STUB}
    if context is not None:
        others[CONTEXT] = json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(others[CONTEXT]) > CAPS[CONTEXT]:
            raise AtoError(E_USAGE, f"context.json is over its cap of {CAPS[CONTEXT]} bytes")
    doc = manifest_document(content_type=content_type, display_ext=display_ext,
                            created_by=key.did if key else UNSIGNED_CREATOR, created_at=format_time(created_at),
                            ttl=ttl, timeout=timeout, variant=variant, source_url=source_url,
                            allow_hosts=allow_hosts)
    parse_manifest(tomli_w.dumps(doc).encode())  # the same rules a reader applies: refuse what it would refuse
    digests = sig.Digests(sig.manifest_hash(doc), payload_hash,
                          {n: label(blake3.blake3(b).hexdigest()) for n, b in sorted(others.items())})
    if key is not None:
        doc["signature"] = sig.signature_table(digests, key, created_at, time.time())
    manifest_toml = tomli_w.dumps(doc).encode()
    file_digest, size = write_sync(out, manifest_toml, payload, others)
    if key is None:
        record_local_build(file_digest, out)
    return {
        "schema_version": "1", "ok": True, "path": str(out), "file_digest": file_digest, "size": size,
        "payload": {"digest": payload_hash, "size": payload_size, "content_type": content_type,
                    "display_ext": display_ext},
        "manifest_hash": digests.manifest_hash, "created_at": doc["meta"]["created_at"], "ttl_seconds": ttl,
        "source": source_url, "signed": key is not None, "signer": key.did if key else None,
    }
