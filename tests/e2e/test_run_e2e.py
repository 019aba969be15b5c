"""`ato run` end to end through the installed CLI, with real child processes.

Node services with readiness probes, a tasks+services DAG with fail-fast, web/static,
a WASI module, python under the bubblewrap engine, the sandbox stopping writes and
sockets, every fail-closed refusal, and the background process table.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import assert_schema, cli_path

NODE = shutil.which("node")
BWRAP = shutil.which("bwrap")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed (make system-deps)")


def node_major() -> str:
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return out.lstrip("v").split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
    return root


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return resp.read().decode()


def wait_for(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Proc:
    """An `ato` started in the background of a test, with its output collected line by line."""

    def __init__(self, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen([cli_path("ato"), *args], cwd=cwd, env={**os.environ, **(env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_line(self, text: str, stream: str = "out", timeout: float = 20.0) -> str:
        lines = self.out if stream == "out" else self.err
        return wait_for(lambda: next((x for x in list(lines) if text in x), None), timeout)

    def wait(self, timeout: float = 30.0) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(args: list[str], **kw) -> Proc:
        p = Proc(args, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


# ------------------------------------------------------------------ projects

NODE_SERVER = """\
const http = require('http');
const port = Number(process.env.PORT);
http.createServer((req, res) => { res.end('node says hi ' + req.url); })
  .listen(port, '127.0.0.1', () => console.log('listening on ' + port));
"""


def node_project(root: Path, port: int, *, lock: bool = True) -> Path:
    files = {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "hello-node"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "web"
driver = "node"
entrypoint = "server.js"
port = {port}
readiness_probe = {{ http_get = "/health", port = "PORT" }}
""",
        "server.js": NODE_SERVER,
    }
    if lock:
        files["capsule.lock"] = 'version = "1"\n'
        files["package-lock.json"] = '{"lockfileVersion": 3, "packages": {}}\n'
    return write(root, files)


UV_LOCK = """\
version = 1
revision = 3
requires-python = ">=3.8"

[[package]]
name = "svc"
version = "0.1.0"
source = { virtual = "." }
"""
PYPROJECT = """\
[project]
name = "svc"
version = "0.1.0"
requires-python = ">=3.8"
dependencies = []
"""
PY_SERVER = """\
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"python in sandbox {sys.prefix}".encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
print("python serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def python_project(root: Path, port: int) -> Path:
    return write(root, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "hello-py"
version = "0.1.0"
type = "app"
default_target = "app"

[targets.app]
runtime = "source"
driver = "python"
entrypoint = "server.py"
port = {port}
readiness_probe = {{ http_get = "/", port = "PORT" }}
""",
        "server.py": PY_SERVER, "uv.lock": UV_LOCK, "pyproject.toml": PYPROJECT,
    })


