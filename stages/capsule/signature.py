"""``signature.json``: the document that binds an artifact's members, signed or not.

Unsigned: ``{"signed": false, "version": 1, "manifest_hash", "payload_hash", "sbom", "members"}``.
Signed: ``{"signed": true, "version": 1, "alg": "ed25519", "key_id", "signed_at", "manifest_hash",
"payload_hash", "sbom", "members", "previous_key"?, "signature"}`` (CONTRACTS.md §3). The signature is
Ed25519 over the RFC 8785 (JCS) bytes of the document **without** ``signature``: the contract's
``{version, alg, key_id, signed_at, manifest_hash, payload_hash}`` (+ ``previous_key``) plus
``signed``, ``sbom`` and ``members``. ``members`` maps every other small member (``capsule.toml``,
``capsule.lock.json``, ``sbom.spdx.json``, ``payload.v3.manifest.json``, README) to its BLAKE3, so
the signature covers every byte of member content, not only the manifest and payload digests.
``signed_at`` is ``SOURCE_DATE_EPOCH`` (or 0) as RFC 3339, and Ed25519 is deterministic, so a
signed build is byte-reproducible too. The member itself is stored in canonical (JCS) form.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import blake3

from cas.canonical import canonical_json
from cas.digest import label
from pipeline.envelope import validation_errors
from stages.capsule.errors import CapsuleError
from stages.capsule.keys import (
    SigningKey,
    b64,
    check_rotation_proof,
    did_fingerprint,
    public_from_did,
    rfc3339,
    short_fingerprint,
    unb64,
    verify_ed25519,
)

ALG = "ed25519"
SIGNATURE_VERSION = 1
SIGNATURE_SCHEMA = "trust-signature"
MEMBER = "signature.json"




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


def _check_schema(doc: Any, check: str = "members") -> None:
    problems = validation_errors(doc, SIGNATURE_SCHEMA)
    if problems:
        raise CapsuleError(check, f"signature.json is malformed: {problems[0]}", problems=problems[:10])


def parse_member(data: bytes) -> dict[str, Any]:
    """signature.json as stored in an artifact: JSON, canonical (JCS) bytes, and the schema."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CapsuleError("members", f"signature.json is not JSON: {exc}") from None
    _check_schema(doc)
    if canonical_json(doc) != data:
        raise CapsuleError("members", "signature.json is not in canonical (JCS) form")
    return doc


def check_member_digests(doc: dict[str, Any], members: dict[str, bytes], order: tuple[str, ...]) -> None:
    """Every small member's bytes match the digest signature.json lists for it (``members`` excludes
    signature.json and the payload); ``order`` says which member to name first when several differ."""
    listed = doc["members"]
    if set(listed) != set(members):
        raise CapsuleError("members", f"signature.json members {sorted(listed)} do not name the artifact's "
                                      f"members {sorted(members)}")
    for name in order:
        if name not in members:
            continue
        actual = label(blake3.blake3(members[name]).hexdigest())
        if listed[name] != actual:
            raise CapsuleError("members", f"member {name} does not match its digest in signature.json "
                                          f"(listed {listed[name]}, content hashes to {actual})", member=name)
    if doc["sbom"]["sha256"] != hashlib.sha256(members["sbom.spdx.json"]).hexdigest():
        raise CapsuleError("members", "signature.json sbom.sha256 does not match sbom.spdx.json",
                           member="sbom.spdx.json")


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
    _check_schema(doc, "signature")
    if not doc.get("signed"):
        return SignatureInfo(False)
    key_id = doc["key_id"]
    try:
        sig = unb64(doc["signature"], 64, "signature")
        public_from_did(key_id)
    except ValueError as exc:
        raise CapsuleError("signature", f"signature.json: {exc}") from None
    if not verify_ed25519(key_id, sig, preimage(doc)):
        raise CapsuleError("signature", f"signature.json: the Ed25519 signature does not verify for key_id "
                                        f"{key_id}", key_id=key_id)
    pk = doc.get("previous_key")
    if pk is not None:
        try:
            check_rotation_proof(pk, key_id)
        except ValueError as exc:
            raise CapsuleError("signature", f"signature.json: {exc}", key_id=key_id) from None
    return SignatureInfo(True, key_id, doc["signed_at"], pk)
