"""Compile a manifest into the registry's package entry, its capability card and install plan.

Preview and publish both call :func:`compile_package`, so what preview shows is
byte for byte what publish writes. Source paths are written relative to the
registry file's directory so a checked-in registry stays valid on every clone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.cap import registry as reg
from pipeline.cap.bins import file_digests, package_digest
from pipeline.cap.manifest import BACKEND_LOCAL, BACKEND_URL, CapManifest
from pipeline.cap.review import Review, review

PERMISSION_KINDS = ("filesystem", "network", "secrets", "env", "spend")
PREVIEW_SCHEMA = "cap-preview.v0"


def source_for(m: CapManifest, registry: Path) -> dict[str, Any]:
    """The install source as the registry records it."""
    if m.backend == BACKEND_URL:
        return {"url": m.source_url, "sha256": m.source_sha256}
    rel = os.path.relpath(m.source_dir, registry.parent.resolve())
    return {"path": Path(rel).as_posix()}


def capability_card(m: CapManifest) -> dict[str, Any]:
    """What an agent reads to decide whether to use the package.

    The publisher's ``verified`` claim is not carried over: namespace verification
    does not exist locally yet, so the card never says a publisher is verified.
    """
    permissions = {k: [] for k in PERMISSION_KINDS} | m.permissions
    return {
        "id": m.id,
        "name": m.name,
        "version": m.version,
        "summary": m.summary,
        "bestFor": list(m.tasks),
        "commands": sorted(m.bins),
        "safeTrials": [t.command for t in m.trials],
        "permissions": permissions,
        "skills": list(m.skills),
        "mcpTools": list(m.mcp_tools),
        "structuredOutput": m.structured_output is True,
        "publisher": {"identity": (m.publisher or {}).get("identity"), "verified": False},
    }


def publisher_entry(m: CapManifest) -> dict[str, Any] | None:
    """The publisher as the registry records it: the claimed identity and method, and ``verified``
    always false. Namespace verification does not exist locally, so a manifest's own
    ``"verified": true`` is kept only as ``claimedVerified``, never as verified."""
    if not isinstance(m.publisher, dict):
        return None
    claimed = {k: v for k in ("identity", "method") if isinstance(v := m.publisher.get(k), str)}
    return {**claimed, "verified": False, "claimedVerified": m.publisher.get("verified") is True}


def install_plan(m: CapManifest, source: dict[str, Any], files: dict[str, str] | None) -> dict[str, Any]:
    """The steps an installer would take; nothing here is executed."""
    steps: list[dict[str, Any]] = []
    if m.backend == BACKEND_LOCAL:
        steps = [{"action": "link-bin", "bin": name, "path": path, "target": f"$CAP_HOME/bin/{name}",
                  "sha256": (files or {}).get(path)} for name, path in sorted(m.bins.items())]
    elif m.backend == BACKEND_URL:
        steps = [{"action": "download", "url": m.source_url},
                 {"action": "verify-sha256", "sha256": m.source_sha256}]
        steps += [{"action": "install-bin", "bin": name, "target": f"$CAP_HOME/bin/{name}", "mode": "0755"}
                  for name in sorted(m.bins)]
    return {"backend": m.backend, "network": m.backend == BACKEND_URL, "source": source, "steps": steps}


def compile_package(m: CapManifest, registry: Path, rv: Review) -> dict[str, Any]:
    """The registry entry for ``m``: normalized metadata, digests, card, install plan, review record."""
    files = file_digests(m)
    source = source_for(m, registry)
    card = capability_card(m)
    package: dict[str, Any] = {
        "id": m.id,
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "summary": m.summary,
        "description": m.description,
        "keywords": list(m.keywords),
        "tasks": list(m.tasks),
        "commands": [dict(c) for c in m.commands],
        "safeTrials": [{"command": t.command, "writes": t.writes, "network": t.network}
                       | ({"description": t.description} if t.description else {}) for t in m.trials],
        "install": {"backend": m.backend, "source": source, "bins": dict(sorted(m.bins.items()))},
        "digest": package_digest(m, files),
        "files": files or {},
        "permissions": card["permissions"],
        "skills": list(m.skills),
        "mcp": {"servers": list(m.mcp_servers), "tools": list(m.mcp_tools)},
        "structuredOutput": m.structured_output is True,
        "publisher": publisher_entry(m),
        "capabilityCard": card,
        "installPlan": install_plan(m, source, files),
        "review": rv.record(),
    }
    if m.has_pricing:
        package["pricing"] = m.pricing
    return package


def registry_status(m: CapManifest, registry: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Whether the registry already holds this id@version, and the warning to show if so."""
    present = reg.find(reg.read(registry), m.id, m.version) is not None
    status = {"path": str(registry), "exists": registry.is_file(), "present": present}
    warnings = [{"id": "registry.present", "severity": "warning",
                 "message": f"Same id@version already present: {m.id}@{m.version} (publish needs --force)"}]
    return status, warnings if present else []


def preview(m: CapManifest, registry: Path) -> dict[str, Any]:
    """The ``cap preview`` document: the compiled package and its parts, nothing written."""
    rv = review(m)
    package = compile_package(m, registry, rv)
    status, extra = registry_status(m, registry)
    return {
        "schema": PREVIEW_SCHEMA,
        "manifest": str(m.path),
        "registry": status,
        "package": package,
        "summary": {
            "id": m.id, "name": m.name, "version": m.version, "summary": m.summary,
            "backend": m.backend, "bins": sorted(m.bins), "trials": len(m.trials),
            "skills": len(m.skills), "mcpTools": len(m.mcp_tools), "digest": package["digest"],
        },
        "capabilityCard": package["capabilityCard"],
        "review": package["review"],
        "installPlan": package["installPlan"],
        "warnings": rv.warnings_json() + extra,
        "failures": [c.to_json() for c in rv.failures],
    }
