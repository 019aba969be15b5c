"""The trust decision: may an artifact signed by this key be used as coming from this identity?

:func:`decide` is pure: it reads a store snapshot and either refuses (an AtoError) or returns a
:class:`Decision`, which may carry a change to write (a first-sight pin, or the new key after a
rotation). :func:`settle` asks for consent when one is needed and writes the change inside a
store transaction, deciding again on the fresh store so that two concurrent installs cannot pin
two different keys. The order of the rules is documented in :mod:`pipeline.trust`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import E_INTEGRITY, E_POLICY, AtoError, Problem
from pipeline.trust import store as trust_store
from pipeline.trust.store import TrustStore
from stages.capsule.keys import did_fingerprint, parse_rfc3339, short_fingerprint
from stages.capsule.signature import SignatureInfo

INTEGRITY = "ATO_ERR_INTEGRITY_FAILURE"
POLICY = "ATO_ERR_POLICY_VIOLATION"
CONSENT = "ATO_ERR_CONSENT_REQUIRED"

Consent = Callable[[str], bool]


def identity_for(*, explicit: str | None = None, scoped_id: str | None = None, name: str | None = None) -> str | None:
    """The identity an artifact is checked against (see :mod:`pipeline.trust`)."""
    if explicit:
        return trust_store.check_identity(explicit)
    if scoped_id and "/" in scoped_id:
        return trust_store.check_identity(scoped_id.split("/", 1)[0])
    if name:
        return trust_store.check_identity(f"capsule:{name}")
    return None


@dataclass
class Decision:
    """An accepted artifact: how it was accepted, and what (if anything) must be written."""

    status: str  # unsigned | local-build | expected-signer | pinned | previous-key | new-pin | rotated
    identity: str | None
    key_id: str | None
    pinned_key: str | None  # what the identity was pinned to before this decision
    message: str
    change: dict[str, Any] | None = None  # {"identity", "key_id", "via", "previous"}
    needs_consent: bool = False

    def to_json(self, store: TrustStore | None = None) -> dict[str, Any]:
        return {"status": self.status, "identity": self.identity, "key_id": self.key_id,
                "petname": store.petname(self.key_id) if store and self.key_id else None,
                "pinned_key": self.pinned_key, "message": self.message}


def _short(did: str) -> str:
    return short_fingerprint(did_fingerprint(did))


def _who(did: str, store: TrustStore) -> str:
    pet = store.petname(did)
    return f"{did} ({_short(did)}{', ' + repr(pet) if pet else ''})"


def _integrity(message: str, hint: str, **details: Any) -> AtoError:
    return AtoError(E_INTEGRITY, message, hint=hint, details=details,
                    problems=[Problem(INTEGRITY, message, {k: v for k, v in details.items() if v is not None})])


def decide(store: TrustStore, *, identity: str | None, signature: SignatureInfo | None,
           allow_unsigned: bool = False, expected_signer: str | None = None,
           extra_revoked: tuple[str, ...] = (), now: float | None = None, built_here: bool = False) -> Decision:
    """Accept (a Decision) or refuse (AtoError) an artifact whose signature already verified."""
    now = time.time() if now is None else now
    if signature is None or not signature.signed or not signature.key_id:
        if built_here:
            return Decision("local-build", identity, None, _pinned(store, identity),
                            "unsigned, built on this machine (its digest is in this ATO_HOME's build records)")
        pinned = _pinned(store, identity)
        if pinned is not None:  # a stripped signature is a downgrade, whatever --allow-unsigned says
            raise _integrity(f"the artifact is unsigned, but {identity} is pinned to {_who(pinned, store)}: an "
                             "artifact of a pinned publisher must carry that key's signature (a stripped signature "
                             "is refused even with --allow-unsigned)",
                             f"if {identity} really stopped signing, forget its pin with `ato trust forget {identity}` "
                             "and retry", identity=identity, pinned_key=pinned, signed=False,
                             reason="unsigned-but-pinned")
        if not allow_unsigned:
            msg = "the artifact is unsigned; unsigned artifacts are refused"
            raise AtoError(E_POLICY, msg, hint="sign it (ato sign --key / ato build --key), or pass --allow-unsigned "
                                               "to accept an unsigned artifact explicitly",
                           details={"identity": identity, "signed": False},
                           problems=[Problem(POLICY, msg, {"signed": False})])
        return Decision("unsigned", identity, None, _pinned(store, identity), "unsigned, allowed by --allow-unsigned")
    key = signature.key_id
    revoked = store.revocation(key, extra_revoked)
    if revoked:
        why = f" ({revoked['reason']})" if revoked.get("reason") else ""
        raise _integrity(f"signing key {_who(key, store)} is revoked{why} (source: {revoked['source']})",
                         "do not use this artifact, even if it was installed before; get a version signed by a "
                         "key that is not revoked", key_id=key, identity=identity, reason="revoked",
                         revocation=revoked)
    if expected_signer is not None:
        if key != expected_signer:
            raise _integrity(f"signed by {_who(key, store)}, not by the expected signer {expected_signer}",
                             "check where the artifact came from; --signer names the only key accepted",
                             key_id=key, expected=expected_signer, reason="signer-mismatch")
        return Decision("expected-signer", identity, key, _pinned(store, identity), "signed by the expected signer")
    if identity is None:
        raise AtoError(E_POLICY, "no identity to check the signer against",
                       hint="pass --identity (a publisher or capsule:<name>) or --signer <did>")
    rec = store.pinned(identity)
    if rec is None:
        return Decision("new-pin", identity, key, None,
                        f"first sight of {identity}: pinned {_short(key)}",
                        change={"identity": identity, "key_id": key, "via": "tofu", "previous": None},
                        needs_consent=True)
    pinned = rec["key_id"]
    if pinned == key:
        return Decision("pinned", identity, key, pinned, f"signed by the key pinned for {identity}")
    prev = rec.get("previous")
    if prev and prev["key_id"] == key:
        if now <= parse_rfc3339(prev["until"]):
            return Decision("previous-key", identity, key, pinned,
                            f"signed by {identity}'s previous key, accepted until {prev['until']}")
        raise _integrity(f"{identity} rotated from {_who(key, store)} to {_who(pinned, store)}; the overlap for the "
                         f"previous key ended at {prev['until']}",
                         "use a version signed by the current key; no temporary allowance is made",
                         key_id=key, identity=identity, pinned_key=pinned, reason="previous-key-expired")
    proof = signature.previous_key
    if proof and proof["key_id"] == pinned:
        old_revoked = store.revocation(pinned, extra_revoked)
        if old_revoked:
            raise _integrity(f"{identity}: the rotation to {_who(key, store)} is vouched for by the revoked key "
                             f"{_who(pinned, store)}", _repin_hint(identity, key),
                             key_id=key, identity=identity, pinned_key=pinned, reason="rotation-by-revoked-key")
        until = parse_rfc3339(proof["overlap_until"])
        if now > until:
            raise _integrity(f"{identity} is pinned to {_who(pinned, store)}; the artifact is signed by "
                             f"{_who(key, store)}, whose rotation overlap ended at {proof['overlap_until']}",
                             _repin_hint(identity, key), key_id=key, identity=identity, pinned_key=pinned,
                             reason="rotation-overlap-ended")
        return Decision("rotated", identity, key, pinned,
                        f"{identity} rotated keys: {_short(pinned)} -> {_short(key)} (vouched for by the pinned key); "
                        "pinned the new key",
                        change={"identity": identity, "key_id": key, "via": "rotation",
                                "previous": {"key_id": pinned, "until": proof["overlap_until"]}})
    raise _integrity(f"{identity} is pinned to {_who(pinned, store)} but the artifact is signed by another key "
                     f"{_who(key, store)}", _repin_hint(identity, key), key_id=key, identity=identity,
                     pinned_key=pinned, reason="key-mismatch")


def _repin_hint(identity: str, key: str) -> str:
    return (f"this may be an impersonation; confirm the new key with the publisher out of band, then "
            f"`ato trust pin {identity} {key} --replace` and retry (there is no temporary allowance)")


def _pinned(store: TrustStore, identity: str | None) -> str | None:
    rec = store.pinned(identity) if identity else None
    return rec["key_id"] if rec else None


def consent_required(decision: Decision) -> AtoError:
    msg = (f"first sight of {decision.identity}: signed by {decision.key_id} ({_short(decision.key_id or '')}); "
           "pinning it needs consent")
    return AtoError(E_POLICY, msg, hint=f"check the fingerprint with the publisher, then re-run with --yes, or "
                                        f"`ato trust pin {decision.identity} {decision.key_id}`",
                    details={"identity": decision.identity, "key_id": decision.key_id},
                    problems=[Problem(CONSENT, msg, {"identity": decision.identity, "key_id": decision.key_id})])


def obtain_consent(decision: Decision, *, consent: Consent | None, assume_yes: bool) -> None:
    """Ask for the consent a first-sight pin needs (a prompt on a TTY, else ``--yes``); refuse without it."""
    if not decision.needs_consent or assume_yes:
        return
    question = (f"First sight of {decision.identity}: trust key {decision.key_id} "
                f"(fingerprint {_short(decision.key_id or '')}) for it?")
    if consent is None or not consent(question):
        raise consent_required(decision)


def settle(decision: Decision, *, consent: Consent | None, assume_yes: bool, decide_again: Callable[[TrustStore],
           Decision]) -> Decision:
    """Obtain consent if needed and write the decision's change; returns the decision that was applied."""
    if decision.change is None:
        return decision
    obtain_consent(decision, consent=consent, assume_yes=assume_yes)
    with trust_store.transaction() as store:
        fresh = decide_again(store)  # refuses if another process pinned a different key meanwhile
        if fresh.change is not None:
            c = fresh.change
            store.pin(c["identity"], c["key_id"], c["via"], c["previous"])
        return fresh


def accept(signature: SignatureInfo | None, *, identity: str | None, allow_unsigned: bool = False,
           assume_yes: bool = False, consent: Consent | None = None, built_here: bool = False,
           now: float | None = None) -> Decision:
    """:func:`decide` on a signature that already verified, then :func:`settle` it (consent, pin): one call
    for callers that judge something other than a ``.capsule`` (a ``.sync`` package and its updates)."""
    def again(store: TrustStore) -> Decision:
        return decide(store, identity=identity, signature=signature, allow_unsigned=allow_unsigned, now=now,
                      built_here=built_here)

    return settle(again(trust_store.load()), consent=consent, assume_yes=assume_yes, decide_again=again)
