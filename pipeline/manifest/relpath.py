"""Relative paths named in a manifest: they must stay inside the project.

A capsule is installed on someone else's machine, so an absolute path or a
``..`` in an entrypoint, a pack pattern or a delivery input would reach outside
the payload; such values are refused when the manifest is read, not later.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

_DRIVE = re.compile(r"^[A-Za-z]:")


def escape_reason(value: str) -> str | None:
    """Why ``value`` is not a path inside the project (None when it is)."""
    text = value.replace("\\", "/")
    if text.startswith(("/", "~")) or _DRIVE.match(text):
        return "must be a relative path inside the project, not an absolute path"
    if ".." in PurePosixPath(text).parts:
        return "must not contain '..' (it would escape the project)"
    return None


def normalize(value: str) -> str:
    """``./a//b/`` -> ``a/b``: the form compared and stored (call after :func:`escape_reason`)."""
    parts = [p for p in PurePosixPath(value.replace("\\", "/")).parts if p not in (".", "")]
    return "/".join(parts)

