"""``ato init`` (a first capsule.toml + capsule.lock) and ``ato lock`` (create or refresh capsule.lock)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.common import emit, info, json_mode, json_option
from pipeline.cli.help import examples


def _lock(project: Path, check: bool):
    from pipeline.manifest import load_manifest
    from stages.project_lock import lock_project

    manifest = load_manifest(project)
    return lock_project(manifest, check=check, run_drivers=_run_drivers(manifest), notify=info)


def _run_drivers(manifest) -> list[str]:
    """The driver of every route `ato run` can take, as the runtime router decides it (so the lock asks for
    exactly the lockfiles the run will)."""
    from pipeline.errors import AtoError
    from pipeline.runtime.router import route

    out = set()
    for label in [None, *manifest.all_targets()]:
        try:
            out.add(route(manifest, label).driver)
        except AtoError:
            continue  # a route this host cannot take (another platform's tool) needs no lock here
    return sorted(d for d in out if d)


def _lock_line(doc: dict, subject: str = "capsule.lock") -> str:
    generated = f" (generated {', '.join(doc['generated'])})" if doc["generated"] else ""
    verb = "created" if doc["created"] else "updated" if doc["changed"] else "up to date"
    return f"{subject} {verb}{generated}"


@click.command("init", epilog=examples("ato init                       # detect the project in this directory",
                                       "ato init web --template static --port 8080"))
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--template", type=click.Choice(["static", "node", "deno", "python", "native", "tool"]),
              help="What kind of project this is (default: detected from its files).")
@click.option("--name", metavar="NAME", help="The capsule name (default: from package.json/pyproject.toml/deno.json, else the "
                             "directory name), made kebab-case.")
@click.option("--port", type=int, metavar="PORT", help="Serve on this port (makes a node/deno/python project a web target).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@click.option("--force", is_flag=True, help="Overwrite an existing capsule.toml.")
@json_option
def init_cmd(directory: Path, template: str | None, name: str | None, port: int | None, yes: bool,
             force: bool) -> None:
    """Write a commented capsule.toml and capsule.lock for a project.

    DIRECTORY (default .) is detected from its files unless --template says what it is; the result
    builds and runs at once.
    """
    from stages.scaffold import plan_init, write_init

    plan = plan_init(directory, template=template, name=name, port=port)
    spec = plan.spec
    if not yes and not json_mode() and sys.stdin.isatty() and sys.stderr.isatty():
        where = f" from {', '.join(spec.evidence)}" if spec.evidence else ""
        click.echo(f"Detected a {spec.template} project{where}: {spec.name} {spec.version} "
                   f"({spec.runtime}/{spec.driver}, entrypoint {spec.entrypoint})", err=True)
        if not click.confirm(f"Write {plan.manifest_path}?", default=True, err=True):
            raise click.exceptions.Abort()
    written = write_init(plan, force=force)
    try:
        lock = _lock(plan.project_dir, check=False).to_json()
    except BaseException:
        written.rollback()  # nothing half-done: a retry starts from the same directory
        raise
    if spec.build_hook:
        # the build command is ato's own suggestion, written at the user's request: `ato build` runs it
        # without asking again (a changed command, or a cloned project, asks as any build step does)
        from pipeline.cli.build import record_build_steps_consent
        from pipeline.manifest import load_manifest

        record_build_steps_consent(load_manifest(plan.project_dir), "ato init")
    created = sorted(str(p.relative_to(plan.project_dir)) for p in written.created
                     if p not in (plan.project_dir, plan.manifest_path) and p.is_file())
    cd = [] if plan.project_dir == Path.cwd().absolute() else [f"cd {directory}"]
    engine = ["ato engine register   # once: the sandbox for Tier 2 (python, native)"] \
        if spec.driver in ("python", "native") else []
    doc = {
        "schema_version": "1", "project_dir": str(plan.project_dir), "manifest_path": str(plan.manifest_path),
        "template": spec.template, "evidence": spec.evidence, "name": spec.name, "version": spec.version,
        "type": spec.type,
        "target": {"label": spec.label, "runtime": spec.runtime, "driver": spec.driver,
                   "entrypoint": spec.entrypoint, "port": spec.port},
        "build_hook": spec.build_hook, "created": created, "overwritten": written.replaced is not None,
        "lock": lock, "notes": spec.notes, "next_steps": [*cd, *engine, "ato build", "ato run"],
    }
    human = [f"Wrote {plan.manifest_path} ({spec.template}: {spec.runtime}/{spec.driver}, "
             f"entrypoint {spec.entrypoint})"]
    if created:
        human.append(f"  Created: {', '.join(created)}")
    human.append(f"  Locked:  {_lock_line(lock)}")
    human += [f"  Note:    {n}" for n in spec.notes]
    human.append("Next:")
    human += [f"  {step}" for step in doc["next_steps"]]
    emit(doc, "init", "\n".join(human))


@click.command("lock", epilog=examples("ato lock            # after editing capsule.toml or the dependencies",
                                       "ato lock --check    # in CI: fail when capsule.lock is missing or stale"))
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Write nothing; fail (E104/E207) when a lockfile is missing or stale.")
@json_option
def lock_cmd(directory: Path, check: bool) -> None:
    """Create or refresh capsule.lock and any missing language lockfile.

    A missing package-lock.json, uv.lock or deno.lock is written by its package manager.
    """
    result = _lock(directory.absolute(), check)
    doc = {**result.to_json(), "check": check}
    emit(doc, "lock", f"{result.path}: up to date" if check else _lock_line(doc, str(result.path)))


def register(group: click.Group) -> None:
    group.add_command(init_cmd)
    group.add_command(lock_cmd)
