"""``ato sign ARTIFACT --key FILE``: sign an existing artifact's signature.json in place."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.cli.common import emit, json_option
from pipeline.cli.help import examples
from stages.build import source_date_epoch
from stages.capsule.keys import load_signing_key
from stages.sign import sign_artifact

SCHEMA_VERSION = "1"


@click.command("sign", epilog=examples("ato sign ./app.capsule --key ~/.ato/keys/signing-key.json",
                                      "ato sign ./app.capsule --key release-key.json --out signed.capsule"))
@click.argument("artifact", metavar="ARTIFACT", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Ed25519 key file (ato key gen).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the signed artifact here instead of replacing ARTIFACT.")
@json_option
def sign_cmd(artifact: Path, key_file: Path, out: Path | None) -> None:
    """Sign an existing .capsule (only its signature.json changes).

    ARTIFACT is verified first; the signed copy replaces it atomically (or goes to --out).

    signed_at is SOURCE_DATE_EPOCH when set, else the artifact's build epoch, so signing an
    unsigned build gives the same bytes as building with --key.
    """
    key = load_signing_key(key_file)
    epoch = source_date_epoch() if os.environ.get("SOURCE_DATE_EPOCH", "").strip() else None
    result = sign_artifact(artifact, key, out=out, epoch=epoch)
    signer = result.signature.to_json()
    doc = {"schema_version": SCHEMA_VERSION, "artifact": str(result.path), "artifact_blake3": result.artifact_blake3,
           "size": result.size, "signed": True, "signer": signer}
    emit(doc, "sign", f"signed {doc['artifact']} as {key.did} ({signer['short_fingerprint']})")


def register(group: click.Group) -> None:
    group.add_command(sign_cmd)