def register_engine(ato) -> None:
    res = ato(["engine", "register", "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "engine-register")
    assert doc["sandbox"] == ["bubblewrap"]


# ------------------------------------------------------------------ drivers


@needs_node
def test_node_service_with_readiness_probe(tmp_path, procs):
    port = free_port()
    node_project(tmp_path, port)
    p = procs(["run", str(tmp_path), "--yes"])
    url_line = p.wait_line(f"http://127.0.0.1:{port}/", stream="err")
    assert "available at" in url_line
    # the URL is printed only once the probe passed, so the service answers now
    assert http_get(f"http://127.0.0.1:{port}/x") == "node says hi /x"
    assert "listening on" in p.wait_line("listening on")
    os.kill(p.p.pid, signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/")


@needs_node
def test_dag_tasks_and_services_fail_fast_with_the_exit_code_of_the_service_that_died(tmp_path, procs):
    port, api_port = free_port(), free_port()
    write(tmp_path, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "dag-app"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "web"
driver = "node"
port = {port}
runtime_tools = {{ node = "{node_major()}" }}

[isolation]
writable = ["build"]

[tasks.install]
cmd = "node install.js"

[services.api]
entrypoint = "node api.js"
depends_on = ["install"]
env = {{ API_PORT = "{api_port}" }}
readiness_probe = {{ http_get = "/health", port = "API_PORT" }}

[services.worker]
entrypoint = "node worker.js"
depends_on = ["api"]
env = {{ API_PORT = "{api_port}" }}

[services.main]
entrypoint = "node main.js"
depends_on = ["worker"]
readiness_probe = {{ tcp_connect = "127.0.0.1", port = "PORT" }}
""",
        "capsule.lock": 'version = "1"\n',
        "package-lock.json": '{"lockfileVersion": 3, "packages": {}}\n',
        "install.js": "require('fs').writeFileSync('build/installed.txt', 'yes'); console.log('install done');\n",
        "api.js": """\
const fs = require('fs');
if (!fs.existsSync('build/installed.txt')) { console.error('install did not run first'); process.exit(3); }
require('http').createServer((q, s) => s.end('api')).listen(Number(process.env.API_PORT), '127.0.0.1');
console.log('api pid=' + process.pid);
""",
        "worker.js": """\
console.log('worker pid=' + process.pid);
require('http').get('http://127.0.0.1:' + process.env.API_PORT + '/', (r) => {
  let body = ''; r.on('data', (c) => body += c); r.on('end', () => console.log('worker saw api: ' + body));
});
process.on('SIGTERM', () => { console.log('worker got SIGTERM'); process.exit(42); });
setInterval(() => {}, 1000);
""",
        "main.js": """\
require('net').createServer(() => {}).listen(Number(process.env.PORT), '127.0.0.1');
console.log('main pid=' + process.pid + ' port=' + process.env.PORT);
process.on('SIGTERM', () => process.exit(0));
""",
    })
    p = procs(["run", str(tmp_path), "-y"])
    p.wait_line(f"service 'main' is available at http://127.0.0.1:{port}/", stream="err")
    pids = {}
    for name in ("api", "worker", "main"):
        line = p.wait_line(f"[{name}] {name} pid=")
        pids[name] = int(line.split("pid=")[1].split()[0])
    assert p.wait_line("[install] install done")
    # What the runtime guarantees, and only that: a task's output is drained before its dependants
    # start, so install's line comes first. api -> worker is separated by api's passed probe (worker
    # checks api answers when it starts); worker has no probe, so it is ready at spawn and nothing
    # orders its output against main's (that semantics is pinned in test_runtime_units).
    first = {n: next(i for i, x in enumerate(p.out) if x.startswith(f"[{n}] ")) for n in ("install", "api",
                                                                                       "worker", "main")}
    assert first["install"] == min(first.values())
    assert p.wait_line("[worker] worker saw api: api")
    assert (tmp_path / "build" / "installed.txt").read_text() == "yes"
    os.kill(pids["worker"], signal.SIGTERM)  # one service dies (here: exits 42 on SIGTERM)
    assert p.wait() == 42
    assert p.wait_line("[worker] worker got SIGTERM")
    for name in ("api", "main"):
        wait_for(lambda n=name: not pid_alive(pids[n]), timeout=10)


@needs_node
def test_dag_killed_service_exit_code_is_128_plus_signal(tmp_path, procs):
    write(tmp_path, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "dag-kill"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "source"
driver = "node"
runtime_tools = {{ node = "{node_major()}" }}

[services.a]
entrypoint = "node a.js"

[services.main]
entrypoint = "node a.js"
depends_on = ["a"]
""",
        "capsule.lock": 'version = "1"\n', "package-lock.json": "{}\n",
        "a.js": "console.log('pid=' + process.pid); setInterval(() => {}, 1000);\n",
    })
    p = procs(["run", str(tmp_path), "-y"])
    pid_a = int(p.wait_line("[a] pid=").split("pid=")[1])
    pid_main = int(p.wait_line("[main] pid=").split("pid=")[1])
    os.kill(pid_a, signal.SIGKILL)
    assert p.wait() == 128 + signal.SIGKILL
    wait_for(lambda: not pid_alive(pid_main), timeout=10)


def static_site(root: Path) -> int:
    """A web/static capsule (public/index.html says "static ok") on a free port; returns the port."""
    port = free_port()
    write(root, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "site"
version = "1.0.0"
type = "app"
default_target = "site"

[targets.site]
runtime = "web"
driver = "static"
entrypoint = "public"
port = {port}
""",
        "public/index.html": "<h1>static ok</h1>\n",
    })
    return port


def test_web_static_answers_on_its_port(tmp_path, procs):
    port = static_site(tmp_path)
    write(tmp_path, {"secret.txt": "outside the served dir\n"})
    p = procs(["run", str(tmp_path), "--yes"])
    line = p.wait_line(f"http://127.0.0.1:{port}/", stream="err")
    assert "web target 'site' is available at" in line
    assert "static ok" in http_get(f"http://127.0.0.1:{port}/")
    with pytest.raises(urllib.error.HTTPError):
        http_get(f"http://127.0.0.1:{port}/../secret.txt")
    os.kill(p.p.pid, signal.SIGINT)
    assert p.wait() == 128 + signal.SIGINT


HELLO_WAT = """\
(module
 (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $e (param i32)))
 (memory (export "memory") 1)
 (data (i32.const 8) "hello from wasm\\0a")
 (func (export "_start")
   (i32.store (i32.const 0) (i32.const 8)) (i32.store (i32.const 4) (i32.const 16))
   (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 40)))
   (call $e (i32.const EXIT))))
