"""``ato key gen | show | rotate``: Ed25519 signing keys (did:key identities)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, json_option
from pipeline.cli.help import examples, group
from pipeline.trust import keys
from stages.capsule.keys import load_signing_key, short_fingerprint

SCHEMA_VERSION = "1"


def _human(desc: dict) -> str:
    lines = [desc["key_id"], f"fingerprint {desc['short_fingerprint']}"]
    if desc["path"]:
        lines.append(f"secret key: {desc['path']} (mode 0600; keep it private)")
    pk = desc.get("previous_key")
    if pk:
        lines.append(f"rotated from {pk['key_id']}; signatures carry that key's vouching until {pk['overlap_until']}")
    return "\n".join(lines)


@group("key", epilog=examples("ato key gen", "ato build . --key ~/.ato/keys/signing-key.json"))
def key_group() -> None:
    """Create, show and rotate Ed25519 signing keys."""


@key_group.command("gen", epilog=examples("ato key gen", "ato key gen --out release-key.json --json"))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the secret key (default $ATO_HOME/keys/signing-key.json).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file (the old key is lost).")
@json_option
def gen_cmd(out: Path | None, force: bool) -> None:
    """Generate an Ed25519 signing key; print its did:key and fingerprint."""
    key = keys.generate(out, force=force)
    desc = keys.describe(key)
    emit({"schema_version": SCHEMA_VERSION, "action": "gen", **desc}, "key", _human(desc))


@key_group.command("show", epilog=examples("ato key show", "ato key show release-key.json --json"))
@click.argument("file", required=False, metavar="[FILE]", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def show_cmd(file: Path | None) -> None:
    """Show the public identity of a key file.

    FILE defaults to $ATO_HOME/keys/signing-key.json.
    """
    key = load_signing_key(file or keys.default_key_path())
    desc = keys.describe(key)
    emit({"schema_version": SCHEMA_VERSION, "action": "show", **desc}, "key", _human(desc))


@key_group.command("rotate", epilog=examples("ato key rotate", "ato key rotate --key release-key.json --overlap 7d"))
@click.option("--key", "old", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="The current key (default $ATO_HOME/keys/signing-key.json).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the new key (default: in place of --key, keeping the old one as "
                   "<name>.retired-<fingerprint>.json).")
@click.option("--overlap", default=keys.DEFAULT_OVERLAP, show_default=True, metavar="DURATION",
              help="How long the old key vouches for the new one (e.g. 48h, 7d).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@json_option
def rotate_cmd(old: Path | None, out: Path | None, overlap: str, force: bool) -> None:
    """Replace a signing key with a new one that the old key vouches for.

    The old key's vouching lasts for the --overlap window.
    """
    rot = keys.rotate(old, out, overlap=keys.parse_duration(overlap), force=force)
    desc = keys.describe(rot.new)
    doc = {"schema_version": SCHEMA_VERSION, "action": "rotate", **desc,
           "retired": {"key_id": rot.old.did, "short_fingerprint": short_fingerprint(rot.old.fingerprint),
                       "path": str(rot.retired_path or rot.old.path)}}
    emit(doc, "key", _human(desc) + f"\nold key kept at {doc['retired']['path']}")


def register(group: click.Group) -> None:
    group.add_command(key_group)
