"""``ato project <derived_app>``, ``ato project ls``, ``ato unproject <id|path>`` (see stages.project)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, json_mode, json_option
from pipeline.cli.help import AtoGroup, examples
from pipeline.cli.trust import artifact_trust, artifact_trust_options
from pipeline.errors import E_USAGE, AtoError

_VALUE_OPTIONS = ("--launcher-dir",)


class _ProjectGroup(AtoGroup):
    """``project`` takes either a subcommand (``ls``) or the derived app path."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = list(args)
        i = 0
        while i < len(rest):
            token = rest[i]
            if token == "--":
                if i + 1 < len(rest):
                    ctx.meta["ato.derived_app"] = rest.pop(i + 1)
                rest.pop(i)
                break
            if token.startswith("-"):
                i += 2 if token in _VALUE_OPTIONS else 1
                continue
            if token not in self.commands:
                ctx.meta["ato.derived_app"] = rest.pop(i)
            break
        return super().parse_args(ctx, rest)


def _human_project(doc: dict[str, Any]) -> str:
    lines = [f"Projected to: {doc['projected_path']}", f"   ID:       {doc['projection_id']}",
             f"   Target:   {doc['derived_app_path']}", f"   State:    {doc['state']}",
             f"   Metadata: {doc['metadata_path']}"]
    if not doc["created"]:
        lines[0] += " (already projected)"
    return "\n".join(lines)


@click.group("project", cls=_ProjectGroup, invoke_without_command=True, subcommand_metavar="DERIVED_APP | ls",
             epilog=examples("ato project ~/.ato/apps/derived-20260101T000000Z-1a2b3c4d", "ato project ls"))
@click.option("--launcher-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where the launcher goes (Linux default $XDG_DATA_HOME/applications, macOS ~/Applications).")
@artifact_trust_options
@json_option
@click.pass_context
def project_cmd(ctx: click.Context, launcher_dir: Path | None, allow_unsigned: bool, yes: bool,
                force_large_payload: bool) -> None:
    """Add a desktop launcher for a finalized native app.

    DERIVED_APP is an `ato finalize` output; the artifact it was derived from is verified and its signer
    trust-checked first. `ato project ls` lists the projections and their state.
    """
    if ctx.invoked_subcommand is not None:
        return
    derived = ctx.meta.get("ato.derived_app")
    if not derived:
        if launcher_dir is None and not json_mode():  # bare `ato project`: its help, like every group
            click.echo(ctx.get_help())
            ctx.exit(0)
        raise AtoError(E_USAGE, "ato project requires <DERIVED_APP_PATH> or use `ato project ls` for read-only status")
    from stages.project import project

    trust = artifact_trust(allow_unsigned=allow_unsigned, yes=yes, force_large_payload=force_large_payload)
    doc = project(Path(derived), launcher_dir, trust=trust)
    emit(doc, "project", _human_project(doc))


@project_cmd.command("ls", epilog=examples("ato project ls", "ato project ls --json"))
@json_option
def project_ls_cmd() -> None:
    """List projections with their state (ok, or broken with problem codes)."""
    from stages.project import list_projections

    doc = list_projections()
    lines = []
    for p in doc["projections"]:
        lines.append(f"[{p['state']}] {p['projected_path']} -> {p['derived_app_path']}")
        lines.append(f"   ID:       {p['projection_id']}")
        if p["problems"]:
            lines.append(f"   Problems: {', '.join(p['problems'])}")
    emit(doc, "project-ls", "\n".join(lines) or "No projections found.")


@click.command("unproject", epilog=examples("ato unproject <projection-id>", "ato unproject ~/.local/share/applications/app.desktop"))
@click.argument("ref", metavar="REF")
@json_option
def unproject_cmd(ref: str) -> None:
    """Remove a launcher that `ato project` added.

    Exactly the launcher, command link and directories `ato project` created go. REF is the projection id, its launcher path, the derived app path or the metadata path.
    """
    from stages.project import unproject

    doc = unproject(ref)
    human = "\n".join([f"Unprojected: {doc['projected_path']}", f"   ID:      {doc['projection_id']}",
                       f"   State:   {doc['state_before']}",
                       f"   Removed: metadata={str(doc['removed_metadata']).lower()}, "
                       f"launcher={str(doc['removed_projected_path']).lower()}"])
    emit(doc, "unproject", human)


def register(group: click.Group) -> None:
    group.add_command(project_cmd)
    group.add_command(unproject_cmd)
