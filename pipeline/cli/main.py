"""The ``ato`` command tree. Thin: each group lives in its own module."""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

import click

from pipeline.cli.common import State, _json_callback, run_cli

# Modules that each export ``register(group)``; one per command group.
COMMAND_MODULES = [
    "pipeline.cli.build",
    "pipeline.cli.inspect",
    "pipeline.cli.cas",
    "pipeline.cli.registry",
    "pipeline.cli.publish",
    "pipeline.cli.install",
    "pipeline.cli.search",
    "pipeline.cli.key",
    "pipeline.cli.trust",
    "pipeline.cli.sign",
    "pipeline.cli.verify",
    "pipeline.cli.run",
    "pipeline.cli.ps",
    "pipeline.cli.logs",
    "pipeline.cli.close",
    "pipeline.cli.engine",
    "pipeline.cli.fetch",
    "pipeline.cli.finalize",
    "pipeline.cli.project",
]


def _version() -> str:
    try:
        return version("ato")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+local"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "-V", "--version", prog_name="ato", message="%(prog)s %(version)s")
@click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
              callback=_json_callback, help="Print exactly one JSON document on stdout.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ato: build, publish, install and run capsules (content-addressed, fail-closed)."""
    ctx.ensure_object(State)


for _name in COMMAND_MODULES:
    import_module(_name).register(cli)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog="ato"))


if __name__ == "__main__":
    main()
