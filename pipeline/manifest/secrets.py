"""Secret-looking names: which environment variables hold credentials.

``ato inspect requirements`` lists these under ``secrets``, the run consent names
them, and the v1 reader refuses a value for one in ``[env]`` (a secret belongs in
the user's environment, not in a manifest that is packed and published).
"""

from __future__ import annotations

_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "API_KEY")


def is_secret(key: str) -> bool:
    upper = key.upper()
    return any(m in upper for m in _SECRET_MARKERS) or upper.endswith("_KEY")
