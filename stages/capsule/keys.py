"""Ed25519 keys: their ``did:key`` identity, fingerprints, key files and rotation proofs.

Identity
    A key's public identity is ``did:key:z<base58btc(0xed 0x01 ‖ pk32)>`` (always ``did:key:z6Mk…``);
    its fingerprint is the lowercase hex SHA-256 of the raw 32-byte public key, shown short as the
    first 16 hex digits in groups of four (``1a2b:3c4d:5e6f:7a8b``).

Key files
    JSON ``{"key_type": "ed25519", "public_key": <b64>, "secret_key": <b64 seed>, "key_id": <did>,
    "fingerprint", "created_at", "previous_key"?}`` (mode 0600); a raw 32-byte seed and a PKCS#8 PEM
    are read too.

previous_key (key rotation)
    ``{"key_id": <old did>, "rotated_at", "overlap_until", "signature"}``: the old key's Ed25519
    signature over the JCS of ``{"type": "ato-key-rotation/1", "previous_key": <old did>,
    "key_id": <new did>, "rotated_at", "overlap_until"}``. The old key thereby vouches for the new
    one, and it, not the new key, fixes how long that vouching lasts. Whether a verifier accepts it
    is a trust decision (``pipeline.trust.policy``); this module only checks the cryptography.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cas.atomic import atomic_writer
from cas.canonical import canonical_json
from pipeline.errors import E_AUTH_REQUIRED, E_USAGE, AtoError

ROTATION_TYPE = "ato-key-rotation/1"
KEY_TYPE = "ed25519"
_MULTICODEC_ED25519_PUB = b"\xed\x01"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
MAX_DID = 64  # an Ed25519 did:key is 56 characters; longer input is refused before base58 (quadratic) decoding


# ---------------------------------------------------------------- identities of keys


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def did_key(public: bytes) -> str:
    """``did:key:z…`` of a raw 32-byte Ed25519 public key."""
    if len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return "did:key:z" + b58encode(_MULTICODEC_ED25519_PUB + public)


def public_from_did(did: str) -> bytes:
    """The raw public key of an Ed25519 ``did:key``; ValueError for anything else."""
    if not isinstance(did, str) or not did.startswith("did:key:z") or len(did) > MAX_DID:
        raise ValueError(f"not an Ed25519 did:key: {did[:80] if isinstance(did, str) else did!r}")
    raw = b58decode(did[len("did:key:z"):])
    if len(raw) != 34 or raw[:2] != _MULTICODEC_ED25519_PUB:
        raise ValueError(f"not an Ed25519 did:key (multicodec 0xed01 + 32 bytes): {did!r}")
    return raw[2:]


def is_did(value: str) -> bool:
    try:
        public_from_did(value)
        return True
    except ValueError:
        return False


def fingerprint(public: bytes) -> str:
    """Full fingerprint: lowercase hex SHA-256 of the raw public key."""
    return hashlib.sha256(public).hexdigest()


def short_fingerprint(fp: str) -> str:
    """The first 16 hex digits of a fingerprint, in groups of four."""
    return ":".join(fp[i:i + 4] for i in range(0, 16, 4))


def did_fingerprint(did: str) -> str:
    return fingerprint(public_from_did(did))


def rfc3339(epoch: int | float) -> str:
    return _dt.datetime.fromtimestamp(int(epoch), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (``Z`` or an offset)."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"not an RFC 3339 time: {text!r:.80}")
    value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    return value.timestamp()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def verify_ed25519(did: str, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_from_did(did)).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


# ---------------------------------------------------------------- signing keys


@dataclass
class SigningKey:
    """A loaded Ed25519 secret key (and the rotation proof its signatures carry, if any)."""

    private: Ed25519PrivateKey
    path: Path | None = None
    previous_key: dict[str, Any] | None = None  # the rotation proof, as stored in the key file
    created_at: str | None = None

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def did(self) -> str:
        return did_key(self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def seed(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def attached_previous_key(self, now: float) -> dict[str, Any] | None:
        """The rotation proof while its overlap window is open, else None (it would be refused anyway)."""
        pk = self.previous_key
        if not pk:
            return None
        try:
            if parse_rfc3339(pk["overlap_until"]) < now:
                return None
        except (KeyError, ValueError):
            return None
        return dict(pk)

    def to_file_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key_type": KEY_TYPE, "public_key": b64(self.public), "secret_key": b64(self.seed()),
                               "key_id": self.did, "fingerprint": self.fingerprint}
        if self.created_at:
            doc["created_at"] = self.created_at
        if self.previous_key:
            doc["previous_key"] = self.previous_key
        return doc


def generate_key(created_at: str | None = None) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate(), created_at=created_at)


def load_signing_key(path: Path) -> SigningKey:
    """Read a key file: ato JSON, a raw 32-byte seed, or a PKCS#8 PEM. Fails with E201/E100."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AtoError(E_AUTH_REQUIRED, f"signing key not found: {path}",
                       hint="create one with `ato key gen --out <file>`", details={"path": str(path)}) from None
    except OSError as exc:
        raise AtoError(E_AUTH_REQUIRED, f"cannot read signing key {path}: {exc.strerror}",
                       details={"path": str(path)}) from None
    try:
        return _parse_key(data, path)
    except ValueError as exc:
        raise AtoError(E_USAGE, f"{path}: not a usable Ed25519 signing key: {exc}", details={"path": str(path)},
                       hint="expected an `ato key gen` JSON key file, a raw 32-byte seed or a PKCS#8 PEM") from None