"""


@pytest.mark.parametrize("exit_code", [0, 7])
def test_wasm_module_prints_to_stdout(tmp_path, ato, exit_code):
    import wasmtime

    (tmp_path / "hello.wasm").write_bytes(wasmtime.wat2wasm(HELLO_WAT.replace("EXIT", str(exit_code))))
    # 1.1 form without execution.runtime: the router picks wasm from the .wasm entrypoint
    write(tmp_path, {"capsule.toml": """\
schema_version = "1.1"
name = "hello-wasm"
version = "0.1.0"
type = "app"

[execution]
entrypoint = "hello.wasm"
"""})
    res = ato(["run", str(tmp_path)])  # WASI with stdio only: no permissions, so no consent needed
    assert res.code == exit_code, res.stderr
    assert res.stdout == "hello from wasm\n"


# ------------------------------------------------------------------ tier 2 under the bubblewrap engine


@needs_bwrap
def test_python_service_with_uv_lock_runs_under_the_bubblewrap_engine_offline(tmp_path, ato):
    register_engine(ato)
    port = free_port()
    python_project(tmp_path / "app", port)
    offline = {"ATO_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "ALL_PROXY": "http://127.0.0.1:9"}
    res = ato(["run", str(tmp_path / "app"), "--yes", "--background", "--json"], env=offline)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "run-background")
    proc = doc["process"]
    assert proc["status"] == "ready" and proc["runtime"] == "nacelle" and proc["route"] == "source/python"
    assert proc["tier"] == 2
    body = http_get(f"http://127.0.0.1:{port}/")
    assert body.startswith("python in sandbox ") and "/runtimes/envs/" in body  # the uv.lock environment
    # the workload really is inside bubblewrap: its parent chain contains bwrap
    chain = subprocess.run(["ps", "-o", "args=", "--ppid", str(proc["supervisor_pid"])], capture_output=True,
                           text=True).stdout
    assert "bwrap" in chain
    res = ato(["close", "--id", proc["id"], "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "run-close")


@needs_bwrap
def test_tier2_sandbox_stops_writes_outside_allowed_paths_and_network(tmp_path, ato):
    register_engine(ato)
    outside = tmp_path / "outside"
    outside.mkdir()
    hits: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    host_port = server.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(b"connection")
                conn.close()
            except OSError:
                continue
    threading.Thread(target=accept, daemon=True).start()
    project = write(tmp_path / "cap", {
        "capsule.toml": """\
schema_version = "0.2"
name = "escape-test"
version = "0.1.0"
type = "app"
default_target = "cli"

[isolation]
writable = ["out"]

[targets.cli]
runtime = "source"
driver = "native"
entrypoint = "escape.sh"
""",
        "escape.sh": f"""\
#!/bin/sh
echo inside > out/allowed.txt && echo "allowed write ok"
echo evil > {outside}/evil.txt 2>/dev/null && echo "OUTSIDE WRITE HAPPENED"
echo evil > ./evil.txt 2>/dev/null && echo "PROJECT WRITE HAPPENED"
echo evil > "$HOME/evil.txt" && echo "home write went to a private tmpfs"
if (exec 3<>/dev/tcp/127.0.0.1/{host_port}) 2>/dev/null; then echo "NETWORK OPENED"; fi
python3 -c "
import socket
print('python ran')
try:
    socket.create_connection(('127.0.0.1', {host_port}), timeout=2)
    print('NETWORK OPENED')
except OSError as exc:
    print('network blocked:', exc)
