"""Placeholder until implemented."""

import click


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
