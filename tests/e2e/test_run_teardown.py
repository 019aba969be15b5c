"""No process left behind: every way a run ends stops every process it started.

The capsule is the deepest tree we know: host Node as a Tier 2 opt-in (``driver =
"native"``, ``npm start``) under the bubblewrap engine, so each service is
bwrap -> bwrap -> npm -> sh -> node, and the server also spawns a detached
grandchild in a session of its own. For each exit path — fail-fast, a refused
start, ``ato close``, SIGINT and SIGKILL of ``ato run`` itself — the test records
every pid below ``ato`` while the run is up and asserts none is alive two seconds
after the run ended (polled against a deadline).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.test_run_e2e import Proc, http_get, register_engine, wait_for, write

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("npm") is None,
                                reason="needs bubblewrap and npm (make system-deps)")

SERVER_JS = """\
const http = require('http');
const { spawn } = require('child_process');
const kid = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { detached: true, stdio: 'ignore' });
kid.unref();
console.log('server up');
http.createServer((q, s) => s.end('tree ok')).listen(Number(process.env.PORT), '127.0.0.1');
"""
LATE_JS = """\
const fs = require('fs');
console.log('late waiting');
setInterval(() => { if (fs.existsSync('go')) { console.log('late gives up'); process.exit(3); } }, 50);
"""


def tree_project(root: Path, *, late: bool = False) -> Path:
    manifest = """\
schema_version = "0.2"
name = "tree"
version = "0.1.0"
type = "app"
default_target = "app"

[targets.app]
runtime = "source"
driver = "native"
entrypoint = "npm start"

[services.main]
entrypoint = "npm start"
readiness_probe = { http_get = "/", port = "PORT" }

[services.side]
entrypoint = "npm run side"
"""
    if late:
        manifest += """
[services.late]
entrypoint = "npm run late"
depends_on = ["main"]
readiness_probe = { tcp_connect = "127.0.0.1", port = "LATE_PORT" }
"""
    return write(root, {
        "capsule.toml": manifest,
        "package.json": '{"name": "tree", "version": "1.0.0", "private": true, "scripts": {"start": "node '
                        'server.js", "side": "node side.js", "late": "node late.js"}}\n',
        "server.js": SERVER_JS,
        "side.js": "console.log('side up'); setInterval(() => {}, 1000);\n",
        "late.js": LATE_JS,
    })


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def ppid_of(pid: int) -> int:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(data[data.rfind(")") + 2:].split()[1])


def descendants(root: int) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            children.setdefault(ppid_of(int(name)), []).append(int(name))
    out: dict[int, str] = {}
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        out[pid] = cmdline(pid)
        stack.extend(children.get(pid, ()))
    return out


def running(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rfind(")") + 2:].split()[0] not in ("Z", "X")


def full_tree(root: int, *, late: bool = False) -> dict[int, str]:
    """Every pid below ``root`` once the whole tree is up, grandchildren of `npm start` included."""
    def complete() -> dict[int, str] | None:
        pids = descendants(root)
        cmds = list(pids.values())
        wanted = ["node server.js", "node side.js", "setInterval"] + (["node late.js"] if late else [])
        return pids if all(any(w in c for c in cmds) for w in wanted) else None
    pids = wait_for(complete, timeout=60)
    server = next(p for p, c in pids.items() if c == "node server.js")
    # node server.js <- sh -c node server.js <- npm start: the grandchild of `npm start` is recorded
    assert "sh -c node server.js" in pids[ppid_of(server)]
    assert "npm start" in pids[ppid_of(ppid_of(server))]
    assert len(pids) >= 11, pids  # 2 x (bwrap, bwrap, npm, sh, node) + the detached grandchild
    return pids


def assert_all_gone(pids: dict[int, str], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(running(p) for p in pids):
            return
        time.sleep(0.05)
    left = {p: c for p, c in pids.items() if running(p)}
    assert not left, f"still alive {within}s after the run ended: {left}"


@pytest.fixture
def tree_run(tmp_path, ato):
    register_engine(ato)
    started: list[Proc] = []

    def start(late: bool = False, env: dict[str, str] | None = None) -> Proc:
        project = tree_project(tmp_path / "tree", late=late)
        p = Proc(["run", str(project), "-y"], env=env)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


def test_sigint_of_ato_run_stops_the_whole_tree(tree_run):
    p = tree_run()
    url = p.wait_line("service 'main' is available at", stream="err", timeout=60).split(" at ")[1]
    assert http_get(url) == "tree ok"
    pids = full_tree(p.p.pid)
    os.kill(p.p.pid, signal.SIGINT)
    assert p.wait() == 128 + signal.SIGINT
    assert_all_gone(pids)


def test_sigkill_of_ato_run_stops_the_whole_tree(tree_run):
    p = tree_run()
    p.wait_line("service 'main' is available at", stream="err", timeout=60)
    pids = full_tree(p.p.pid)
    os.kill(p.p.pid, signal.SIGKILL)  # ato run itself, nothing else: the supervisor outlives it and cleans up
    p.p.wait()
    assert_all_gone(pids, within=2.0 + 1.0)  # the grace period starts once the kernel told the supervisor


def test_fail_fast_stops_the_whole_tree(tree_run):
    p = tree_run()
    p.wait_line("service 'main' is available at", stream="err", timeout=60)
    pids = full_tree(p.p.pid)
    side = next(pid for pid, c in pids.items() if c == "node side.js")
    os.kill(side, signal.SIGKILL)  # one service dies: everything stops, its exit code is ato's
    assert p.wait() == 128 + signal.SIGKILL
    assert_all_gone(pids)


def test_refused_start_stops_what_already_started(tree_run, tmp_path):
    p = tree_run(late=True)
    p.wait_line("service 'main' is available at", stream="err", timeout=60)
    pids = full_tree(p.p.pid, late=True)
    (tmp_path / "tree" / "go").write_text("")  # now `late` exits before its probe ever passed
    assert p.wait() == 5
    assert any("exited before readiness" in x and "late" in x for x in p.err), p.err
    assert_all_gone(pids)


def test_ato_close_stops_the_whole_tree_of_a_background_run(tmp_path, ato):
    register_engine(ato)
    project = tree_project(tmp_path / "tree")
    res = ato(["run", str(project), "-y", "--background", "--json"], timeout=120)
    assert res.code == 0, res.stderr
    record = res.json()["process"]
    try:
        assert record["status"] == "ready"
        pids = full_tree(record["supervisor_pid"])
    finally:
        res = ato(["close", "--id", record["id"], "--json"])  # a failed check must not leave the run behind
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "run-close")
    assert_all_gone(pids)
    row = next(r for r in ato(["ps", "--json"]).json()["processes"] if r["id"] == record["id"])
    assert row["status"] == "stopped"
