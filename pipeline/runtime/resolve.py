"""What ``ato run <input>`` names: a project dir, a capsule.toml, a ``.capsule`` file, or publisher/slug.

A ``.capsule`` (given directly, or the one ``ato install`` stored) is verified and
unpacked (:mod:`pipeline.runtime.unpack`); a publisher/slug that is not installed is installed
first through the install stage. With ``--registry`` the installed copy runs when it is
byte-identical to the registry's release; otherwise that release is installed first.
Runtime-config overrides saved in the registry UI (per-target env, port,
permission mode) come along with a registry resolution.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config, names, paths
from pipeline.errors import E_NOT_FOUND, E_USAGE, AtoError, http_error, network_error
from pipeline.manifest import MANIFEST_NAME, Manifest, load_manifest

SCOPED_REF = re.compile(r"^@?([a-z0-9][a-z0-9._-]*)/([a-z0-9][a-z0-9._-]*)(?:@([^/\s]+))?$", re.IGNORECASE)


@dataclass
class Overrides:
    """Runtime config saved in the registry UI for one target."""

    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    permission_mode: str | None = None  # sandbox | dangerous


@dataclass
class Resolved:
    kind: str  # local | artifact | installed
    input: str
    project_dir: Path
    manifest: Manifest
    scoped_id: str | None = None
    artifact: Path | None = None
    registry: str | None = None
    overrides_by_target: dict[str, Overrides] = field(default_factory=dict)
    selected_target: str | None = None  # chosen in the registry UI; an explicit --target wins
    installed_now: bool = False

    def overrides(self, label: str) -> Overrides:
        return self.overrides_by_target.get(label) or self.overrides_by_target.get("*") or Overrides()


def looks_local(raw: str, cwd: Path) -> bool:
    if raw.startswith((".", "/", "~")) or raw.endswith(".capsule") or raw.endswith(MANIFEST_NAME):
        return True
    return (cwd / raw).exists() or not SCOPED_REF.match(raw)


def resolve(raw: str, *, registry: str | None = None, cwd: Path | None = None,
            confirm_install: Any = None) -> Resolved:
    """Resolve ``raw``; ``confirm_install(scoped_id, registry, other_version_installed)`` is asked before a
    registry install."""
    base = cwd or Path.cwd()
    if looks_local(raw, base):
        path = (base / Path(raw).expanduser()).resolve()
        if not path.exists():
            raise AtoError("TARGET_NOT_FOUND", f"{raw} does not exist", details={"input": raw})
        if path.is_file() and path.suffix == ".capsule":
            return _from_artifact(raw, path, "artifact")
        manifest = load_manifest(path)
        return Resolved("local", raw, manifest.project_dir, manifest)
    match = SCOPED_REF.match(raw)
    assert match is not None
    publisher, slug, version = match.group(1).lower(), match.group(2).lower(), match.group(3)
    scoped = f"{publisher}/{slug}"
    if registry:
        # the installed copy runs when it is exactly what the registry publishes (no download, no consent)
        from pipeline.registry.client import RegistryClient
        from stages.install import installed_release

        artifact = installed_release(scoped, registry, version, connect=RegistryClient,
                                     token=os.environ.get("ATO_TOKEN"))
    else:
        artifact = installed_artifact(publisher, slug, version)
    installed_now = False
    if artifact is None:
        reg = registry or str(config.registry().value)
        if confirm_install is not None:
            confirm_install(scoped, reg, installed_artifact(publisher, slug, version) is not None)
        artifact = install_from_registry(scoped, reg, version)
        installed_now = True
    # install_from_registry ran the trust check on exactly these bytes: no second pass.
    resolved = _from_artifact(raw, artifact, "installed", verified=installed_now)
    resolved.scoped_id = scoped
    resolved.installed_now = installed_now
    if registry:
        resolved.registry = registry
        doc = fetch_runtime_config(registry, publisher, slug)
        resolved.overrides_by_target = parse_runtime_config(doc)
        selected = doc.get("selected_target") if isinstance(doc, dict) else None
        resolved.selected_target = selected if isinstance(selected, str) and selected.strip() else None
    return resolved


def _from_artifact(raw: str, artifact: Path, kind: str, *, verified: bool = False) -> Resolved:
    from pipeline.runtime.unpack import unpack_capsule
    from pipeline.trust import gate
    from stages.capsule import verify

    verdict = verify(artifact, gate.port().limits)  # once: the gate, the native check and the unpack share it
    if not verified:
        trust_gate(artifact, verdict)
    refuse_native_verdict(verdict)
    project_dir, _summary = unpack_capsule(artifact, gate.port().limits, verdict)
    manifest = load_manifest(project_dir)
    return Resolved(kind, raw, project_dir, manifest, artifact=artifact)


def trust_gate(artifact: Path, verdict: Any = None) -> None:
    """THE call site for trust verification before an artifact runs (issue 6 fills this in).

    Every ``.capsule`` that ``ato run`` executes — given as a file or installed from a
    registry — passes through here exactly once, before it is unpacked. Raise an
    AtoError to refuse it. ``verdict``: the caller's :func:`stages.capsule.verify` of ``artifact``, decided
    on instead of reading the file again.
    """
    from pipeline.trust import gate  # imported here: only runs of artifacts pay for the trust stack

    gate.verify_before_run(artifact, verdict=verdict)  # fail closed: no trust module, no run


def installed_artifact(publisher: str, slug: str, version: str | None) -> Path | None:
    """The stored ``.capsule`` of an installed capsule (the highest version unless one is named)."""
    root = paths.store_dir() / publisher / slug
    if not root.is_dir():
        return None
    versions = [version] if version else sorted((p.name for p in root.iterdir() if p.is_dir()),
                                                 key=names.version_key, reverse=True)
    for ver in versions:
        candidate = root / ver / f"{slug}-{ver}.capsule"
        if candidate.is_file():
            return candidate
        found = sorted((root / ver).glob("*.capsule")) if (root / ver).is_dir() else []
        if found:
            return found[0]
    return None


def install_from_registry(scoped_id: str, registry: str, version: str | None) -> Path:
    """Install through the install stage (the same one ``ato install`` uses) and return the stored ``.capsule``.

    The download is verified (digests, signature, trust decision) before it is stored, and
    the stored artifact then goes through :func:`trust_gate` like every other artifact that runs.
    """
    from pipeline.registry.client import RegistryClient
    from pipeline.trust import gate
    from stages.install import install
    from stages.trust_port import GatedPort

    port = gate.port()
    # The same check as `ato install`: nothing unverified lands in the store, and no native app either
    # (it needs `ato install`'s local finalize, and run would not launch it).
    envelope = install(scoped_id, registry, version, connect=RegistryClient, token=os.environ.get("ATO_TOKEN"),
                       trust=GatedPort(port, lambda verdict: refuse_native_verdict(verdict, scoped_id)))
    path = _installed_path(envelope)
    if path is None:
        publisher, slug = scoped_id.split("/", 1)
        found = installed_artifact(publisher, slug, version)
        path = str(found) if found else None
    if path is None or not Path(path).is_file():
        raise AtoError(E_NOT_FOUND, f"install of {scoped_id} did not leave a runnable .capsule",
                       details={"scoped_id": scoped_id})
    return Path(path)


def refuse_native(artifact: Path, limits: Any = None, scoped_id: str | None = None) -> None:
    """``ato run`` does not launch a native app's ``.capsule``: it runs from its locally derived copy."""
    from stages.capsule import Limits, verify

    refuse_native_verdict(verify(Path(artifact), limits or Limits()), scoped_id)


