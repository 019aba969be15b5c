"""The lock stage: ``capsule.lock.json``, the record of what a build consumed.

It pins the normalized manifest's hash, the digest of the source set and the
language lockfiles found in it, so a later stage (or a person) can tell exactly
which inputs an artifact came from.
"""

from __future__ import annotations

from typing import Any

from cas.canonical import jcs_digest
from cas.digest import label
from stages.sbom import rfc3339
from stages.sources import SourceEntry

LOCK_VERSION = "1"
LANGUAGE_LOCKFILES = ("uv.lock", "package-lock.json", "deno.lock", "pnpm-lock.yaml", "yarn.lock", "bun.lock",
                      "Cargo.lock", "go.sum", "capsule.lock")
_LOCKFILE_NAMES = frozenset(LANGUAGE_LOCKFILES)


def entries_listing(entries: list[SourceEntry]) -> list[list[Any]]:
    """The source set as data: path, kind, mode, size and content digest (or link target)."""
    return [[e.relpath, e.kind, e.mode, e.size, e.link_target if e.kind == "symlink" else e.blake3]
            for e in entries]


def lock_inputs(entries: list[SourceEntry]) -> dict[str, Any]:
    """The lock's ``inputs``: how many entries, the digest of the source set, the language lockfiles in it."""
    found = {e.relpath: e for e in entries if e.relpath in _LOCKFILE_NAMES}  # not a dict of all 10,000 paths
    lockfiles = {name: label(found[name].blake3 or "") for name in LANGUAGE_LOCKFILES
                 if name in found and found[name].kind == "file"}
    return {"files": len(entries), "source_set_digest": jcs_digest(entries_listing(entries), plain=True), "lockfiles": lockfiles}


def build_lock(normalized_manifest: dict[str, Any], targets: dict[str, dict[str, Any]],
               inputs: dict[str, Any], epoch: int) -> dict[str, Any]:
    return {
        "version": LOCK_VERSION,
        "meta": {"created_at": rfc3339(epoch), "manifest_hash": jcs_digest(normalized_manifest)},
        "inputs": inputs,
        "targets": targets,
    }
