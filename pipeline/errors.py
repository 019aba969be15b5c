"""Error codes, exit codes and the structured failure shapes.

Every failure the user can cause is an :class:`AtoError`. The CLI turns it into a
one-line message on stderr (plus JSONL ``ATO_ERR_*`` lines or a JSON error object),
and an exit code; nothing else in the program decides how failures look.

:data:`CODES` is the one table of codes: each E-code and ``ATO_ERR_*`` name maps to
its exit status and a one-line meaning (the README's table is checked against it).
Raise sites name a code; the exit status follows from the table, never from the site.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Any

# Exit codes (ARCHITECTURE.md §6).
EXIT_OK = 0
EXIT_USER = 1
EXIT_INTERNAL = 2
EXIT_NETWORK = 3
EXIT_RUNTIME = 5


@dataclass(frozen=True)
class ErrorCode:
    """One row of the code table."""

    code: str
    exit: int
    meaning: str
    diagnostic: str | None = None  # the E-code an ATO_ERR_* name is reported under


_ROWS = [
    # manifest and input
    ErrorCode("E001", EXIT_USER, "`capsule.toml` is not valid TOML"),
    ErrorCode("E002", EXIT_USER, "a manifest value has the wrong type or breaks a rule"),
    ErrorCode("E003", EXIT_USER, "a required manifest key is missing"),
    ErrorCode("E004", EXIT_USER, "an input document is nested too deeply (more than 64 levels of tables or arrays)"),
    ErrorCode("E005", EXIT_USER, "a `depends_on` chain is too long (more than 256 services and tasks in a row)"),
    ErrorCode("E100", EXIT_USER, "the command line is wrong, or what it names does not exist"),
    ErrorCode("E101", EXIT_USER, "the entrypoint is missing or not a safe relative path"),
    ErrorCode("E102", EXIT_USER, "packing or a build/finalize command needs manual intervention "
                                 "(unsafe symlink, file changed while packing, a command failed)"),
    ErrorCode("E106", EXIT_USER, "`--strict-v3` refused a fallback"),
    ErrorCode("E108", EXIT_USER, "a file or member name is too long for the filesystem (ENAMETOOLONG)"),
    ErrorCode("CAPSULE_TOML_NOT_FOUND", EXIT_USER, "no `capsule.toml` where one was expected"),
    ErrorCode("TARGET_NOT_FOUND", EXIT_USER, "the manifest has no target of that name"),
    ErrorCode("CAPSULE_TOML_EXISTS", EXIT_USER, "`ato init` would overwrite an existing `capsule.toml` "
                                                "(pass `--force`)"),
    # registry, store and trust
    ErrorCode("E201", EXIT_USER, "a registry write needs a token (`ATO_TOKEN`), or the token was rejected"),
    ErrorCode("E202", EXIT_USER, "that version is already published (next actions are in the message)"),
    ErrorCode("E207", EXIT_USER, "a lockfile does not match what it locks"),
    ErrorCode("E208", EXIT_USER, "an artifact or CAS object failed an integrity check"),
    ErrorCode("E211", EXIT_USER, "no space left on the disk (ENOSPC, the disk quota is used up, or a file outgrew "
                                 "the file size limit)"),
    ErrorCode("E212", EXIT_USER, "the payload is over the size ceiling (200 MiB unless raised)"),
    ErrorCode("E213", EXIT_USER, "an artifact or download is truncated (it ends before its own structure does)"),
    ErrorCode("E220", EXIT_USER, "a source sync run failed, or `ato source rebuild --wait` timed out"),
    ErrorCode("E230", EXIT_USER, "an official-registry publish check failed (a missing or broken CI workflow: "
                                 "`ato publish --fix` writes it)"),
    ErrorCode("E301", EXIT_USER, "a security policy refused the operation (unsigned artifact, consent, "
                                 "non-loopback host)"),
    ErrorCode("E900", EXIT_NETWORK, "a registry, Store or download host could not be reached, or did not serve "
                                    "what was asked (every network failure has this one code)"),
    ErrorCode("E901", EXIT_NETWORK, "a registry or Store answered with a server error (HTTP 5xx)"),
    ErrorCode("E999", EXIT_INTERNAL, "internal error (a bug: please report it)"),
    # cap
    ErrorCode("CAP_MANIFEST_NOT_FOUND", EXIT_USER, "no `capability.json` where one was expected"),
    ErrorCode("CAP_MANIFEST_EXISTS", EXIT_USER, "`cap init` would overwrite an existing `capability.json`"),
    ErrorCode("CAP_IO", EXIT_USER, "a cap manifest or registry file cannot be read or written"),
    # policy problems and unmet requirements (ATO_ERR_* lines)
    ErrorCode("ATO_ERR_MISSING_REQUIRED_ENV", EXIT_USER, "a variable in `required_env` is not set", "E103"),
    ErrorCode("ATO_ERR_POLICY_VIOLATION", EXIT_USER, "the run policy refused the target", "E301"),
    ErrorCode("ATO_ERR_CONSENT_REQUIRED", EXIT_USER, "the run needs consent (`--yes` when not on a TTY)",
              "E301"),
    ErrorCode("ATO_ERR_PROVISIONING_LOCK_INCOMPLETE", EXIT_USER, "a lockfile the runtime needs is missing",
              "E104"),
    ErrorCode("ATO_ERR_PROVISIONING_FAILED", EXIT_RUNTIME, "installing the target's dependencies failed", "E104"),
    ErrorCode("ATO_ERR_ENGINE_MISSING", EXIT_USER, "the sandbox or container engine the target needs is "
                                                   "not available", "E205"),
    ErrorCode("ATO_ERR_SKILL_NOT_FOUND", EXIT_USER, "the named skill does not exist", "E206"),
    ErrorCode("ATO_ERR_AUTH_REQUIRED", EXIT_USER, "the operation needs a token, or the token was rejected",
              "E201"),
    ErrorCode("ATO_ERR_INTEGRITY_FAILURE", EXIT_USER, "a digest or signature does not match", "E208"),
    ErrorCode("ATO_ERR_EXECUTION_CONTRACT_INVALID", EXIT_USER, "the target's execution contract is invalid "
                                                               "(probe, depends_on, ports)", "E302"),
    ErrorCode("ATO_ERR_RUNTIME_NOT_RESOLVED", EXIT_USER, "no runtime could be resolved for the target", "E303"),
    ErrorCode("ATO_ERR_COMPAT_HARDWARE", EXIT_USER, "the target does not run on this host's OS/CPU", "E304"),
    ErrorCode("ATO_ERR_RUNTIME_LAUNCH_FAILED", EXIT_RUNTIME, "a process of the capsule could not start or "
                                                             "failed before it was ready", "E305"),
    ErrorCode("ATO_ERR_TASK_FAILED", EXIT_RUNTIME, "a task or service of the capsule exited with an error",
              "E305"),
    ErrorCode("ATO_ERR_PROCESS_STUCK", EXIT_RUNTIME, "a capsule process did not stop when asked", "E305"),
    ErrorCode("ATO_ERR_PORT_IN_USE", EXIT_USER, "the port the capsule needs is already in use", "E301"),
    ErrorCode("ATO_ERR_STATE_IN_USE", EXIT_USER, "a dependency's state directory is in use by another run", "E301"),
    # IPC declarations (upstream's codes; pipeline.manifest.ipc)
    ErrorCode("IPC-001", EXIT_USER, "`[ipc]` exports conflict (a `[lifecycle]` capsule with non-default sharing, a "
                                    "method exported twice, an unknown sharing mode)"),
    ErrorCode("IPC-002", EXIT_USER, "an IPC name is reserved (`_ipc_*`, `_setup*`, `_main*`)"),
    ErrorCode("IPC-003", EXIT_USER, "IPC imports are circular"),
    ErrorCode("IPC-004", EXIT_USER, "an IPC import alias is also a service or task name"),
    ErrorCode("IPC-006", EXIT_USER, "an IPC import's provider is not found, or exports no service"),
    ErrorCode("IPC-008", EXIT_USER, "an IPC method schema is missing, not JSON, or not a JSON Schema"),
    ErrorCode("ATO_ERR_PERMISSION_DENIED", EXIT_USER, "a Tier 1 program needed a permission (net, read, write, "
                                                      "env, run, ...) its manifest does not grant", "E301"),
]

CODES: dict[str, ErrorCode] = {row.code: row for row in _ROWS}

# Names the raise sites use.
E_TOML_PARSE = "E001"
E_MANIFEST = "E002"
E_MANIFEST_MISSING = "E003"
E_TOO_DEEP = "E004"
E_CHAIN_TOO_LONG = "E005"
E_USAGE = "E100"
E_ENTRYPOINT = "E101"
E_LOCKFILE = "E102"  # manual intervention needed (also: a build or finalize command failed)
E_STRICT_FALLBACK = "E106"
E_NAME_TOO_LONG = "E108"
E_NOT_FOUND = "CAPSULE_TOML_NOT_FOUND"
E_MANIFEST_EXISTS = "CAPSULE_TOML_EXISTS"
E_TARGET_NOT_FOUND = "TARGET_NOT_FOUND"
E_AUTH_REQUIRED = "E201"
E_VERSION_CONFLICT = "E202"
E_LOCK_TAMPERED = "E207"
E_INTEGRITY = "E208"
E_DISK_FULL = "E211"
E_PAYLOAD_TOO_LARGE = "E212"
E_TRUNCATED = "E213"
E_SOURCE_RUN = "E220"
E_PUBLISH_CHECK = "E230"
E_POLICY = "E301"
E_NETWORK = "E900"
E_SERVER = "E901"
E_INTERNAL = "E999"


def exit_status(code: str) -> int:
    """The exit status of a code; an unknown code is a bug and exits as internal."""
    row = CODES.get(code)
    return row.exit if row else EXIT_INTERNAL


# C0 and C1 controls (but tab and newline), and the bidirectional overrides that reorder what a terminal shows
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Escape control characters so an echoed value cannot forge or garble terminal output."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                        f"\\u{ord(m.group()):04x}", text)


# In JSON text these can only sit inside strings; JSON itself escapes C0 controls but not these.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe_json(text: str) -> str:
    """JSON text with C1 controls and bidi overrides written as ``\\uXXXX``: the same values for a parser,
    nothing a terminal acts on."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@dataclass
