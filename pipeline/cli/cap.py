"""The ``cap`` command tree: init, preview, review, publish --local (seed 002).

Thin by design: parse options, call ``pipeline.cap``, print one envelope. Every
failure is an AtoError rendered by ``run_cli`` (one line, or a JSON object under
--json, and a documented exit code).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cas.atomic import write_text_atomic
from pipeline.cap import registry as reg
from pipeline.cap.compile import compile_package, preview, registry_status
from pipeline.cap.infer import infer_manifest
from pipeline.cap.manifest import (
    DEFAULT_MANIFEST,
    E_CAP_MANIFEST_EXISTS,
    io_error,
    load,
    normalize,
    read_manifest,
)
from pipeline.cap.review import Review, review, review_document
from pipeline.cap.trials import DEFAULT_TIMEOUT, run_trials
from pipeline.cli.common import State, _json_callback, emit, json_mode, json_option, run_cli, warn
from pipeline.cli.help import AtoGroup, examples
from pipeline.envelope import dumps, validate
from pipeline.errors import E_USAGE, AtoError


def manifest_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--manifest", "manifest", default=DEFAULT_MANIFEST, show_default=True,
                        type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                        help="The capability manifest.")(fn)


def registry_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--registry", "registry", default=reg.DEFAULT_REGISTRY, show_default=True, metavar="FILE",
                        help="The filesystem registry JSON file.")(fn)


def trial_timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--trial-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT,
                        show_default=True, metavar="SECONDS", help="Seconds before a safe trial is killed.")(fn)


def _human_warnings(warnings: list[dict[str, str]]) -> None:
    if not json_mode():
        for w in warnings:
            warn(w["message"])


@click.group(cls=AtoGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples("cap init acme/my-tool && cap review --run-trials",
                             "cap publish --local --registry registry/packages.json --json"))
@click.version_option(None, "-V", "--version", package_name="ato", prog_name="cap", message="%(prog)s %(version)s")
@click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
              callback=_json_callback, help="Print exactly one JSON document on stdout.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """cap: publish agent tools described by capability.json.

    Run `cap COMMAND --help` for a command's options and examples.
    """
    ctx.ensure_object(State)


@cli.command("init", epilog=examples("cap init acme/my-tool", "cap init --force --json"))
@click.argument("package_id", required=False, metavar="[PUBLISHER/NAME]")
@manifest_option
@click.option("--force", is_flag=True, help="Overwrite an existing manifest.")
@json_option
def init_cmd(package_id: str | None, manifest: Path, force: bool) -> None:
    """Create capability.json from package.json, skills, .mcp.json and bin files."""
    existed = manifest.exists()
    if existed and not force:
        raise AtoError(E_CAP_MANIFEST_EXISTS, f"Manifest already exists: {manifest}",
                       details={"file": str(manifest)}, hint="pass --force to overwrite")
    doc, info = infer_manifest(manifest.absolute().parent, package_id)
    validate(doc, "cap-manifest")
    rv = review(normalize(manifest, doc))
    try:
        write_text_atomic(manifest, dumps(doc))
    except OSError as exc:
        raise io_error(manifest, "write the manifest", exc) from None
    out = {
        "schema": "cap-init.v0",
        "manifest": str(manifest.absolute()),
        "overwritten": existed,
        "inferred": info.to_json(),
        "capability": doc,
        "review": {"passed": rv.passed, "failures": [c.to_json() for c in rv.failures],
                   "warnings": rv.warnings_json()},
    }
    lines = [f"wrote {manifest} for {doc['id']}@{doc['version']} "
             f"({len(info.bins)} bin(s), {len(info.skills)} skill(s), {len(info.mcp_tools)} MCP tool(s))"]
    lines += [f"  to do: {c.message}" for c in rv.failures]
    emit(out, "cap-init", "\n".join(lines))


def _preview_text(doc: dict[str, Any]) -> str:
    s, plan, review_rec = doc["summary"], doc["installPlan"], doc["review"]
    lines = [
        f"{s['id']}@{s['version']}  {s['name']}: {s['summary']}",
        f"  backend   {s['backend']}  source {plan['source'].get('path') or plan['source'].get('url')}",
        f"  bins      {', '.join(s['bins']) or '-'}",
        f"  digest    {s['digest'] or '-'}",
        f"  trials    {s['trials']}   skills {s['skills']}   MCP tools {s['mcpTools']}",
        f"  review    {review_rec['status']}",
    ]
    lines += [f"  fail      {f['id']}: {f['message']}" for f in doc["failures"]]
    return "\n".join(lines)


@cli.command("preview", epilog=examples("cap preview", "cap preview --manifest tools/capability.json --json"))
@manifest_option
@registry_option
@json_option
def preview_cmd(manifest: Path, registry: str) -> None:
    """Compile the manifest and show the package it would publish; writes nothing."""
    registry_path = reg.registry_path(registry)
    doc = preview(load(manifest), registry_path)
    _human_warnings(doc["warnings"])
    emit(doc, "cap-preview", _preview_text(doc))


def _review_text(rv: Review, label: str) -> str:
    head = "passed" if rv.passed else f"failed ({len(rv.failures)} blocking)"
    lines = [f"review {label}: {head}"]
    lines += [f"  {c.status:<4}  {c.id:<18} {c.message}" for c in rv.checks]
    lines += [f"  warn  {w['id']:<18} {w['message']}" for w in rv.warnings_json()]
    for t in rv.trials or []:
        lines.append(f"  trial {t.status:<7} {t.command}" + (f"  ({t.reason})" if t.reason else ""))
    return "\n".join(lines)


@cli.command("review", epilog=examples("cap review", "cap review --run-trials --trial-timeout 30 --json"))
@manifest_option
@registry_option
@click.option("--run-trials", "run_trials_flag", is_flag=True,
              help="Run local-bin safe trials in the sandbox (cap publish always does).")
@trial_timeout_option
@json_option
def review_cmd(manifest: Path, registry: str, run_trials_flag: bool, trial_timeout: float) -> None:
    """Run the local preflight: every blocking check and warning.

    Exit 1 when a blocking check fails.
    """
    registry_path = reg.registry_path(registry)
    raw = read_manifest(manifest)
    rv, m = review_document(manifest, raw, trial_timeout if run_trials_flag else None)
    status: dict[str, Any] = {"path": str(registry_path), "exists": registry_path.is_file(), "present": False}
    extra: list[dict[str, str]] = []
    if m is not None:
        status, extra = registry_status(m, registry_path)
    ident = {k: raw[k] if isinstance(raw.get(k), str) else None for k in ("id", "version")}
    out = {
        "schema": "cap-review.v0",
        "manifest": str(manifest.absolute()),
        **ident,
        "passed": rv.passed,
        "blocking_failures": len(rv.failures),
        "checks": [c.to_json() for c in rv.checks],
        "warnings": rv.warnings_json() + extra,
        "trials": {"ran": rv.trials is not None, "timeout_s": trial_timeout,
                   "results": [t.to_json() for t in rv.trials or []]},
        "registry": status,
    }
    label = f"{ident['id']}@{ident['version']}" if m is not None else str(manifest)
    emit(out, "cap-review", _review_text(rv, label))
    if not rv.passed:
        raise rv.error()


@cli.command("publish", epilog=examples("cap publish --local --dry-run", "cap publish --local --registry registry/packages.json --json"))
@click.option("--local", "local", is_flag=True, help="Publish into a filesystem registry (the only kind today).")
@manifest_option
@registry_option
@click.option("--dry-run", is_flag=True, help="Decide everything (safe trials included), write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing id@version.")
@trial_timeout_option
@json_option
def publish_cmd(local: bool, manifest: Path, registry: str, dry_run: bool, force: bool,
                trial_timeout: float) -> None:
    """Review, compile and write the package into the local registry JSON.

    The review is the same as `cap review --run-trials`: every blocking check, and the safe trials
    run. A failing check or trial publishes nothing.
    """
    if not local:
        raise AtoError(E_USAGE, "Remote publish is not implemented",
                       hint="pass --local; hosted publishing is future marketplace work")
    registry_path = reg.registry_path(registry)
    m = load(manifest)
    rv = review(m, run_trials(m, trial_timeout))
    if not rv.passed:
        raise rv.error()
    package = compile_package(m, registry_path, rv)
    action, count = reg.publish(registry_path, package, force=force, dry_run=dry_run)
    out = {
        "schema": "cap-publish.v0",
        "dry_run": dry_run,
        "registry": str(registry_path),
        "action": action,
        "id": m.id,
        "version": m.version,
        "digest": package["digest"],
        "packages": count,
        "package": package,
        "warnings": rv.warnings_json(),
        "trials": {"ran": True, "timeout_s": trial_timeout, "results": [t.to_json() for t in rv.trials or []]},
    }
    _human_warnings(out["warnings"])
    verb = {"added": "published", "replaced": "replaced"}[action]
    prefix = "dry run: would have " if dry_run else ""
    emit(out, "cap-publish", f"{prefix}{verb} {m.id}@{m.version} in {registry}")


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog="cap"))


if __name__ == "__main__":
    main()
