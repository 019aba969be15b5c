"""``signature.json``: Ed25519 signing keys, the signed document, and checking an artifact end to end.

Keys
    Ed25519 (``cryptography``). A key's public identity is ``did:key:z<base58btc(0xed 0x01 ‖ pk32)>``
    (always ``did:key:z6Mk…``); its fingerprint is the lowercase hex SHA-256 of the raw 32-byte public
    key, shown short as the first 16 hex digits in groups of four (``1a2b:3c4d:5e6f:7a8b``).
    A key file is JSON ``{"key_type": "ed25519", "public_key": <b64>, "secret_key": <b64 seed>,
    "key_id": <did>, "fingerprint", "created_at", "previous_key"?}`` (mode 0600); a raw 32-byte seed
    and a PKCS#8 PEM are read too.

signature.json (CONTRACTS.md §3)
    Unsigned: ``{"signed": false, "version": 1, "manifest_hash", "payload_hash", "sbom", "members"}``.
    Signed: ``{"signed": true, "version": 1, "alg": "ed25519", "key_id", "signed_at", "manifest_hash",
    "payload_hash", "sbom", "members", "previous_key"?, "signature"}``. The signature is Ed25519 over
    the RFC 8785 (JCS) bytes of the document **without** ``signature``: the contract's
    ``{version, alg, key_id, signed_at, manifest_hash, payload_hash}`` (+ ``previous_key``) plus
    ``signed``, ``sbom`` and ``members``. ``members`` maps every other small member
    (``capsule.toml``, ``capsule.lock.json``, ``sbom.spdx.json``, ``payload.v3.manifest.json``,
    README) to its BLAKE3, so the signature covers every byte of member content, not only the
    manifest and payload digests. ``signed_at`` is ``SOURCE_DATE_EPOCH`` (or 0) as RFC 3339, and
    Ed25519 is deterministic, so a signed build is byte-reproducible too.

previous_key (key rotation)
    ``{"key_id": <old did>, "rotated_at", "overlap_until", "signature"}``: the old key's Ed25519
    signature over the JCS of ``{"type": "ato-key-rotation/1", "previous_key": <old did>,
    "key_id": <new did>, "rotated_at", "overlap_until"}``. The old key thereby vouches for the new
    one, and it, not the new key, fixes how long that vouching lasts. Whether a verifier accepts it
    is a trust decision (``pipeline.trust.policy``); this module only checks the cryptography.

Checking an artifact (:func:`check_artifact`) covers every byte: the tar framing (every header
and padding byte must equal what the deterministic writer produces), every digest
(:func:`stages.artifact.verify_capsule`), the member digests in signature.json, and the signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import tarfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cas.atomic import atomic_writer
from cas.canonical import canonical_json
from cas.digest import label
from cas.tempfiles import temp_path
from pipeline.envelope import validation_errors
from pipeline.errors import E_AUTH_REQUIRED, E_INTEGRITY, E_USAGE, AtoError
from stages import artifact as capsule
from stages import tar_header

ALG = "ed25519"
SIGNATURE_VERSION = 1
ROTATION_TYPE = "ato-key-rotation/1"
KEY_TYPE = "ed25519"
SIGNATURE_SCHEMA = "trust-signature"
_MULTICODEC_ED25519_PUB = b"\xed\x01"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_ZERO_BLOCK = b"\0" * tarfile.BLOCKSIZE
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
    if not isinstance(did, str) or not did.startswith("did:key:z"):
        raise ValueError(f"not an Ed25519 did:key: {did!r}")
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


# ---------------------------------------------------------------- the signature.json document


def signature_document(*, manifest_hash: str, payload_hash: str, members: dict[str, bytes], epoch: int,
                       key: SigningKey | None = None, now: float | None = None) -> dict[str, Any]:
    """The signature.json document for an artifact with these members (signed when ``key`` is given).

    ``members`` maps member names to bytes: capsule.toml, capsule.lock.json, sbom.spdx.json,
    payload.v3.manifest.json and the README if any (not signature.json or payload.tar.zst).
    """
    doc: dict[str, Any] = {
        "signed": False,
        "version": SIGNATURE_VERSION,
        "manifest_hash": manifest_hash,
        "payload_hash": payload_hash,
        "sbom": {"path": "sbom.spdx.json", "sha256": hashlib.sha256(members["sbom.spdx.json"]).hexdigest()},
        "members": {name: label(blake3.blake3(data).hexdigest()) for name, data in sorted(members.items())},
    }
    if key is not None:
        doc.update({"signed": True, "alg": ALG, "key_id": key.did, "signed_at": rfc3339(epoch)})
        pk = key.attached_previous_key(_dt.datetime.now(_dt.UTC).timestamp() if now is None else now)
        if pk:
            doc["previous_key"] = pk
        doc["signature"] = b64(key.sign(preimage(doc)))
    _check_schema(doc)
    return doc


def preimage(doc: dict[str, Any]) -> bytes:
    """The exact bytes the Ed25519 signature covers: JCS of the document without ``signature``."""
    return canonical_json({k: v for k, v in doc.items() if k != "signature"})


def signature_bytes(doc: dict[str, Any]) -> bytes:
    return canonical_json(doc)


def _check_schema(doc: Any) -> None:
    problems = validation_errors(doc, SIGNATURE_SCHEMA)
    if problems:
        raise AtoError(E_INTEGRITY, f"signature.json is malformed: {problems[0]}", details={"problems": problems[:10]})


@dataclass
class SignatureInfo:
    """What a verified signature says (None fields for an unsigned artifact)."""

    signed: bool
    key_id: str | None = None
    signed_at: str | None = None
    previous_key: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> str | None:
        return did_fingerprint(self.key_id) if self.key_id else None

    def to_json(self) -> dict[str, Any] | None:
        if not self.signed or not self.key_id:
            return None
        fp = did_fingerprint(self.key_id)
        out: dict[str, Any] = {"key_id": self.key_id, "fingerprint": fp, "short_fingerprint": short_fingerprint(fp),
                               "signed_at": self.signed_at, "previous_key": None}
        if self.previous_key:
            pfp = did_fingerprint(self.previous_key["key_id"])
            out["previous_key"] = {"key_id": self.previous_key["key_id"], "fingerprint": pfp,
                                   "short_fingerprint": short_fingerprint(pfp),
                                   "rotated_at": self.previous_key["rotated_at"],
                                   "overlap_until": self.previous_key["overlap_until"]}
        return out


def check_signature(doc: dict[str, Any]) -> SignatureInfo:
    """Verify signature.json's own signature (and rotation proof); E208 when either does not hold."""
    _check_schema(doc)
    if not doc.get("signed"):
        return SignatureInfo(False)
    key_id = doc["key_id"]
    try:
        sig = unb64(doc["signature"], 64, "signature")
        public_from_did(key_id)
    except ValueError as exc:
        raise AtoError(E_INTEGRITY, f"signature.json: {exc}") from None
    if not verify_ed25519(key_id, sig, preimage(doc)):
        raise AtoError(E_INTEGRITY, f"signature.json: the Ed25519 signature does not verify for key_id {key_id}",
                       details={"key_id": key_id})
    pk = doc.get("previous_key")
    if pk is not None:
        try:
            check_rotation_proof(pk, key_id)
        except ValueError as exc:
            raise AtoError(E_INTEGRITY, f"signature.json: {exc}", details={"key_id": key_id}) from None
    return SignatureInfo(True, key_id, doc["signed_at"], pk)


