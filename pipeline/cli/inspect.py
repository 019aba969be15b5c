"""``ato inspect requirements``: what a capsule needs before it runs, as a stable contract."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.common import emit, json_mode, json_option, warn
from pipeline.envelope import validate
from pipeline.errors import AtoError
from pipeline.manifest import requirements

_LABELS = (("secrets", "Secrets"), ("state", "State"), ("env", "Env"), ("network", "Network"),
           ("services", "Services"), ("consent", "Consent"))


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(inspect_group)


@click.group("inspect")
def inspect_group() -> None:
    """Inspect a capsule without running it."""


@inspect_group.command("requirements")
@click.argument("target", metavar="<path|publisher/slug>")
@click.option("--registry", metavar="URL", help="Registry for publisher/slug refs (remote refs: not yet).")
@json_option
def requirements_cmd(target: str, registry: str | None) -> None:
    """Print the secrets, state, env, network, services and consent TARGET needs (from capsule.toml)."""
    try:
        doc, warnings = requirements.inspect_local(target)
    except AtoError as err:
        # The failure shape is a contract too: check it before run_cli prints it.
        err.details.setdefault("input", target)
        validate(err.to_json(), "inspect-requirements-error")
        raise
    if not json_mode():
        for line in warnings:
            warn(line)
    emit(doc, "inspect-requirements", human=_human(target, doc))


def _human(target: str, doc: dict[str, Any]) -> str:
    lines = [f"Requirements for {target}"]
    for key, label in _LABELS:
        names = [i["key"] + ("" if i.get("required", True) else " (optional)") for i in doc["requirements"][key]]
        lines.append(f"  {label}: {', '.join(names) if names else 'none'}")
    return "\n".join(lines)
