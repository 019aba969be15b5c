"""Opening a ``.sync``: show the local copy at once, then refresh it from its source once its TTL has passed.

This is HTTP's *stale-while-revalidate*: ``ato run|open x.sync`` verifies the local copy (every
digest and the signature, then the trust decision on its signer), hands its payload to ``show``
without touching the network, and only then, when the payload is due, fetches the package its
``[source] url`` publishes. The update replaces the local file only after it has passed every
check the local copy passed, plus the ones an update needs:

* it is signed (an unsigned update cannot be verified), by the key the identity is pinned to, or by
  a key that key vouched for in a rotation proof inside its overlap window (``pipeline.trust``);
* it is not older than the local copy (``meta.created_at``), so an attacker who replays an old,
  validly signed version cannot roll the data back, and not dated in the future;
* the source is ``https://`` (``http://`` only on loopback) and its host is in
  ``permissions.allow_hosts``, on every redirect too; the download stops at the size cap and at
  ``policy.timeout``.

Fail closed: any failed refresh keeps the last good package byte for byte and says why
(``refresh.status = "failed"`` with the error); the next open tries again. The file is replaced
temp + fsync + rename, so a crash leaves the old package or the new one (and a temp file beside
it, which the next refresh sweeps once its owner is gone).

When: a payload is due once ``max(meta.created_at, last successful check) + policy.ttl`` has
passed. The last check (and the source's ETag, sent back as ``If-None-Match``) is kept in
``$ATO_HOME/state/sync/<blake3 of the package path>.json``. Identity: a package is pinned as
``sync:<display name>`` (``q3.sync`` -> ``sync:q3.csv``), like a bare ``.capsule`` as
``capsule:<name>``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from cas.atomic import atomic_writer, write_bytes_atomic
from cas.digest import blake3_bytes
from cas.filelock import flocked
from cas.tempfiles import sweep
from pipeline import paths
from pipeline.errors import E_INTEGRITY, E_NETWORK, E_POLICY, E_SERVER, AtoError
from pipeline.trust import gate
from stages.provenance import built_here
from stages.sync import SyncPackage, read_sync
from stages.sync.archive import MAX_FILE
from stages.sync.manifest import OPENABLE_VARIANTS, check_source_url, format_time

REFRESH_MODES = ("auto", "always", "never")
FUTURE_SKEW = 300  # seconds an update's created_at may be ahead of this machine's clock
MAX_REDIRECTS = 5
_IDENTITY_CHARS = re.compile(r"[^A-Za-z0-9._:/@+-]")


@dataclass
class Refresh:
    """What the refresh step did: ``not-due``, ``skipped`` (--offline), ``no-source``, ``unchanged``,
    ``updated`` or ``failed`` (with the error; the last good package is kept)."""

    status: str
    source: str | None = None
    previous_digest: str | None = None
    error: AtoError | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "source": self.source, "previous_digest": self.previous_digest,
                "error": None if self.error is None else {"code": self.error.code, "message": self.error.message}}


@dataclass
class Opened:
    package: SyncPackage
    trust: dict[str, Any] | None
    refresh: Refresh
    checked_at: float | None
    notes: list[str] = field(default_factory=list)


def identity_of(pkg: SyncPackage) -> str:
    return "sync:" + _IDENTITY_CHARS.sub("-", pkg.display_name())[:190]


# ------------------------------------------------------------------ state: the last check


def _state_path(path: Path) -> Path:
    return paths.sync_state_dir() / f"{blake3_bytes(str(path).encode())[:32]}.json"


def _load_state(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_state_path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _save_state(path: Path, **changes: Any) -> None:
    doc = {**_load_state(path), **changes, "path": str(path)}
    write_bytes_atomic(_state_path(path), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _checked_at(state: dict[str, Any]) -> float | None:
    value = state.get("checked_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def next_refresh(pkg: SyncPackage, checked_at: float | None) -> float:
    return max(pkg.manifest.created_epoch, checked_at or 0.0) + pkg.manifest.ttl


# ------------------------------------------------------------------ opening


def _accept(pkg: SyncPackage) -> dict[str, Any]:
    if pkg.manifest.variant not in OPENABLE_VARIANTS:
        raise AtoError(E_POLICY, f"{pkg.path.name} is a '{pkg.manifest.variant}' package; ato opens only "
                                 f"{' and '.join(OPENABLE_VARIANTS)} packages (vault encryption and app payloads are "
                                 "not supported)", details={"variant": pkg.manifest.variant})
    decision = gate.accept_signature(pkg.signature, identity_of(pkg), built_here=built_here(pkg.file_digest))
    return decision.to_json()


def open_sync(path: Path, *, refresh: str = "auto", show: Callable[[SyncPackage], None] | None = None,
              now: Callable[[], float] = time.time) -> Opened:
    """Verify and accept the local copy, ``show`` it, then refresh it when due (see the module doc).

    Raises only when the local copy itself is unusable; a failed refresh is reported in the result.
    """
    path = Path(path).expanduser().resolve()
    pkg = read_sync(path)
    try:
        trust = _accept(pkg)
        if show is not None:
            show(pkg)
    except BaseException:
        pkg.close()
        raise
    checked = _checked_at(_load_state(path))
    source = pkg.manifest.source_url
    if refresh == "never":
        return Opened(pkg, trust, Refresh("skipped", source), checked)
    if source is None:
        return Opened(pkg, trust, Refresh("no-source"), checked)
    if refresh == "auto" and now() < next_refresh(pkg, checked):
        return Opened(pkg, trust, Refresh("not-due", source), checked)
    with flocked(_state_path(path).with_suffix(".lock")):
        state = _load_state(path)
        if refresh == "auto" and now() < next_refresh(pkg, _checked_at(state)):  # another open just did it
            return Opened(pkg, trust, Refresh("not-due", source), _checked_at(state))
        result, new_pkg = _refresh(path, pkg, state, now)
    if new_pkg is not None:
        pkg.close()
        pkg = new_pkg
    return Opened(pkg, trust, result, _checked_at(_load_state(path)))


# ------------------------------------------------------------------ refreshing


def _network(message: str, url: str) -> AtoError:
    return AtoError(E_NETWORK, message, details={"url": url})


def _check_hop(pkg: SyncPackage, url: str) -> None:
    try:
        check_source_url(url)
    except AtoError as exc:
        raise AtoError(E_POLICY, f"refusing to fetch {url}: {exc.message.split(': ', 2)[-1]}",
                       details={"url": url}) from None
    host = urlsplit(url).hostname or ""
    if not pkg.manifest.host_allowed(host):
        raise AtoError(E_POLICY, f"refusing to fetch {url}: host {host} is not in permissions.allow_hosts "
                                 f"{list(pkg.manifest.allow_hosts)}", details={"url": url, "host": host})


def _download(pkg: SyncPackage, url: str, etag: str | None, out: Any, deadline: float) -> tuple[int, str | None]:
    """GET the source into ``out`` (status 200) or learn it is unchanged (304); redirects re-checked."""
    import httpx

    headers = {"User-Agent": "ato-sync/1", "Accept": "application/vnd.magnetic.sync+zip, */*"}
    if etag:
        headers["If-None-Match"] = etag
    for _hop in range(MAX_REDIRECTS + 1):
        _check_hop(pkg, url)
        left = deadline - time.monotonic()
        if left <= 0:
            raise _network(f"refresh from {url} took longer than policy.timeout", url)
        try:
            with httpx.stream("GET", url, headers=headers, timeout=left, follow_redirects=False) as resp:
                if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("location"):
                    url = urljoin(url, resp.headers["location"])
                    continue
                if resp.status_code == 304:
                    return 304, etag
                if resp.status_code >= 500:
                    raise AtoError(E_SERVER, f"{url} answered HTTP {resp.status_code}", details={"url": url})
                if resp.status_code != 200:
                    raise _network(f"{url} answered HTTP {resp.status_code}", url)
                size = 0
                for chunk in resp.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE:
                        raise AtoError(E_INTEGRITY, f"{url} sent more than the {MAX_FILE}-byte cap of a .sync",
                                       details={"url": url})
                    if time.monotonic() > deadline:
                        raise _network(f"refresh from {url} took longer than policy.timeout", url)
                    out.write(chunk)
                return 200, resp.headers.get("etag")
        except httpx.HTTPError as exc:
            raise _network(f"cannot fetch {url}: {exc}", url) from None
    raise _network(f"{url}: more than {MAX_REDIRECTS} redirects", url)


def _judge_update(pkg: SyncPackage, new: SyncPackage, now: float) -> bool:
    """True when the update is the same package; raise when it may not replace the local copy."""
    m_old, m_new = pkg.manifest, new.manifest
    if not new.signature.signed:
        raise AtoError(E_INTEGRITY, "the update is unsigned; an update must be signed to be verified")
    if m_new.created_epoch > now + FUTURE_SKEW:
        raise AtoError(E_INTEGRITY, f"the update is dated in the future ({m_new.created_at})")
    same = new.digests == pkg.digests
    if m_new.created_epoch < m_old.created_epoch:
        raise AtoError(E_INTEGRITY, f"the update ({m_new.created_at}) is older than the local copy "
                                    f"({m_old.created_at}): refusing a rollback")
    if m_new.created_epoch == m_old.created_epoch and not same:
        raise AtoError(E_INTEGRITY, f"the update has the local copy's created_at ({m_old.created_at}) but other "
                                    "content; a new version must carry a newer created_at")
    if new.manifest.variant not in OPENABLE_VARIANTS:
        raise AtoError(E_POLICY, f"the update is a '{new.manifest.variant}' package")
    gate.accept_signature(new.signature, identity_of(pkg))
    return same


def _refresh(path: Path, pkg: SyncPackage, state: dict[str, Any],
             now: Callable[[], float]) -> tuple[Refresh, SyncPackage | None]:
    source = pkg.manifest.source_url
    assert source is not None
    deadline = time.monotonic() + pkg.manifest.timeout
    verified: list[SyncPackage] = []
    outcome: dict[str, Any] = {}

    def check(tmp: Path) -> None:  # runs on the complete temp file, before it may replace the local copy
        if outcome["status"] == 304:
            raise _Keep()
        new = read_sync(tmp)
        verified.append(new)
        if _judge_update(pkg, new, now()):
            raise _Keep()

    sweep([path.parent])  # what a refresh killed mid-download left beside the package (owner gone only)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        with atomic_writer(path, mode=mode, check=check) as out:
            outcome["status"], outcome["etag"] = _download(pkg, source, state.get("etag"), out, deadline)
    except _Keep:
        for new in verified:
            new.close()
        _save_state(path, checked_at=now(), etag=outcome.get("etag"), last_error=None)
        return Refresh("unchanged", source), None
    except AtoError as exc:
        for new in verified:
            new.close()
        _save_state(path, last_error={"code": exc.code, "message": exc.message, "at": format_time(now())})
        return Refresh("failed", source, error=exc), None
    except OSError as exc:
        for new in verified:
            new.close()
        err = AtoError(E_POLICY, f"cannot replace {path}: {exc.strerror or exc}")
        return Refresh("failed", source, error=err), None
    _save_state(path, checked_at=now(), etag=outcome.get("etag"), last_error=None)
    new = verified[-1]
    new.path = path  # it was verified as the temp file that has just been renamed here
    return Refresh("updated", source, previous_digest=pkg.payload_digest), new


class _Keep(Exception):
    """Raised from the check: the download is not a change; keep the local copy as it is."""


# ------------------------------------------------------------------ the envelope


def envelope(opened: Opened, now: float) -> dict[str, Any]:
    """The ``sync-open`` document: the payload's digest, age and next refresh, and what the refresh did."""
    pkg = opened.package
    m = pkg.manifest
    due = next_refresh(pkg, opened.checked_at)
    return {
        "schema_version": "1",
        "path": str(pkg.path),
        "display_name": pkg.display_name(),
        "content_type": m.content_type,
        "variant": m.variant,
        "file_digest": pkg.file_digest,
        "manifest_hash": pkg.digests.manifest_hash,
        "payload": {"digest": pkg.payload_digest, "size": pkg.payload_size},
        "created_at": m.created_at,
        "age_seconds": max(0, int(now - m.created_epoch)),
        "ttl_seconds": m.ttl,
        "expires_at": format_time(m.created_epoch + m.ttl),
        "checked_at": format_time(opened.checked_at) if opened.checked_at else None,
        "next_refresh_at": format_time(due),
        "next_refresh_in_seconds": max(0, int(due - now)),
        "source": m.source_url,
        "signed": pkg.signature.signed,
        "signer": pkg.signature.to_json(),
        "trust": opened.trust,
        "refresh": opened.refresh.to_json(),
    }
