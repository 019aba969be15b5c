"""Structure: the parsed TOML checked against schemas/capsule-manifest.json.

The schema is the single statement of which keys exist and what type each has;
this module turns jsonschema's findings into one-line errors that name the key
path and what was expected, so a wrong type never surfaces as a KeyError later.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.envelope import validator
from pipeline.errors import E_MANIFEST, E_MANIFEST_MISSING, AtoError
from pipeline.manifest.keypath import describe, fail

if TYPE_CHECKING:  # jsonschema itself is imported when a manifest is first validated (start-up time)
    from jsonschema.exceptions import ValidationError

SCHEMA = "capsule-manifest"
# Integers outside this range cannot be represented in the canonical JSON the build hashes.
_SAFE_INT = 2**53 - 1

_ARTICLE = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
            "array": "an array", "object": "a table", "null": "nothing"}
# Which problem wins when several are reported at the same depth.
_PRIORITY = {"required": 0, "type": 1}


def check_structure(doc: dict[str, Any], file: str, schema: str = SCHEMA) -> None:
    """Raise the first structural problem of ``doc`` (shallowest key first), or return.

    Every problem found is listed once in the error's ``details.problems``.
    """
    problems = sorted(_problems(doc, file, schema), key=lambda p: p[0])
    if problems:
        first = problems[0][1]
        first.details["problems"] = list(dict.fromkeys(p[1].message for p in problems))[:20]
        raise first
    for parts, value in _walk(doc, []):
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(file, parts, f"expected a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE_INT:
            raise fail(file, parts, f"expected an integer within ±{_SAFE_INT}, got {value}")


def _problems(doc: dict[str, Any], file: str, schema: str) -> Iterator[tuple[tuple, AtoError]]:
    for error in validator(schema).iter_errors(doc):
        parts = list(error.absolute_path)
        for sub_parts, err in _translate(error, parts, file):
            yield (len(sub_parts), [str(p) for p in sub_parts], _PRIORITY.get(str(error.validator), 9)), err


def _translate(error: ValidationError, parts: list, file: str) -> Iterator[tuple[list, AtoError]]:
    kind = str(error.validator)
    value = error.validator_value
    custom = error.schema.get("x-expected") if isinstance(error.schema, dict) else None
    if kind == "required":
        for name in value:
            if isinstance(error.instance, dict) and name not in error.instance:
                yield parts + [name], fail(file, parts + [name], "required key is missing",
                                           code=E_MANIFEST_MISSING)
        return
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        for name in sorted(k for k in error.instance if k not in known):
            yield parts + [name], fail(file, parts + [name], f"unknown key (expected one of: {', '.join(known)})")
        return
    got = describe(error.instance)
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        expected = " or ".join(_ARTICLE.get(t, t) for t in types)
        message = f"expected {expected}, got {got}"
    elif custom:
        message = f"expected {custom}, got {got}"
    elif kind == "enum":
        message = f"expected one of {'|'.join(str(v) for v in value)}, got {got}"
    elif kind == "const":
        message = f"expected {value!r}, got {got}"
    elif kind == "minLength":
        message = f"expected a non-empty string, got {got}"
    elif kind in ("minimum", "maximum"):
        message = f"expected a value {'>=' if kind == 'minimum' else '<='} {value}, got {got}"
    elif kind == "pattern":
        message = f"expected a value matching {value}, got {got}"
    else:
        message = f"{error.message}"
    yield parts, fail(file, parts, message, code=E_MANIFEST)


def _walk(value: Any, parts: list) -> Iterator[tuple[list, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, parts + [key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, parts + [i])
    else:
        yield parts, value

