"""The progress reporter and the one human byte format, in-process."""

from __future__ import annotations

import io
import sys

import pytest

from pipeline import config
from pipeline.cli.progress import RichProgress, reporter
from pipeline.progress import SILENT, counted, human_bytes


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (104_857_600, "104.9 MB"),
                                     (105_461_760, "105.5 MB"), (2_500_000_000, "2.5 GB")])
def test_human_bytes_is_decimal_with_one_decimal(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_silent_reporter_does_nothing_and_counted_passes_bytes_through() -> None:
    with SILENT.task("Packing", total=10, chunks=2) as task:
        assert b"".join(counted([b"abc", b"defg"], task)) == b"abcdefg"
        task.advance(3, chunks=1)
        task.update(completed=10, total=10, label="x")


def test_bars_only_on_a_terminal_without_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    with reporter(stream=io.StringIO()) as progress:
        assert progress is SILENT  # a pipe or a file
    with reporter(json=True, stream=FakeTty()) as progress:
        assert progress is SILENT
    monkeypatch.setenv("TERM", "dumb")
    with reporter(stream=FakeTty()) as progress:
        assert progress is SILENT
    monkeypatch.setenv("TERM", "xterm-256color")
    config.set_value("output.progress", "never")
    with reporter(stream=FakeTty()) as progress:
        assert progress is SILENT
    config.unset("output.progress")
    out = FakeTty()
    with reporter(stream=out) as progress:
        assert isinstance(progress, RichProgress)
        with progress.task("Uploading", total=2_000_000, chunks=4) as task:
            task.advance(1_000_000, chunks=2)
    text = out.getvalue()
    assert "Uploading" in text and "2.0/2.0 MB" in text and "2/4 chunks" in text


def test_rich_is_not_imported_until_a_bar_is_shown() -> None:
    import subprocess

    code = ("import sys, io; from pipeline.cli.progress import reporter; from pipeline.cli import main\n"
            "from pipeline.cli.common import run_cli\n"
            "with reporter(stream=io.StringIO()) as p: pass\n"
            "run_cli(main.cli, ['ps']); run_cli(main.cli, ['--version']); run_cli(main.cli, ['ps', '--json'])\n"
            "print('rich' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False"  # `ato ps` and `ato --version` never load rich
