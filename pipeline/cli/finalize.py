"""``ato finalize <fetched_dir>``: derive a locally finalized app (advanced surface; see stages.finalize)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, json_option
from pipeline.cli.help import examples
from pipeline.cli.trust import artifact_trust, artifact_trust_options
from pipeline.errors import E_POLICY, AtoError, Problem


@click.command("finalize", epilog=examples("ato finalize ~/.ato/fetches/<digest> --output-dir ./derived --json"))
@click.argument("fetched_dir", metavar="FETCHED_DIR", type=click.Path(path_type=Path))
@click.option("--allow-external-finalize", is_flag=True,
              help="Approve running the finalize tool (codesign on macOS, the built-in ato-sign on Linux).")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where to create the fresh derived-<UTC time>-<8hex>/ directory.")
@artifact_trust_options
@json_option
def finalize_cmd(fetched_dir: Path, allow_external_finalize: bool, output_dir: Path, allow_unsigned: bool, yes: bool,
                 force_large_payload: bool) -> None:
    """Finalize a fetched native app in a fresh derived directory.

    FETCHED_DIR is an `ato fetch` cache dir. Its artifact is verified and its signer trust-checked first; the app is
    then copied, finalized there and described by local-derivation.json; the fetched parent is never modified.
    """
    from stages.finalize import finalize

    if not allow_external_finalize:
        message = "finalize requires --allow-external-finalize for any external signing step"
        raise AtoError(E_POLICY, message, problems=[Problem("ATO_ERR_CONSENT_REQUIRED", message,
                                                            {"flag": "--allow-external-finalize"})])
    trust = artifact_trust(allow_unsigned=allow_unsigned, yes=yes, force_large_payload=force_large_payload)
    doc = finalize(fetched_dir, output_dir, trust=trust).envelope
    human = "\n".join([f"Finalized to: {doc['output_dir']}", f"   App:      {doc['derived_app_path']}",
                       f"   Parent:   {doc['parent_digest']}", f"   Derived:  {doc['derived_digest']}"])
    emit(doc, "finalize", human)


def register(group: click.Group) -> None:
    group.add_command(finalize_cmd)