"
exit 0
""",
    })
    res = ato(["run", str(project), "-y"])
    stop.set()
    assert res.code == 0, res.stderr
    assert "allowed write ok" in res.stdout and "python ran" in res.stdout and "network blocked" in res.stdout
    assert "OUTSIDE WRITE HAPPENED" not in res.stdout and "PROJECT WRITE HAPPENED" not in res.stdout
    assert "NETWORK OPENED" not in res.stdout
    assert not (outside / "evil.txt").exists()
    assert not (project / "evil.txt").exists()
    assert (project / "out" / "allowed.txt").read_text() == "inside\n"
    assert hits == []


@needs_bwrap
def test_tier2_exit_code_passes_through_the_engine(tmp_path, ato):
    register_engine(ato)
    write(tmp_path, {"capsule.toml": """\
schema_version = "0.2"
name = "exit-code"
version = "0.1.0"
type = "app"
default_target = "cli"

[targets.cli]
runtime = "source"
driver = "native"
entrypoint = "run.sh"
""", "run.sh": "#!/bin/sh\necho \"args: $*\"\nexit 9\n"})
    res = ato(["run", str(tmp_path), "-y", "--", "a", "b c"])
    assert res.code == 9, res.stderr
    assert res.stdout == "args: a b c\n"


# ------------------------------------------------------------------ fail-closed refusals


def marker_capsule(root: Path, target: str, extra: str = "", files: dict[str, str] | None = None) -> Path:
    """A capsule whose program would leave started.txt behind; the refusals must leave none."""
    write(root, {"capsule.toml": f"""\
schema_version = "0.2"
name = "refused"
version = "0.1.0"
type = "app"
default_target = "t"

