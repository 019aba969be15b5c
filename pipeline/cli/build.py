"""``ato build [dir]``: project -> byte-reproducible ``.capsule``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from pipeline.cli.common import emit, json_mode, json_option, warn
from pipeline.cli.help import examples
from pipeline.progress import human_bytes


def _reason(name: str, arg: object) -> str:
    """One of doit's reasons, in words."""
    if isinstance(arg, list) and arg and all(isinstance(a, str) for a in arg):
        shown = ", ".join(arg[:3]) + (f" and {len(arg) - 3} more" if len(arg) > 3 else "")
        return f"{name.replace('_', ' ')}: {shown}"
    if name == "uptodate_false":
        checks = [str(a[0] if isinstance(a, list) else a) for a in (arg if isinstance(arg, list) else [arg])]
        return "inputs changed: " + "; ".join(c.split("(")[0].split(".")[-1].strip("<'\" ") for c in checks)
    return name.replace("_", " ")


def _explain(doc: dict) -> str:
    lines = [f"{doc['artifact']}"]
    for t in doc["tasks"]:
        lines.append(f"  {t['name']:<9} {t['status']:<11} inputs {t['inputs_digest']}")
        for name, arg in (t.get("reasons") or {}).items():
            lines.append(f"      why: {_reason(name, arg)}")
    p = doc["payload"]
    lines.append(f"  payload   {p['artifact_hash']}  {p['chunks']} chunks, {p['files']} files "
                 f"({p['files_read']} read), {p['chunks_inserted']} new chunks ({human_bytes(p['bytes_inserted'])}) "
                 "added to the store")
    return "\n".join(lines)


def build_steps_plan(manifest):
    """The consent plan of a manifest's build steps: approving it approves exactly these commands."""
    from pipeline.runtime import policy
    from stages.build_steps import shown

    commands = [shown(step) for step in manifest.build_steps]
    return policy.Plan(capsule=manifest.name, version=manifest.version, target="build", runtime="build",
                       driver="", tier=None, permissions={"host_execution": commands})


def record_build_steps_consent(manifest, how: str) -> None:
    """Record approval of the manifest's build steps (``ato init`` wrote them, so the user's init approved them)."""
    from pipeline.runtime import policy

    if manifest.build_steps:
        policy.record_consent(build_steps_plan(manifest), how)


def approve_build_steps(yes: bool) -> Callable[..., None]:
    """Consent for a manifest's build steps, under the rules of a run's [tasks]: a recorded approval of
    exactly these commands, ``--yes``, or a prompt on a terminal; otherwise ATO_ERR_CONSENT_REQUIRED."""
    def approve(manifest) -> None:
        from pipeline.errors import AtoError
        from pipeline.runtime import policy
        from stages.build_steps import shown

        commands = [shown(step) for step in manifest.build_steps]
        plan = build_steps_plan(manifest)

        def prompt(_plan) -> bool:
            click.echo(f"{manifest.path.name} asks ato build to run these commands on this machine:", err=True)
            for key, command in zip((s.key for s in manifest.build_steps), commands, strict=True):
                click.echo(f"  {key}: {command}", err=True)
            return click.confirm("Run them?", default=False, err=True)

        try:
            policy.ensure_consent(plan, yes=yes, prompt=prompt)
        except AtoError as err:
            if err.code != policy.CONSENT or "not interactive" not in err.message:
                raise
            raise policy.fail(policy.CONSENT, f"ato build would run {len(commands)} build command(s) on this "
                                              f"machine ({'; '.join(commands)}) and needs consent; the session is "
                                              "not interactive: re-run with -y/--yes to approve them",
                              commands=commands, policy_hash=plan.policy_hash()) from None
    return approve


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
@click.option("-y", "--yes", is_flag=True, help="Approve the manifest's build steps (commands run on this machine).")
@json_option
def build_cmd(directory: Path, out: Path | None, strict_v3: bool, force_large_payload: bool, explain: bool,
              key_file: Path | None, yes: bool) -> None:
    """Build a project into a byte-reproducible .capsule.

    DIR defaults to the current directory. The artifact is DIR/<name>.capsule unless --out;
    --key signs it.
    """
    from pipeline.manifest import load_manifest
    from pipeline.manifest.strictness import strict_from_env

    strict = strict_v3 or strict_from_env()
    manifest = load_manifest(directory, strict=strict or None)  # a bad input fails before the build machinery loads
    from pipeline.cli.progress import reporter
    from pipeline.graph import few_collections, run_build
    from stages.build import BuildOptions, plan_build, source_date_epoch
    from stages.capsule.keys import load_signing_key

    with reporter(json=json_mode()) as progress, few_collections():
        options = BuildOptions(out=out, strict_v3=strict,
                               force_large_payload=force_large_payload, epoch=source_date_epoch(),
                               signing_key=load_signing_key(key_file) if key_file else None, reporter=progress,
                               approve_steps=approve_build_steps(yes))
        plan = plan_build(directory, options, manifest=manifest)
        for w in plan.warnings:
            warn(w)
        doc = run_build(plan, explain=explain)
    if doc["size"] > 200 * 1024 * 1024:
        warn(f"large payload allowed by --force-large-payload: {human_bytes(doc['size'])}")
    if explain and not json_mode():
        emit(doc, "build", _explain(doc))
    else:
        emit(doc, "build", doc["artifact"])


def register(group: click.Group) -> None:
    group.add_command(build_cmd)
