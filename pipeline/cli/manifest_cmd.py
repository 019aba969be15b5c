"""``ato manifest upgrade [DIR] [--to 0.3|1.1|0.2] [--write]``: move capsule.toml between generations."""

from __future__ import annotations

import difflib
from pathlib import Path

import click

from pipeline.cli.common import emit, json_mode, json_option, warn
from pipeline.cli.help import AtoGroup, examples


@click.group("manifest", cls=AtoGroup, epilog=examples("ato manifest upgrade .", "ato manifest upgrade . --to 0.3 --write"))
def manifest_group() -> None:
    """Work with capsule.toml itself (move it between generations)."""


@manifest_group.command("upgrade", epilog=examples("ato manifest upgrade .", "ato manifest upgrade . --to 1.1 --write"))
@click.argument("directory", metavar="[DIR]", required=False, default=".", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["0.3", "1.1", "0.2"]), default="0.3", show_default=True,
              help="The generation to write (0.2 is the way back from 0.3 or v1).")
@click.option("--write", is_flag=True, help="Replace capsule.toml (atomically) instead of printing a diff.")
@json_option
def upgrade_cmd(directory: Path, to: str, write: bool) -> None:
    """Rewrite capsule.toml in another generation (a diff unless --write).

    The result is read back and must give the same normalized model; otherwise nothing is
    written and the key that cannot move is named. DIR defaults to the current directory.
    """
    from cas.atomic import write_bytes_atomic
    from pipeline.manifest import load_manifest
    from pipeline.manifest.upgrade import upgrade

    manifest = load_manifest(directory, strict=False)
    old = manifest.path.read_text("utf-8")
    new = upgrade(manifest, to)
    changed = new != old
    diff = "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"{manifest.path.name} ({manifest.schema_version})",
                                        tofile=f"{manifest.path.name} ({to})"))
    notes = []
    if changed and "#" in old:
        notes.append("comments in the original are not carried over")
    if write and changed:
        write_bytes_atomic(manifest.path, new.encode("utf-8"))
    doc = {"path": str(manifest.path), "from": manifest.schema_version, "to": to, "changed": changed,
           "written": bool(write and changed), "text": new, "diff": diff, "notes": notes}
    if not json_mode():
        for note in notes:
            warn(note)
    if write:
        human = f"{manifest.path}: written as schema_version {to!r}" if changed else \
            f"{manifest.path}: already in that form, unchanged"
    else:
        human = diff.rstrip("\n") if changed else f"{manifest.path}: already in that form, nothing to change"
    emit(doc, "manifest-upgrade", human=human)


def register(group: click.Group) -> None:
    group.add_command(manifest_group)
