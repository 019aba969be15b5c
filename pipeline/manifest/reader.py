"""The manifest reader: capsule.toml text -> validated :class:`Manifest`, for every generation.

Passes, each with errors that name the file and key: TOML syntax (E001); the
generation (:mod:`generations`: an unsupported schema_version is the headline
error); structure against the generation's schema in ``schemas/`` (E002 wrong
type/value, E003 missing key); keys the schema does not know (warnings, or E002
when strict: :mod:`strictness`); a 0.3 or v1 document is then translated into the
0.2 form (:mod:`v03`, :mod:`v1`) and every generation meets the same semantic
rules (E002, E101 for entrypoints), with errors naming the key as written in the
source. The first failure is raised; nothing downstream ever sees a half-valid
manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING, E_NOT_FOUND, AtoError
from pipeline.manifest import delivery as delivery_
from pipeline.manifest import generations, relpath, strictness, v03, v1
from pipeline.manifest.contracts import read_contracts
from pipeline.manifest.keypath import fail, key_path, quote
from pipeline.manifest.lifecycle import check_graph, read_services, read_tasks
from pipeline.manifest.model import FORM_02, BuildStep, Manifest, PackRules, Target
from pipeline.manifest.origins import Origins
from pipeline.manifest.platforms import check_platforms
from pipeline.manifest.secrets import is_secret
from pipeline.manifest.structure import check_structure
from pipeline.manifest.targets import check_target, read_target
from pipeline.manifest.tomlfile import parse_toml, read_text

MANIFEST_NAME = "capsule.toml"
# Keys of [targets] that are settings, not target labels.
RESERVED_TARGET_KEYS = frozenset({"source_digest", "preference"})
# 1.1 route alternatives beside [execution] (seed 003: oci -> wasm -> source).
ROUTE_TARGETS = ("oci", "wasm")
# In the 1.x form a [targets.source] may omit runtime (the reference ato defaults it to "source").
ROUTE_TARGETS_1X = ROUTE_TARGETS + ("source",)


def load_manifest(project_dir: Path, *, strict: bool | None = None) -> Manifest:
    """Read ``<project_dir>/capsule.toml`` (and an ``ato.delivery.toml`` sidecar next to it)."""
    path = project_dir if project_dir.is_file() else project_dir / MANIFEST_NAME
    if not path.is_file():
        raise AtoError(E_NOT_FOUND, f"{MANIFEST_NAME} was not found",
                       details={"path": str(path), "reason": f"Expected manifest at {path}"},
                       hint=f"expected {path}")
    sidecar_path = path.parent / delivery_.SIDECAR_NAME
    sidecar = read_text(sidecar_path) if sidecar_path.is_file() else None
    return parse_manifest(read_text(path), path, sidecar=sidecar, strict=strict)


def parse_manifest(text: str, path: Path, *, sidecar: str | None = None, strict: bool | None = None) -> Manifest:
    """Parse and validate manifest ``text``; ``path`` names it in messages (project_dir = its parent).

    ``sidecar`` is the text of an ``ato.delivery.toml`` beside it, if any; reading
    the disk is :func:`load_manifest`'s job, so this stays usable for manifests
    taken out of artifacts or registry responses. ``strict`` (default: from
    ``ATO_STRICT_MANIFEST``) turns unknown and unsupported keys into errors.
    """
    file = path.name
    raw = parse_toml(text, file)
    strict = strictness.strict_from_env() if strict is None else strict
    generation = generations.detect(raw, file)
    schema = generations.SCHEMAS[generation]
    try:
        check_structure(raw, file, schema)
    except AtoError as err:
        raise generations.other_form(raw, generation, err, file) or err from None
    warnings: list[str] = []
    hints: dict[str, str] = {}
    strictness.apply(strictness.findings(raw, schema), file, strict=strict, warnings=warnings, hints=hints)
    if generation not in (generations.V03, generations.V1):
        return _build(raw, raw, path, sidecar, warnings, hints, generation, Origins())
    try:
        if generation == generations.V03:
            doc, origins = v03.translate(raw, file, warnings)
        else:
            doc, origins = v1.translate(raw, file, warnings, is_secret=is_secret)
        with origins.errors_in_source_terms(file):
            check_structure(doc, file)
            return _build(doc, raw, path, sidecar, warnings, hints, generation, origins)
    except AtoError as err:
        raise generations.other_form(raw, generation, err, file) or err from None


def _build(doc: dict[str, Any], source: dict[str, Any], path: Path, sidecar: str | None, warnings: list[str],
           hints: dict[str, str], generation: str, origins: Origins) -> Manifest:
    """The model of ``doc`` (a 0.2 or 1.x document; ``source`` is what the file said, if translated)."""
    raw = doc
    file = path.name
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
    routes = ROUTE_TARGETS if form_02 else ROUTE_TARGETS_1X
    for label in sorted(k for k in table if k not in RESERVED_TARGET_KEYS):
        targets[label] = read_target(label, table[label], ["targets", label], file,
                                     default_runtime=label if label in routes else None,
                                     fallback_digest=fallback_digest, warnings=warnings)
    execution = None
    if not form_02:
        execution = read_target("execution", raw["execution"], ["execution"], file, default_runtime=None,
                                fallback_digest=fallback_digest, warnings=warnings)
    services = read_services(raw.get("services", {}), file, set(targets), warnings)
    tasks = read_tasks(raw.get("tasks", {}), file, warnings)

    default_target = None
    kind = raw.get("type", "app")
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
                     route_alternative=not form_02 and label in ROUTE_TARGETS_1X, warnings=warnings)
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
    platforms = check_platforms(raw, file)
    dependencies, contracts = read_contracts(raw, targets, services, file, warnings)

    primary = execution if execution is not None else targets[default_target]  # type: ignore[index]
    label = "execution" if execution is not None else default_target
    meta = delivery_.resolve(raw, primary.driver == "native", primary.entrypoint, primary.cmd, str(label), file,
                             sidecar)
    translated = source is not doc
    return Manifest(
        path=path, project_dir=path.parent, schema_version=source.get("schema_version", generation) if translated else version,
        name=raw["name"], version=raw["version"],
        type=kind, default_target=default_target, targets=targets, execution=execution,
        services=services, tasks=tasks, lifecycle_run=lifecycle_run, pack=pack, delivery=meta,
        metadata=dict(raw.get("metadata", {})), build=dict(raw.get("build", {})),
        isolation=dict(raw.get("isolation", {})), raw=source, state=dict(raw.get("state", {})),
        network=dict(raw.get("network", {})), warnings=warnings, generation=generation,
        build_steps=_build_steps(raw, targets, default_target, origins), required_env=tuple(raw.get("required_env", ())),
        dependencies=dependencies, contracts=contracts, platforms=platforms,
        document=doc if translated else None, hints=hints,
    )


def _build_steps(doc: dict[str, Any], targets: dict[str, Target], default_target: str | None,
                 origins: Origins) -> tuple[BuildStep, ...]:
    """What ``ato build`` runs before packing: ``[build.lifecycle] build``, ``[[build.steps]]``, then each
    target's ``build`` (the default target first). ``[build.lifecycle] prepare`` is ``ato publish``'s prepare
    phase, not a build step."""
    def where(parts: tuple[str | int, ...]) -> str:
        return key_path(origins.source_of(parts))

    build = doc.get("build") or {}
    steps: list[BuildStep] = []
    lifecycle = build.get("lifecycle") or {}
    if lifecycle.get("build"):
        steps.append(BuildStep(_command(lifecycle["build"]), where(("build", "lifecycle", "build"))))
    for i, step in enumerate(build.get("steps") or ()):
        steps.append(BuildStep(_command(step["command"]), where(("build", "steps", i)), step.get("working_dir")))
    order = sorted(targets, key=lambda label: (label != default_target, label))
    for label in order:
        command = doc["targets"][label].get("build")
        if command:
            steps.append(BuildStep(_command(command), where(("targets", label, "build")), targets[label].working_dir))
    return tuple(steps)


def _command(value: Any) -> str | tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else str(value).strip()


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
