"""The ``ato`` command tree. Thin: each group lives in its own module."""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType

import click

from pipeline.cli.common import State, _json_callback, run_cli
from pipeline.cli.help import AtoGroup, examples

# httpx imports its own command line, and with it rich's tables, progress and syntax colouring
# (~60 ms of CPU in every networked command), whenever click and rich are installed, as they are
# for ato, which never runs it. An empty module in its place makes httpx skip it.
sys.modules.setdefault("httpx._main", ModuleType("httpx._main"))

# Each module exports ``register(group)`` and adds the commands named here. Modules
# are imported only when one of their commands runs (or for --help), so `ato ps`
# does not pay for doit, the HTTP stack or the sandbox engine.
COMMANDS: dict[str, str] = {
    "build": "pipeline.cli.build",
    "inspect": "pipeline.cli.inspect",
    "cas": "pipeline.cli.cas",
    "registry": "pipeline.cli.registry",
    "publish": "pipeline.cli.publish",
    "install": "pipeline.cli.install",
    "search": "pipeline.cli.search",
    "key": "pipeline.cli.key",
    "trust": "pipeline.cli.trust",
    "sign": "pipeline.cli.sign",
    "verify": "pipeline.cli.verify",
    "run": "pipeline.cli.run",
    "open": "pipeline.cli.run",
    "ps": "pipeline.cli.ps",
    "logs": "pipeline.cli.logs",
    "close": "pipeline.cli.close",
    "sync": "pipeline.cli.sync",
    "config": "pipeline.cli.config",
    "engine": "pipeline.cli.engine",
    "setup": "pipeline.cli.engine",
    "fetch": "pipeline.cli.fetch",
    "finalize": "pipeline.cli.finalize",
    "project": "pipeline.cli.project",
    "unproject": "pipeline.cli.project",
    "login": "pipeline.cli.login",
    "whoami": "pipeline.cli.login",
    "logout": "pipeline.cli.login",
    "gen-ci": "pipeline.cli.gen_ci",
    "source": "pipeline.cli.source",
    "completion": "pipeline.cli.completion",
    "init": "pipeline.cli.init",
    "lock": "pipeline.cli.init",
    "list": "pipeline.cli.manage",
    "uninstall": "pipeline.cli.manage",
    "upgrade": "pipeline.cli.manage",
    "gc": "pipeline.cli.manage",
    "validate": "pipeline.cli.validate",
    "manifest": "pipeline.cli.manifest_cmd",
}
COMMAND_MODULES = sorted(set(COMMANDS.values()))

# `ato --help` lists the commands under these titles, in this order (deprecated ones are hidden).
SECTIONS: dict[str, tuple[str, ...]] = {
    "Build & publish": ("init", "lock", "build", "validate", "publish", "gen-ci"),
    "Install & run": ("install", "run", "ps", "logs", "close", "sync"),
    "Manage": ("list", "upgrade", "uninstall", "gc", "config", "engine", "cas", "manifest", "completion"),
    "Registry & Store": ("search", "registry", "login", "whoami", "logout", "source"),
    "Trust": ("key", "sign", "verify", "trust"),
    "Advanced": ("inspect", "fetch", "finalize", "project", "unproject"),
}


class LazyGroup(AtoGroup):
    """The root group: imports a command's module the first time it is needed."""

    sections = SECTIONS

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        scratch = click.Group()
        import_module(module).register(scratch)
        return scratch.commands.get(cmd_name)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # only for --version: it is slow to import

    try:
        return version("ato")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+local"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"ato {_version()}")
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples("ato build . && ato publish --artifact ./<name>.capsule --registry URL",
                             "ato install publisher/slug && ato run publisher/slug"))
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
              callback=_json_callback, help="Print exactly one JSON document on stdout.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ato: build, publish, install and run capsules.

    Every artifact is content-addressed and byte-reproducible; anything ato cannot verify, it
    refuses.
    Run `ato COMMAND --help` for a command's options and examples.
    """
    ctx.ensure_object(State)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog="ato"))


if __name__ == "__main__":
    main()
