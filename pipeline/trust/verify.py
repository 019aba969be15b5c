"""Verify an artifact for use: every digest, the signature, then the trust decision.

One entry point for ``ato verify``, ``ato install`` and ``ato run``, so they cannot drift apart:
:func:`verify_artifact` returns the ``verify`` report (validated against schemas/verify.json)
and the error that refuses the artifact, if any; :func:`require_verified` raises that error.
Nothing is pinned for an artifact whose integrity checks failed, and nothing is extracted or
executed by callers before this returns without an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.envelope import validate
from pipeline.errors import AtoError, Problem
from pipeline.trust import policy
from pipeline.trust import store as trust_store
from pipeline.trust.policy import Decision
from stages.provenance import built_here
from stages.sign import ArtifactCheck, Check, check_artifact

SCHEMA = "verify"
SCHEMA_VERSION = "1"


@dataclass
class VerifyOptions:
    identity: str | None = None  # overrides the identity derived from the scoped id or the manifest name
    expected_signer: str | None = None  # accept only this did (no pinning)
    allow_unsigned: bool = False
    assume_yes: bool = False  # consent to a first-sight pin without a prompt
    extra_revoked: tuple[str, ...] = ()  # ids revoked for this check only (e.g. from --revocations)


@dataclass
class Outcome:
    report: dict[str, Any]
    check: ArtifactCheck
    decision: Decision | None = None
    error: AtoError | None = None
    notes: list[str] = field(default_factory=list)  # human notes (a new pin, a rotation) for stderr

    def summary(self) -> dict[str, Any]:
        """``signed`` / ``signer`` / ``trust`` for other envelopes (install, run)."""
        return {"signed": self.report["signed"], "signer": self.report["signer"], "trust": self.report["trust"]}


def scoped_id_from_store_path(path: Path) -> str | None:
    """``publisher/slug`` of an artifact under ``$ATO_HOME/store/<publisher>/<slug>/<version>/``."""
    try:
        rel = Path(path).resolve().relative_to(paths.store_dir().resolve())
    except (ValueError, OSError):
        return None
    parts = rel.parts
    return f"{parts[0]}/{parts[1]}" if len(parts) == 4 else None


def verify_artifact(path: Path, *, options: VerifyOptions | None = None, target: str | None = None,
                    scoped_id: str | None = None, consent: policy.Consent | None = None,
                    now: float | None = None) -> Outcome:
    """Check ``path`` completely and decide whether to trust it; pins on first sight (with consent)."""
    options = options or VerifyOptions()
    now = time.time() if now is None else now
    path = Path(path)
    scoped_id = scoped_id or scoped_id_from_store_path(path)
    check = check_artifact(path)
    outcome = Outcome({}, check)
    identity = None
    try:
        identity = policy.identity_for(explicit=options.identity, scoped_id=scoped_id, name=check.name)
    except AtoError as exc:
        outcome.error = exc
    trust: dict[str, Any] = {"status": "not-checked", "identity": identity, "key_id": None, "petname": None,
                             "pinned_key": None, "message": "integrity checks failed; trust was not evaluated"}
    integrity_error = check.error()
    if integrity_error is not None:
        outcome.error = _with_problem(integrity_error)
    elif outcome.error is None:
        trust, outcome.decision = _decide(check, identity, options, consent, now, outcome)
    checks = [c.to_json() for c in check.checks]
    checks.append(Check("trust", _trust_status(trust["status"]), trust["message"]).to_json())
    signed = bool(check.signature and check.signature.signed)
    report = {
        "schema_version": SCHEMA_VERSION,
        "ok": outcome.error is None,
        "target": target or str(path),
        "artifact": str(path),
        "scoped_id": scoped_id,
        "name": check.name,
        "version": check.version,
        "artifact_blake3": check.artifact_blake3,
        "size": check.size,
        "digests": check.digests,
        "signed": signed,
        "signer": check.signature.to_json() if signed and check.signature else None,
        "trust": trust,
        "checks": checks,
        "error": None if outcome.error is None else {"code": outcome.error.code, "message": outcome.error.message},
    }
    outcome.report = validate(report, SCHEMA)
    return outcome


def _trust_status(status: str) -> str:
    return {"not-checked": "skipped", "rejected": "failed"}.get(status, "ok")


def _decide(check: ArtifactCheck, identity: str | None, options: VerifyOptions, consent: policy.Consent | None,
            now: float, outcome: Outcome) -> tuple[dict[str, Any], Decision | None]:
    try:
        snapshot = trust_store.load()

        def decide(store: trust_store.TrustStore) -> Decision:
            return policy.decide(store, identity=identity, signature=check.signature,
                                 allow_unsigned=options.allow_unsigned, expected_signer=options.expected_signer,
                                 extra_revoked=options.extra_revoked, now=now,
                                 built_here=built_here(check.artifact_blake3))

        decision = policy.settle(decide(snapshot), consent=consent, assume_yes=options.assume_yes,
                                 decide_again=decide)
    except AtoError as exc:
        outcome.error = exc
        key = check.signature.key_id if check.signature else None
        return ({"status": "rejected", "identity": identity, "key_id": key, "petname": None,
                 "pinned_key": exc.details.get("pinned_key"), "message": exc.message}, None)
    if decision.status in ("new-pin", "rotated"):
        outcome.notes.append(decision.message)
    store = trust_store.load() if decision.change else snapshot
    return decision.to_json(store), decision


def _with_problem(err: AtoError) -> AtoError:
    if not err.problems:
        err.problems.append(Problem(policy.INTEGRITY, err.message, {"check": err.details.get("check")}))
    return err


def require_verified(path: Path, **kwargs: Any) -> Outcome:
    """:func:`verify_artifact`, raising the refusal (E208 / E301) instead of returning it."""
    outcome = verify_artifact(path, **kwargs)
    if outcome.error is not None:
        raise outcome.error
    return outcome


def installer_verifier(*, allow_unsigned: bool = False, assume_yes: bool = False,
                       consent: policy.Consent | None = None, notify: Callable[[str], None] = lambda _m: None,
                       ) -> Callable[[Path, str], dict[str, Any]]:
    """The ``verify(path, scoped_id)`` hook install and run call before using an artifact.

    Returns ``{"signed", "signer", "trust"}`` for their envelopes; raises the refusal.
    """
    options = VerifyOptions(allow_unsigned=allow_unsigned, assume_yes=assume_yes)

    def verify(path: Path, scoped_id: str) -> dict[str, Any]:
        outcome = require_verified(path, options=options, scoped_id=scoped_id or None, consent=consent)
        for note in outcome.notes:
            notify(note)
        return outcome.summary()

    return verify
