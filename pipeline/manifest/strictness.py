"""Strictness: keys this ato does not know, and tables of capabilities it has not built.

The schema of each generation (``schemas/capsule-manifest*.json``) is the one list of
known keys. Walking a document alongside it finds, at every level, each key the
schema does not name (a typo such as ``[buid]`` gets "did you mean build?") and
each table marked ``x-unsupported`` (e.g. ``[ipc]``, until the IPC broker exists).
Both are warnings that keep the key; under ``--strict-v3`` or
``ATO_STRICT_MANIFEST=1`` the first is error E002 naming the key path, and every
finding is listed once in the error's details.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.envelope import schema_resolver
from pipeline.errors import E_USAGE, AtoError
from pipeline.manifest.keypath import fail, key_path, quote

STRICT_ENV = "ATO_STRICT_MANIFEST"
_TRUTHY = {"1", "true", "yes", "on"}
_FALSY = {"0", "false", "no", "off", ""}
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


def strict_from_env() -> bool:
    """``ATO_STRICT_MANIFEST``: 1/true/yes/on or 0/false/no/off (anything else is a usage error)."""
    raw = os.environ.get(STRICT_ENV)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUTHY:
        return True
    if value in _FALSY:
        return False
    raise AtoError(E_USAGE, f"invalid {STRICT_ENV} value {raw!r}; expected one of 1,true,yes,on,0,false,no,off")


@dataclass(frozen=True)
class Finding:
    """One key the schema does not know (``unknown``) or marks as not built (``unsupported``)."""

    kind: str
    parts: tuple[str | int, ...]
    is_table: bool
    reason: str = ""  # unsupported: what is not built
    suggestion: str | None = None  # unknown: the closest known key

    def warning(self, file: str) -> str:
        where = f"{file}: {key_path(self.parts)}"
        if self.kind == "unsupported":
            return f"{where}: unsupported: {self.reason}; kept, but nothing acts on it"
        return f"{where}: unknown {'table' if self.is_table else 'key'}, ignored"

    def hint(self) -> str | None:
        return quote(self.suggestion) if self.suggestion else None

    def error(self, file: str) -> AtoError:
        if self.kind == "unsupported":
            return fail(file, self.parts, f"unsupported: {self.reason}")
        text = f"unknown {'table' if self.is_table else 'key'}"
        if self.suggestion:
            text += f" (did you mean {quote(self.suggestion)}?)"
        return fail(file, self.parts, text)


def findings(doc: dict[str, Any], schema: str) -> list[Finding]:
    """Every unknown or unsupported key of ``doc`` against schema ``schema``, in document order."""
    root, resolver = schema_resolver(schema)
    return list(_visit(doc, root, resolver, ()))


def apply(found: list[Finding], file: str, *, strict: bool, warnings: list[str], hints: dict[str, str]) -> None:
    """Warn about each finding, or, when strict, raise the first as E002 listing them all."""
    if strict and found:
        err = found[0].error(file)
        err.details["problems"] = list(dict.fromkeys(f.error(file).message for f in found))
        raise err
    for item in found:
        line = item.warning(file)
        if line not in warnings:
            warnings.append(line)
        hint = item.hint()
        if hint:
            hints[line] = hint


def _deref(schema: Any, resolver: Any) -> tuple[dict[str, Any], Any]:
    while isinstance(schema, dict) and "$ref" in schema:
        resolved = resolver.lookup(schema["$ref"])
        merged = {k: v for k, v in schema.items() if k != "$ref"}
        schema, resolver = {**resolved.contents, **merged}, resolved.resolver
    return (schema if isinstance(schema, dict) else {}), resolver


def _branch(schema: dict[str, Any], value: Any, resolver: Any) -> tuple[dict[str, Any], Any]:
    """For ``oneOf``/``anyOf``, the branch whose type fits ``value`` (the schema itself otherwise)."""
    options = schema.get("oneOf") or schema.get("anyOf")
    if not options:
        return schema, resolver
    kind = _JSON_TYPES.get(type(value))
    for option in options:
        branch, res = _deref(option, resolver)
        types = branch.get("type")
        types = types if isinstance(types, list) else [types]
        if kind in types or (kind == "integer" and "number" in types):
            return branch, res
    return {}, resolver


def _visit(value: Any, schema: Any, resolver: Any, parts: tuple[str | int, ...]) -> Iterator[Finding]:
    schema, resolver = _deref(schema, resolver)
    if "x-unsupported" in schema:
        yield Finding("unsupported", parts, isinstance(value, dict), reason=schema["x-unsupported"])
        return
    schema, resolver = _branch(schema, value, resolver)
    if schema.get("x-open"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return  # an opaque table: its keys are the user's
        for key, item in value.items():
            if props and key in props:
                yield from _visit(item, props[key], resolver, parts + (key,))
            elif isinstance(extra, dict):
                yield from _visit(item, extra, resolver, parts + (key,))
            elif extra is False:
                continue  # the structure check has already refused it
            else:
                close = difflib.get_close_matches(key, list(props or ()), n=1, cutoff=0.7)
                yield Finding("unknown", parts + (key,), isinstance(item, dict), suggestion=close[0] if close else None)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                yield from _visit(item, items, resolver, parts + (i,))