class Problem:
    """One ``ATO_ERR_*`` JSONL line: a policy violation or an unmet requirement."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class AtoError(Exception):
    """A failure with a documented code and a one-line message; the code decides the exit status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        hint: str | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.hint = hint
        self.problems = list(problems or [])

    @property
    def exit_code(self) -> int:
        return exit_status(self.code)

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
        return printable(" ".join(line.split("\n")))


def network_error(where: str, reason: object, *, doing: str | None = None, **details: Any) -> AtoError:
    """Every failure to reach a host (refused, reset, timeout, DNS, TLS) is this one code: E900, exit 3.

    ``doing`` words what failed (``download acme/app from URL``) when "reach URL" says too little.
    """
    text = str(reason) or type(reason).__name__
    return AtoError(E_NETWORK, f"network error: cannot {doing or f'reach {where}'}: {text}",
                    details=details or {"url": where}, hint="check the network and the URL, then try again")


def http_error(where: str, status: int, what: str = "the request", *, message: str | None = None) -> AtoError:
    """A host answered, but not with what was asked: 5xx is E901 (its fault), anything else E900."""
    code = E_SERVER if status >= 500 else E_NETWORK
    return AtoError(code, message or f"{where} answered HTTP {status} to {what}",
                    details={"url": where, "status": status})