[targets.t]
{target}
{extra}
""", **(files or {})})
    return root


def assert_refused(res, code: str, exit_code: int = 1) -> list[dict]:
    assert res.code == exit_code, (res.code, res.stderr)
    lines = [x for x in res.stderr_json_lines() if x.get("code") == code]
    assert lines, res.stderr
    assert res.stdout == ""
    return lines


TOUCH_JS = "require('fs').writeFileSync(__dirname + '/started.txt', 'x');\n"


def test_missing_required_env_fails_closed_with_one_line_per_key(tmp_path, ato):
    marker_capsule(tmp_path, 'runtime = "source"\ndriver = "node"\nentrypoint = "main.js"\n'
                             'required_env = ["ATO_T_ONE", "ATO_T_TWO"]\nenv = { ATO_ORCH_REQUIRED_ENVS = "ATO_T_THREE" }',
                   files={"main.js": TOUCH_JS, "capsule.lock": "", "package-lock.json": "{}"})
    res = ato(["run", str(tmp_path), "-y"], env={"ATO_T_ONE": "set", "ATO_T_TWO": "   "})
    lines = assert_refused(res, "ATO_ERR_MISSING_REQUIRED_ENV")
    assert sorted(x["details"]["key"] for x in lines) == ["ATO_T_THREE", "ATO_T_TWO"]
    assert not (tmp_path / "started.txt").exists()


@pytest.mark.parametrize("driver,files,missing", [
    ("node", {"capsule.lock": ""}, "package-lock.json"),
    ("node", {"package-lock.json": "{}"}, "capsule.lock"),
    ("python", {}, "uv.lock"),
    ("deno", {"capsule.lock": ""}, "deno.lock"),
])
def test_missing_lockfiles_fail_closed(tmp_path, ato, driver, files, missing):
    entry = {"node": "main.js", "python": "main.py", "deno": "main.ts"}[driver]
    marker_capsule(tmp_path, f'runtime = "source"\ndriver = "{driver}"\nentrypoint = "{entry}"',
                   files={entry: TOUCH_JS, **files})
    lines = assert_refused(ato(["run", str(tmp_path), "-y"]), "ATO_ERR_PROVISIONING_LOCK_INCOMPLETE")
    assert lines[0]["details"]["lockfile"] == missing
    assert not (tmp_path / "started.txt").exists()


@pytest.mark.parametrize("driver", ["native", "python"])
def test_tier2_without_an_engine_fails_closed(tmp_path, ato, driver):
    entry = "run.sh" if driver == "native" else "main.py"
    marker_capsule(tmp_path, f'runtime = "source"\ndriver = "{driver}"\nentrypoint = "{entry}"',
                   files={entry: "#!/bin/sh\ntouch started.txt\n", "uv.lock": UV_LOCK})
    lines = assert_refused(ato(["run", str(tmp_path), "-y"]), "ATO_ERR_ENGINE_MISSING")
    assert "nacelle" in lines[0]["message"]
    assert not (tmp_path / "started.txt").exists()
    # a configured engine that does not exist is refused the same way (never a fallback to the host)
    res = ato(["run", str(tmp_path), "-y"], env={"NACELLE_PATH": str(tmp_path / "no-such-engine")})
    assert_refused(res, "ATO_ERR_ENGINE_MISSING")
    assert not (tmp_path / "started.txt").exists()


def test_dangerously_skip_permissions_needs_the_env_guard(tmp_path, ato):
    marker_capsule(tmp_path, 'runtime = "source"\ndriver = "native"\nentrypoint = "run.sh"',
                   files={"run.sh": "#!/bin/sh\ntouch started.txt\necho ran on host\n"})
    lines = assert_refused(ato(["run", str(tmp_path), "-y", "--dangerously-skip-permissions"],
                               env={"CAPSULE_ALLOW_UNSAFE": "yes"}), "ATO_ERR_POLICY_VIOLATION")
    assert "CAPSULE_ALLOW_UNSAFE=1" in lines[0]["message"]
    assert not (tmp_path / "started.txt").exists()
    res = ato(["run", str(tmp_path), "-y", "-U"], env={"CAPSULE_ALLOW_UNSAFE": "1"})
    assert res.code == 0, res.stderr
    assert res.stdout == "ran on host\n" and (tmp_path / "started.txt").exists()
    assert "dangerous" in res.stderr


@needs_node
def test_non_interactive_run_without_yes_fails_closed(tmp_path, ato):
    marker_capsule(tmp_path, f'runtime = "source"\ndriver = "node"\nentrypoint = "main.js"\nport = {free_port()}',
                   extra='[isolation]\nwritable = ["."]',
                   files={"main.js": TOUCH_JS, "capsule.lock": "", "package-lock.json": "{}"})
    lines = assert_refused(ato(["run", str(tmp_path)]), "ATO_ERR_CONSENT_REQUIRED")
    assert "--yes" in lines[0]["message"]
    assert not (tmp_path / "started.txt").exists()
    # once approved with --yes, the same plan does not ask again
    res = ato(["run", str(tmp_path), "-y"])
    assert res.code == 0, res.stderr
    (tmp_path / "started.txt").unlink()
    assert ato(["run", str(tmp_path)]).code == 0
    consent = Path(os.environ["ATO_HOME"]) / "consent" / "executionplan_v1.jsonl"
    assert oct(consent.stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------ engine install


class Release:
    """A loopback release server: <base>/<version>/nacelle-<version>-linux-<arch> plus checksums."""

    def __init__(self, root: Path, body: bytes, checksum: str | None) -> None:
        import http.server
        import platform

        arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), "x64")
        self.binary = f"nacelle-1.2.3-linux-{arch}"
        (root / "1.2.3").mkdir(parents=True)
        (root / "latest.txt").write_text("1.2.3\n")
        (root / "1.2.3" / self.binary).write_bytes(body)
        if checksum is not None:
            (root / "1.2.3" / "SHA256SUMS").write_text(f"{checksum}  {self.binary}\n")
        handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.RequestHandlerClass.log_message = lambda *a: None
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


def engine_script() -> bytes:
    bundled = Path(sys.executable).parent / "ato-nacelle"
    return f"#!/bin/sh\nexec {bundled} \"$@\"\n".encode()


def test_engine_install_with_a_wrong_checksum_fails_closed(tmp_path, ato):
    release = Release(tmp_path / "rel", engine_script(), "0" * 64)
    try:
        res = ato(["config", "engine", "install", "--engine", "nacelle"],
                  env={"ATO_NACELLE_RELEASE_BASE_URL": release.url})
        lines = assert_refused(res, "ATO_ERR_INTEGRITY_FAILURE")
        assert "SHA256 mismatch" in lines[0]["message"]
        engines = Path(os.environ["ATO_HOME"]) / "engines"
        assert not engines.exists() or not any(engines.iterdir())
        assert not (Path(os.environ["ATO_HOME"]) / "config.toml").exists()
    finally:
        release.close()


def test_engine_install_without_any_checksum_fails_closed(tmp_path, ato):
    release = Release(tmp_path / "rel", engine_script(), None)
    try:
        res = ato(["setup", "--engine", "nacelle", "--version", "1.2.3"],
                  env={"ATO_NACELLE_RELEASE_BASE_URL": release.url})
        assert "deprecated" in res.stderr
        assert_refused(res, "ATO_ERR_INTEGRITY_FAILURE")
    finally:
        release.close()


@needs_bwrap
def test_engine_install_verifies_registers_and_runs_tier2(tmp_path, ato):
    import hashlib

    body = engine_script()
    release = Release(tmp_path / "rel", body, hashlib.sha256(body).hexdigest())
    try:
        res = ato(["config", "engine", "install", "--engine", "nacelle", "--json"],
                  env={"ATO_NACELLE_RELEASE_BASE_URL": release.url})
    finally:
        release.close()
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "engine-install")
    assert doc["version"] == "1.2.3" and doc["sha256"] == hashlib.sha256(body).hexdigest()
    assert Path(doc["path"]).read_bytes() == body
    res = ato(["engine", "features", "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "engine-features")
    assert res.json()["path"] == doc["path"]
    marker_capsule(tmp_path / "cap", 'runtime = "source"\ndriver = "native"\nentrypoint = "run.sh"',
                   files={"run.sh": "#!/bin/sh\necho sandboxed by the installed engine\n"})
    res = ato(["run", str(tmp_path / "cap"), "-y"])
    assert res.code == 0, res.stderr
    assert res.stdout == "sandboxed by the installed engine\n"


# ------------------------------------------------------------------ background processes


@needs_node
def test_background_ps_logs_follow_close(tmp_path, ato, procs):
    port = free_port()
    node_project(tmp_path, port)
    res = ato(["run", str(tmp_path), "-y", "--background", "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "run-background")
    run_id = doc["process"]["id"]
    assert doc["process"]["status"] == "ready"
    ps = ato(["ps", "--json"])
    assert ps.code == 0
    assert_schema(ps.json(), "ps")
    rows = {r["id"]: r for r in ps.json()["processes"]}
    assert rows[run_id]["status"] == "ready" and pid_alive(rows[run_id]["pid"])
    assert http_get(f"http://127.0.0.1:{port}/bg") == "node says hi /bg"
    follower = procs(["logs", "--id", run_id, "--follow"])
    follower.wait_line("listening on")
    res = ato(["close", "--id", run_id, "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "run-close")
    assert res.json()["stopped"][0]["was_running"] is True
    assert follower.wait(timeout=15) == 0  # --follow ends once the capsule has stopped
    ps = ato(["ps", "--json"]).json()
    row = next(r for r in ps["processes"] if r["id"] == run_id)
    assert row["status"] == "stopped" and not pid_alive(row["pid"])
    assert ps["running"] == 0
    assert "No capsules found." in ato(["ps", "--prune"]).stdout


@needs_node
def test_process_killed_from_outside_shows_as_exited(tmp_path, ato):
    port = free_port()
    node_project(tmp_path, port)
    doc = ato(["run", str(tmp_path), "-y", "--background", "--json"]).json()
    record = doc["process"]
    os.kill(record["pid"], signal.SIGKILL)
    ps = wait_for(lambda: next((r for r in ato(["ps", "--json"]).json()["processes"]
                                if r["id"] == record["id"] and r["status"] != "ready"), None))
    assert ps["status"] == "exited" and ps["exit_code"] == 137
    # a second one: supervisor and workload both killed, nobody left to observe the code
    port2 = free_port()
    node_project(tmp_path / "two", port2)
    record = ato(["run", str(tmp_path / "two"), "-y", "--background", "--json"]).json()["process"]
    os.kill(record["supervisor_pid"], signal.SIGKILL)
    os.kill(record["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(record["pid"]))
    ps = ato(["ps", "--json"])
    assert_schema(ps.json(), "ps")
    row = next(r for r in ps.json()["processes"] if r["id"] == record["id"])
    assert row["status"] == "exited" and row["exit_code"] is None
    assert "killed from outside" in row["last_error"]


def test_logs_and_close_need_a_selector(ato):
    assert ato(["logs"]).code == 1
    assert ato(["close"]).code == 1
    res = ato(["close", "--id", "capsule-00000000"])
    assert res.code == 1 and "no capsule found" in res.stderr


# ------------------------------------------------------------------ watch, skills, artifacts


@needs_node
def test_open_watch_restarts_on_change(tmp_path, procs):
    write(tmp_path, {"capsule.toml": """\
