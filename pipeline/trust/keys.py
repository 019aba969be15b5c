"""Signing keys on disk: generation, rotation, and how a key is described to people.

The codec (did:key, fingerprints, the key file format, signing) lives in :mod:`stages.capsule.keys`
because the format signs and checks with it; this module owns the key's life cycle.

Rotation: ``rotate`` makes a new key and has the old key sign a statement vouching for it with
an overlap window (``previous_key``, see :mod:`stages.capsule.keys`). The new key file carries that
proof, so every signature made with it during the window carries it too; verifiers that pinned
the old key then accept the new one and pin it (:mod:`pipeline.trust.policy`). After the window
the proof is dropped from new signatures, and anyone who did not see it must re-verify the key.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import E_USAGE, AtoError
from stages.capsule.keys import (
    SigningKey,
    generate_key,
    load_signing_key,
    make_rotation_proof,
    rfc3339,
    short_fingerprint,
    write_key_file,
)

DEFAULT_KEY_NAME = "signing-key.json"
DEFAULT_OVERLAP = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
MAX_OVERLAP = 365 * 86400


def default_key_path() -> Path:
    return paths.keys_dir() / DEFAULT_KEY_NAME


def parse_duration(text: str, *, maximum: int = MAX_OVERLAP, what: str = "overlap",
                   why: str = "a rotation overlap should be short") -> int:
    """Seconds in ``30m``, ``48h``, ``7d``, ``2w`` or a bare number of seconds (at most ``maximum``)."""
    m = _DURATION.match(text or "")
    if not m:
        raise AtoError(E_USAGE, f"invalid duration {text!r}: use e.g. 3600, 30m, 48h, 7d or 2w")
    seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > maximum:
        raise AtoError(E_USAGE, f"{what} {text!r} is too long (at most {maximum // 86400} days); {why}")
    return seconds


def describe(key: SigningKey, path: Path | None = None) -> dict[str, Any]:
    """The public facts of a key, as the key envelopes print them."""
    pk = key.previous_key
    return {
        "key_id": key.did,
        "fingerprint": key.fingerprint,
        "short_fingerprint": short_fingerprint(key.fingerprint),
        "path": str(Path(path or key.path).absolute()) if (path or key.path) else None,
        "created_at": key.created_at,
        "previous_key": None if not pk else {"key_id": pk["key_id"], "rotated_at": pk["rotated_at"],
                                             "overlap_until": pk["overlap_until"]},
    }


def generate(out: Path | None = None, *, force: bool = False) -> SigningKey:
    """A new Ed25519 key written to ``out`` (default ``$ATO_HOME/keys/signing-key.json``), mode 0600."""
    path = Path(out) if out is not None else default_key_path()
    key = generate_key(created_at=rfc3339(time.time()))
    write_key_file(path, key, force=force)
    return key


@dataclass
class Rotation:
    new: SigningKey
    old: SigningKey
    retired_path: Path | None  # where the old key file was moved, when the new one took its place


def rotate(old_path: Path | None = None, out: Path | None = None, *, overlap: int, force: bool = False,
           now: float | None = None) -> Rotation:
    """Make a new key vouched for by the old one for ``overlap`` seconds.

    Without ``out`` the new key takes the old key's file and the old one is kept beside it as
    ``<name>.retired-<fingerprint16>.json`` (0600).
    """
    old_path = Path(old_path) if old_path is not None else default_key_path()
    old = load_signing_key(old_path)
    at = time.time() if now is None else now
    new = generate_key(created_at=rfc3339(at))
    new.previous_key = make_rotation_proof(old, new.did, at, at + overlap)
    target = Path(out) if out is not None else old_path
    retired = None
    if target.resolve() == old_path.resolve():
        retired = old_path.with_name(f"{old_path.stem}.retired-{old.fingerprint[:16]}{old_path.suffix or '.json'}")
        if retired.exists():
            raise AtoError(E_USAGE, f"{retired} already exists; refusing to overwrite a retired key")
        os.link(old_path, retired)
        try:
            write_key_file(target, new, force=True)
        except BaseException:
            retired.unlink(missing_ok=True)
            raise
    else:
        write_key_file(target, new, force=force)
    return Rotation(new, old, retired)
