"""Tier 1 under Deno, end to end: real `deno` (from the `deno` package), real sockets and files.

Node programs run in Deno's Node-compatibility mode with permissions derived from the
manifest. Without declarations a program cannot connect to a loopback port outside
its allowlist, read outside its directory or write outside its state dir — each
refusal is one ATO_ERR_PERMISSION_DENIED line naming the permission — and the same
program succeeds once the manifest declares the host and a state dir. An npm-style
app with a vendored dependency serves through Deno, a Deno target runs, and seed
003's tasks/services example runs verbatim.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from tests.e2e.test_run_e2e import http_get, procs, write  # noqa: F401 - procs is a fixture
from tests.test_runtime_units import SEED_003_LIFECYCLE

LOCKS = {"capsule.lock": 'version = "1"\n', "package-lock.json": '{"lockfileVersion": 3, "packages": {}}\n'}


class Listener:
    """A loopback server that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.sendall(b"hello from the host\n")
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def perm_capsule(root: Path, program: str, declarations: str = "") -> Path:
    return write(root, {"capsule.toml": f"""\
schema_version = "0.2"
name = "perm-node"
version = "0.1.0"
type = "app"
default_target = "cli"
{declarations}
[targets.cli]
runtime = "source"
driver = "node"
entrypoint = "main.js"
""", "main.js": program, "own.txt": "my own file\n", **LOCKS})


def one_denial(res, permission: str) -> dict:
    assert res.code == 1, (res.code, res.stdout, res.stderr)
    lines = [x for x in res.stderr_json_lines() if x.get("code", "").startswith("ATO_ERR_")]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line["code"] == "ATO_ERR_PERMISSION_DENIED" and line["details"]["permission"] == permission
    assert f"needs {permission} access" in line["message"]
    assert "NotCapable" not in res.stderr and "    at " not in res.stderr  # Deno's trace became that one line
    return line


def test_undeclared_egress_to_a_loopback_port_is_refused(tmp_path, ato, listener):
    program = f"require('net').connect({listener.port}, '127.0.0.1', () => console.log('CONNECTED'));\n"
    res = ato(["run", str(perm_capsule(tmp_path, program)), "-y"])
    line = one_denial(res, "net")
    assert line["details"]["resource"] == f"127.0.0.1:{listener.port}"
    assert "CONNECTED" not in res.stdout and listener.hits == 0


def test_reading_outside_the_capsule_dir_is_refused(tmp_path, ato):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    program = f"console.log(require('fs').readFileSync({str(secret)!r}, 'utf8'));\n"
    res = ato(["run", str(perm_capsule(tmp_path / "cap", program)), "-y"])
    line = one_denial(res, "read")
    assert line["details"]["resource"] == str(secret) and "host secret" not in res.stdout


def test_writing_outside_the_state_dir_is_refused(tmp_path, ato):
    target = tmp_path / "outside" / "evil.txt"
    target.parent.mkdir()
    program = f"require('fs').writeFileSync({str(target)!r}, 'evil');\n"
    res = ato(["run", str(perm_capsule(tmp_path / "cap", program)), "-y"])
    one_denial(res, "write")
    assert not target.exists()
    # not even inside its own directory: only declared state is writable
    res = ato(["run", str(perm_capsule(tmp_path / "cap2", "require('fs').writeFileSync('x.txt', 'x');\n")), "-y"])
    one_denial(res, "write")
    assert not (tmp_path / "cap2" / "x.txt").exists()


def test_declared_egress_and_state_dir_are_granted(tmp_path, ato, listener):
    program = f"""\
const fs = require('fs'), path = require('path');
const dir = process.env.ATO_STATE_DATA;
fs.writeFileSync(path.join(dir, 'note.txt'), fs.readFileSync('own.txt', 'utf8'));
fs.writeFileSync(path.join(require('os').tmpdir(), 'scratch.txt'), 'tmp');
const s = require('net').connect({listener.port}, '127.0.0.1');
s.on('data', (d) => {{ console.log('got: ' + d.toString().trim()); s.end(); }});
"""
    declarations = f"""
[network]
egress_allow = ["127.0.0.1:{listener.port}"]

[state.data]
kind = "filesystem"
durability = "ephemeral"
purpose = "notes"
"""
    res = ato(["run", str(perm_capsule(tmp_path, program, declarations)), "-y"])
    assert res.code == 0, res.stderr
    assert res.stdout == "got: hello from the host\n"
    assert listener.hits == 1
    state = Path(os.environ["ATO_HOME"]) / "capsule-state" / "perm-node" / "data" / "note.txt"
    assert state.read_text() == "my own file\n"
    assert not list((Path(os.environ["ATO_HOME"]) / "run" / "tmp").glob("run-*"))  # the per-run TMPDIR is gone


def test_undeclared_env_is_not_readable(tmp_path, ato):
    program = "console.log('home=' + process.env.HOME);\n"
    res = ato(["run", str(perm_capsule(tmp_path, program)), "-y"], env={"HOME": str(tmp_path)})
    one_denial(res, "env")


NPM_LOCK = """\
{
  "name": "npm-web",
  "version": "1.0.0",
  "lockfileVersion": 3,
  "requires": true,
  "packages": {
    "": {"name": "npm-web", "version": "1.0.0", "dependencies": {"pad-it": "1.2.0"}},
    "node_modules/pad-it": {"version": "1.2.0"}
  }
}
"""


