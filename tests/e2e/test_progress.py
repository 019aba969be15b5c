"""Progress bars: seen updating on a real terminal (a tmux pane), never on a pipe or under --json.

One ~50 MB project of incompressible data (made once for the module) goes through `ato build`,
`ato publish` and `ato install` three times: on the pane's terminal, with stderr on a pipe, and
with --json. Each run has a fresh ATO_HOME and a fresh registry, so every command does the real
work (packing, uploading, downloading) every time. The pane is read with `tmux capture-pane`,
polled with a deadline, never after a fixed sleep.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import cli_path
from tests.e2e.registry_support import TOKEN, Registry
from tests.e2e.test_run_e2e import static_site

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make system-deps)")

BLOBS, BLOB_SIZE = 5, 10_000_000
BAR = re.compile(r"(Packing|Hashing|Verifying|Uploading|Downloading) +\S* +(\d+)% +([\d.]+)/([\d.]+) (?:kB|MB)")
DONE = "__ato_done__"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "big"
    static_site(root)
    for i in range(BLOBS):
        (root / "public" / f"blob{i}.bin").write_bytes(os.urandom(BLOB_SIZE))
    return root


class Pane:
    """A detached tmux session of its own (private socket) running one shell command line."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.socket = f"ato-test-{uuid.uuid4().hex[:12]}"
        line = f"{command}; echo {DONE} $?; sleep 600"
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "200",
                        "-y", "50", "-c", str(cwd), "bash", "-o", "pipefail", "-c", line],
                       env={**env, "TERM": "xterm-256color"}, check=True, timeout=60)

    def capture(self) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-J", "-t", "t", "-S", "-200"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout

    def watch(self, timeout: float = 240.0) -> tuple[list[str], int]:
        """Every distinct screen until the command line finishes, and its exit status."""
        screens: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.capture()
            if not screens or screen != screens[-1]:
                screens.append(screen)
            done = re.search(rf"{DONE} (\d+)", screen)
            if done:
                return screens, int(done.group(1))
            time.sleep(0.05)
        raise AssertionError(f"the command did not finish in {timeout}s; the pane shows:\n{screens[-1:]}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def run_in_pane(command: list[str], cwd: Path, env: dict[str, str], suffix: str = "") -> tuple[list[str], int]:
    pane = Pane(shlex.join(command) + suffix, cwd, env)
    try:
        return pane.watch()
    finally:
        pane.close()


def bar_states(screens: list[str]) -> dict[str, set[tuple[str, str]]]:
    """label -> the distinct (percent, amount done) states its bar was seen in."""
    seen: dict[str, set[tuple[str, str]]] = {}
    for screen in screens:
        for m in BAR.finditer(screen):
            seen.setdefault(m.group(1), set()).add((m.group(2), m.group(3)))
    return seen


def flow(tmp_path: Path, name: str) -> tuple[dict[str, str], dict[str, str], Registry]:
    home = tmp_path / name
    producer = {**os.environ, "HOME": str(home / "p"), "ATO_HOME": str(home / "p" / ".ato"), "ATO_TOKEN": TOKEN}
    consumer = {**os.environ, "HOME": str(home / "c"), "ATO_HOME": str(home / "c" / ".ato")}
    return producer, consumer, Registry(tmp_path / f"{name}-registry")


def commands(project: Path, name: str, registry: Registry) -> list[list[str]]:
    ato = cli_path("ato")
    out = str(project.parent / f"{name}.capsule")
    return [[ato, "build", ".", "--out", out],
            [ato, "publish", "--artifact", out, "--registry", registry.url, "--scoped-id", f"{name}/site"],
            [ato, "install", f"{name}/site", "--registry", registry.url, "--allow-unsigned"]]


def test_progress_updates_on_a_terminal(project: Path, tmp_path: Path) -> None:
    producer, consumer, registry = flow(tmp_path, "tty")
    try:
        build, publish, install = commands(project, "tty", registry)
        for argv, env, labels in ((build, producer, {"Packing"}), (publish, producer, {"Hashing", "Uploading"}),
                                  (install, consumer, {"Downloading"})):
            screens, status = run_in_pane(argv, project, env)
            assert status == 0, screens[-1]
            states = bar_states(screens)
            assert labels <= set(states), (argv[1], states, screens[-1])
            # the same line was redrawn with new numbers while the work went on (not a line per update)
            moving = {label for label in labels if len(states[label]) >= 2}
            assert moving, (argv[1], states)
            final = screens[-1]
            for label in labels:
                assert len(re.findall(rf"^{label} ", final, re.M)) == 1, final
                assert re.search(rf"^{label} .* 100% ", final, re.M), final
        assert "Installed tty/site 1.0.0" in screens[-1]
        assert re.search(r"downloaded \d+ of \d+ chunks \(5\d\.\d MB\)", screens[-1]), screens[-1]  # one byte format
    finally:
        registry.stop()


def test_no_progress_on_a_pipe_or_under_json(project: Path, tmp_path: Path) -> None:
    for name, suffix, extra in (("pipe", " 2>&1 | cat", []), ("json", "", ["--json"])):
        producer, consumer, registry = flow(tmp_path, name)
        try:
            for argv, env in zip(commands(project, name, registry), (producer, producer, consumer), strict=True):
                screens, status = run_in_pane(argv + extra, project, env, suffix)
                assert status == 0, screens[-1]
                assert bar_states(screens) == {}, (name, argv[1], screens[-1])
                assert not any("━" in s or "\x1b" in s for s in screens)
                if extra:  # --json: the one document is all the terminal shows
                    text = screens[-1].split(DONE)[0].strip()
                    assert text.startswith("{") and text.endswith("}"), text
        finally:
            registry.stop()
