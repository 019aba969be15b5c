"""``ato publish``: prepare -> build -> deploy (phase rules in :mod:`stages.publish`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, info, json_mode, json_option, registry_option, warn
from pipeline.cli.help import examples
from pipeline.cli.progress import reporter
from pipeline.errors import E_USAGE, AtoError
from pipeline.progress import SILENT, Progress


def _build(project_dir: Path, force_large_payload: bool, signing_key=None, progress: Progress = SILENT,
           yes: bool = False) -> dict:
    from pipeline.cli.build import approve_build_steps
    from pipeline.graph import run_build
    from pipeline.manifest.strictness import strict_from_env
    from stages.build import BuildOptions, plan_build, source_date_epoch

    options = BuildOptions(strict_v3=strict_from_env(), force_large_payload=force_large_payload,
                           epoch=source_date_epoch(), signing_key=signing_key, reporter=progress,
                           approve_steps=approve_build_steps(yes))
    plan = plan_build(project_dir, options)
    for w in plan.warnings:
        warn(w)
    return run_build(plan)


def _fix_workflow(project_dir: Path) -> tuple[dict[str, Any], int]:
    """``--fix``: write the official workflow (gen-ci's code path): from the pins an existing workflow
    carries, without the network, or locked afresh from the package index."""
    from pipeline.cli import gen_ci

    return gen_ci.fix_workflow(project_dir)


@click.command("publish", epilog=examples("ATO_TOKEN=pwd ato publish --artifact ./<name>.capsule --registry http://127.0.0.1:18787",
                                         "ato publish --registry https://api.ato.run --fix"))
@registry_option("Registry URL (private/local: direct upload; api.ato.run: CI hand-off). Default: the manifest's "
                 "[store] registry, else `ato config get registry` when set, else your Personal Dock.")
@click.option("--artifact", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Publish an existing .capsule (skips build; no capsule.toml needed).")
@click.option("--scoped-id", metavar="PUBLISHER/SLUG", help="publisher/slug to publish as (slug must equal the manifest name).")
@click.option("--allow-existing", is_flag=True,
              help="Succeed without writing when the same version with the same digest exists (deploy only).")
@click.option("--prepare", "prepare_", is_flag=True, help="Run the prepare phase.")
@click.option("--build", "build_", is_flag=True, help="Run the build phase.")
@click.option("--deploy", "deploy_", is_flag=True, help="Run the deploy phase.")
@click.option("--legacy-full-publish", is_flag=True,
              help="Official registries only, deprecated: run prepare -> build -> deploy.")
@click.option("--fix", is_flag=True,
              help="Official registries only: write the CI workflow if it is missing or broken, then re-diagnose.")
@click.option("--no-tui", is_flag=True, help="Print CI guidance directly (ato never starts a TUI; the default).")
@click.option("--force-large-payload", is_flag=True, help="Allow building an artifact over 200 MiB.")
@click.option("--dry-run", is_flag=True, help="Report what would happen and be uploaded; write nothing.")
@click.option("--ci", is_flag=True, help="Official CI publish (GitHub Actions with OIDC).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Sign the build with this publisher key (ato key gen); sign an --artifact with `ato sign` first.")
@click.option("-y", "--yes", is_flag=True, help="Approve the manifest's build steps (build phase).")
@json_option
def publish_cmd(registry: str | None, artifact: Path | None, scoped_id: str | None, allow_existing: bool,
                prepare_: bool, build_: bool, deploy_: bool, legacy_full_publish: bool, fix: bool, no_tui: bool,
                force_large_payload: bool, dry_run: bool, ci: bool, key_file: Path | None, yes: bool) -> None:
    """Publish a capsule: prepare, build, then deploy to a registry.

    Writes need ATO_TOKEN when the registry was started with a token.
    """
    from pipeline import credentials
    from pipeline.registry.client import RegistryClient
    from stages.publish import PublishPorts, PublishRequest, failed_check_error, run_publish

    if no_tui and (ci or dry_run):
        raise AtoError(E_USAGE, "--no-tui cannot be combined with --ci or --dry-run")
    # ato never starts an interactive hand-off UI: --no-tui output (plain CI guidance) is the default
    from pipeline import config

    # flag > ATO_REGISTRY > the manifest's [store] registry > config.toml's `registry` > the Personal Dock
    chosen = config.registry(registry, fallback=False)
    explicit = chosen.value if chosen.origin != "config" else None
    configured = chosen.value if chosen.origin == "config" else None
    req = PublishRequest(project_dir=Path.cwd(), registry=explicit, configured_registry=configured,
                         artifact=artifact, scoped_id=scoped_id,
                         allow_existing=allow_existing, prepare=prepare_, build=build_, deploy=deploy_,
                         legacy_full_publish=legacy_full_publish, fix=fix, dry_run=dry_run, ci=ci,
                         force_large_payload=force_large_payload,
                         token=os.environ.get("ATO_TOKEN") or None)
    if legacy_full_publish:
        warn("--legacy-full-publish is deprecated and will be removed in the next major release. "
             "Use explicit --prepare/--build/--deploy flags instead.")
    # issue 6: the build phase signs signature.json with the publisher key
    if key_file is not None and artifact is not None:
        raise AtoError(E_USAGE, "--key signs the build phase; --artifact publishes an existing file as it is",
                       hint=f"sign it first: ato sign {artifact} --key {key_file}")
    from stages.capsule.keys import load_signing_key

    signing_key = load_signing_key(key_file) if key_file is not None else None
    with reporter(json=json_mode()) as progress:
        ports = PublishPorts(connect=RegistryClient, build=lambda d, f: _build(d, f, signing_key, progress, yes),
                             personal_dock=credentials.personal_dock, store_api_url=credentials.store_api_url,
                             fix_workflow=_fix_workflow, reporter=progress)
        outcome = run_publish(req, ports=ports, progress=info)
    emit(outcome.doc, "publish", "\n".join(outcome.human))
    failed = failed_check_error(outcome.doc)
    if failed is not None:
        raise failed  # the hand-off is printed above; a failing diagnostic still fails the command


def register(group: click.Group) -> None:
    group.add_command(publish_cmd)