def test_npm_style_web_app_with_a_vendored_dependency_serves_through_deno(tmp_path, procs):  # noqa: F811
    from tests.e2e.test_run_e2e import free_port

    port = free_port()
    write(tmp_path, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "npm-web"
version = "1.0.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "web"
driver = "node"
port = {port}

[services.main]
entrypoint = "npm start"
readiness_probe = {{ http_get = "/", port = "PORT" }}
""",
        "capsule.lock": 'version = "1"\n',
        "package.json": '{"name": "npm-web", "version": "1.0.0", "scripts": {"start": "node src/server.js"}, '
                        '"dependencies": {"pad-it": "1.2.0"}}\n',
        "package-lock.json": NPM_LOCK,
        "node_modules/pad-it/package.json": '{"name": "pad-it", "version": "1.2.0", "main": "lib/index.js"}\n',
        "node_modules/pad-it/lib/index.js": "module.exports = (s, n) => String(s).padStart(n, '0');\n",
        "src/server.js": """\
const http = require('http');
const pad = require('pad-it');
http.createServer((req, res) => res.end('order ' + pad(42, 6) + ' via ' + (typeof Deno)))
  .listen(Number(process.env.PORT), '127.0.0.1');
""",
    })
    p = procs(["run", str(tmp_path), "-y"])
    p.wait_line(f"service 'main' is available at http://127.0.0.1:{port}/", stream="err", timeout=60)
    assert http_get(f"http://127.0.0.1:{port}/") == "order 000042 via object"  # Deno, not host node


def test_a_deno_target_runs(tmp_path, ato):
    write(tmp_path, {"capsule.toml": """\
schema_version = "0.2"
name = "hello-deno"
version = "0.1.0"
type = "app"
default_target = "cli"

[targets.cli]
runtime = "source"
driver = "deno"
entrypoint = "main.ts"
""", "capsule.lock": 'version = "1"\n', "deno.lock": '{"version": "5"}\n', "main.ts": """\
const who: string = Deno.args[0] ?? "nobody";
console.log(`hello ${who} from deno ${Deno.version.deno.split(".")[0]}`);
"""})
    res = ato(["run", str(tmp_path), "-y", "--", "world"])
    assert res.code == 0, res.stderr
    assert res.stdout == "hello world from deno 2\n"


SEED_003 = """\
schema_version = "1.1"
name = "example-app"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
entrypoint = "server.js"

""" + SEED_003_LIFECYCLE  # seed 003's block, verbatim


def test_seed_003_tasks_and_services_example_runs_verbatim(tmp_path, procs, ato):  # noqa: F811
    write(tmp_path, {
        "capsule.toml": SEED_003,
        "capsule.lock": 'version = "1"\n',
        "package.json": '{"name": "example-app", "version": "0.1.0", "private": true, '
                        '"scripts": {"start": "node server.js"}}\n',
        "package-lock.json": '{"name": "example-app", "version": "0.1.0", "lockfileVersion": 3, "requires": true, '
                             '"packages": {"": {"name": "example-app", "version": "0.1.0"}}}\n',
        "server.js": """\
const http = require('http');
http.createServer((req, res) => res.end(req.url === '/health' ? 'ok' : 'hello from seed 003'))
  .listen(Number(process.env.APP_PORT), '127.0.0.1');
""",
    })
    p = procs(["run", str(tmp_path), "-y"])
    url = p.wait_line("service 'app' is available at http://127.0.0.1:", stream="err", timeout=60).split(" at ")[1]
    assert http_get(url) == "hello from seed 003"  # the printed URL is the port the probe checked
    assert (tmp_path / "node_modules").is_dir() and not (tmp_path / "deno.lock").exists()


@pytest.mark.parametrize("script,why", [
    ("node server.js && rm -rf /", "cannot run"),
    ("python3 -m http.server", "cannot run"),
])
def test_package_scripts_that_are_not_node_programs_are_refused_before_start(tmp_path, ato, script, why):
    write(tmp_path, {"capsule.toml": SEED_003, "capsule.lock": "", "package-lock.json": "{}",
                     "server.js": "require('fs').writeFileSync('started.txt', 'x');\n",
                     "package.json": f'{{"scripts": {{"start": "{script}"}}}}\n'})
    res = ato(["run", str(tmp_path), "-y"])
    assert res.code == 1, res.stderr
    lines = [x for x in res.stderr_json_lines() if x.get("code") == "ATO_ERR_POLICY_VIOLATION"]
    assert lines and why in lines[0]["message"], res.stderr
    assert not (tmp_path / "node_modules").exists()  # refused before the install task ran


def test_seed_003_in_the_background_ps_shows_the_port_the_probe_checked(tmp_path, ato):
    write(tmp_path, {
        "capsule.toml": SEED_003, "capsule.lock": 'version = "1"\n',
        "package.json": '{"name": "example-app", "private": true, "scripts": {"start": "node server.js"}}\n',
        "package-lock.json": '{"name": "example-app", "lockfileVersion": 3, "packages": {"": {}}}\n',
        "server.js": "require('http').createServer((q, s) => s.end('bg ' + process.env.APP_PORT))"
                     ".listen(Number(process.env.APP_PORT), '127.0.0.1');\n",
    })
    res = ato(["run", str(tmp_path), "-y", "--background", "--json"])
    assert res.code == 0, res.stderr
    record = res.json()["process"]
    try:
        row = next(r for r in ato(["ps", "--json"]).json()["processes"] if r["id"] == record["id"])
        assert row["status"] == "ready" and row["url"] == f"http://127.0.0.1:{row['port']}/"
        assert http_get(row["url"]) == f"bg {row['port']}"  # the service listens where ps says
    finally:
        assert ato(["close", "--id", record["id"]]).code == 0
