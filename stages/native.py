"""What the native delivery stages (fetch, finalize, project, install) share.

The ``schema_version = "0.1"`` contract generation, RFC 3339 timestamps, this host as a
delivery target string, and validated JSON documents written temp + fsync + rename.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

from cas.atomic import write_bytes_atomic
from pipeline.envelope import dumps, validate
from pipeline.errors import E_INTEGRITY, AtoError
from pipeline.manifest.delivery import host_arch

SCHEMA_VERSION = "0.1"
ACCEPTED_SCHEMA_VERSIONS = ("0.1", "exp-0.1")  # exp-0.1: the legacy spelling, still read


def now_rfc3339() -> str:
    """Now, UTC, whole seconds, ``Z``."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_os() -> str:
    """``linux`` | ``darwin`` | ``windows`` (or the raw platform name elsewhere)."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "darwin"
    if sys.platform in ("win32", "cygwin"):
        return "windows"
    return platform.system().lower() or sys.platform


def host_target() -> str:
    return f"{host_os()}/{host_arch()}"


def write_doc(path: Path, doc: dict[str, Any], schema: str, *, mode: int = 0o644,
              no_clobber: bool = False) -> bool:
    """Validate ``doc`` against ``schema`` and write it as house-style JSON, atomically."""
    return write_bytes_atomic(path, dumps(validate(doc, schema)).encode("utf-8"), mode=mode, no_clobber=no_clobber)


def read_doc(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; unreadable or malformed content is E208 naming the file."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise AtoError(E_INTEGRITY, f"{what} is missing: {path}", details={"path": str(path)}) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise AtoError(E_INTEGRITY, f"failed to parse {what}: {path}: {exc}", details={"path": str(path)}) from None
    if not isinstance(doc, dict):
        raise AtoError(E_INTEGRITY, f"failed to parse {what}: {path}: not a JSON object", details={"path": str(path)})
    return doc


def check_schema_version(doc: dict[str, Any], path: Path, what: str) -> str:
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version not in ACCEPTED_SCHEMA_VERSIONS:
        raise AtoError(E_INTEGRITY, f"unsupported {what} schema_version {version!r} in {path}; expected '0.1' "
                                    "(stable) or 'exp-0.1' (legacy)", details={"path": str(path)})
    return str(version)
