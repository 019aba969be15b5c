"""The manifest reader: capsule.toml text -> validated :class:`Manifest`.

Three passes, each with errors that name the file and key: TOML syntax (E001),
structure against schemas/capsule-manifest.json (E002 wrong type/value, E003
missing key), then the semantic rules (E002, E101 for entrypoints). The first
failure is raised; nothing downstream ever sees a half-valid manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING, E_NOT_FOUND, AtoError
from pipeline.manifest import delivery as delivery_
from pipeline.manifest import relpath
from pipeline.manifest.keypath import fail, quote
from pipeline.manifest.lifecycle import check_graph, read_services, read_tasks
from pipeline.manifest.model import FORM_02, Manifest, PackRules, Target
from pipeline.manifest.structure import check_structure
from pipeline.manifest.targets import check_target, read_target
from pipeline.manifest.tomlfile import parse_toml, read_text

MANIFEST_NAME = "capsule.toml"
# Keys of [targets] that are settings, not target labels.
RESERVED_TARGET_KEYS = frozenset({"source_digest", "preference"})
# 1.1 route alternatives beside [execution] (seed 003: oci -> wasm -> source).
ROUTE_TARGETS = ("oci", "wasm")


def load_manifest(project_dir: Path) -> Manifest:
    """Read ``<project_dir>/capsule.toml`` (and an ``ato.delivery.toml`` sidecar next to it)."""
    path = project_dir if project_dir.is_file() else project_dir / MANIFEST_NAME
    if not path.is_file():
        raise AtoError(E_NOT_FOUND, f"{MANIFEST_NAME} was not found",
                       details={"path": str(path), "reason": f"Expected manifest at {path}"},
                       hint=f"expected {path}")
    sidecar_path = path.parent / delivery_.SIDECAR_NAME
    sidecar = read_text(sidecar_path) if sidecar_path.is_file() else None
    return parse_manifest(read_text(path), path, sidecar=sidecar)


def parse_manifest(text: str, path: Path, *, sidecar: str | None = None) -> Manifest:
    """Parse and validate manifest ``text``; ``path`` names it in messages (project_dir = its parent).

    ``sidecar`` is the text of an ``ato.delivery.toml`` beside it, if any; reading
    the disk is :func:`load_manifest`'s job, so this stays usable for manifests
    taken out of artifacts or registry responses.
    """
    file = path.name
    raw = parse_toml(text, file)
    check_structure(raw, file)
    return _build(raw, path, sidecar)


def _build(raw: dict[str, Any], path: Path, sidecar: str | None) -> Manifest:
    file = path.name
    warnings: list[str] = []
    version = raw["schema_version"]
    form_02 = version == FORM_02
    if form_02 and "execution" in raw:
        raise fail(file, ["execution"], '[execution] belongs to the schema_version "1.1" form; with "0.2" declare '
                                        "[targets.<label>] and default_target")
    if not form_02 and "default_target" in raw:
        raise fail(file, ["default_target"], f'belongs to the schema_version "0.2" form; with "{version}" the '
                                             "[execution] table is what runs")

    table = raw.get("targets", {})
    fallback_digest = table.get("source_digest")
    targets: dict[str, Target] = {}
    for label in sorted(k for k in table if k not in RESERVED_TARGET_KEYS):
        targets[label] = read_target(label, table[label], ["targets", label], file,
                                     default_runtime=label if label in ROUTE_TARGETS else None,
                                     fallback_digest=fallback_digest, warnings=warnings)
    execution = None
    if not form_02:
        execution = read_target("execution", raw["execution"], ["execution"], file, default_runtime=None,
                                fallback_digest=fallback_digest, warnings=warnings)
    services = read_services(raw.get("services", {}), file, set(targets), warnings)
    tasks = read_tasks(raw.get("tasks", {}), file, warnings)

    default_target = None
    if form_02:
        if not targets:
            raise fail(file, ["targets"], "at least one [targets.<label>] table is required",
                       code=E_MANIFEST_MISSING)
        default_target = raw["default_target"]
        if default_target not in targets:
            raise fail(file, ["default_target"], f"{quote(default_target)} does not exist under [targets] "
                                                 f"(declared: {', '.join(targets)})")
    for label, target in targets.items():
        check_target(target, ["targets", label], file,
                     entrypoint_optional=label == default_target and bool(services),
                     route_alternative=not form_02 and label in ROUTE_TARGETS, warnings=warnings)
    if execution is not None:
        oci = targets.get("oci")
        check_target(execution, ["execution"], file,
                     entrypoint_optional=bool(services) or bool(oci and oci.image) or execution.runtime == "oci",
                     route_alternative=False, warnings=warnings)

    if form_02 and services and "main" not in services:
        raise fail(file, ["services", "main"], "required key is missing (services mode needs a main service; it "
                                               f"receives PORT from targets.{default_target}.port)",
                   code=E_MANIFEST_MISSING)
    check_graph(services, tasks, file)
    lifecycle_run = raw.get("lifecycle", {}).get("run")
    if lifecycle_run is not None and lifecycle_run not in services and lifecycle_run not in tasks:
        raise fail(file, ["lifecycle", "run"], f"{quote(lifecycle_run)} is not a declared service or task "
                                               f"(declared: {', '.join(sorted(set(services) | set(tasks))) or 'none'})")
    pack = _pack(raw.get("pack", {}), file)

    primary = execution if execution is not None else targets[default_target]  # type: ignore[index]
    label = "execution" if execution is not None else default_target
    meta = delivery_.resolve(raw, primary.driver == "native", primary.entrypoint, primary.cmd, str(label), file,
                             sidecar)
    return Manifest(
        path=path, project_dir=path.parent, schema_version=version, name=raw["name"], version=raw["version"],
        type=raw.get("type", "app"), default_target=default_target, targets=targets, execution=execution,
        services=services, tasks=tasks, lifecycle_run=lifecycle_run, pack=pack, delivery=meta,
        metadata=dict(raw.get("metadata", {})), build=dict(raw.get("build", {})),
        isolation=dict(raw.get("isolation", {})), raw=raw, state=dict(raw.get("state", {})),
        network=dict(raw.get("network", {})), warnings=warnings,
    )


def _pack(table: dict[str, Any], file: str) -> PackRules:
    """``[pack]`` patterns are relative globs; an absolute or ``..`` pattern could reach outside the project."""
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("include", "exclude"):
        patterns = table.get(key)
        if patterns is None:
            continue
        if key == "include" and not patterns:
            raise fail(file, ["pack", "include"], "expected at least one pattern (omit include to pack every "
                                                  "file not excluded)")
        for i, pattern in enumerate(patterns):
            if not pattern.strip():
                raise fail(file, ["pack", key, i], "expected a non-empty glob pattern")
            reason = relpath.escape_reason(pattern.strip())
            if reason:
                raise fail(file, ["pack", key, i], f"{quote(pattern)} {reason}")
        lists[key] = tuple(p.strip() for p in patterns)
    return PackRules(include=lists.get("include"), exclude=lists.get("exclude", ()))
