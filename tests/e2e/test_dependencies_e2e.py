"""Dependency contracts at run time: a 0.3 consumer with `[dependencies.db]` on a provider capsule.

The provider is a small HTTP key service (host python3, Tier 2 under the bundled bubblewrap engine)
published to a real `ato registry serve`; the consumer names it `capsule://ato/acme/kv@1.0.0`.
`ato run` resolves and installs it, starts it before the consumer, waits for the contract's ready
probe, renders the exports (a secret URL among them) into the consumer's env — the secret is never
printed by ato — and SIGINT to `ato run` leaves no process of either capsule (checked by PID).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry
from tests.e2e.test_run_e2e import Proc, register_engine, write
from tests.e2e.test_run_teardown import assert_all_gone, descendants
from tests.ipc_support import alive, wait_until

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("python3") is None,
                                reason="needs bubblewrap and python3 (make system-deps)")

PASSWORD = "s3cr3t-Pa55-" + "x" * 8

SERVER_PY = r'''
import argparse, http.server, os, subprocess, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--password-file", required=True)
ap.add_argument("--db", required=True)
a = ap.parse_args()
password = open(a.password_file).read()
with open(os.path.join(os.environ["KV_DATA"], "started"), "a") as fh:
    fh.write(a.db + "\n")  # its state: a directory the consumer owns, kept between runs
if a.db == "crash":
    sys.exit(3)  # a provider that dies before it is ready
# a helper process of the provider's own, so teardown must stop more than the unit it started
helper = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
print(f"kv serving db={a.db} helper={helper.pid}", flush=True)
time.sleep(2)  # a slow start: the consumer must not be started before the ready probe passes
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok"); return
        ok = self.headers.get("X-Password") == password
        self.send_response(200 if ok else 403); self.end_headers()
        self.wfile.write((f"db={a.db}" if ok else "denied").encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", a.port), H).serve_forever()
'''

APP_PY = r'''
import hashlib, os, time, urllib.request, urllib.parse
url = urllib.parse.urlsplit(os.environ["KV_URL"])
req = urllib.request.Request(f"http://{url.hostname}:{url.port}/whoami", headers={"X-Password": url.password})
print("WHOAMI " + urllib.request.urlopen(req, timeout=10).read().decode(), flush=True)
print("HOST " + os.environ["KV_HOST"] + ":" + os.environ["KV_PORT"], flush=True)
print("URL-SHA " + hashlib.sha256(os.environ["KV_URL"].encode()).hexdigest(), flush=True)
print("GREETING " + os.environ["GREETING"], flush=True)
while True:
    time.sleep(1)
'''


def provider(root: Path) -> Path:
    return write(root, {
        "capsule.toml": """\
schema_version = "0.3"
name = "kv"
version = "1.0.0"
type = "app"
default_target = "server"

[targets.server]
runtime = "source"
driver = "native"
run = "python3 server.py --port {{port}} --password-file {{credentials.password}} --db {{params.database}}"

[contracts."service@1"]
target = "server"
ready = { type = "tcp", target = "{{host}}:{{port}}", timeout = "90s" }
parameters = { database = { type = "string", required = true } }
credentials = { password = { type = "string", required = true } }
state = { version = "1", mount = "KV_DATA" }
runtime_exports = { KV_URL = { value = "kv://app:{{credentials.password}}@{{host}}:{{port}}/{{params.database}}", secret = true }, KV_HOST = "{{host}}", KV_PORT = "{{port}}" }
""",
        "server.py": SERVER_PY,
    })


def consumer(root: Path, database: str = "reports") -> Path:
    return write(root, {
        "capsule.toml": """\
schema_version = "0.3"
name = "report"
version = "0.1.0"
type = "app"
default_target = "app"
required_env = ["KV_PASS"]

[dependencies.db]
capsule = "capsule://ato/acme/kv@1.0.0"
contract = "service@1"
parameters = { database = "DATABASE" }
credentials = { password = "{{env.KV_PASS}}" }
state = { name = "kvdata" }

