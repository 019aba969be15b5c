"""capability.json: read the file, check its shape, normalize it into one typed model.

The manifest allows several spellings of the same fact (tasks in three places, bins
in ``commands`` and ``install.bins``, the source at the top level or under
``install``). Everything downstream (review, compile, trials) reads the normalized
:class:`CapManifest`, so each rule is written once against one spelling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import nesting
from pipeline.envelope import validation_errors
from pipeline.errors import E_MANIFEST, AtoError

SCHEMA_ID = "cap-manifest.v0"
SCHEMA_NAME = "cap-manifest"
DEFAULT_MANIFEST = "capability.json"

BACKEND_LOCAL = "local-bin"
BACKEND_URL = "single-file-url"
BACKENDS = (BACKEND_LOCAL, BACKEND_URL)

# File-level situations have their own codes, like ato's CAPSULE_TOML_NOT_FOUND.
E_CAP_MANIFEST_NOT_FOUND = "CAP_MANIFEST_NOT_FOUND"
E_CAP_MANIFEST_EXISTS = "CAP_MANIFEST_EXISTS"
E_CAP_IO = "CAP_IO"  # a manifest or registry file that cannot be read or written


def io_error(path: Path, action: str, exc: OSError) -> AtoError:
    """A filesystem failure as a one-line user error (permissions, a directory in the way, a full disk)."""
    return AtoError(E_CAP_IO, f"{path}: cannot {action}: {exc.strerror or exc}", details={"file": str(path)})


@dataclass(frozen=True)
class Trial:
    """One declared safe trial: a command line that must not write or reach the network."""

    command: str
    writes: list[str]
    network: list[str]
    description: str | None


@dataclass
class CapManifest:
    """The normalized manifest; ``raw`` keeps the document as written."""

    path: Path
    raw: dict[str, Any]
    id: str
    name: str
    version: str
    kind: str
    summary: str
    description: str
    keywords: list[str]
    tasks: list[str]
    commands: list[dict[str, Any]]
    bins: dict[str, str]
    bin_conflicts: list[str]
    trials: list[Trial]
    backend: str
    source_path: str
    source_url: str | None
    source_sha256: str | None
    permissions: dict[str, list[str]]
    skills: list[str]
    mcp_servers: list[str]
    mcp_tools: list[str]
    structured_output: bool | None
    publisher: dict[str, Any] | None
    pricing: Any = None

    @property
    def has_pricing(self) -> bool:
        """Pricing metadata is declared (it is shown, but nothing enforces it locally yet)."""
        return self.pricing not in (None, {}, [], "")

    @property
    def package_dir(self) -> Path:
        """The directory the manifest lives in; relative manifest paths start here."""
        return self.path.parent

    @property
    def source_dir(self) -> Path:
        """Where local-bin files live: ``install.source.path`` resolved from the manifest dir."""
        return (self.package_dir / self.source_path).resolve()


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse the manifest JSON; missing or unparsable files are user errors, not tracebacks."""
    if not path.is_file():
        raise AtoError(
            E_CAP_MANIFEST_NOT_FOUND, f"Manifest not found: {path}",
            details={"file": str(path)}, hint="run `cap init namespace/name` or pass --manifest",
        )
    try:
        doc = nesting.loads_json(path.read_text("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise AtoError(E_MANIFEST, f"{path}: not UTF-8 text: {exc.reason}", details={"file": str(path)}) from None
    except OSError as exc:
        raise io_error(path, "read the manifest", exc) from None
    except json.JSONDecodeError as exc:
        raise AtoError(
            E_MANIFEST, f"{path}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}",
            details={"file": str(path)},
        ) from None
    if not isinstance(doc, dict):
        raise AtoError(E_MANIFEST, f"{path}: the manifest must be a JSON object", details={"file": str(path)})
    return doc


def shape_problems(doc: dict[str, Any]) -> list[str]:
    """Schema violations of the raw document (empty when the shape is right)."""
    return validation_errors(doc, SCHEMA_NAME)


def load(path: Path) -> CapManifest:
    """Read, shape-check and normalize; a wrong shape is an E002 naming the key."""
    doc = read_manifest(path)
    problems = shape_problems(doc)
    if problems:
        raise AtoError(E_MANIFEST, f"{path}: {problems[0]}", details={"file": str(path), "problems": problems})
    return normalize(path, doc)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def clean_rel(path: str) -> str:
    """``./bin/x`` and ``bin/x`` name the same file; keep one spelling."""
    while path.startswith("./"):
        path = path[2:]
    return path


def _bins(doc: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Bins from ``commands[].path`` and ``install.bins``; a name with two paths is a conflict."""
    bins: dict[str, str] = {}
    conflicts: list[str] = []
    declared = [(c["name"], c.get("path")) for c in doc.get("commands", [])]
    declared += list(doc.get("install", {}).get("bins", {}).items())
    for name, path in declared:
        if path is None:
            bins.setdefault(name, name)
            continue
        path = clean_rel(path)
        if name in bins and bins[name] != path and bins[name] != name:
            conflicts.append(name)
        else:
            bins[name] = path
    return bins, _dedupe(conflicts)


def normalize(path: Path, doc: dict[str, Any]) -> CapManifest:
    """Fold the manifest's alternative spellings into one model (``doc`` must have a valid shape)."""
    install = doc.get("install", {})
    source = {**doc.get("source", {}), **install.get("source", {})}
    backend = install.get("backend") or (BACKEND_URL if source.get("url") else BACKEND_LOCAL)
    bins, conflicts = _bins(doc)
    tasks = doc.get("tasks", []) + doc.get("bestFor", []) + doc.get("capabilityCard", {}).get("bestFor", [])
    skills = ([doc["skill"]] if "skill" in doc else []) + doc.get("skills", [])
    mcp = doc.get("mcp", {})
    tools = [t if isinstance(t, str) else t["name"] for t in mcp.get("tools", [])]
    trials = [
        Trial(t["command"], list(t.get("writes", [])), list(t.get("network", [])), t.get("description"))
        for t in doc.get("safeTrials", [])
    ]
    return CapManifest(
        path=path.absolute(),
        raw=doc,
        id=doc.get("id", ""),
        name=doc.get("name") or doc.get("id", "").rpartition("/")[2],
        version=doc.get("version", ""),
        kind=doc.get("kind", "local-tool"),
        summary=doc.get("summary", ""),
        description=doc.get("description", ""),
        keywords=list(doc.get("keywords", [])),
        tasks=_dedupe([t.strip() for t in tasks if t.strip()]),
        commands=[{**c, "path": clean_rel(c["path"])} if "path" in c else dict(c)
                  for c in doc.get("commands", [])],
        bins=bins,
        bin_conflicts=conflicts,
        trials=trials,
        backend=backend,
        source_path=clean_rel(source.get("path", ".")) or ".",
        source_url=source.get("url"),
        source_sha256=source.get("sha256"),
        permissions={k: list(v) for k, v in doc.get("permissions", {}).items()},
        skills=_dedupe([clean_rel(s) for s in skills]),
        mcp_servers=list(mcp.get("servers", [])),
        mcp_tools=tools,
        structured_output=doc.get("structuredOutput"),
        publisher=doc.get("publisher"),
        pricing=doc.get("pricing"),
    )
