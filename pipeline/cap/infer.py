"""Inference for ``cap init``: a first capability.json from what the package already says.

A package usually already names itself (package.json), its executables
(package.json ``bin``, or ``bin/``), its skills (SKILL.md frontmatter) and its MCP
servers (``.mcp.json``). Init copies those facts instead of asking for them again,
and adds ``<bin> --help`` as the default safe trial. Facts it cannot find stay
empty so review names them, rather than being invented.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cap.manifest import BACKEND_LOCAL, SCHEMA_ID, clean_rel, io_error
from pipeline.cap.review import ID_RE, SUMMARY_MAX
from pipeline.cap.skills import find_skills, read_skill
from pipeline.errors import E_MANIFEST, AtoError

DEFAULT_VERSION = "0.1.0"
HELP_TRIAL = "Print help without reading credentials or changing state."
_BIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Inferred:
    """Where each inferred fact came from, for the init report."""

    package_json: bool = False
    bins: dict[str, str] = field(default_factory=dict)
    skills: list[str] = field(default_factory=list)
    mcp_servers: list[str] = field(default_factory=list)
    mcp_tools: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"packageJson": self.package_json, "bins": dict(self.bins), "skills": list(self.skills),
                "mcpServers": list(self.mcp_servers), "mcpTools": list(self.mcp_tools)}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; a broken file is an error, not a silent skip."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AtoError(E_MANIFEST, f"{path}: not valid JSON: {exc}", details={"file": str(path)}) from None
    except OSError as exc:
        raise io_error(path, "read", exc) from None
    if not isinstance(doc, dict):
        raise AtoError(E_MANIFEST, f"{path}: expected a JSON object", details={"file": str(path)})
    return doc


def id_from_package_name(name: object) -> str | None:
    """``@acme/my-tool`` is ``acme/my-tool``; an unscoped name has no namespace to offer."""
    if isinstance(name, str) and name.startswith("@") and "/" in name:
        return name[1:]
    return None


def display_name(package_id: str) -> str:
    """``acme/my-tool`` reads as ``My Tool``."""
    words = re.split(r"[-_.]+", package_id.rpartition("/")[2])
    return " ".join(w[:1].upper() + w[1:] for w in words if w)


def bins_from_package_json(pkg: dict[str, Any], fallback_name: str) -> dict[str, str]:
    """package.json ``bin`` in its string form (named after the package) or object form."""
    raw = pkg.get("bin")
    if isinstance(raw, str) and raw:
        name = str(pkg.get("name") or fallback_name).rpartition("/")[2]
        return {name: clean_rel(raw)}
    if isinstance(raw, dict):
        return {k: clean_rel(v) for k, v in raw.items() if isinstance(v, str) and v and _BIN_NAME.match(k)}
    return {}


def bins_from_bin_dir(package_dir: Path) -> dict[str, str]:
    """Executable files directly under ``bin/``, named by their stem."""
    bin_dir = package_dir / "bin"
    if not bin_dir.is_dir():
        return {}
    out = {}
    for p in sorted(bin_dir.iterdir()):
        if p.is_file() and os.access(p, os.X_OK) and _BIN_NAME.match(p.stem):
            out.setdefault(p.stem, f"bin/{p.name}")
    return out


def mcp_from_config(doc: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """Server names and any tool names listed in ``.mcp.json`` (``mcpServers`` or ``servers``)."""
    servers_doc = (doc or {}).get("mcpServers") or (doc or {}).get("servers") or {}
    if not isinstance(servers_doc, dict):
        return [], []
    tools: list[str] = []
    for entry in servers_doc.values():
        listed = entry.get("tools", []) if isinstance(entry, dict) else []
        for t in listed if isinstance(listed, list) else []:
            name = t if isinstance(t, str) else t.get("name") if isinstance(t, dict) else None
            if isinstance(name, str) and name not in tools:
                tools.append(name)
    return list(servers_doc), tools


def infer_manifest(package_dir: Path, package_id: str | None) -> tuple[dict[str, Any], Inferred]:
    """Build a cap-manifest.v0 document for the package in ``package_dir``."""
    pkg = _read_json(package_dir / "package.json")
    info = Inferred(package_json=pkg is not None)
    pkg = pkg or {}
    package_id = package_id or id_from_package_name(pkg.get("name"))
    if not package_id or not ID_RE.match(package_id):
        raise AtoError(E_MANIFEST, 'Package id must look like "namespace/name"',
                       details={"id": package_id}, hint="pass it: cap init namespace/name")

    info.skills = find_skills(package_dir)
    skill_meta = [read_skill(package_dir / s) or {} for s in info.skills]
    skill_descriptions = [m["description"] for m in skill_meta if m.get("description")]
    description = pkg.get("description") if isinstance(pkg.get("description"), str) else ""
    summary = (description.strip().splitlines() or skill_descriptions[:1] or [""])[0].strip()[:SUMMARY_MAX]
    info.bins = bins_from_package_json(pkg, package_id) or bins_from_bin_dir(package_dir)
    info.mcp_servers, info.mcp_tools = mcp_from_config(_read_json(package_dir / ".mcp.json"))
    keywords = pkg.get("keywords")

    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "id": package_id,
        "name": display_name(package_id),
        "version": pkg.get("version") if isinstance(pkg.get("version"), str) else DEFAULT_VERSION,
        "kind": "local-tool",
        "summary": summary,
    }
    if description.strip() and description.strip() != summary:
        doc["description"] = description.strip()
    doc["keywords"] = [k for k in keywords if isinstance(k, str)] if isinstance(keywords, list) else []
    doc["tasks"] = list(dict.fromkeys(skill_descriptions)) or ([summary] if summary else [])
    doc["commands"] = [{"name": n, "path": p, "safeArgs": ["--help"]} for n, p in info.bins.items()]
    doc["safeTrials"] = [{"command": f"{n} --help", "writes": [], "network": [], "description": HELP_TRIAL}
                         for n in info.bins]
    doc["install"] = {"backend": BACKEND_LOCAL, "source": {"path": "."}, "bins": dict(info.bins)}
    doc["permissions"] = {"filesystem": ["workspace:read"], "network": [], "secrets": [], "env": [], "spend": []}
    if len(info.skills) == 1:
        doc["skill"] = info.skills[0]
    elif info.skills:
        doc["skills"] = list(info.skills)
    if info.mcp_servers or info.mcp_tools:
        doc["mcp"] = {"servers": info.mcp_servers, "tools": info.mcp_tools}
    return doc, info
