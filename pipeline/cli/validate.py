"""``ato validate [DIR]``: read a capsule.toml of any generation and show what ato makes of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import tomli_w

from pipeline.cli.common import emit, json_mode, json_option, warn
from pipeline.cli.help import examples
from pipeline.errors import E_USAGE, AtoError


@click.command("validate", epilog=examples("ato validate .", "ato validate . --strict-v3 --json"))
@click.argument("directory", metavar="[DIR]", required=False, default=".", type=click.Path(path_type=Path))
@click.option("--strict-v3", "strict", is_flag=True,
              help="Unknown and unsupported keys are errors (also ATO_STRICT_MANIFEST=1).")
@click.option("--provider", "providers", multiple=True, metavar="ALIAS=DIR",
              help="Check [dependencies.ALIAS] against the provider capsule in DIR (contract offered, parameters, "
                   "credentials, the exports read). Repeatable.")
@json_option
def validate_cmd(directory: Path, strict: bool, providers: tuple[str, ...]) -> None:
    """Check a capsule.toml of any generation and show the model it gives.

    Prints the generation, the build steps, the normalized model the build stores and every
    warning (did you mean ...?). DIR defaults to the current directory. Exit 1 on any error.
    """
    from pipeline import paths
    from pipeline.manifest import load_manifest
    from pipeline.manifest.contracts import check_provider
    from pipeline.manifest.ipc import check_document
    from pipeline.manifest.strictness import strict_from_env

    manifest = load_manifest(directory, strict=strict or strict_from_env())
    ipc_warnings = [f"{manifest.path.name}: {f.location}: [{f.code}] {f.message}"
                    for f in check_document(manifest.raw, manifest.project_dir, str(manifest.path),
                                            store_dir=paths.store_dir())]
    manifest.warnings.extend(w for w in ipc_warnings if w not in manifest.warnings)
    for spec in providers:
        alias, sep, where = spec.partition("=")
        if not sep or not alias or not where:
            raise AtoError(E_USAGE, f"--provider expects ALIAS=DIR, got {spec!r}")
        dependency = manifest.dependencies.get(alias)
        if dependency is None:
            raise AtoError(E_USAGE, f"--provider {alias}: {manifest.path.name} declares no [dependencies.{alias}] "
                                    f"(declared: {', '.join(sorted(manifest.dependencies)) or 'none'})")
        provider = load_manifest(Path(where), strict=False)
        check_provider(alias, dependency, provider.contracts, manifest.targets, manifest.path.name,
                       str(provider.path))
    doc = document(manifest, strict=strict or strict_from_env())
    if not json_mode():
        for line in manifest.warning_lines():
            warn(line)
    emit(doc, "validate", human=_human(doc))


def document(manifest: Any, *, strict: bool) -> dict[str, Any]:
    """The ``ato validate --json`` document."""
    warnings = []
    for line in manifest.warnings:
        item: dict[str, Any] = {"message": line}
        head = line.split(": ", 2)
        if len(head) == 3:
            item["key"] = head[1]
        if line in manifest.hints:
            item["hint"] = manifest.hints[line]
        warnings.append(item)
    return {
        "ok": True,
        "path": str(manifest.path.absolute()),
        "generation": manifest.generation,
        "schema_version": manifest.schema_version,
        "strict": strict,
        "name": manifest.name,
        "version": manifest.version,
        "default_target": manifest.primary_target().label,
        "build_steps": [{"key": s.key, "command": s.command if isinstance(s.command, str) else list(s.command)}
                        for s in manifest.build_steps],
        "dependencies": sorted(manifest.dependencies),
        "contracts": sorted(manifest.contracts),
        "normalized": manifest.normalized(),
        "warnings": warnings,
    }


def _human(doc: dict[str, Any]) -> str:
    lines = [f"{doc['path']}: schema_version {doc['schema_version']!r} ({_form(doc['generation'])}), "
             f"{doc['name']} {doc['version']}, runs target {doc['default_target']!r}"]
    for step in doc["build_steps"]:
        command = step["command"] if isinstance(step["command"], str) else " ".join(step["command"])
        lines.append(f"build step ({step['key']}): {command}")
    if doc["dependencies"]:
        lines.append(f"dependencies: {', '.join(doc['dependencies'])}")
    if doc["contracts"]:
        lines.append(f"offers: {', '.join(doc['contracts'])}")
    lines.append("normalized model (stored in the artifact as capsule.toml):")
    lines.append(tomli_w.dumps(doc["normalized"]).rstrip())
    return "\n".join(lines)


def _form(generation: str) -> str:
    return {"0.2": "the 0.2 form", "0.3": "0.3, read as the 0.2 model", "1": "v1 authoring, read as the 0.2 model",
            "1.0": "the 1.x [execution] form", "1.1": "the 1.x [execution] form"}.get(generation, generation)


def register(group: click.Group) -> None:
    group.add_command(validate_cmd)
