"""Error codes, exit codes and the structured failure shapes.

Every failure the user can cause is an :class:`AtoError`. The CLI turns it into a
one-line message on stderr (plus JSONL ``ATO_ERR_*`` lines or a JSON error object),
and an exit code; nothing else in the program decides how failures look.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Exit codes (ARCHITECTURE.md §6).
EXIT_OK = 0
EXIT_USER = 1
EXIT_INTERNAL = 2
EXIT_NETWORK = 3
EXIT_RUNTIME = 5

# Diagnostic E-codes (CONTRACTS.md §6).
E_LOCKFILE = "E102"
E_STRICT_FALLBACK = "E106"
E_AUTH_REQUIRED = "E201"
E_VERSION_CONFLICT = "E202"
E_LOCK_TAMPERED = "E207"
E_INTEGRITY = "E208"
E_PAYLOAD_TOO_LARGE = "E212"
E_SOURCE_RUN = "E220"  # a registry source sync run failed, or --wait ran out of time
E_POLICY = "E301"
E_NETWORK = "E900"  # a registry, Store or download host could not be reached (exit 3)
E_INTERNAL = "E999"

# Manifest and input problems (codes follow the reference implementation's table).
E_TOML_PARSE = "E001"  # capsule.toml is not valid TOML
E_MANIFEST = "E002"  # a value has the wrong type/shape or breaks a rule
E_MANIFEST_MISSING = "E003"  # a required key is missing
E_USAGE = "E100"  # the command line itself is wrong
E_ENTRYPOINT = "E101"  # entrypoint missing / not a safe relative path
E_NOT_FOUND = "CAPSULE_TOML_NOT_FOUND"


@dataclass
class Problem:
    """One ``ATO_ERR_*`` JSONL line: a policy violation or an unmet requirement."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class AtoError(Exception):
    """A failure with a documented code, a one-line message and an exit code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        exit_code: int = EXIT_USER,
        details: dict[str, Any] | None = None,
        hint: str | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.details = dict(details or {})
        self.hint = hint
        self.problems = list(problems or [])

    def to_json(self) -> dict[str, Any]:
        """The structured failure object printed on stderr under ``--json``."""
        details = dict(self.details)
        if self.hint:
            details.setdefault("hint", self.hint)
        return {"error": {"code": self.code, "message": self.message, "details": details}}

    def human_line(self) -> str:
        line = f"error[{self.code}]: {self.message}"
        if self.hint:
            line += f" ({self.hint})"
        return " ".join(line.split("\n"))


def manifest_error(path: str, key: str, expected: str, *, code: str = E_MANIFEST) -> AtoError:
    """A manifest problem that names the file, the key path and what was expected."""
    where = f"{path}: {key}" if key else path
    return AtoError(code, f"{where}: {expected}", details={"file": path, "key": key})
