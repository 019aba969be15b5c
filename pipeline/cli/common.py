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

from pipeline.cli.term import decorated, for_stream
from pipeline.envelope import render
from pipeline.errors import (
    E_INTERNAL,
    E_TOO_DEEP,
    E_USAGE,
    EXIT_INTERNAL,
    AtoError,
    from_os_error,
    printable,
    terminal_safe_json,
)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


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
    """Print an envelope: JSON under --json, otherwise the human text (if any).

    The envelope is validated when it is what leaves the program (under --json); human
    text does not pay for loading the schema validator, so `ato ps` starts fast.
    """
    if json_mode():
        sys.stdout.write(render(doc, schema))
    elif human:
        say(human)


def say(text: str, *, err: bool = False, styled: str = "") -> None:
    """Human text on stdout (or stderr): emoji and colour only where the stream may show them.

    ``text`` echoes values (names, paths, registry messages): its control characters are escaped, so a
    value cannot move the cursor or recolour the terminal; ``styled`` is our own (coloured) prefix.
    """
    stream = sys.stderr if err else sys.stdout
    text = styled + for_stream(printable(text), stream)
    if err:
        from pipeline.cli.progress import active

        bars = active()
        if bars is not None:
            bars.print(text)
            return
    click.echo(text, file=stream, color=decorated(stream))


def info(message: str) -> None:
    """Human progress/notes: stderr, never under --json."""
    if not json_mode():
        say(message, err=True)


def warn(message: str) -> None:
    label = click.style("warning", fg="yellow", bold=True) if decorated(sys.stderr) else "warning"
    say(f": {message}", err=True, styled=label)


def report_error(err: AtoError, as_json: bool) -> None:
    for problem in err.problems:
        sys.stderr.write(terminal_safe_json(json.dumps(problem.to_json(), ensure_ascii=False)) + "\n")
    if as_json:
        sys.stderr.write(terminal_safe_json(json.dumps(err.to_json(), ensure_ascii=False)) + "\n")
        return
    line = for_stream(err.human_line(), sys.stderr)
    if decorated(sys.stderr):
        line = click.style("error", fg="red", bold=True) + line[len("error"):]
    sys.stderr.write(line + "\n")


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt) or isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)


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
    except click.exceptions.Abort as exc:
        if _interrupted(exc):  # Ctrl-C: the exit status says it, nothing more to print
            return EXIT_INTERRUPTED
        err = AtoError(E_USAGE, "aborted (no answer was given)")
        report_error(err, as_json)
        return err.exit_code
    except click.ClickException as exc:
        no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", None)
        if no_args_help is not None and isinstance(exc, no_args_help):  # a bare group: its help, exit 0
            click.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
            return 0
        ctx = getattr(exc, "ctx", None)
        err = AtoError(E_USAGE, _one_line(exc.format_message()),
                       hint=f"see `{ctx.command_path} --help`" if ctx is not None else None)
        report_error(err, as_json)
        return err.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("ATO_DEBUG") == "1":
            traceback.print_exc()
        err = from_os_error(exc)  # disk full, name too long: the user's to fix, with their own codes
        if err is None and isinstance(exc, RecursionError):  # a reader without its own depth check (E004)
            err = AtoError(E_TOO_DEEP, "an input is nested too deeply to process (a document or a directory tree "
                                       "inside itself more levels than ato reads)", hint="flatten it")
        if err is not None:
            report_error(err, as_json)
            return err.exit_code
        err = AtoError(E_INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        report_error(err, as_json)
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split())


REGISTRY_HELP = "Registry URL (default: `ato config get registry`: ATO_REGISTRY, config.toml, else the Store)."


def registry_option(help: str = REGISTRY_HELP, dest: str = "registry") -> Callable[[Callable[..., Any]], Any]:
    """``--registry URL``: the same flag, metavar and default resolution on every command that takes it."""
    return click.option("--registry", dest, metavar="URL", default=None, help=help)


def resolve_registry(flag: str | None) -> str:
    """THE registry resolver: ``--registry`` > ATO_REGISTRY > ``registry`` in config.toml > the Store."""
    from pipeline import config

    return str(config.registry(flag).value)
