"""Help people can read, checked over the whole command tree of `ato` and `cap`.

Every command's --help ends with examples; every summary is a whole sentence; the root's
commands sit under section titles with deprecated ones hidden; one metavar per option name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

import click
import pytest

from pipeline.cli import cap as cap_cli
from pipeline.cli import main as ato_main
from pipeline.cli.common import run_cli
from pipeline.cli.help import AtoGroup, summary

ROOTS = {"ato": ato_main.cli, "cap": cap_cli.cli}
# click's default metavars name a type, not a concept: every option says what it takes instead
TYPE_METAVARS = re.compile(r"^(TEXT|INTEGER|FLOAT|BOOLEAN|UUID|DIRECTORY|FILENAME)( RANGE)?$|RANGE$")


def walk(cmd: click.Command, path: list[str], parent: click.Context | None = None
         ) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    ctx = click.Context(cmd, info_name=path[-1], parent=parent)
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name} but cannot load it"
            yield from walk(sub, [*path, name], ctx)


def tree() -> list[tuple[list[str], click.Command, click.Context]]:
    return [item for prog, root in ROOTS.items() for item in walk(root, [prog])]


ALL = tree()
IDS = [" ".join(p) for p, _c, _x in ALL]


def help_of(path: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = run_cli(ROOTS[path[0]], [*path[1:], "--help"], prog=path[0])
    out = capsys.readouterr()
    assert code == 0 and out.err == "", out.err
    return out.out


@pytest.mark.parametrize("path", [p for p, _c, _x in ALL], ids=IDS)
def test_every_help_ends_with_examples(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(path, capsys)
    assert text.startswith(f"Usage: {' '.join(path)}"), text
    tail = text.rstrip("\n").split("Examples:", 1)
    assert len(tail) == 2, f"`{' '.join(path)} --help` has no Examples section:\n{text}"
    examples = [line.strip() for line in tail[1].splitlines() if line.strip()]
    assert 1 <= len(examples) <= 2 and all(f"{path[0]} " in e for e in examples), \
        examples
    # the examples are the end of the help: nothing after them
    assert tail[1].strip().splitlines()[-1].strip() == examples[-1]


@pytest.mark.parametrize("path, cmd", [(p, c) for p, c, _x in ALL], ids=IDS)
def test_every_summary_is_a_whole_sentence(path: list[str], cmd: click.Command) -> None:
    text = summary(cmd)
    assert text and text[0].isupper() or text.startswith(("ato", "cap")), text
    assert text.endswith("."), f"{' '.join(path)}: {text!r}"
    assert "..." not in text and len(text) <= 76, f"{' '.join(path)}: {text!r}"


def test_every_group_is_an_ato_group() -> None:
    groups = [" ".join(p) for p, c, _x in ALL if isinstance(c, click.Group) and not isinstance(c, AtoGroup)]
    assert groups == []


def test_root_help_is_sectioned_and_hides_deprecated_commands(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(["ato"], capsys)
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["Options", "Build & publish", "Install & run", "Manage", "Registry & Store", "Trust",
                      "Advanced"], titles
    assert "Other commands" not in text  # every command is placed in a section
    listed = {line.split()[0] for line in text.split("Build & publish:", 1)[1].split("Examples:")[0].splitlines()
              if line.strip() and line.startswith("  ") and not line.startswith("    ")}
    visible = {name for name in ato_main.COMMANDS if not ato_main.cli.get_command(click.Context(ato_main.cli),
                                                                                   name).hidden}
    assert listed == visible and {"open", "setup"}.isdisjoint(listed)
    assert help_of(["ato", "open"], capsys).startswith("Usage: ato open")  # hidden, still there


def test_one_metavar_per_option_name() -> None:
    seen: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    generic = []
    for path, cmd, ctx in ALL:
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.is_flag or param.hidden or param.count:
                continue
            metavar = param.make_metavar(ctx)
            long_name = max(param.opts, key=len)
            seen[(path[0], long_name)][metavar].append(" ".join(path))
            if TYPE_METAVARS.search(metavar):
                generic.append(f"{' '.join(path)} {long_name} {metavar}")
    assert generic == [], generic
    mixed = {k: dict(v) for k, v in seen.items() if len(v) > 1}
    assert mixed == {}
    assert set(seen[("ato", "--registry")]) == {"URL"}


def test_mistyped_command_suggests_the_close_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(ato_main.cli, ["biuld"], prog="ato") == 1
    err = capsys.readouterr().err
    assert err.startswith("error[E100]: no such command 'biuld'") and "did you mean 'build'?" in err
    assert run_cli(ato_main.cli, ["--json", "cas", "verfy"], prog="ato") == 1
    doc = __import__("json").loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert doc["error"]["code"] == "E100" and doc["error"]["details"]["suggestions"] == ["verify"]
    # hidden (deprecated) commands are never suggested
    run_cli(ato_main.cli, ["opne"], prog="ato")
    assert "'open'" not in capsys.readouterr().err


def test_usage_errors_point_at_the_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(ato_main.cli, ["build", "--no-such-flag"], prog="ato") == 1
    err = capsys.readouterr().err
    assert "No such option '--no-such-flag'" in err and "see `ato build --help`" in err
    assert len(err.strip().splitlines()) == 1
