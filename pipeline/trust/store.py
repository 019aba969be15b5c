"""The trust store, ``~/.capsule/trust_store.json``: pins, petnames, revocations.

Every change is a transaction: an exclusive ``flock`` on a sibling lock file, a fresh read, the
change, then temp file + fsync + rename (:func:`cas.atomic.write_bytes_atomic`), so a crash
leaves the old store or the new one, never half of either, and two processes never lose each
other's pins. A store that does not parse or does not match ``schemas/trust-store.json`` is
reported (E208) with what is wrong and how to recover; it is never silently reset, because an
empty store would turn every pinned identity back into a first sight.

Layout (``schema_version`` 1)::

    {"schema_version": 1,
     "keys": {<did>: {"fingerprint", "petname"|null, "added_at", "added_by"}},
     "identities": {<identity>: {"key_id", "pinned_at", "via": "tofu"|"pin"|"rotation",
                                 "previous": {"key_id", "until"}|null}},
     "revoked": [{"id": <did or 64-hex fingerprint>, "revoked_at", "reason"|null, "source"}],
     "revocation_lists": [{"source", "merged_at", "entries"}]}
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cas.atomic import write_bytes_atomic
from cas.tempfiles import sweep
from pipeline import nesting, paths
from pipeline.envelope import validation_errors
from pipeline.errors import E_INTEGRITY, E_INTERNAL, E_USAGE, AtoError
from stages.capsule.keys import did_fingerprint, is_did, rfc3339, short_fingerprint

SCHEMA = "trust-store"
SCHEMA_VERSION = 1
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
_PETNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHORT = re.compile(r"^[0-9a-f]{4}(:?[0-9a-f]{4}){1,15}$")


def empty() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "keys": {}, "identities": {}, "revoked": [], "revocation_lists": []}


def now_rfc3339() -> str:
    return rfc3339(time.time())


def check_identity(identity: str) -> str:
    if not isinstance(identity, str) or not _IDENTITY.match(identity):
        raise AtoError(E_USAGE, f"invalid identity {identity!r}: use a publisher (acme), capsule:<name> "
                                "or another name of letters, digits and ._:/@+-")
    return identity


class TrustStore:
    """An in-memory copy of the store; mutate it inside :func:`transaction` to persist."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path
        self._original = copy.deepcopy(data)

    @property
    def changed(self) -> bool:
        return self.data != self._original

    # ------------------------------------------------------------ queries

    @property
    def keys(self) -> dict[str, dict[str, Any]]:
        return self.data["keys"]

    @property
    def identities(self) -> dict[str, dict[str, Any]]:
        return self.data["identities"]

    def pinned(self, identity: str) -> dict[str, Any] | None:
        return self.identities.get(identity)

    def petname(self, did: str) -> str | None:
        entry = self.keys.get(did)
        return entry.get("petname") if entry else None

    def revocation(self, did: str, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The revocation entry naming this key (by did or fingerprint), if any."""
        fp = did_fingerprint(did)
        for entry in self.data["revoked"]:
            if entry["id"] in (did, fp):
                return entry
        for ident in extra:
            if ident in (did, fp):
                return {"id": ident, "revoked_at": None, "reason": None, "source": "command line"}
        return None

    def resolve_key(self, ref: str, *, allow_unknown_fingerprint: bool = False) -> str:
        """A did for ``ref``: a did:key, a petname, or a (short) fingerprint of a known key.

        With ``allow_unknown_fingerprint`` a full 64-hex fingerprint of an unknown key comes back
        as itself (revoking a key never seen here).
        """
        text = ref.strip()
        if text.startswith("did:"):
            if not is_did(text):
                raise AtoError(E_USAGE, f"{text!r} is not an Ed25519 did:key")
            return text
        by_pet = [d for d, k in self.keys.items() if k.get("petname") == text]
        if by_pet:
            return by_pet[0]
        low = text.lower()
        if _HEX64.match(low):
            for d, k in self.keys.items():
                if k["fingerprint"] == low:
                    return d
            if allow_unknown_fingerprint:
                return low
        elif _SHORT.match(low):
            prefix = low.replace(":", "")
            hits = [d for d, k in self.keys.items() if k["fingerprint"].startswith(prefix)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise AtoError(E_USAGE, f"fingerprint prefix {text!r} matches {len(hits)} keys; give more digits")
        raise AtoError(E_USAGE, f"no key known as {text!r}",
                       hint="name a key by did:key, petname or fingerprint; `ato trust ls` lists them")

    # ------------------------------------------------------------ changes

    def add_key(self, did: str, added_by: str) -> dict[str, Any]:
        entry = self.keys.get(did)
        if entry is None:
            entry = {"fingerprint": did_fingerprint(did), "petname": None, "added_at": now_rfc3339(),
                     "added_by": added_by}
            self.keys[did] = entry
        return entry

    def pin(self, identity: str, did: str, via: str, previous: dict[str, Any] | None = None) -> None:
        check_identity(identity)
        self.add_key(did, via)
        self.identities[identity] = {"key_id": did, "pinned_at": now_rfc3339(), "via": via, "previous": previous}

    def set_petname(self, did: str, name: str | None) -> None:
        if name is not None:
            if not _PETNAME.match(name) or name.startswith("did:") or _HEX64.match(name.lower()) \
                    or _SHORT.match(name.lower()):
                raise AtoError(E_USAGE, f"invalid petname {name!r}: 1-64 letters, digits, spaces and ._@+-, "
                                        "not shaped like a did or a fingerprint")
            for other, entry in self.keys.items():
                if other != did and entry.get("petname") == name:
                    raise AtoError(E_USAGE, f"petname {name!r} already names {other}")
        self.add_key(did, "petname")["petname"] = name

    def revoke(self, ident: str, reason: str | None, source: str) -> bool:
        """Add a revocation (a did or a 64-hex fingerprint); False when already present."""
        if ident.startswith("did:"):
            fp = did_fingerprint(ident)
            ids = {ident, fp}
        else:
            ids = {ident}
            ids |= {d for d, k in self.keys.items() if k["fingerprint"] == ident}
        if any(e["id"] in ids for e in self.data["revoked"]):
            return False
        self.data["revoked"].append({"id": ident, "revoked_at": now_rfc3339(), "reason": reason, "source": source})
        return True

    def forget_identity(self, identity: str) -> bool:
        return self.identities.pop(identity, None) is not None

    def forget_key(self, did: str) -> list[str]:
        """Drop a key and every identity pinned to it (its revocations stay); returns those identities."""
        dropped = [i for i, rec in self.identities.items() if rec["key_id"] == did]
        for i in dropped:
            del self.identities[i]
        for rec in self.identities.values():
            if rec.get("previous") and rec["previous"]["key_id"] == did:
                rec["previous"] = None
        self.keys.pop(did, None)
        return dropped

    def record_list(self, source: str, entries: int) -> None:
        lists = [x for x in self.data["revocation_lists"] if x["source"] != source]
        lists.append({"source": source, "merged_at": now_rfc3339(), "entries": entries})
        self.data["revocation_lists"] = lists

    # ------------------------------------------------------------ rendering

    def listing(self) -> dict[str, Any]:
        """Identities, keys, revocations and lists as the ``trust`` envelope shows them."""
        keys = []
        for did in sorted(self.keys):
            k = self.keys[did]
            keys.append({"key_id": did, "fingerprint": k["fingerprint"], "short_fingerprint":
                         short_fingerprint(k["fingerprint"]), "petname": k.get("petname"),
                         "added_at": k["added_at"], "added_by": k["added_by"],
                         "revoked": self.revocation(did) is not None,
                         "identities": sorted(i for i, r in self.identities.items() if r["key_id"] == did)})
        identities = []
        for name in sorted(self.identities):
            rec = self.identities[name]
            identities.append({"identity": name, "key_id": rec["key_id"],
                               "short_fingerprint": short_fingerprint(did_fingerprint(rec["key_id"])),
                               "petname": self.petname(rec["key_id"]), "pinned_at": rec["pinned_at"],
                               "via": rec["via"], "previous": rec.get("previous")})
        return {"path": str(self.path), "identities": identities, "keys": keys,
                "revoked": list(self.data["revoked"]), "revocation_lists": list(self.data["revocation_lists"])}


def _corrupt(path: Path, problem: str) -> AtoError:
    return AtoError(E_INTEGRITY, f"trust store {path} is corrupted: {problem}",
                    hint=f"nothing was changed; repair the file or move it aside (all pins are then lost and every "
                         f"signer is a first sight again): mv {path} {path}.corrupt",
                    details={"path": str(path), "problem": problem})


def load(path: Path | None = None) -> TrustStore:
    """Read the store (a missing file is an empty store); a damaged one raises E208."""
    path = Path(path) if path is not None else paths.trust_store_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return TrustStore(empty(), path)
    except OSError as exc:
        raise _corrupt(path, f"cannot be read: {exc.strerror}") from None
    try:
        data = nesting.loads_json(raw, str(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"not JSON ({exc})") from None
    problems = validation_errors(data, SCHEMA)
    if problems:
        raise _corrupt(path, problems[0])
    for did, k in data["keys"].items():
        if not is_did(did) or did_fingerprint(did) != k["fingerprint"]:
            raise _corrupt(path, f"key {did!r} does not match its fingerprint")
    for name, rec in data["identities"].items():
        if rec["key_id"] not in data["keys"]:
            raise _corrupt(path, f"identity {name!r} is pinned to a key the store does not list")
    return TrustStore(data, path)


def save(store: TrustStore) -> None:
    """Validate and atomically replace the store file (0600 in a 0700 directory)."""
    problems = validation_errors(store.data, SCHEMA)
    if problems:  # pragma: no cover - a bug here, not bad input
        raise AtoError(E_INTERNAL, f"internal error: trust store would be invalid: {problems[0]}")
    store.path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    data = (json.dumps(store.data, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    write_bytes_atomic(store.path, data, mode=0o600)
    store._original = copy.deepcopy(store.data)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of a writer that died before its rename (cas.tempfiles: only those whose owner is gone)."""
    sweep([path.parent])


@contextlib.contextmanager
def transaction(path: Path | None = None) -> Iterator[TrustStore]:
    """Lock, read, yield the store, and save it if it changed (nothing is saved on an exception)."""
    path = Path(path) if path is not None else paths.trust_store_path()
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)  # two first writers may race here
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _remove_stale_temps(path)
        store = load(path)
        yield store
        if store.changed:
            save(store)
    finally:
        os.close(fd)