def _parse_key(data: bytes, path: Path) -> SigningKey:
    stripped = data.strip()
    if stripped.startswith(b"{"):
        try:
            doc = json.loads(stripped)
        except ValueError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("key_type") != KEY_TYPE:
            raise ValueError('key_type must be "ed25519"')
        key = SigningKey(Ed25519PrivateKey.from_private_bytes(unb64(doc.get("secret_key"), 32, "secret_key")), path,
                         created_at=doc.get("created_at") if isinstance(doc.get("created_at"), str) else None)
        if "public_key" in doc and unb64(doc["public_key"], 32, "public_key") != key.public:
            raise ValueError("public_key does not belong to secret_key")
        if "key_id" in doc and doc["key_id"] != key.did:
            raise ValueError("key_id does not belong to secret_key")
        pk = doc.get("previous_key")
        if pk is not None:
            check_rotation_proof(pk, key.did)
            key.previous_key = pk
        return key
    if stripped.startswith(b"-----BEGIN"):
        loaded = serialization.load_pem_private_key(stripped, password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError("the PEM key is not Ed25519")
        return SigningKey(loaded, path)
    if len(data) == 32:
        return SigningKey(Ed25519PrivateKey.from_private_bytes(data), path)
    raise ValueError(f"unrecognized key format ({len(data)} bytes)")


def write_key_file(path: Path, key: SigningKey, *, force: bool = False) -> None:
    """Write a secret key file, mode 0600, atomically; refuse to replace one unless ``force``."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise AtoError(E_USAGE, f"{path} already exists; refusing to overwrite a key",
                       hint="pass --force to replace it (the old key is lost)", details={"path": str(path)})
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    data = (json.dumps(key.to_file_json(), indent=2) + "\n").encode()
    with atomic_writer(path, mode=0o600) as fh:
        fh.write(data)
    key.path = path


# ---------------------------------------------------------------- rotation proofs


def rotation_statement(old_did: str, new_did: str, rotated_at: str, overlap_until: str) -> bytes:
    return canonical_json({"type": ROTATION_TYPE, "previous_key": old_did, "key_id": new_did,
                           "rotated_at": rotated_at, "overlap_until": overlap_until})


def make_rotation_proof(old: SigningKey, new_did: str, rotated_at: float, overlap_until: float) -> dict[str, Any]:
    at, until = rfc3339(rotated_at), rfc3339(overlap_until)
    return {"key_id": old.did, "rotated_at": at, "overlap_until": until,
            "signature": b64(old.sign(rotation_statement(old.did, new_did, at, until)))}


def check_rotation_proof(pk: Any, new_did: str) -> None:
    """ValueError unless ``pk`` is the old key's valid signature vouching for ``new_did``."""
    if not isinstance(pk, dict):
        raise ValueError("previous_key must be an object")
    try:
        old, at, until = pk["key_id"], pk["rotated_at"], pk["overlap_until"]
        sig = unb64(pk["signature"], 64, "previous_key.signature")
        public_from_did(old)
        if parse_rfc3339(until) < parse_rfc3339(at):
            raise ValueError("previous_key.overlap_until is before rotated_at")
    except KeyError as exc:
        raise ValueError(f"previous_key lacks {exc.args[0]}") from None
    if old == new_did:
        raise ValueError("previous_key names the signing key itself")
    if not verify_ed25519(old, sig, rotation_statement(old, new_did, at, until)):
        raise ValueError(f"previous_key signature by {old} does not verify for {new_did}")
