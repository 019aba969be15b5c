"""Requirements: what a capsule needs from the host before it can run, derived from capsule.toml.

This is the contract ``ato inspect requirements`` prints (seed 000): capsule.toml
is the only source. Env keys come from every target's ``required_env`` (and the
legacy ``ATO_ORCH_REQUIRED_ENVS``) plus ``isolation.allow_env``; secret-looking keys
go to ``secrets``; ``[state]``, ``[network]`` and ``[services]`` map one to one; consent
lists what the user will be asked to approve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import E_NOT_FOUND, AtoError
from pipeline.manifest.ipc import check_document, read_ipc
from pipeline.manifest.model import Manifest
from pipeline.manifest.reader import MANIFEST_NAME, load_manifest
from pipeline.manifest.secrets import is_secret

SCHEMA_VERSION = "1"
TARGET_NOT_FOUND = "TARGET_NOT_FOUND"
_REMOTE_REF = re.compile(r"^@?[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^/\s]+)?$")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def derive(manifest: Manifest) -> dict[str, list[dict[str, Any]]]:
    """The six requirement lists, each sorted by key so the output is stable."""
    secrets, env = _env_items(manifest)
    state = sorted([_state_item(key, spec) for key, spec in manifest.state.items()] + _dependency_state(manifest),
                   key=lambda item: item["key"])
    network = _network_items(manifest.network)
    services = _service_items(manifest)
    consent = []
    if network:
        consent.append({"key": "network.egress", "required": True,
                        "description": "Requires consent for outbound network access"})
    if state:
        consent.append({"key": "filesystem.write", "required": True,
                        "description": "Writes files to bound application state"})
    if secrets:
        consent.append({"key": "secrets.access", "required": True,
                        "description": "Requires secret provisioning before launch"})
    return {"secrets": secrets, "state": state, "env": env, "network": network, "services": services,
            "consent": consent}


def inspect_local(raw_input: str, cwd: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """The ``inspect requirements`` document for a local path (dir or capsule.toml file), and the
    manifest's warnings (kept out of the document, whose shape is fixed by seed 000)."""
    base = cwd or Path.cwd()
    if not looks_local(raw_input, base):
        raise AtoError(TARGET_NOT_FOUND,
                       "Could not resolve target: remote refs (publisher/slug) need the registry client, which is "
                       "not available yet; pass a local project path",
                       details={"input": raw_input, "reason": f"Remote ref is not supported yet: {raw_input}"})
    candidate = (base / Path(raw_input).expanduser())
    if not candidate.exists():
        raise AtoError(TARGET_NOT_FOUND, f"Could not resolve target: local path does not exist: {raw_input}",
                       details={"input": raw_input, "reason": f"Local path does not exist: {candidate}"})
    resolved = candidate.resolve()
    manifest_path = resolved if resolved.is_file() else resolved / MANIFEST_NAME
    if not manifest_path.is_file():
        raise AtoError(E_NOT_FOUND, "capsule.toml was not found",
                       details={"input": raw_input, "reason": f"Expected manifest at {manifest_path}"},
                       hint=f"expected {manifest_path}")
    try:
        manifest = load_manifest(manifest_path)
        # [ipc]: refused with upstream's IPC-00x codes here too (as by ato validate, build and run)
        ipc_warnings = [f"[{f.code}] {f.message} (at {f.location})"
                        for f in check_document(manifest.raw, manifest.project_dir, str(manifest_path),
                                                store_dir=paths.store_dir())]
    except AtoError as err:
        err.details = {"input": raw_input, **err.details}
        raise
    doc = {
        "schemaVersion": SCHEMA_VERSION,
        "target": {"input": raw_input, "kind": "local", "resolved": {"path": str(resolved)}},
        "requirements": derive(manifest),
    }
    return doc, list(manifest.warnings) + ipc_warnings


def looks_local(raw_input: str, base: Path) -> bool:
    """A path when it exists or is spelled like one; ``publisher/slug`` otherwise."""
    if (base / Path(raw_input).expanduser()).exists():
        return True
    if raw_input.startswith((".", "/", "~", "\\")) or _DRIVE.match(raw_input):
        return True
    if raw_input.endswith((".capsule", ".toml")):
        return True
    return not _REMOTE_REF.match(raw_input)


