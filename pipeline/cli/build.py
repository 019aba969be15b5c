"""``ato build [dir]``: project -> byte-reproducible ``.capsule``."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, json_mode, json_option, warn
from pipeline.cli.help import examples
from pipeline.cli.progress import reporter
from pipeline.graph import run_build
from pipeline.progress import human_bytes
from stages.build import BuildOptions, plan_build, source_date_epoch, strict_from_env
from stages.capsule.keys import load_signing_key


def _explain(doc: dict) -> str:
    lines = [f"{doc['artifact']}"]
    for t in doc["tasks"]:
        lines.append(f"  {t['name']:<9} {t['status']:<11} inputs {t['inputs_digest']}")
    p = doc["payload"]
    lines.append(f"  payload   {p['artifact_hash']}  {p['chunks']} chunks, {p['files']} files, "
                 f"{p['chunks_inserted']} new chunks ({human_bytes(p['bytes_inserted'])}) added to the CAS")
    return "\n".join(lines)


@click.command("build", epilog=examples("ato build .", "ato build . --out dist/app.capsule --key ~/.ato/keys/signing-key.json"))
@click.argument("directory", metavar="[DIR]", required=False, default=".",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the .capsule (default <dir>/<name>.capsule).")
@click.option("--strict-v3", is_flag=True, help="Forbid every fallback: the payload must come from source_digest in the CAS.")
@click.option("--force-large-payload", is_flag=True, help="Allow an artifact over 200 MiB.")
@click.option("--explain", is_flag=True, help="Show the task graph: inputs digests and which tasks ran.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Sign signature.json with this Ed25519 key file (ato key gen).")
@json_option
def build_cmd(directory: Path, out: Path | None, strict_v3: bool, force_large_payload: bool, explain: bool,
              key_file: Path | None) -> None:
    """Build a project into a byte-reproducible .capsule.

    DIR defaults to the current directory. The artifact is DIR/<name>.capsule unless --out;
    --key signs it.
    """
    with reporter(json=json_mode()) as progress:
        options = BuildOptions(out=out, strict_v3=strict_v3 or strict_from_env(),
                               force_large_payload=force_large_payload, epoch=source_date_epoch(),
                               signing_key=load_signing_key(key_file) if key_file else None, reporter=progress)
        plan = plan_build(directory, options)
        for w in plan.warnings:
            warn(w)
        doc = run_build(plan)
    if doc["size"] > 200 * 1024 * 1024:
        warn(f"large payload allowed by --force-large-payload: {human_bytes(doc['size'])}")
    if explain and not json_mode():
        emit(doc, "build", _explain(doc))
    else:
        emit(doc, "build", doc["artifact"])


def register(group: click.Group) -> None:
    group.add_command(build_cmd)
