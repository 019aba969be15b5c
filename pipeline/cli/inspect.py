"""``ato inspect requirements``: what a capsule needs before it runs, as a stable contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, json_mode, json_option, registry_option, resolve_registry, warn
from pipeline.cli.help import examples, group
from pipeline.envelope import validate
from pipeline.errors import AtoError
from pipeline.manifest import requirements

_LABELS = (("secrets", "Secrets"), ("state", "State"), ("env", "Env"), ("network", "Network"),
           ("services", "Services"), ("consent", "Consent"))


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(inspect_group)


@group("inspect", epilog=examples("ato inspect requirements . --json"))
def inspect_group() -> None:
    """Inspect a capsule without running it."""


@inspect_group.command("requirements", epilog=examples("ato inspect requirements . --json",
                                                       "ato inspect requirements acme/app --registry URL"))
@click.argument("target", metavar="PATH|PUBLISHER/SLUG")
@registry_option()
@click.option("--force-large-payload", is_flag=True,
              help="Accept a .capsule whose payload decodes to more than the ceiling (200 MiB unless configured).")
@json_option
def requirements_cmd(target: str, registry: str | None, force_large_payload: bool) -> None:
    """Print the secrets, state, env, network, services and consent TARGET needs.

    TARGET is a project dir (its capsule.toml), a .capsule file (verified first, as `ato verify`
    checks it; nothing is unpacked) or publisher/slug[@version] (the registry's copy).
    """
    try:
        artifact = Path(target).expanduser()
        if artifact.suffix == ".capsule" and artifact.is_file():
            doc, warnings = _inspect_artifact(target, artifact, force_large_payload)
        elif requirements.looks_local(target, Path.cwd()):
            doc, warnings = requirements.inspect_local(target)
        else:
            doc, warnings = _inspect_remote(target, registry)
    except AtoError as err:
        # The failure shape is a contract too: check it before run_cli prints it.
        err.details.setdefault("input", target)
        validate(err.to_json(), "inspect-requirements-error")
        raise
    if not json_mode():
        for line in warnings:
            warn(line)
    emit(doc, "inspect-requirements", human=_human(target, doc))


def _inspect_remote(target: str, registry: str | None) -> tuple[dict[str, Any], list[str]]:
    """The same document for ``publisher/slug[@version]``, from the registry's copy of capsule.toml."""
    from pipeline.registry.client import RegistryClient
    from stages.registry_port import RegistryHttpError

    ref = target.lstrip("@").split("@", 1)[0]
    publisher, slug = ref.split("/", 1)
    with RegistryClient(resolve_registry(registry)) as client:
        try:
            detail = client.detail(publisher, slug)
        except RegistryHttpError as exc:
            if exc.status == 404:
                raise AtoError(requirements.TARGET_NOT_FOUND,
                               f"Could not resolve target: {ref} is not in registry {client.base}",
                               details={"input": target, "reason": f"Capsule not found: {ref}"}) from None
            raise
    text = detail.get("manifest_toml")
    if not isinstance(text, str) or not text.strip():
        raise AtoError(requirements.E_NOT_FOUND, f"capsule.toml was not found for {ref} in the registry",
                       details={"input": target, "reason": "registry detail has no manifest_toml"})
    manifest = _manifest_of(text.encode("utf-8"))
    doc = {"schemaVersion": requirements.SCHEMA_VERSION,
           "target": {"input": target, "kind": "remote", "resolved": {"publisher": publisher, "slug": slug}},
           "requirements": requirements.derive(manifest)}
    return doc, list(manifest.warnings)


def _inspect_artifact(target: str, path: Path, force_large_payload: bool) -> tuple[dict[str, Any], list[str]]:
    """The same document for a ``.capsule`` file: its capsule.toml, once the format's one verifier has
    accepted the artifact (a hostile one is refused with the code every other entry point gives it)."""
    from stages.capsule import consumer_limits, verify

    verdict = verify(path, consumer_limits(force_large_payload))
    if verdict.error is not None:
        verdict.error.problems = []  # this command's failure contract is one JSON object, no ATO_ERR_* line
        raise verdict.error
    assert verdict.capsule is not None
    manifest = _manifest_of(verdict.capsule.raw["capsule.toml"])
    doc = {"schemaVersion": requirements.SCHEMA_VERSION,
           "target": {"input": target, "kind": "local", "resolved": {"path": str(path.resolve())}},
           "requirements": requirements.derive(manifest)}
    return doc, list(manifest.warnings)


def _manifest_of(text: bytes) -> Any:
    """The manifest model of capsule.toml bytes that are not in a project dir (a registry's or an artifact's)."""
    import tempfile

    from pipeline.manifest.reader import load_manifest

    with tempfile.TemporaryDirectory(prefix="ato-inspect-") as tmp:
        path = Path(tmp) / "capsule.toml"
        path.write_bytes(text)
        return load_manifest(path)


def _human(target: str, doc: dict[str, Any]) -> str:
    lines = [f"Requirements for {target}"]
    for key, label in _LABELS:
        names = [i["key"] + ("" if i.get("required", True) else " (optional)") for i in doc["requirements"][key]]
        lines.append(f"  {label}: {', '.join(names) if names else 'none'}")
    return "\n".join(lines)
