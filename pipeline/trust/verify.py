"""Verify an artifact for use: the format's verdict, then the trust decision.

One path for ``ato verify``, install, fetch, finalize, project and run, so they cannot drift
apart: :func:`stages.capsule.verify` judges the bytes (every digest, every payload entry, the
signature's cryptography) and :func:`evaluate` adds who signed it and whether this machine
trusts that signer for the identity the artifact claims. :class:`ArtifactTrust` is what the
stages call (the :class:`stages.trust_port.TrustPort`); :func:`verify_artifact` is the
``verify`` report (validated against schemas/verify.json). Nothing is pinned for an artifact
whose integrity checks failed, and nothing is extracted or executed by callers before the
check returns without an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.envelope import validate
from pipeline.errors import AtoError
from pipeline.trust import policy
from pipeline.trust import store as trust_store
from pipeline.trust.policy import Decision
from stages.capsule import Limits, Verdict, verdict_under, verify
from stages.capsule.verifier import Check
from stages.provenance import built_here

SCHEMA = "verify"
SCHEMA_VERSION = "1"


@dataclass
class VerifyOptions:
    identity: str | None = None  # overrides the identity derived from the scoped id or the manifest name
    expected_signer: str | None = None  # accept only this did (no pinning)
    allow_unsigned: bool = False
    assume_yes: bool = False  # consent to a first-sight pin without a prompt
    extra_revoked: tuple[str, ...] = ()  # ids revoked for this check only (e.g. from --revocations)
    limits: Limits = field(default_factory=Limits)  # the payload ceiling (--force-large-payload lifts it)


@dataclass
class Outcome:
    report: dict[str, Any]
    verdict: Verdict
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


def evaluate(verdict: Verdict, *, options: VerifyOptions | None = None, target: str | None = None,
             scoped_id: str | None = None, consent: policy.Consent | None = None, now: float | None = None,
             write: bool = True) -> Outcome:
    """The trust decision on a verdict; pins on first sight (with consent) unless ``write`` is False."""
    options = options or VerifyOptions()
    now = time.time() if now is None else now
    outcome = Outcome({}, verdict)
    identity = None
    try:
        identity = policy.identity_for(explicit=options.identity, scoped_id=scoped_id, name=verdict.name)
    except AtoError as exc:
        outcome.error = exc
    trust: dict[str, Any] = {"status": "not-checked", "identity": identity, "key_id": None, "petname": None,
                             "pinned_key": None, "message": "integrity checks failed; trust was not evaluated"}
    if verdict.error is not None:
        outcome.error = verdict.error
    elif outcome.error is None:
        trust, outcome.decision = _decide(verdict, identity, options, consent, now, outcome, write)
    checks = [c.to_json() for c in verdict.checks]
    checks.append(Check("trust", _trust_status(trust["status"]), trust["message"]).to_json())
    signed = bool(verdict.signature and verdict.signature.signed)
    artifact = str(verdict.path) if verdict.path is not None else (target or "")
    report = {
        "schema_version": SCHEMA_VERSION,
        "ok": outcome.error is None,
        "target": target or artifact,
        "artifact": artifact,
        "scoped_id": scoped_id,
        "name": verdict.name,
        "version": verdict.version,
        "artifact_blake3": verdict.artifact_blake3,
        "size": verdict.size,
        "digests": verdict.digests if verdict.complete and verdict.ok else None,
        "signed": signed,
        "signer": verdict.signature.to_json() if signed and verdict.signature else None,
        "trust": trust,
        "checks": checks,
        "error": None if outcome.error is None else {"code": outcome.error.code, "message": outcome.error.message},
    }
    outcome.report = validate(report, SCHEMA)
    return outcome


def verify_artifact(path: Path, *, options: VerifyOptions | None = None, target: str | None = None,
                    scoped_id: str | None = None, consent: policy.Consent | None = None,
                    now: float | None = None) -> Outcome:
    """Check ``path`` completely and decide whether to trust it; pins on first sight (with consent)."""
    options = options or VerifyOptions()
    path = Path(path)
    scoped_id = scoped_id or scoped_id_from_store_path(path)
    return evaluate(verify(path, options.limits), options=options, target=target, scoped_id=scoped_id,
                    consent=consent, now=now)


def _trust_status(status: str) -> str:
    return {"not-checked": "skipped", "rejected": "failed"}.get(status, "ok")


def _decide(verdict: Verdict, identity: str | None, options: VerifyOptions, consent: policy.Consent | None,
            now: float, outcome: Outcome, write: bool) -> tuple[dict[str, Any], Decision | None]:
    try:
        snapshot = trust_store.load()

        def decide(store: trust_store.TrustStore) -> Decision:
            return policy.decide(store, identity=identity, signature=verdict.signature,
                                 allow_unsigned=options.allow_unsigned, expected_signer=options.expected_signer,
                                 extra_revoked=options.extra_revoked, now=now,
                                 built_here=built_here(verdict.artifact_blake3))

        decision = decide(snapshot)
        if write:
            decision = policy.settle(decision, consent=consent, assume_yes=options.assume_yes, decide_again=decide)
        else:
            policy.obtain_consent(decision, consent=consent, assume_yes=options.assume_yes)
    except AtoError as exc:
        outcome.error = exc
        key = verdict.signature.key_id if verdict.signature else None
        return ({"status": "rejected", "identity": identity, "key_id": key, "petname": None,
                 "pinned_key": exc.details.get("pinned_key"), "message": exc.message}, None)
    if write and decision.status in ("new-pin", "rotated"):
        outcome.notes.append(decision.message)
    store = trust_store.load() if write and decision.change else snapshot
    return decision.to_json(store), decision


def require_verified(path: Path, **kwargs: Any) -> Outcome:
    """:func:`verify_artifact`, raising the refusal (E208 / E212 / E301) instead of returning it."""
    outcome = verify_artifact(path, **kwargs)
    if outcome.error is not None:
        raise outcome.error
    return outcome


class ArtifactTrust:
    """The :class:`stages.trust_port.TrustPort` of one command: its flags, its prompt, its notes.

    A consent given at :meth:`precheck` (before a download) is remembered for that identity and
    key, so the complete :meth:`check` afterwards pins without asking twice.
    """

    def __init__(self, options: VerifyOptions | None = None, *, consent: policy.Consent | None = None,
                 notify: Callable[[str], None] = lambda _m: None) -> None:
        self.options = options or VerifyOptions()
        self.consent = consent
        self.notify = notify
        self._consented: set[tuple[str | None, str | None]] = set()

    @property
    def limits(self) -> Limits:
        return self.options.limits

    def precheck(self, verdict: Verdict, scoped_id: str | None) -> None:
        outcome = evaluate(verdict, options=self.options, scoped_id=scoped_id, consent=self.consent, write=False)
        if outcome.error is not None:
            raise outcome.error
        if outcome.decision is not None and outcome.decision.needs_consent:
            self._consented.add((outcome.decision.identity, outcome.decision.key_id))

    def check(self, path: Path, scoped_id: str | None) -> dict[str, Any]:
        return self.accept(verify(Path(path), self.options.limits), scoped_id)

    def accept(self, verdict: Verdict, scoped_id: str | None) -> dict[str, Any]:
        options = self.options
        verdict = verdict_under(verdict, options.limits)
        path = verdict.path
        assert path is not None
        if verdict.signature is not None and verdict.signature.key_id and options.assume_yes is False:
            try:
                identity = policy.identity_for(explicit=options.identity, scoped_id=scoped_id, name=verdict.name)
            except AtoError:
                identity = None
            if (identity, verdict.signature.key_id) in self._consented:
                options = VerifyOptions(**{**options.__dict__, "assume_yes": True})
        outcome = evaluate(verdict, options=options, scoped_id=scoped_id or scoped_id_from_store_path(Path(path)),
                           consent=self.consent)
        if outcome.error is not None:
            raise outcome.error
        for note in outcome.notes:
            self.notify(note)
        return outcome.summary()


def installer_verifier(*, allow_unsigned: bool = False, assume_yes: bool = False,
                       consent: policy.Consent | None = None, notify: Callable[[str], None] = lambda _m: None,
                       limits: Limits | None = None) -> ArtifactTrust:
    """The trust port install, fetch, finalize, project and run use before touching an artifact."""
    return ArtifactTrust(VerifyOptions(allow_unsigned=allow_unsigned, assume_yes=assume_yes,
                                       limits=limits or Limits()), consent=consent, notify=notify)