def manifest_error(path: str, key: str, expected: str, *, code: str = E_MANIFEST) -> AtoError:
    """A manifest problem that names the file, the key path and what was expected."""
    where = f"{path}: {key}" if key else path
    return AtoError(code, f"{where}: {expected}", details={"file": path, "key": key})


# What the operating system reports for failures the user can fix: each has its own code, never E999.
_OS_ERRORS = {
    errno.ENOSPC: (E_DISK_FULL, "no space left on the disk", "free some space (`ato cas gc` removes what nothing "
                                                            "uses) and run the command again"),
    errno.EDQUOT: (E_DISK_FULL, "the disk quota is used up", "free some space and run the command again"),
    # Python ignores SIGXFSZ, so a write past `ulimit -f` (RLIMIT_FSIZE) or the filesystem's largest file fails here
    errno.EFBIG: (E_DISK_FULL, "a file grew past the file size limit", "raise `ulimit -f` or write to another "
                                                                       "filesystem, then run the command again"),
    errno.ENAMETOOLONG: (E_NAME_TOO_LONG, "a file name is too long for the filesystem",
                         "shorten the name (at most 255 bytes per path component)"),
}


def from_os_error(exc: BaseException) -> AtoError | None:
    """The documented error for an OS failure the user can fix (disk full, name too long), else None."""
    if not isinstance(exc, OSError) or exc.errno not in _OS_ERRORS:
        return None
    code, what, hint = _OS_ERRORS[exc.errno]
    names = [n for n in (exc.filename, exc.filename2) if isinstance(n, str)]  # a rename has two
    where = names[-1] if names else None
    shown = where
    if where and exc.errno == errno.ENAMETOOLONG:  # name the component that is too long, not a temp path
        part = max((p for n in names for p in n.split("/")), key=lambda p: len(p.encode("utf-8", "surrogateescape")))
        size = len(part.encode("utf-8", "surrogateescape"))
        shown = f"{part[:40]}...{part[-16:]} ({size} bytes)" if size > 60 else part
    message = f"{what}" + (f": {shown}" if shown else "")
    return AtoError(code, message, details={"errno": errno.errorcode.get(exc.errno, str(exc.errno)),
                                            **({"path": where} if where else {})}, hint=hint)