def refuse_native_verdict(verdict: Any, scoped_id: str | None = None) -> None:
    """:func:`refuse_native` on the complete verdict of an artifact just verified (not read again)."""
    from pipeline.native_delivery import verdict_delivery

    artifact = verdict.path
    if verdict_delivery(verdict) is not None:
        ref = scoped_id or str(artifact)
        raise AtoError(E_USAGE, f"{ref} is a native app: it runs from its locally finalized copy, not from the "
                                ".capsule", hint=f"install it with `ato install {ref} --yes` and launch it from its "
                                                 "projection (the install's launchable.path)",
                       details={"artifact": str(artifact)})


def _installed_path(envelope: Any) -> str | None:
    if not isinstance(envelope, dict):
        return None
    launchable = envelope.get("launchable") or {}
    if isinstance(launchable, dict):
        archive = launchable.get("CapsuleArchive")
        if isinstance(archive, dict) and archive.get("path"):
            return str(archive["path"])
        if launchable.get("DerivedApp"):
            raise AtoError(E_USAGE, "this capsule installs as a native app; launch it from its projection",
                           details={"launchable": launchable})
    path = envelope.get("path")
    return str(path) if isinstance(path, str) and path.endswith(".capsule") else None


def fetch_runtime_config(registry: str, publisher: str, slug: str) -> dict[str, Any]:
    """``GET /v1/local/capsules/by/{p}/{s}/runtime-config`` -> per-target overrides ({} when none)."""
    import httpx

    url = f"{registry.rstrip('/')}/v1/local/capsules/by/{publisher}/{slug}/runtime-config"
    headers = {}
    token = os.environ.get("ATO_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = httpx.get(url, headers=headers, timeout=15)
    except httpx.HTTPError as exc:
        raise network_error(url, exc) from None
    if resp.status_code == 404:
        return {}
    if resp.status_code != 200:
        raise http_error(url, resp.status_code, "the runtime-config request")
    try:
        doc = resp.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_runtime_config(doc: Any) -> dict[str, Overrides]:
    """Accept ``{"targets": {label: cfg}}``, ``{label: cfg}`` or one ``cfg`` for every target (``"*"``)."""
    if not isinstance(doc, dict):
        return {}
    if isinstance(doc.get("runtime_config"), dict):
        doc = doc["runtime_config"]
    table = doc.get("targets") if isinstance(doc.get("targets"), dict) else None
    if table is None:
        if any(k in doc for k in ("env", "port", "permission_mode")):
            table = {"*": doc}
        else:
            table = {k: v for k, v in doc.items() if isinstance(v, dict)}
    out: dict[str, Overrides] = {}
    for label, cfg in table.items():
        if not isinstance(cfg, dict):
            continue
        env = {str(k): str(v) for k, v in (cfg.get("env") or {}).items()} if isinstance(cfg.get("env"), dict) \
            else {}
        port = cfg.get("port")
        port = int(port) if isinstance(port, int | str) and str(port).isdigit() and 0 < int(port) < 65536 else None
        mode = cfg.get("permission_mode")
        out[str(label)] = Overrides(env=env, port=port,
                                    permission_mode=mode if mode in ("sandbox", "dangerous") else None)
    return out