schema_version = "0.2"
name = "watched"
version = "0.1.0"
type = "app"
default_target = "cli"

[targets.cli]
runtime = "source"
driver = "node"
entrypoint = "main.js"
""", "capsule.lock": "", "package-lock.json": "{}",
        "main.js": "console.log('version one'); setInterval(() => {}, 1000);\n"})
    p = procs(["open", str(tmp_path), "--watch", "-y"], env={"CAPSULE_WATCH_DEBOUNCE_MS": "50"})
    p.wait_line("version one")
    assert any("deprecated" in x for x in p.err)
    time.sleep(0.3)
    (tmp_path / "main.js").write_text("console.log('version two'); setInterval(() => {}, 1000);\n")
    p.wait_line("version two")
    os.kill(p.p.pid, signal.SIGTERM)
    assert p.wait() == 0


@needs_node
def test_skills(tmp_path, ato):
    skill = tmp_path / ".agents" / "skills" / "greet" / "SKILL.md"
    write(tmp_path, {".agents/skills/greet/SKILL.md": """\
---
name: greet
version: 0.1.0
---
Says hello.

```js
console.log('hello from a skill', process.argv.slice(2).join(' '));
```
"""})
    res = ato(["run", "--skill", "greet", "--from-skill", str(skill)], cwd=tmp_path)
    assert res.code == 1 and "mutually exclusive" in res.stderr
    res = ato(["run", "--skill", "greet", "-y", "--", "world"], cwd=tmp_path)
    assert res.code == 0, res.stderr
    assert res.stdout == "hello from a skill world\n"
    res = ato(["run", "--from-skill", str(skill), "-y"], cwd=tmp_path)
    assert res.code == 0 and "hello from a skill" in res.stdout
    assert_refused(ato(["run", "--skill", "nope", "-y"], cwd=tmp_path), "ATO_ERR_SKILL_NOT_FOUND")


@needs_node
def test_run_a_built_capsule_file(tmp_path, ato):
    project = write(tmp_path / "proj", {"capsule.toml": """\
