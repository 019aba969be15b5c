"""Names the registry accepts: scopes, versions, file names, registry URLs; version order.

Kernel vocabulary: the registry server, its client and the stages (install, publish)
all check names the same way, so the rules live below all of them.

Publisher and slug segments follow the reference server: 1–63 characters of
``[a-z0-9-]``, starting with a letter or digit, no ``--`` and no trailing ``-``
(unlike the reference, the original case is never used after the check: a
segment with upper case is refused rather than silently lowered). A version is
a single path segment: no ``/``, ``\\`` or ``..``. File names are bare
``*.capsule`` names.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pipeline.errors import E_USAGE, AtoError

_SEGMENT = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,62}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_~-]{0,127}$")
_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

OFFICIAL_HOSTS = ("api.ato.run", "staging.api.ato.run")
DEFAULT_REGISTRY = "https://api.ato.run"


def valid_segment(value: str) -> bool:
    return bool(_SEGMENT.match(value or ""))


def valid_version(value: str) -> bool:
    return bool(_VERSION.match(value or "")) and ".." not in value


def valid_file_name(value: str) -> bool:
    """A bare ``*.capsule`` name a filesystem holds: printable (no NUL or other control, no bidi override, no
    U+FFFD from bytes that were not UTF-8), at most 255 bytes, no path separators or ``..``."""
    return (bool(value) and value.isprintable() and "\ufffd" not in value
            and len(value.encode("utf-8", "surrogateescape")) <= 255 and value.lower().endswith(".capsule")
            and "/" not in value and "\\" not in value and ".." not in value and not value.startswith("."))


def parse_scoped_id(value: str) -> tuple[str, str] | None:
    """``publisher/slug`` (a leading ``@`` is tolerated) → the two segments, or None."""
    text = (value or "").strip().lstrip("@")
    parts = text.split("/")
    if len(parts) != 2 or not valid_segment(parts[0]) or not valid_segment(parts[1]):
        return None
    return parts[0], parts[1]


def normalize_segment(value: str) -> str:
    """A best-effort publisher segment from free text (``Koh0920`` → ``koh0920``, ``a_b`` → ``a-b``)."""
    text = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")
    return text[:63].rstrip("-")


def version_key(version: str) -> tuple:
    """Sort key: semver order (pre-releases before their release); non-semver versions sort first, by text."""
    m = _SEMVER.match(version)
    if not m:
        return (0, version)
    core = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    pre = m.group(4)
    if pre is None:
        return (1, core, (1,))
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (1, core, (0, parts))


def latest(versions: list[str]) -> str | None:
    return max(versions, key=version_key) if versions else None


class RegistryUrlError(ValueError):
    pass


def normalize_registry_url(value: str) -> str:
    """``host:port`` → ``http://host:port``; scheme must be http(s); no trailing ``/``."""
    text = (value or "").strip()
    if not text:
        raise RegistryUrlError("registry URL is empty")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise RegistryUrlError(f"Registry URL must use http or https scheme (got {value!r})")
    if not parts.hostname:
        raise RegistryUrlError(f"Registry URL has no host: {value!r}")
    return text.rstrip("/")


def parse_registry(value: str) -> str:
    """:func:`normalize_registry_url`, with a bad URL reported as a usage error (E100)."""
    try:
        return normalize_registry_url(value)
    except RegistryUrlError as exc:
        raise AtoError(E_USAGE, str(exc)) from None


def is_official(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in OFFICIAL_HOSTS
