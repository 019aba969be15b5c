"""`ato run` and its deprecated alias `ato open`: resolve, route, check, consent, launch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, info, json_mode, json_option, registry_option, warn
from pipeline.cli.help import examples
from pipeline.errors import E_USAGE, AtoError, printable


def _notify(message: str) -> None:
    info(f"ato: {message}" if not message.startswith(("warning:", "🌐", "👀", "📝", "🔄", "👋", "🚀"))
         else message)


def _prompt(question: Any) -> bool:
    from pipeline.cli.progress import paused

    with paused():
        return _ask(question)


def _ask(question: Any) -> bool:
    from pipeline.runtime.policy import Plan

    if isinstance(question, Plan):
        click.echo("Execution plan consent is required before run:", err=True)
        for line in question.summary_lines():
            click.echo(f"  {printable(line)}", err=True)
        return click.confirm("Approve this execution plan?", default=False, err=True)
    return click.confirm(printable(str(question)), default=False, err=True)


def run_options(fn):
    options = [
        click.argument("input", required=False),
        click.argument("args", nargs=-1, type=click.UNPROCESSED),
        registry_option("Resolve publisher/slug in this registry: the installed copy runs when it is the "
                        "registry's release, else that release is installed first."),
        click.option("-t", "--target", metavar="LABEL", help="Run this target instead of the default."),
        click.option("-y", "--yes", is_flag=True, help="Approve consent (required in non-interactive runs)."),
        click.option("--allow-unsigned", is_flag=True, help="Run an unsigned .capsule (it is reported as unsigned)."),
        click.option("--force-large-payload", is_flag=True,
                     help="Run a .capsule whose payload decodes to more than the ceiling (200 MiB unless configured)."),
        click.option("--background", is_flag=True, help="Run detached; see `ato ps` / `ato logs`."),
        click.option("--watch", is_flag=True, help="Restart when the project's files change."),
        click.option("--nacelle", metavar="PATH", help="Sandbox engine to use for Tier 2 targets."),
        click.option("--sandbox", is_flag=True, help="Explicit opt-in to the Tier 2 sandbox (always on)."),
        click.option("--unsafe", is_flag=True, hidden=True),
        click.option("--unsafe-bypass-sandbox", "unsafe_bypass", is_flag=True, hidden=True),
        click.option("-U", "--dangerously-skip-permissions", "dangerous", is_flag=True,
                     help="Run without the sandbox (needs CAPSULE_ALLOW_UNSAFE=1)."),
        json_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _execute(input_: str | None, args: tuple[str, ...], *, registry: str | None, target: str | None, yes: bool,
             background: bool, watch: bool, nacelle: str | None, unsafe: bool, unsafe_bypass: bool,
             dangerous: bool, skill: str | None = None, from_skill: str | None = None, sandbox: bool = False,
             command: str = "run", allow_unsigned: bool = False, force_large_payload: bool = False) -> None:
    from pipeline import config
    from pipeline.cli.trust import tty_consent
    from pipeline.runtime import session, table
    from pipeline.trust import gate
    from stages.capsule import consumer_limits

    # --registry, else ATO_REGISTRY / config.toml's `registry` (None: installed copies, else the Store)
    registry = config.registry(registry, fallback=False).value

    # issue 6: every .capsule is verified (digests, signature, pin, revocation) before it is unpacked
    gate.configure(allow_unsigned=allow_unsigned, assume_yes=yes, consent=tty_consent, notify=_notify,
                   limits=consumer_limits(force_large_payload))

    if skill and from_skill:
        raise AtoError(E_USAGE, "--skill and --from-skill are mutually exclusive")
    for flag, used in (("--unsafe", unsafe), ("--unsafe-bypass-sandbox", unsafe_bypass)):
        if used:
            warn(f"{flag} is a legacy flag: it is accepted but does nothing (Tier 2 always runs in the sandbox; "
                 "use --dangerously-skip-permissions with CAPSULE_ALLOW_UNSAFE=1 to bypass it)")
    if skill or from_skill:
        from pipeline.runtime import skill as skill_mod

        if watch or background:
            raise AtoError(E_USAGE, f"--skill/--from-skill does not support --{'watch' if watch else 'background'}")
        if input_ is not None:
            args = (input_, *args)
        md = skill_mod.find_skill(skill, Path.cwd()) if skill else Path(from_skill).expanduser().resolve()
        input_ = str(skill_mod.materialize(md))
    if input_ and input_.endswith(".sync") and not Path(input_).is_dir():
        # a .sync package is shown and refreshed, not launched (pipeline.runtime.sync_package)
        from pipeline.cli.sync import open_sync_file

        for flag, used in (("--background", background), ("--watch", watch), ("--target", target),
                           ("--nacelle", nacelle), ("--skill/--from-skill", skill or from_skill), ("arguments", args),
                           ("--dangerously-skip-permissions", dangerous)):
            if used:
                raise AtoError(E_USAGE, f"{flag} does not apply to a .sync package (it is shown, not launched)")
        open_sync_file(input_, yes=yes, allow_unsigned=allow_unsigned)
        return
    input_ = input_ or "."
    if watch:
        if background:
            raise AtoError(E_USAGE, "--watch and --background cannot be combined")
        from pipeline.runtime.watch import watch as watch_loop

        child = [input_]
        for flag, value in (("--registry", registry), ("--target", target), ("--nacelle", nacelle)):
            if value:
                child += [flag, value]
        if yes:
            child.append("--yes")
        if allow_unsigned:
            child.append("--allow-unsigned")
        if force_large_payload:
            child.append("--force-large-payload")
        if dangerous:
            child.append("--dangerously-skip-permissions")
        if args:
            child += ["--", *args]
        resolved = Path(input_).expanduser()
        project = resolved if resolved.is_dir() else resolved.parent
        sys.exit(watch_loop(project.resolve(), child, _notify))
    from pipeline.ipc.wiring import RunWiring

    # the capsule's [ipc.imports]: providers started (once per scope) and reached through the broker
    wiring = RunWiring(registry=registry, yes=yes, prompt=_prompt, notify=_notify)
    req = session.Request(input=input_, registry=registry, target=target, yes=yes, background=background,
                          args=tuple(args), nacelle=nacelle, dangerous=dangerous, run_id=wiring.run_id)
    try:
        prep = session.prepare(req, notify=_notify, prompt=_prompt, wire=wiring)
        for note in prep.launch.notes:
            _notify(note)
        if background:
            record = session.run_background(prep)
            wiring.rebind(record.get("supervisor_pid"), record.get("supervisor_start"))
        else:
            if json_mode():
                info("note: --json applies to failures and --background; a foreground run's stdout is the "
                     "capsule's")
            code = session.run_foreground(prep, notify=_notify)
    except BaseException:
        wiring.detach()  # the consumer never ran (or is gone): its providers are uncounted now
        raise
    if not background:
        wiring.detach()
        sys.stdout.flush()
        sys.exit(code)
    doc = table.public_record(record)
    if record["status"] == "starting":
        warn(f"capsule is still starting in background (ID: {record['id']}); `ato ps` shows its state")
    else:
        info(f"🚀 capsule started in background and is {record['status']} (ID: {record['id']}); "
             f"logs: {record['log_path']}")
    emit({"schema_version": "1", "ok": True, "process": doc}, "run-background", human=record["id"])


@click.command("run", epilog=examples("ato run . --yes", "ato run acme/hello --registry http://127.0.0.1:18787 --yes"))
@run_options
@click.option("--skill", metavar="NAME", help="Run a skill by name (./.agents/skills, ./.mcp/skills, "
                                                "~/.config/agents/skills).")
@click.option("--from-skill", "from_skill", metavar="SKILL.md", help="Run the skill described by this file.")
def run_cmd(input: str | None, args: tuple[str, ...], **kw: Any) -> None:  # noqa: A002 - click name
    """Run a project, a .capsule file or an installed publisher/slug.

    INPUT is a project dir, a capsule.toml, a .capsule file, or publisher/slug. A publisher/slug that is not installed is installed first (with consent). Arguments after
    `--` go to the capsule.
    """
    _execute(input, args, **kw)


@click.command("open", hidden=True, epilog=examples("ato run . --yes"))
@run_options
def open_cmd(input: str | None, args: tuple[str, ...], **kw: Any) -> None:  # noqa: A002 - click name
    """Deprecated alias of `ato run` (kept for compatibility)."""
    if not (input and input.endswith(".sync")):  # opening a .sync is what `open` is for
        warn("'ato open' is deprecated. Use 'ato run' instead.")
    _execute(input, args, command="open", **kw)


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(run_cmd)
    group.add_command(open_cmd)
