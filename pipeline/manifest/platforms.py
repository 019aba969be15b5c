"""Tool platforms: ``type = "tool"`` with ``[platforms.<os>-<arch>]`` {artifact, sha256}.

A tool capsule ships one prebuilt program per platform. The 0.3 reader turns each
platform into a native target of the same label whose ``digest`` pins the
artifact's SHA-256; ``ato run`` picks the target of the host's platform and
refuses an artifact whose bytes do not match.
"""

from __future__ import annotations

import platform as _platform
import re
from typing import Any

from pipeline.manifest import relpath
from pipeline.manifest.delivery import host_arch
from pipeline.manifest.keypath import describe, fail, quote

KEY = re.compile(r"^(darwin|linux|windows)-(arm64|x86_64)$")


def check_platforms(doc: dict[str, Any], file: str) -> dict[str, dict[str, str]]:
    """The validated ``[platforms]`` table (structure already checked by the schema)."""
    table = doc.get("platforms") or {}
    if table and doc.get("type") != "tool":
        raise fail(file, ["platforms"], f'[platforms] describes a tool\'s per-platform programs; it needs type = '
                                        f'"tool", got type {describe(doc.get("type", "app"))}')
    for key, spec in table.items():
        if not KEY.match(key):
            raise fail(file, ["platforms", key], "expected <darwin|linux|windows>-<arm64|x86_64> "
                                                 f"(e.g. linux-x86_64), got {quote(key)}")
        reason = relpath.escape_reason(spec["artifact"])
        if reason:
            raise fail(file, ["platforms", key, "artifact"], f"{quote(spec['artifact'])} {reason}")
    return {k: dict(v) for k, v in sorted(table.items())}


def host_platform() -> str:
    """This machine as a platform key (``linux-x86_64``, ``darwin-arm64``...)."""
    return f"{_platform.system().lower()}-{host_arch()}"


def platform_targets(platforms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One native target per platform, its artifact pinned by digest."""
    return {key: {"runtime": "source", "driver": "native", "entrypoint": relpath.normalize(spec["artifact"]),
                  "digest": f"sha256:{spec['sha256']}"} for key, spec in sorted(platforms.items())}
