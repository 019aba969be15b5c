"""Help people can read: grouped commands, whole-sentence summaries, examples, "did you mean".

Every command group of ``ato`` and ``cap`` is an :class:`AtoGroup`:

- a bare group (``ato``, ``ato registry``, ``cap``) prints its help on stdout and exits 0, as
  cargo and uv do;
- ``--help`` lists commands under section titles (the root's are :data:`SECTIONS`), each with
  the first sentence of its help, never cut in the middle; hidden (deprecated) commands are left out;
- a mistyped command is E100 with the closest names ("did you mean 'build'?").

Every command ends its help with examples: pass ``epilog=examples(...)`` to ``click.command``.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import click

from pipeline.errors import E_USAGE, AtoError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`$(\"'])")


def examples(*lines: str) -> str:
    """The ``Examples:`` block that ends a command's help (kept verbatim, one example per line)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def summary(cmd: click.Command) -> str:
    """The first sentence of a command's help (its ``short_help`` when it sets one), whole."""
    if cmd.short_help:
        return cmd.short_help
    text = (cmd.help or "").split("\n\n", 1)[0]
    text = " ".join(text.replace("\b", " ").split())
    return _SENTENCE_END.split(text, maxsplit=1)[0]


class AtoGroup(click.Group):
    """A click group with the house help rules (see the module docstring)."""

    #: section title -> command names, in display order; commands not named go under "Commands"
    sections: dict[str, tuple[str, ...]] = {}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing and not self.invoke_without_command:
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                              list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            raise unknown_command(ctx, self, name)
        return super().resolve_command(ctx, args)

    def visible_commands(self, ctx: click.Context) -> list[tuple[str, click.Command]]:
        out = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                out.append((name, cmd))
        return out

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = dict(self.visible_commands(ctx))
        placed: set[str] = set()
        blocks: list[tuple[str, list[str]]] = []
        for title, names in self.sections.items():
            chosen = [n for n in names if n in commands]
            placed.update(chosen)
            blocks.append((title, chosen))
        rest = [n for n in commands if n not in placed]
        blocks.append(("Commands" if not self.sections else "Other commands", rest))
        for title, names in blocks:
            if names:
                with formatter.section(title):
                    formatter.write_dl([(n, summary(commands[n])) for n in names])


def unknown_command(ctx: click.Context, group: AtoGroup, name: str) -> AtoError:
    names = [n for n, _cmd in group.visible_commands(ctx)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:
        close = [n for n in names if n.startswith(name[:3])][:3] if len(name) >= 3 else []
    hint = f"see `{ctx.command_path} --help`"
    if close:
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " + hint
    return AtoError(E_USAGE, f"no such command {name!r} in `{ctx.command_path}`", hint=hint,
                    details={"command": name, "suggestions": close})


def group(name: str | None = None, **kwargs: Any) -> Any:
    """``click.group`` with :class:`AtoGroup` (the decorator every command group uses)."""
    kwargs.setdefault("cls", AtoGroup)
    return click.group(name, **kwargs)
