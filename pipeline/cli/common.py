"""What every command shares: the --json flag, output helpers, error rendering.

The CLI is the only layer that prints. Commands call :func:`emit` with an
envelope and the schema it must satisfy; failures are raised as AtoError and
rendered once by :func:`run_cli`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from pipeline.envelope import render
from pipeline.errors import E_INTERNAL, E_USAGE, EXIT_INTERNAL, EXIT_USER, AtoError


class State:
    """Per-invocation options set on the group (e.g. ``ato --json build``)."""

    def __init__(self) -> None:
        self.json = False


def _json_callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        root = ctx.find_root()
        root.ensure_object(State).json = True
    return value


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` to a command; it merges with the global ``ato --json``."""
    return click.option(
        "--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
        callback=_json_callback, help="Print exactly one JSON document on stdout.",
    )(fn)


def json_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    state = ctx.find_root().obj
    return bool(isinstance(state, State) and state.json)


def emit(doc: dict[str, Any], schema: str, human: str | None = None) -> None:
    """Print an envelope: JSON under --json, otherwise the human text (if any)."""
    text = render(doc, schema)
    if json_mode():
        sys.stdout.write(text)
    elif human:
        click.echo(human)


def info(message: str) -> None:
    """Human progress/notes: stderr, never under --json."""
    if not json_mode():
        click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def report_error(err: AtoError, as_json: bool) -> None:
    for problem in err.problems:
        sys.stderr.write(json.dumps(problem.to_json(), ensure_ascii=False) + "\n")
    if as_json:
        sys.stderr.write(json.dumps(err.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stderr.write(err.human_line() + "\n")


def run_cli(group: click.Group, argv: list[str] | None = None, prog: str = "ato") -> int:
    """Run a click group with the house failure rules: no traceback, documented exits."""
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = group.main(args=argv, prog_name=prog, standalone_mode=False, obj=State())
        # Without standalone mode click returns (rather than raises) the code of ctx.exit(n).
        return rv if isinstance(rv, int) else 0
    except AtoError as err:
        report_error(err, as_json)
        return err.exit_code
    except click.exceptions.Abort:
        sys.stderr.write("error: aborted\n")
        return EXIT_USER
    except click.ClickException as exc:
        err = AtoError(E_USAGE, exc.format_message())
        report_error(err, as_json)
        return EXIT_USER
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("ATO_DEBUG") == "1":
            traceback.print_exc()
        err = AtoError(E_INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        report_error(err, as_json)
        return EXIT_INTERNAL
