"""`ato run` startup: time to the first successful readiness probe, next to plain `node server.js`.

A node hello-world HTTP server is started two ways, each timed from process
spawn until an HTTP GET on its port first answers 200 (the same poller, every
2 ms, for both):

* ``node server.js`` directly;
* ``ato run <dir> -y`` — manifest read, routing, lockfile/env/consent checks,
  then the same node process and ato's own readiness probe.

Each timing is the median of several runs (after one warm-up of each). Target
(issue 5): ato within 1.5x node + 300 ms. Results: bench/results/run.json and run.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from report import save

HERE = Path(__file__).resolve().parent
RUNS = int(os.environ.get("RUN_BENCH_RUNS", "15"))
ATO = str(Path(sys.executable).parent / "ato")
SERVER = """\
const http = require('http');
http.createServer((req, res) => { res.end('hello'); }).listen(Number(process.env.PORT), '127.0.0.1');
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_ok(port: int, proc: subprocess.Popen, start: float, timeout: float = 20.0) -> float:
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        time.sleep(0.002)
    raise RuntimeError("no answer in time")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def project(root: Path, port: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "server.js").write_text(SERVER)
    (root / "capsule.lock").write_text('version = "1"\n')
    (root / "package-lock.json").write_text('{"lockfileVersion": 3, "packages": {}}\n')
    (root / "capsule.toml").write_text(f"""\
schema_version = "0.2"
name = "bench-node"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "web"
driver = "node"
entrypoint = "server.js"
port = {port}
readiness_probe = {{ http_get = "/", port = "PORT" }}
""")
    return root


def time_one(cmd: list[str], port: int, env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return first_ok(port, proc, start)
    finally:
        stop(proc)


def main() -> int:
    node = shutil.which("node")
    if node is None:
        print("node is not installed; skipping the run benchmark")
        return 0
    with tempfile.TemporaryDirectory(prefix="ato-run-bench-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "HOME": str(home), "ATO_HOME": str(home / ".ato")}
        port = free_port()
        proj = project(Path(tmp) / "proj", port)
        node_env = {**env, "PORT": str(port)}
        direct, via_ato = [], []
        time_one([node, "server.js"], port, node_env, proj)  # warm-up (page cache)
        time_one([ATO, "run", str(proj), "-y"], port, env, proj)  # warm-up; records the consent
        for _ in range(RUNS):
            direct.append(time_one([node, "server.js"], port, node_env, proj))
            via_ato.append(time_one([ATO, "run", str(proj), "-y"], port, env, proj))
    node_ms = statistics.median(direct) * 1000
    ato_ms = statistics.median(via_ato) * 1000
    budget_ms = 1.5 * node_ms + 300
    doc = {
        "benchmark": "ato run -> first successful readiness probe (node hello-world)",
        "runs": RUNS,
        "node_direct_ms": {"median": round(node_ms, 1), "min": round(min(direct) * 1000, 1),
                           "max": round(max(direct) * 1000, 1)},
        "ato_run_ms": {"median": round(ato_ms, 1), "min": round(min(via_ato) * 1000, 1),
                       "max": round(max(via_ato) * 1000, 1)},
        "overhead_ms": round(ato_ms - node_ms, 1),
        "ratio": round(ato_ms / node_ms, 2),
        "target": "ato <= 1.5 x node + 300 ms",
        "target_ms": round(budget_ms, 1),
        "within_target": ato_ms <= budget_ms,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "node": subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip(),
    }
    save("run", doc, f"""\
# `ato run` startup benchmark

Time from spawning the process until an HTTP GET on the service's port first answers 200
(node hello-world; median of {RUNS} runs after a warm-up; {doc['cpus']} CPUs).

| how | median | min | max |
| --- | ---: | ---: | ---: |
| `node server.js` | {doc['node_direct_ms']['median']} ms | {doc['node_direct_ms']['min']} ms | {doc['node_direct_ms']['max']} ms |
| `ato run <dir> -y` | {doc['ato_run_ms']['median']} ms | {doc['ato_run_ms']['min']} ms | {doc['ato_run_ms']['max']} ms |

Overhead {doc['overhead_ms']} ms ({doc['ratio']}x). Target: ato within 1.5x node + 300 ms =
{doc['target_ms']} ms: {'met' if doc['within_target'] else 'NOT met'}.
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