schema_version = "0.2"
name = "packed"
version = "0.1.0"
type = "app"
default_target = "cli"

[targets.cli]
runtime = "source"
driver = "node"
entrypoint = "main.js"
""", "capsule.lock": "", "package-lock.json": "{}", "main.js": "console.log('from the artifact', __dirname);\n"})
    res = ato(["build", str(project), "--json"])
    assert res.code == 0, res.stderr
    artifact = Path(res.json()["artifact"])
    res = ato(["run", str(artifact), "-y", "--allow-unsigned"])
    assert res.code == 0, res.stderr
    assert res.stdout.startswith("from the artifact ") and "/unpacked/" in res.stdout
    again = ato(["run", str(artifact), "-y", "--allow-unsigned"])  # unpacked once per digest, reused
    assert again.stdout == res.stdout
    # a tampered artifact is refused before anything runs
    import tarfile

    with tarfile.open(artifact) as tf:
        member = tf.getmember("payload.tar.zst")
    data = bytearray(artifact.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    bad = tmp_path / "bad.capsule"
    bad.write_bytes(bytes(data))
    res = ato(["run", str(bad), "-y", "--allow-unsigned"])
    assert res.code == 1 and "from the artifact" not in res.stdout


@needs_bwrap
def test_tier2_declared_network_is_allowed(tmp_path, ato):
    """The positive control: with [network] egress_allow declared, the same connection goes through."""
    register_engine(ato)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]
    write(tmp_path, {"capsule.toml": """\
schema_version = "0.2"
name = "net-allowed"
version = "0.1.0"
type = "app"
default_target = "cli"

[network]
egress_allow = ["127.0.0.1"]

[targets.cli]
runtime = "source"
driver = "native"
entrypoint = "net.sh"
""", "net.sh": f"#!/bin/sh\npython3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), "
                 "timeout=2); print('connected')\"\n"})
    res = ato(["run", str(tmp_path), "-y"])
    server.settimeout(5)
    conn, _ = server.accept()
    conn.close()
    server.close()
    assert res.code == 0, res.stderr
    assert res.stdout == "connected\n"
