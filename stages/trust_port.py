"""The trust decision as stages see it: a port the product layer fills in (``pipeline.trust``).

Install, fetch, finalize, project and run must accept an artifact exactly alike: every check of
the format (:func:`stages.capsule.verify`), then whether its signer is trusted for the identity
it claims (pins, revocation, rotation, consent on first sight). Stages may not import the trust
policy (it sits above them), so each takes a :class:`TrustPort` and calls it before it stores,
unpacks or derives anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from stages.capsule import Limits, Verdict, verdict_under, verify


class TrustPort(Protocol):
    """Accepts or refuses an artifact (raising E208 / E301 / E212)."""

    @property
    def limits(self) -> Limits:
        """The payload ceiling this command applies."""
        ...

    def precheck(self, verdict: Verdict, scoped_id: str | None) -> None:
        """Decide from the small members alone (a skeleton's verdict), before the payload is
        downloaded: refuse, or obtain any consent the full check will need. Writes nothing."""
        ...

    def check(self, path: Path, scoped_id: str | None) -> dict[str, Any]:
        """The complete check of the file at ``path``; returns ``{"signed", "signer", "trust"}``."""
        ...

    def accept(self, verdict: Verdict, scoped_id: str | None) -> dict[str, Any]:
        """:meth:`check` of the file a caller has just verified (``verify(path, self.limits)``), decided on
        that verdict instead of reading the file again (:func:`stages.capsule.verdict_under`)."""
        ...


class GatedPort:
    """A trust port that also runs ``after(verdict)`` once ``inner`` has accepted the complete artifact
    (install's native gate; run refusing a native app before it is stored)."""

    def __init__(self, inner: TrustPort, after: Callable[[Verdict], None]) -> None:
        self.inner, self.after = inner, after

    @property
    def limits(self) -> Limits:
        return self.inner.limits

    def precheck(self, verdict: Verdict, scoped_id: str | None) -> None:
        self.inner.precheck(verdict, scoped_id)

    def check(self, path: Path, scoped_id: str | None) -> dict[str, Any]:
        return self.accept(verify(Path(path), self.limits), scoped_id)

    def accept(self, verdict: Verdict, scoped_id: str | None) -> dict[str, Any]:
        verdict = verdict_under(verdict, self.limits)
        result = self.inner.accept(verdict, scoped_id)
        self.after(verdict)
        return result
