"""``ato completion bash|zsh|fish``: the shell completion script (click's own completion machinery)."""

from __future__ import annotations

import click

from pipeline.cli.help import examples

SHELLS = ("bash", "zsh", "fish")
INSTALL = {
    "bash": 'eval "$(ato completion bash)"   # in ~/.bashrc',
    "zsh": 'eval "$(ato completion zsh)"    # in ~/.zshrc',
    "fish": "ato completion fish > ~/.config/fish/completions/ato.fish",
}


def script(root: click.Command, prog: str, shell: str) -> str:
    """The completion script of ``prog`` for ``shell``; the shell calls ``prog`` back to complete."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # SHELLS are the shells click supports
    var = f"_{prog.replace('-', '_').upper()}_COMPLETE"
    return cls(root, {}, prog, var).source()


@click.command("completion", epilog=examples(INSTALL["bash"], INSTALL["fish"]))
@click.argument("shell", type=click.Choice(SHELLS))
def completion_cmd(shell: str) -> None:
    """Print the shell completion script (bash, zsh or fish).

    Load it from your shell's start-up file; it completes commands, options and choices.
    """
    from pipeline.cli.main import cli

    click.echo(script(cli, "ato", shell))


def register(group: click.Group) -> None:
    group.add_command(completion_cmd)