# ---------------------------------------------------------------- checking a whole artifact


@dataclass
class Check:
    name: str  # archive | digests | members | signature
    status: str  # ok | failed | skipped
    message: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message}


@dataclass
class ArtifactCheck:
    """The result of :func:`check_artifact`: every check, the digests and the signature."""

    path: Path
    checks: list[Check] = field(default_factory=list)
    artifact_blake3: str | None = None
    size: int | None = None
    name: str | None = None
    version: str | None = None
    digests: dict[str, Any] | None = None
    signature: SignatureInfo | None = None
    layout: _Layout | None = None

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.checks)

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == "failed"), None)

    def error(self) -> AtoError | None:
        bad = self.first_failure()
        if bad is None:
            return None
        failures = [c.to_json() for c in self.checks if c.status == "failed"]
        return AtoError(E_INTEGRITY, f"{self.path.name}: {bad.name} check failed: {bad.message}",
                        details={"artifact": str(self.path), "check": bad.name, "failures": failures},
                        hint="do not use this artifact; rebuild it or download it again")


@dataclass
class _Layout:
    members: list[tuple[str, int, int]]  # (name, data offset, size)
    epoch: int


def _fail(message: str) -> AtoError:
    return AtoError(E_INTEGRITY, message)


def _read_layout(path: Path) -> _Layout:
    """Walk the outer tar and require exactly the bytes the deterministic writer produces."""
    expected = list(capsule.MEMBER_ORDER)
    members: list[tuple[str, int, int]] = []
    epoch: int | None = None
    with open(path, "rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        offset = 0
        while True:
            fh.seek(offset)
            block = fh.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise _fail(f"archive is truncated at offset {offset} (size {total})")
            if block == _ZERO_BLOCK:
                break
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                if len(members) >= len(expected):
                    raise _fail(f"block at offset {offset} after the last member is neither a README header nor "
                                f"the zero end-of-archive marker ({exc})") from None
                raise _fail(f"tar header #{len(members) + 1} (expected {expected[len(members)]}) at offset "
                            f"{offset} is corrupt: {exc}") from None
            if epoch is None:
                epoch = int(info.mtime)
            if block != tar_header.header(info.name, size=info.size, mtime=epoch):
                raise _fail(f"tar header of {info.name!r} at offset {offset} differs from the canonical header "
                            "(mode, owner, mtime or type was changed)")
            data_at = offset + tarfile.BLOCKSIZE
            end = data_at + info.size
            pad = (-info.size) % tarfile.BLOCKSIZE
            if end + pad > total:
                raise _fail(f"member {info.name!r} runs past the end of the file (truncated)")
            fh.seek(end)
            if pad and fh.read(pad) != b"\0" * pad:
                raise _fail(f"padding after member {info.name!r} (offset {end}) is not zero")
            members.append((info.name, data_at, info.size))
            offset = end + pad
        names = [m[0] for m in members]
        if names[:len(expected)] != expected or len(names) > len(expected) + 1 or \
                any(n not in capsule.README_NAMES for n in names[len(expected):]):
            raise _fail(f"members are not the capsule layout: {names}")
        want_total = offset + 2 * tarfile.BLOCKSIZE
        want_total += (-want_total) % capsule.RECORD
        if total != want_total:
            raise _fail(f"file is {total} bytes but its members give {want_total} "
                        f"({'data appended after the archive' if total > want_total else 'truncated'})")
        fh.seek(offset)
        if fh.read(total - offset).count(0) != total - offset:
            raise _fail(f"end-of-archive blocks/padding after offset {offset} are not zero")
    return _Layout(members, epoch or 0)


def _member_bytes(path: Path, layout: _Layout, skip: tuple[str, ...] = ("payload.tar.zst",)) -> dict[str, bytes]:
    out = {}
    with open(path, "rb") as fh:
        for name, at, size in layout.members:
            if name in skip:
                continue
            fh.seek(at)
            out[name] = fh.read(size)
    return out


def _parse_signature_member(data: bytes) -> dict[str, Any]:
    """signature.json as a document: JSON, canonical (JCS) bytes, and the schema."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"signature.json is not JSON: {exc}") from None
    _check_schema(doc)
    if canonical_json(doc) != data:
        raise _fail("signature.json is not in canonical (JCS) form")
    return doc


def _check_member_digests(doc: dict[str, Any], raw: dict[str, bytes]) -> None:
    """Every small member's bytes match the digest signature.json lists for it."""
    listed = doc["members"]
    present = {n: d for n, d in raw.items() if n != "signature.json"}
    if set(listed) != set(present):
        raise _fail(f"signature.json members {sorted(listed)} do not name the artifact's members {sorted(present)}")
    for name in capsule.MEMBER_ORDER + tuple(sorted(set(present) - set(capsule.MEMBER_ORDER))):
        if name not in present:
            continue
        actual = label(blake3.blake3(present[name]).hexdigest())
        if listed[name] != actual:
            raise _fail(f"member {name} does not match its digest in signature.json "
                        f"(listed {listed[name]}, content hashes to {actual})")
    if doc["sbom"]["sha256"] != hashlib.sha256(present["sbom.spdx.json"]).hexdigest():
        raise _fail("signature.json sbom.sha256 does not match sbom.spdx.json")


def check_artifact(path: Path) -> ArtifactCheck:
    """Every integrity check of an artifact, each recorded; never raises for a bad artifact.

    Order: archive (tar framing), members (signature.json and each member's digest, so a
    damaged member is named), digests (manifest_hash, chunk list, Merkle root, chunks,
    payload_hash via :func:`stages.artifact.verify_capsule`), signature.
    """
    path = Path(path)
    result = ArtifactCheck(path)
    checks = result.checks
    try:
        with open(path, "rb") as fh:
            hasher = blake3.blake3()
            size = 0
            while chunk := fh.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        result.artifact_blake3, result.size = label(hasher.hexdigest()), size
        layout = result.layout = _read_layout(path)
        checks.append(Check("archive", "ok", f"{len(layout.members)} members in canonical tar framing"))
    except (OSError, AtoError) as exc:
        message = exc.message if isinstance(exc, AtoError) else f"cannot read {path}: {exc.strerror}"
        checks.append(Check("archive", "failed", message))
        for name in ("members", "digests", "signature"):
            checks.append(Check(name, "skipped", "the archive is unreadable or its framing is broken"))
        return result
    raw = _member_bytes(path, layout)
    _manifest_identity(result, raw.get("capsule.toml", b""))
    doc = None
    try:
        doc = _parse_signature_member(raw["signature.json"])
        _check_member_digests(doc, raw)
        checks.append(Check("members", "ok", f"{len(doc['members'])} member digests in signature.json match"))
    except AtoError as exc:
        checks.append(Check("members", "failed", exc.message))
    try:
        result.digests = capsule.verify_capsule(path)
        checks.append(Check("digests", "ok", f"manifest_hash, chunk list, Merkle root, "
                                             f"{result.digests['chunks']} chunks and payload_hash recomputed"))
    except AtoError as exc:
        checks.append(Check("digests", "failed", exc.message))
    if doc is None:
        checks.append(Check("signature", "skipped", "signature.json is unusable"))
        return result
    try:
        info = check_signature(doc)
        result.signature = info
        checks.append(Check("signature", "ok", f"Ed25519 signature by {info.key_id} verifies" if info.signed
                            else "unsigned (signature.json carries no signature)"))
    except AtoError as exc:
        checks.append(Check("signature", "failed", exc.message))
    return result


def _manifest_identity(result: ArtifactCheck, toml_bytes: bytes) -> None:
    with contextlib.suppress(ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        doc = capsule.parse_manifest_bytes(toml_bytes)
        if isinstance(doc.get("name"), str):
            result.name = doc["name"]
        if isinstance(doc.get("version"), str):
            result.version = doc["version"]


# ---------------------------------------------------------------- signing an existing artifact


@dataclass
class Signed:
    """What :func:`sign_artifact` wrote."""

    path: Path
    artifact_blake3: str
    size: int
    signature: SignatureInfo


def sign_artifact(path: Path, key: SigningKey, *, out: Path | None = None, epoch: int | None = None,
                  now: float | None = None) -> Signed:
    """Replace signature.json of a verified artifact with a signed one; every other byte stays.

    ``epoch`` (``signed_at``) defaults to the artifact's own header mtime, i.e. the epoch it was
    built with, so ``ato build`` + ``ato sign`` gives the same bytes as ``ato build --key``.
    The new file is written temp + fsync + rename; on any failure the target is untouched.
    """
    path = Path(path)
    before = check_artifact(path)
    err = before.error()
    if err is not None or before.layout is None:
        raise AtoError(E_INTEGRITY, f"refusing to sign a broken artifact: {err.message if err else path}",
                       details=err.details if err else {}, hint="rebuild it first")
    layout = before.layout
    raw = _member_bytes(path, layout)
    old = json.loads(raw["signature.json"])
    small = {n: b for n, b in raw.items() if n != "signature.json"}
    doc = signature_document(manifest_hash=old["manifest_hash"], payload_hash=old["payload_hash"], members=small,
                             epoch=layout.epoch if epoch is None else epoch, key=key, now=now)
    target = Path(out) if out is not None else path
    payload_at, payload_size = next((at, size) for n, at, size in layout.members if n == "payload.tar.zst")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path(target.with_name(target.name + ".payload"))
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
            src.seek(payload_at)
            left = payload_size
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    raise _fail(f"{path} shrank while signing")
                dst.write(chunk)
                left -= len(chunk)
        members = []
        for name, _at, _size in layout.members:
            if name == "payload.tar.zst":
                members.append(capsule.Member(name, path=tmp_path))
            elif name == "signature.json":
                members.append(capsule.Member(name, signature_bytes(doc)))
            else:
                members.append(capsule.Member(name, raw[name]))
        digest, size = capsule.write_capsule(target, members, layout.epoch)
    finally:
        tmp_path.unlink(missing_ok=True)
    return Signed(target, label(digest), size, SignatureInfo(True, key.did, doc["signed_at"], doc.get("previous_key")))
