"""The command line as a person meets it: bare groups, Ctrl-C, colour and emoji, completion.

Run as subprocesses of the installed `ato`/`cap`, on pipes and on a real pseudo-terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import click
import pytest

from tests.conftest import cli_path
from tests.e2e.terminal import TtyProc
from tests.e2e.test_run_e2e import Proc, http_get, static_site

ESCAPE = re.compile(r"\x1b\[")
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF]")


def groups() -> list[list[str]]:
    """Every command group of `ato` (with the root) and `cap`, as argv."""
    from pipeline.cli import cap as cap_cli
    from pipeline.cli import main as ato_main

    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(cmd, info_name=path[-1], parent=parent)
        if isinstance(cmd, click.Group):
            out.append(path)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)
    walk(ato_main.cli, ["ato"], None)
    walk(cap_cli.cli, ["cap"], None)
    return out


@pytest.mark.parametrize("argv", groups(), ids=lambda a: " ".join(a))
def test_a_bare_group_prints_its_help_and_exits_0(argv: list[str]) -> None:
    proc = subprocess.run([cli_path(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Usage: {' '.join(argv)} ") and len(lines) > 8, proc.stdout
    assert "Commands:" in proc.stdout or "Build & publish:" in proc.stdout
    assert "Examples:" in proc.stdout and "error" not in proc.stdout


def test_mistyped_command_says_did_you_mean(ato) -> None:
    res = ato(["regsitry", "serve"])
    assert res.code == 1 and res.stdout == ""
    assert res.stderr.strip() == ("error[E100]: no such command 'regsitry' in `ato` (did you mean 'registry'? "
                                  "see `ato --help`)")


def test_ctrl_c_on_registry_serve_exits_130_quietly(tmp_path: Path) -> None:
    proc = Proc(["registry", "serve", "--port", "0", "--data-dir", str(tmp_path / "reg")])
    try:
        proc.wait_line("Local registry serving at", timeout=60)
        os.killpg(proc.p.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the process group
        assert proc.wait(timeout=60) == 130
        assert [line for line in proc.err if line.strip()] == []
    finally:
        proc.kill()
    # the same on a terminal: nothing but the banner, no "error", no "aborted"
    tty = TtyProc(["registry", "serve", "--port", "0", "--data-dir", str(tmp_path / "reg2")])
    try:
        tty.wait_for("Write auth: off")
        tty.interrupt()
        assert tty.wait() == 130
        assert "error" not in tty.output.lower() and "abort" not in tty.output.lower()
    finally:
        tty.close()


def run_on_tty(project: Path, port: int, env: dict[str, str] | None = None) -> str:
    """`ato run` on a terminal until the site answers; Ctrl-C; what the terminal showed."""
    tty = TtyProc(["run", str(project), "--yes"], env=env)
    try:
        out = tty.wait_for(f"http://127.0.0.1:{port}/")
        assert "static ok" in http_get(f"http://127.0.0.1:{port}/")
        tty.interrupt()
        assert tty.wait() == 130
        return out
    finally:
        tty.close()


def test_emoji_and_colour_only_on_a_terminal_without_no_color(ato, tmp_path: Path) -> None:
    project = tmp_path / "site"
    port = static_site(project)
    # positive control: a terminal shows the emoji
    assert "🌐 web target 'site' is available at" in run_on_tty(project, port)
    # NO_COLOR, TERM=dumb, and `output.color = never` each take every emoji and escape away
    for env in ({"NO_COLOR": "1"}, {"TERM": "dumb"}, {"NO_COLOR": "1", "TERM": "dumb"}):
        out = run_on_tty(project, port, env)
        assert "web target 'site' is available at" in out
        assert not EMOJI.search(out) and not ESCAPE.search(out), (env, out)
    assert ato(["config", "set", "output.color", "never"]).code == 0
    out = run_on_tty(project, port)
    assert not EMOJI.search(out) and not ESCAPE.search(out), out
    assert ato(["config", "unset", "output.color"]).code == 0
    # a pipe never gets them
    proc = Proc(["run", str(project), "--yes"])
    try:
        line = proc.wait_line("is available at", stream="err", timeout=60)
        assert line.startswith("web target 'site'") and not EMOJI.search(line)
        os.killpg(proc.p.pid, signal.SIGINT)
        assert proc.wait() == 130
        assert not any(EMOJI.search(x) or ESCAPE.search(x) for x in proc.err + proc.out)
    finally:
        proc.kill()


def test_errors_are_red_on_a_terminal_only(tmp_path: Path) -> None:
    tty = TtyProc(["biuld"])
    try:
        assert tty.wait() == 1
        assert "\x1b[" in tty.output and "did you mean 'build'?" in tty.output
    finally:
        tty.close()
    tty = TtyProc(["biuld"], env={"NO_COLOR": "1"})
    try:
        assert tty.wait() == 1
        assert "\x1b[" not in tty.output and tty.output.startswith("error[E100]: no such command 'biuld'")
    finally:
        tty.close()


def test_shell_completion_scripts_complete_commands(ato) -> None:
    for shell in ("bash", "zsh", "fish"):
        res = ato(["completion", shell])
        assert res.code == 0 and "_ATO_COMPLETE" in res.stdout, res.stderr
    assert ato(["completion", "tcsh"]).code == 1
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    path = f"{Path(cli_path('ato')).parent}{os.pathsep}{os.environ['PATH']}"
    script = ('source <(ato completion bash); COMP_WORDS=(ato re); COMP_CWORD=1; _ato_completion ato; '
              'printf "%s\\n" "${COMPREPLY[@]}"; COMPREPLY=(); COMP_WORDS=(ato cas ""); COMP_CWORD=2; '
              '_ato_completion ato; printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run([bash, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": path})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["registry", "gc", "verify"], out.stdout
