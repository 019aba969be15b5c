"""Key paths: how a place in a TOML document is named in error messages.

Every manifest error names the key it is about (``targets.web.port``,
``pack.include[0]``), so the user can find it without reading a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.errors import E_MANIFEST, AtoError, manifest_error

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def key_path(parts: Iterable[str | int]) -> str:
    """``["targets", "web", "cmd", 0]`` -> ``targets.web.cmd[0]``; odd keys are quoted like TOML."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        out += ("." if out else "") + (part if _BARE.match(part) else quote(part))
    return out


def describe(value: object) -> str:
    """A short, TOML-flavoured description of a value for "got ..." clauses."""
    kind = toml_type(value)
    if kind in ("table", "array"):
        return kind
    text = quote(value) if isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def quote(text: str) -> str:
    """A string value as it is written in TOML (basic string)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__  # datetime, date, time


def fail(file: str, parts: Iterable[str | int], expected: str, *, code: str = E_MANIFEST) -> AtoError:
    """The one-line manifest error: ``<file>: <key path>: <what was expected>``."""
    return manifest_error(file, key_path(parts), expected, code=code)


_SEGMENT = re.compile(r'\.?(?:(?P<bare>[A-Za-z0-9_-]+)|"(?P<quoted>(?:[^"\\]|\\.)*)"|\[(?P<index>\d+)\])')


def parse_key_path(text: str) -> list[str | int] | None:
    """The parts of a key path made by :func:`key_path` (None when ``text`` is not one)."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _SEGMENT.match(text, pos)
        if match is None or match.end() == pos:
            return None
        if match.group("index") is not None:
            parts.append(int(match.group("index")))
        elif match.group("quoted") is not None:
            parts.append(re.sub(r"\\(.)", r"\1", match.group("quoted")))
        else:
            parts.append(match.group("bare"))
        pos = match.end()
    return parts