def _env_items(manifest: Manifest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Required env of every target, the top-level required_env (the scope of {{env.X}} in
    [dependencies]) and isolation.allow_env; secret-looking or declared-secret names go to secrets."""
    required: dict[str, set[str]] = {}
    declared_secret: set[str] = set()
    optional: set[str] = set()
    for label, target in manifest.all_targets().items():
        for key in target.required_env:
            required.setdefault(key, set()).add(label)
        declared_secret.update(target.secret_env)
        optional.update(target.optional_env)
    credential_env = {key: alias for alias, dep in manifest.dependencies.items() for key in dep.credential_env()}
    scope = [k for k in manifest.required_env if k not in required]
    allowed = [k.strip() for k in manifest.isolation.get("allow_env", []) if k.strip()]
    secrets: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    for key in sorted(set(required) | set(scope) | set(allowed) | optional):
        if key in required:
            item = {"key": key, "required": True,
                    "description": f"Required environment variable for target(s): {', '.join(sorted(required[key]))}"}
        elif key in credential_env:
            item = {"key": key, "required": True,
                    "description": f"Required for the credentials of dependency '{credential_env[key]}'"}
        elif key in scope:
            item = {"key": key, "required": True, "description": "Required environment variable (top-level "
                                                                 "required_env)"}
        elif key in optional:
            item = {"key": key, "required": False, "description": "Optional setting declared by the manifest"}
        else:
            item = {"key": key, "required": False, "description": "Optional host environment variable passthrough"}
        (secrets if is_secret(key) or key in declared_secret else env).append(item)
    return secrets, env


def _dependency_state(manifest: Manifest) -> list[dict[str, Any]]:
    """The provider state each dependency's consumer owns (``[dependencies.<alias>.state]``)."""
    return [{"key": f"{alias}/{dep.state}", "required": True, "kind": "filesystem", "durability": "persistent",
             "attach": "auto", "purpose": f"State of dependency '{alias}' ({dep.capsule}), owned by this capsule"}
            for alias, dep in sorted(manifest.dependencies.items()) if dep.state]


def _state_item(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"key": key, "required": True, "kind": spec.get("kind", "filesystem"),
                            "durability": spec["durability"], "attach": spec.get("attach", "auto")}
    if spec.get("purpose"):
        item["purpose"] = spec["purpose"]
    if spec.get("schema_id"):
        item["schemaId"] = spec["schema_id"]
    return item


def _network_items(network: dict[str, Any]) -> list[dict[str, Any]]:
    hosts = sorted({h.strip() for h in network.get("egress_allow", []) if h.strip()})
    identities = sorted({(i["type"], i["value"].strip()) for i in network.get("egress_id_allow", [])
                         if i["value"].strip()})
    if not hosts and not identities:
        return []
    item: dict[str, Any] = {"key": "external-network", "required": True,
                            "description": "Requires outbound network access"}
    if hosts:
        item["hosts"] = hosts
    if identities:
        item["identities"] = [{"type": t, "value": v} for t, v in identities]
    return [item]


def _service_items(manifest: Manifest) -> list[dict[str, Any]]:
    """``[services]`` entries, then each dependency (a provider capsule that must be running)."""
    primary = manifest.lifecycle_run or "main"
    out = []
    for name, service in sorted(manifest.services.items()):
        if name == primary:
            description = "Primary runtime service"
        elif service.target:
            description = f"Service declared in capsule.toml targeting '{service.target}'"
        else:
            description = "Service declared in capsule.toml"
        item: dict[str, Any] = {"key": name, "required": True, "description": description}
        if service.target:
            item["target"] = service.target
        if service.depends_on:
            item["dependsOn"] = list(service.depends_on)
        out.append(item)
    for alias, imp in sorted(read_ipc(manifest.raw, []).imports.items()):
        out.append({"key": alias, "required": not imp.optional,
                    "description": f"IPC import of {imp.source} through the broker (started before the capsule)"})
    for alias, dep in sorted(manifest.dependencies.items()):
        needed_by = sorted(label for label, t in manifest.targets.items() if alias in t.needs)
        description = f"Dependency {dep.capsule} offering {dep.contract}"
        if needed_by:
            description += f", needed by target(s): {', '.join(needed_by)}"
        out.append({"key": alias, "required": True, "description": description})
    return sorted(out, key=lambda item: item["key"])
