"""The run-time trust gate: ``verify_before_run(artifact)`` before ``ato run`` unpacks anything.

:func:`pipeline.runtime.resolve.trust_gate` calls :func:`verify_before_run` for every ``.capsule``
it is about to unpack (a file, or the one ``ato install`` stored), so a run checks exactly what
``ato verify`` and ``ato install`` check: every digest, the signature, revocation and the pin.
An artifact under ``$ATO_HOME/store/<publisher>/<slug>/`` is checked against its publisher;
a bare file against ``capsule:<name>``.

The run command says how to decide with :func:`configure` (``--allow-unsigned``, ``--yes``, the
TTY prompt, where notes go). Unconfigured, the gate fails closed: unsigned artifacts and
first-seen signers are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.trust import policy
from pipeline.trust.verify import ArtifactTrust, installer_verifier, scoped_id_from_store_path
from stages.capsule import Limits, Verdict


@dataclass(frozen=True)
class GateConfig:
    allow_unsigned: bool = False
    assume_yes: bool = False
    consent: policy.Consent | None = None
    notify: Callable[[str], None] = lambda _m: None
    limits: Limits = Limits()


_config = GateConfig()


def configure(*, allow_unsigned: bool = False, assume_yes: bool = False, consent: policy.Consent | None = None,
              notify: Callable[[str], None] | None = None, limits: Limits | None = None) -> None:
    """Set how this process's runs decide (call once from the run command)."""
    global _config
    _config = GateConfig(allow_unsigned, assume_yes, consent, notify or (lambda _m: None), limits or Limits())


def port() -> ArtifactTrust:
    """The trust port of this process's run (what install-on-demand hands the install stage)."""
    cfg = _config
    return installer_verifier(allow_unsigned=cfg.allow_unsigned, assume_yes=cfg.assume_yes, consent=cfg.consent,
                              notify=cfg.notify, limits=cfg.limits)


def verify_before_run(artifact: Path, scoped_id: str | None = None, verdict: Verdict | None = None) -> dict[str, Any]:
    """Refuse (raise E208/E212/E301) or return ``{"signed", "signer", "trust"}`` for the run envelope;
    decided on ``verdict`` (the caller's verification of ``artifact``) when given."""
    scoped = scoped_id or scoped_id_from_store_path(Path(artifact))
    if verdict is not None:
        return port().accept(verdict, scoped)
    return port().check(Path(artifact), scoped)


def accept_signature(signature: Any, identity: str, *, built_here: bool = False) -> policy.Decision:
    """The same decision for something that is not a ``.capsule`` (a ``.sync`` and its updates), under the
    run command's settings: refuse (E208/E301) or return how the signer was accepted."""
    cfg = _config
    decision = policy.accept(signature, identity=identity, allow_unsigned=cfg.allow_unsigned,
                             assume_yes=cfg.assume_yes, consent=cfg.consent, built_here=built_here)
    if decision.status in ("new-pin", "rotated"):
        cfg.notify(decision.message)
    return decision
