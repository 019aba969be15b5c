"""``manifest.toml`` of a ``.sync`` package: what the payload is, who made it, how long it stays fresh.

The keys are sync-rs's (``crates/sync-format/src/manifest.rs``), read strictly where a wrong value
would mislead a reader (types, the payload's MIME type, the display extension that becomes a file
name, the TTL), plus one ato extension: ``[source] url``, where a fresh copy of the package is
published. Tables this reader does not use (``[ownership]``, ``[verification]``,
``[capabilities]``, …) are kept as they are: the signature covers them too.

::

    [sync]        version, content_type, display_ext, variant = "plain"|"data"|"vault"|"app"
    [meta]        created_by (the signer's did:key when signed), created_at (RFC 3339), hash_algo = "blake3"
    [policy]      ttl (seconds the payload stays fresh), timeout (seconds a refresh may take)
    [permissions] allow_hosts = [...], allow_env = [...]  (a refresh contacts only allowed hosts)
    [source]      url  (ato: where the next version of this package is fetched from)
    [signature]   see :mod:`stages.sync.signature`
"""

from __future__ import annotations

import datetime as _dt
import re
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import E_MANIFEST, AtoError

FORMAT_VERSION = "1.3"
HASH_ALGO = "blake3"
VARIANTS = ("plain", "data", "vault", "app")
OPENABLE_VARIANTS = ("plain", "data")  # vault (encrypted) and app payloads are not opened by ato
DEFAULT_TTL = 3600
DEFAULT_TIMEOUT = 30
MAX_TTL = 10 * 365 * 86400
MAX_TIMEOUT = 3600
MAX_URL = 2048
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_EXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}(\.[A-Za-z0-9][A-Za-z0-9_-]{0,31}){0,2}$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9.:\[\]-]{1,253}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def parse_time(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time with a zone (``Z`` or an offset)."""
    value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    return value.timestamp()


def format_time(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(int(epoch), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SyncManifest:
    """A checked ``manifest.toml``; ``doc`` is the whole parsed table (what the signature covers)."""

    doc: dict[str, Any]
    version: str
    content_type: str
    display_ext: str
    variant: str
    created_by: str
    created_at: str
    created_epoch: float
    ttl: int
    timeout: int
    allow_hosts: tuple[str, ...]
    allow_env: tuple[str, ...]
    source_url: str | None

    @property
    def signature(self) -> dict[str, Any] | None:
        sig = self.doc.get("signature")
        return sig if isinstance(sig, dict) else None

    def unsigned_doc(self) -> dict[str, Any]:
        """The manifest without ``[signature]``: the document ``manifest_hash`` names."""
        return {k: v for k, v in self.doc.items() if k != "signature"}

    def host_allowed(self, host: str) -> bool:
        """A host the package may contact: an exact entry, or a subdomain of a ``*.domain`` entry.

        (sync-rs matches any suffix, so ``evil-example.com`` would pass ``example.com``; here a
        wildcard only matches at a dot boundary.) An empty list allows nothing.
        """
        host = host.lower().rstrip(".")
        for entry in self.allow_hosts:
            entry = entry.lower().rstrip(".")
            if entry.startswith("*."):
                if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                    return True
            elif host == entry:
                return True
        return False


def _bad(key: str, expected: str) -> AtoError:
    return AtoError(E_MANIFEST, f"manifest.toml: {key}: {expected}", details={"file": "manifest.toml", "key": key})


def _table(doc: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    value = doc.get(name)
    if value is None:
        if required:
            raise AtoError(E_MANIFEST, f"manifest.toml: [{name}] is missing",
                           details={"file": "manifest.toml", "key": name})
        return {}
    if not isinstance(value, dict):
        raise _bad(name, "must be a table")
    return value


def _string(table: dict[str, Any], section: str, key: str, *, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise AtoError(E_MANIFEST, f"manifest.toml: {section}.{key} is missing",
                           details={"file": "manifest.toml", "key": f"{section}.{key}"})
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{section}.{key}", "must be a non-empty string")
    return value


def _int(table: dict[str, Any], section: str, key: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{section}.{key}", f"must be an integer number of seconds from {low} to {high}")
    return value


def _strings(table: dict[str, Any], section: str, key: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.match(v) for v in value):
        raise _bad(f"{section}.{key}", "must be a list of names")
    return tuple(value)


def _no_dates(value: Any, where: str) -> None:
    """The signature hashes the manifest as JSON, which has no date type: dates must be quoted strings."""
    if isinstance(value, dict):
        for k, v in value.items():
            _no_dates(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_dates(v, f"{where}[{i}]")
    elif isinstance(value, _dt.date | _dt.time):
        raise _bad(where, "must be a quoted RFC 3339 string, not a TOML date")


def check_source_url(url: str, key: str = "source.url") -> str:
    """``https://`` anywhere, ``http://`` only to this machine (loopback); no credentials, no fragment."""
    if len(url) > MAX_URL:
        raise _bad(key, f"is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError as exc:
        raise _bad(key, f"is not a URL ({exc})") from None
    if parts.scheme not in ("https", "http") or not host:
        raise _bad(key, "must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise _bad(key, "must not carry credentials")
    if parts.scheme == "http" and not is_loopback(host):
        raise _bad(key, "must use https (plain http is allowed only to 127.0.0.1, ::1 or localhost)")
    return url


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_manifest(data: bytes) -> SyncManifest:
    """Read and check ``manifest.toml``; E002 naming the key for anything wrong."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AtoError(E_MANIFEST, f"manifest.toml is not valid TOML: {exc}", details={"file": "manifest.toml"}) \
            from None
    _no_dates(doc, "")
    sync = _table(doc, "sync", True)
    meta = _table(doc, "meta", True)
    policy = _table(doc, "policy", True)
    perms = _table(doc, "permissions", False)
    source = _table(doc, "source", False)
    _table(doc, "signature", False)
    version = _string(sync, "sync", "version") or ""
    content_type = (_string(sync, "sync", "content_type") or "").strip().lower()
    if not _MIME.match(content_type.split(";", 1)[0].strip()):
        raise _bad("sync.content_type", "must be a MIME type such as text/csv")
    display_ext = _string(sync, "sync", "display_ext") or ""
    if not _EXT.match(display_ext):
        raise _bad("sync.display_ext", "must be a file extension such as csv (letters, digits, - and _)")
    variant = sync.get("variant", "plain")
    if variant not in VARIANTS:
        raise _bad("sync.variant", f"must be one of {', '.join(VARIANTS)}")
    created_by = _string(meta, "meta", "created_by") or ""
    created_at = _string(meta, "meta", "created_at") or ""
    try:
        created_epoch = parse_time(created_at)
    except ValueError:
        raise _bad("meta.created_at", "must be an RFC 3339 time with a zone, e.g. 2026-01-31T12:00:00Z") from None
    if meta.get("hash_algo") != HASH_ALGO:
        raise _bad("meta.hash_algo", f'must be "{HASH_ALGO}"')
    ttl = _int(policy, "policy", "ttl", DEFAULT_TTL, 0, MAX_TTL)
    timeout = _int(policy, "policy", "timeout", DEFAULT_TIMEOUT, 1, MAX_TIMEOUT)
    allow_hosts = _strings(perms, "permissions", "allow_hosts", _HOST)
    allow_env = _strings(perms, "permissions", "allow_env", _ENV)
    url = _string(source, "source", "url", required=False)
    if url is not None:
        check_source_url(url)
    return SyncManifest(doc, version, content_type, display_ext, variant, created_by, created_at, created_epoch, ttl,
                        timeout, allow_hosts, allow_env, url)


def manifest_document(*, content_type: str, display_ext: str, created_by: str, created_at: str, ttl: int,
                      timeout: int = DEFAULT_TIMEOUT, variant: str = "plain", source_url: str | None = None,
                      allow_hosts: tuple[str, ...] = (), allow_env: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest a build writes (without ``[signature]``); the source's host is allowed automatically."""
    hosts = list(dict.fromkeys(allow_hosts))
    if source_url:
        host = (urlsplit(source_url).hostname or "").lower()
        if host and host not in hosts:
            hosts.append(host)
    doc: dict[str, Any] = {
        "sync": {"version": FORMAT_VERSION, "content_type": content_type, "display_ext": display_ext,
                 "variant": variant},
        "meta": {"created_by": created_by, "created_at": created_at, "hash_algo": HASH_ALGO},
        "policy": {"ttl": ttl, "timeout": timeout},
        "permissions": {"allow_hosts": hosts, "allow_env": list(allow_env)},
    }
    if source_url:
        doc["source"] = {"url": source_url}
    return doc
