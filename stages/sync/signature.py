"""``[signature]`` of a ``.sync`` manifest: Ed25519 over every member of the package.

sync-rs's shape (``algo``, ``manifest_hash``, ``payload_hash``, ``timestamp``, ``value``; the key is
``meta.created_by``, a ``did:key``), with two additions so that no byte of the package goes
unsigned and a signature cannot be replayed from another context:

* ``members``: the BLAKE3 of every other member (``context.json``, ``sync.wasm``, ``sync.proof``);
  a member that is present but not listed, or listed but absent, fails verification;
* the signed statement carries ``type = "ato-sync-signature/1"``, so no other document ato signs
  (a ``.capsule``'s signature.json, a key rotation proof) can pass for it.

``manifest_hash`` is ``blake3:`` of the RFC 8785 (JCS) bytes of the manifest without
``[signature]``; ``payload_hash`` is ``blake3:`` of the payload. The signature is Ed25519 over the
JCS bytes of ``{type, manifest_hash, payload_hash, members, timestamp, signer}``. An optional
``previous_key`` table is the project's key-rotation proof (the old key vouching for the new one).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cas.canonical import canonical_json
from cas.digest import blake3_bytes, is_label, label
from pipeline.errors import E_INTEGRITY, AtoError
from stages.capsule.keys import SigningKey, check_rotation_proof, public_from_did, unb64, verify_ed25519
from stages.capsule.signature import SignatureInfo
from stages.sync.manifest import SyncManifest, format_time

ALGO = "Ed25519"
STATEMENT_TYPE = "ato-sync-signature/1"


@dataclass(frozen=True)
class Digests:
    """What a signature covers: the manifest (without ``[signature]``), the payload, the other members."""

    manifest_hash: str
    payload_hash: str
    members: dict[str, str]


def manifest_hash(unsigned_doc: dict[str, Any]) -> str:
    return label(blake3_bytes(canonical_json(unsigned_doc)))


def statement(digests: Digests, timestamp: str, signer: str) -> bytes:
    """The exact bytes the Ed25519 signature covers."""
    return canonical_json({"type": STATEMENT_TYPE, "manifest_hash": digests.manifest_hash,
                           "payload_hash": digests.payload_hash, "members": dict(sorted(digests.members.items())),
                           "timestamp": timestamp, "signer": signer})


def signature_table(digests: Digests, key: SigningKey, epoch: float, now: float) -> dict[str, Any]:
    """The ``[signature]`` table of a package signed by ``key`` (whose did must be ``meta.created_by``)."""
    timestamp = format_time(epoch)
    table: dict[str, Any] = {"algo": ALGO, "manifest_hash": digests.manifest_hash,
                             "payload_hash": digests.payload_hash, "members": dict(sorted(digests.members.items())),
                             "timestamp": timestamp,
                             "value": base64.b64encode(key.sign(statement(digests, timestamp, key.did))).decode()}
    proof = key.attached_previous_key(now)
    if proof:
        table["previous_key"] = proof
    return table


def _fail(message: str) -> AtoError:
    return AtoError(E_INTEGRITY, message, hint="do not use this package; get it again from its publisher")


def check(manifest: SyncManifest, digests: Digests) -> SignatureInfo:
    """Compare the signed digests with the package's and verify the signature; E208 when anything differs.

    An unsigned package (no ``[signature]``) is reported as such: whether that is acceptable is a
    trust decision (``pipeline.trust``), not the format's.
    """
    sig = manifest.signature
    if sig is None:
        return SignatureInfo(False)
    for key in ("algo", "manifest_hash", "payload_hash", "timestamp", "value"):
        if not isinstance(sig.get(key), str):
            raise _fail(f"manifest.toml: signature.{key} is missing or not a string")
    if sig["algo"].lower() != ALGO.lower():
        raise _fail(f"manifest.toml: signature.algo {sig['algo']!r} is not supported (only {ALGO})")
    listed = sig.get("members", {})
    if not isinstance(listed, dict) or not all(isinstance(v, str) and is_label(v) for v in listed.values()):
        raise _fail("manifest.toml: signature.members must map member names to blake3 digests")
    if sig["manifest_hash"] != digests.manifest_hash:
        raise _fail(f"manifest.toml does not match its signed digest (signed {sig['manifest_hash']}, "
                    f"content hashes to {digests.manifest_hash})")
    if sig["payload_hash"] != digests.payload_hash:
        raise _fail(f"payload does not match its signed digest (signed {sig['payload_hash']}, "
                    f"content hashes to {digests.payload_hash})")
    if set(listed) != set(digests.members):
        raise _fail(f"signature.members {sorted(listed)} do not name the package's other members "
                    f"{sorted(digests.members)}")
    for name, digest in sorted(digests.members.items()):
        if listed[name] != digest:
            raise _fail(f"member {name} does not match its signed digest (signed {listed[name]}, content "
                        f"hashes to {digest})")
    signer = manifest.created_by
    try:
        public_from_did(signer)
        value = unb64(sig["value"], 64, "signature.value")
    except ValueError as exc:
        raise _fail(f"manifest.toml: {exc} (meta.created_by must be the signer's did:key)") from None
    if not verify_ed25519(signer, value, statement(digests, sig["timestamp"], signer)):
        raise _fail(f"the Ed25519 signature does not verify for {signer}")
    proof = sig.get("previous_key")
    if proof is not None:
        try:
            check_rotation_proof(proof, signer)
        except ValueError as exc:
            raise _fail(f"manifest.toml: signature.{exc}") from None
    return SignatureInfo(True, signer, sig["timestamp"], proof)
