"""How deeply a parsed document (TOML, JSON) may nest, and the one check every reader applies.

Python's parsers and everything that walks their output afterwards (schema validation, TOML and
canonical-JSON writers) recurse once per level, so a 2,000-deep ``a = [[[[...]]]]`` is a
RecursionError somewhere far from the input. Documents ato reads never need more than a handful
of levels, so anything deeper than :data:`MAX_DEPTH` is refused at the reader, with E004.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import E_TOO_DEEP, AtoError

MAX_DEPTH = 64


def too_deep(file: str) -> AtoError:
    return AtoError(E_TOO_DEEP, f"{file}: nested more than {MAX_DEPTH} levels deep (tables or arrays inside "
                                "each other)", details={"file": file, "max_depth": MAX_DEPTH},
                    hint="flatten the document")


def depth(doc: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of dicts/lists in ``doc`` (a scalar is 0), counted without recursion; stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level) for child in children)
    return deepest


def check(doc: Any, file: str) -> Any:
    """``doc`` itself, or E004 when it nests deeper than :data:`MAX_DEPTH`."""
    if depth(doc) > MAX_DEPTH:
        raise too_deep(file)
    return doc


def loads_json(text: str | bytes, file: str) -> Any:
    """``json.loads`` bounded in depth: a document too deep for the parser is E004, not a RecursionError.

    Other parse errors propagate as ``ValueError`` (``json.JSONDecodeError``) for the caller to word.
    """
    try:
        return check(json.loads(text), file)
    except RecursionError:
        raise too_deep(file) from None
