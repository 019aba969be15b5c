"""How the format package refuses: one error type, carrying the check that failed.

Every refusal of an artifact is an :class:`~pipeline.errors.AtoError` (E208, or E212 for a
payload over the size ceiling) whose ``details`` name the check (``archive``, ``members``,
``signature``, ``digests``) and, for a payload entry that must never be unpacked, the
reason ``unsafe_entry``. Callers that map refusals to another vocabulary (the registry's
HTTP errors) read those two fields; nobody parses the message.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import E_INTEGRITY, E_PAYLOAD_TOO_LARGE, AtoError, Problem

INTEGRITY_PROBLEM = "ATO_ERR_INTEGRITY_FAILURE"
UNSAFE_ENTRY = "unsafe_entry"
UNREADABLE_TAR = "unreadable_tar"
HINT = "do not use this artifact; rebuild it or download it again"


class CapsuleError(AtoError):
    """An artifact that fails a check of the format. ``check`` names the check."""

    def __init__(self, check: str, message: str, *, code: str = E_INTEGRITY, reason: str | None = None,
                 hint: str | None = HINT, **details: Any) -> None:
        details = {"check": check, **({"reason": reason} if reason else {}), **details}
        problems = [Problem(INTEGRITY_PROBLEM, message, {k: v for k, v in details.items() if v is not None})] \
            if code == E_INTEGRITY else []
        super().__init__(code, message, details=details, hint=hint, problems=problems)
        self.check = check
        self.reason = reason


def too_large(size: int, ceiling: int) -> CapsuleError:
    return CapsuleError("digests", f"the payload decodes to {size} bytes ({size / 1048576:.1f} MiB), over the "
                                   f"{ceiling} byte ({ceiling / 1048576:.0f} MiB) payload ceiling",
                        code=E_PAYLOAD_TOO_LARGE, reason="payload_too_large", size=size, ceiling=ceiling,
                        hint="pass --force-large-payload if you expect a payload this large, or raise "
                             "[payload] max_bytes in $ATO_HOME/config.toml")
