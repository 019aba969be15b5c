"""The ``cap`` command tree (placeholder until implemented)."""

import sys

import click

from pipeline.cli.common import run_cli


@click.group()
def cli() -> None:
    """cap: publish agent tools described by capability.json."""


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog="cap"))
