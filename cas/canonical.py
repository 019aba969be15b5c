"""RFC 8785 (JCS) canonical JSON, with a fast path for the documents we hash most.

The ``rfc8785`` package is exact but pure Python and slow on large documents
(a payload manifest lists thousands of chunks). For documents without floats
and whose keys are all in the Basic Multilingual Plane below the surrogates,
JCS equals ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``:
same key order, same string escapes, same integers. Anything else goes through
``rfc8785``.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785


def _simple(value: Any) -> bool:
    """True when ``value`` has no float, no integer beyond 2**53 and no key outside the BMP."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if not -(2**53) < v < 2**53:
                return False
        elif t is dict:
            for k in v:
                if type(k) is not str or (not k.isascii() and any(ord(c) >= 0xD800 for c in k)):
                    return False
            stack.extend(v.values())
        elif t is list or t is tuple:
            stack.extend(v)
        else:
            return False
    return True


def canonical_json(value: Any, *, plain: bool = False) -> bytes:
    """The JCS bytes of ``value``.

    ``plain``: the caller vouches that ``value`` is a document it built itself from strings, booleans,
    None and integers below 2**53, with BMP keys (a listing of ten thousand files, say), so the check
    that walks every value is skipped; the bytes are the same.
    """
    if plain or _simple(value):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return rfc8785.dumps(value)


def jcs_digest(value: Any, *, plain: bool = False) -> str:
    """``blake3:<hex>`` of the canonical JSON of ``value`` (``plain`` as for :func:`canonical_json`)."""
    import blake3

    return "blake3:" + blake3.blake3(canonical_json(value, plain=plain)).hexdigest()
