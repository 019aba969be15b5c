"""Revocation lists: read from a file or an http(s) URL, merged into the trust store.

Wire format (what a registry serves, and what a file holds)::

    {"revoked": ["did:key:z6Mk…" | "<64-hex fingerprint>" |
                 {"id": <did or fingerprint>, "reason"?: str, "revoked_at"?: RFC 3339}, …]}

A list that cannot be fetched or parsed is an error, never an empty list: failing open would
let a revoked key through. Entries merged from a list keep it as their ``source``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import E_USAGE, AtoError, http_error, network_error
from pipeline.trust.store import TrustStore
from stages.capsule.keys import is_did, parse_rfc3339

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_BYTES = 8 << 20
TIMEOUT = 30.0


@dataclass
class Entry:
    id: str
    reason: str | None = None


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(source: str) -> bytes:
    """The raw bytes of a list at a path or an http(s) URL."""
    if _is_url(source):
        import httpx

        try:
            with httpx.Client(timeout=TIMEOUT, follow_redirects=True) as client:
                resp = client.get(source)
        except httpx.HTTPError as exc:
            raise network_error(source, exc, doing=f"fetch revocation list {source}", source=source) from None
        if resp.status_code != 200:
            raise http_error(source, resp.status_code,
                             message=f"cannot fetch revocation list {source}: HTTP {resp.status_code}")
        if len(resp.content) > MAX_BYTES:
            raise AtoError(E_USAGE, f"revocation list {source} is larger than {MAX_BYTES} bytes")
        return resp.content
    try:
        path = Path(source)
        if path.stat().st_size > MAX_BYTES:
            raise AtoError(E_USAGE, f"revocation list {source} is larger than {MAX_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise AtoError(E_USAGE, f"cannot read revocation list {source}: {exc.strerror}",
                       details={"source": source}) from None


def parse(data: bytes, source: str) -> list[Entry]:
    """Entries of a list; any malformed entry rejects the whole list."""
    def bad(problem: str) -> AtoError:
        return AtoError(E_USAGE, f"revocation list {source} is malformed: {problem}", details={"source": source})

    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    items = doc.get("revoked") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise bad('expected {"revoked": [...]}')
    out = []
    for i, item in enumerate(items):
        reason = None
        if isinstance(item, dict):
            ident, reason = item.get("id"), item.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise bad(f"entry {i}: reason must be a string")
            if item.get("revoked_at") is not None:
                try:
                    parse_rfc3339(str(item["revoked_at"]))
                except ValueError:
                    raise bad(f"entry {i}: revoked_at is not an RFC 3339 time") from None
        else:
            ident = item
        if not isinstance(ident, str):
            raise bad(f"entry {i}: expected a did:key or a fingerprint")
        ident = ident.strip()
        if not is_did(ident):
            ident = ident.lower()
            if not _HEX64.match(ident):
                raise bad(f"entry {i}: {ident!r} is neither an Ed25519 did:key nor a 64-hex fingerprint")
        out.append(Entry(ident, reason))
    return out


def merge(store: TrustStore, source: str, entries: list[Entry]) -> int:
    """Add the list's entries to the store; returns how many were new."""
    added = sum(1 for e in entries if store.revoke(e.id, e.reason, source))
    store.record_list(source, len(entries))
    return added


def load_entries(source: str) -> list[Entry]:
    return parse(fetch(source), source)