[targets.app]
runtime = "source"
driver = "native"
run = "python3 app.py"
needs = ["db"]
env = { KV_URL = "{{deps.db.runtime_exports.KV_URL}}", KV_HOST = "{{deps.db.runtime_exports.KV_HOST}}", KV_PORT = "{{deps.db.runtime_exports.KV_PORT}}", GREETING = "hello {{env.WHO}}" }
""".replace("DATABASE", database),
        "app.py": APP_PY,
    })


@pytest.fixture
def published(ato, tmp_path: Path):
    registry = Registry(tmp_path / "registry-data")
    try:
        kv = provider(tmp_path / "kv")
        res = ato(["publish", "--registry", registry.url, "--scoped-id", "acme/kv"], cwd=kv,
                  env={"ATO_TOKEN": TOKEN})
        assert res.code == 0, res.stderr
        yield registry
    finally:
        registry.stop()


def test_consumer_gets_a_ready_provider_and_sigint_stops_both(ato, tmp_path: Path, published) -> None:
    register_engine(ato)
    app = consumer(tmp_path / "report")
    env = {"KV_PASS": PASSWORD, "WHO": "ada"}
    p = Proc(["run", str(app), "--yes", "--registry", published.url], env=env)
    try:
        line = p.wait_line("WHOAMI ", timeout=180)
        assert line.endswith("WHOAMI db=reports")  # the provider was ready, took the credential, got the parameter
        port = p.wait_line("HOST 127.0.0.1:", timeout=30).rsplit(":", 1)[1]
        assert int(port) > 0
        expected = f"kv://app:{PASSWORD}@127.0.0.1:{port}/reports"
        assert p.wait_line("URL-SHA ", timeout=30).endswith(hashlib.sha256(expected.encode()).hexdigest())
        assert p.wait_line("GREETING ", timeout=30).endswith("GREETING hello ada")
        helper = int(p.wait_line("kv serving db=reports helper=", timeout=30).rsplit("=", 1)[1])
        assert helper > 0
        # every process of both capsules, seen from the host while the run is up
        tree = wait_until(lambda: (d := descendants(p.p.pid)) and len(d) >= 4 and d, timeout=60,
                          what="both capsules' processes")
        os.kill(p.p.pid, signal.SIGINT)
        assert p.wait(timeout=120) == 130
        assert_all_gone(tree, within=30)
        state = Path(os.environ["ATO_HOME"]) / "state" / "dependencies" / "report" / "db" / "1" / "kvdata"
        assert (state / "started").read_text() == "reports\n"
        assert not any(PASSWORD in line for line in p.out + p.err)  # the secret is never printed by ato
        logs = Path(os.environ["ATO_HOME"]) / "logs"
        for f in logs.rglob("*") if logs.exists() else []:
            assert PASSWORD not in f.read_text(errors="replace")
        assert not (Path(os.environ["ATO_HOME"]) / "run" / "secrets").exists() or \
            not any((Path(os.environ["ATO_HOME"]) / "run" / "secrets").rglob("password"))
    finally:
        p.kill()
    assert not alive(p.p.pid)


def test_a_missing_credential_stops_before_anything_starts(ato, tmp_path: Path, published) -> None:
    app = consumer(tmp_path / "report")
    res = ato(["run", str(app), "--yes", "--registry", published.url], env={"WHO": "x"})
    assert res.code == 1 and "KV_PASS" in res.stderr


def test_background_consumer_shows_its_provider_and_close_leaves_nothing(ato, tmp_path: Path, published) -> None:
    register_engine(ato)
    app = consumer(tmp_path / "report")
    env = {"KV_PASS": PASSWORD, "WHO": "bo"}
    res = ato(["run", str(app), "--yes", "--background", "--json", "--registry", published.url], env=env)
    assert res.code == 0, res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    run_id = res.json()["process"]["id"]
    try:
        def provider_ready() -> dict | None:
            doc = ato(["ps", "--json"]).json()
            assert_schema(doc, "ps")
            rec = next(r for r in doc["processes"] if r["id"] == run_id)
            return rec if rec["dependencies"] and rec["dependencies"][0]["status"] == "ready" and rec["pid"] else None
        rec = wait_until(provider_ready, timeout=120, what="the provider to be ready in ato ps")
        (dep,) = rec["dependencies"]
        assert dep["alias"] == "db" and dep["provider"] == "acme/kv" and dep["version"] == "1.0.0"
        assert dep["contract"] == "service@1" and alive(dep["pid"])
        human = ato(["ps"])
        assert "└ db: acme/kv@1.0.0 (service@1)" in human.stdout
        supervisor = rec["supervisor_pid"]
        log = Path(rec["log_path"])
        wait_until(lambda: "WHOAMI db=reports" in log.read_text(errors="replace"), timeout=120,
                   what="the consumer to reach the provider")
        tree = {supervisor: "supervisor", **descendants(supervisor)}
        # the state is held by this run: a second run of the consumer is refused before anything starts
        second = ato(["run", str(app), "--yes", "--registry", published.url], env=env)
        assert second.code == 1 and "ATO_ERR_STATE_IN_USE" in second.stderr, second.stderr
        assert PASSWORD not in second.stdout + second.stderr
        assert dep["pid"] in tree and rec["pid"] in tree  # one supervisor owns both capsules
        closed = ato(["close", "--id", run_id])
        assert closed.code == 0, closed.stderr
        assert_all_gone(tree, within=60)
        assert PASSWORD not in log.read_text(errors="replace")
        assert not (Path(os.environ["ATO_HOME"]) / "run" / "secrets" / run_id).exists()
    finally:
        ato(["close", "--all"])


def test_a_provider_that_dies_before_ready_fails_the_run_and_the_consumer_never_starts(
        ato, tmp_path: Path, published) -> None:
    register_engine(ato)
    app = consumer(tmp_path / "report", database="crash")
    p = Proc(["run", str(app), "--yes", "--registry", published.url], env={"KV_PASS": PASSWORD, "WHO": "cy"})
    try:
        code = p.wait(timeout=180)
        assert code != 0
        err = "\n".join(p.err)
        assert "db" in err and ("exited" in err or "before" in err), err
        assert not any("WHOAMI" in line for line in p.out)
        assert not any(PASSWORD in line for line in p.out + p.err)
    finally:
        p.kill()
