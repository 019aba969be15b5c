"""IPC through `ato run`: a provider capsule exporting a service and consumer capsules importing it.

Both are Tier 2 (`driver = "native"`, host python3) under the bundled bubblewrap engine, so the
sockets really are reached through the sandbox. The provider starts once for two consumers (the
count is in `ato ps --json`), every call goes through the broker (tokens, schemas), and the
provider stops after both consumers have exited.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.test_run_e2e import Proc, register_engine, write
from tests.e2e.test_run_teardown import assert_all_gone, descendants
from tests.ipc_support import GREET_IN, GREET_OUT, PROVIDER_PY, alive, call, received, wait_until

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("python3") is None,
                                reason="needs bubblewrap and python3 (make system-deps)")

# The consumer: greets through the broker, shows what it got (and, for the test, its socket and token),
# tries a call that breaks the input schema, then waits until the test lets it go.
CONSUMER_PY = r'''
import json, os, socket, sys, time
sock_path = os.environ["CAPSULE_IPC_GREETER_SOCKET"]
token = os.environ["CAPSULE_IPC_GREETER_TOKEN"]
assert os.environ["CAPSULE_IPC_GREETER_URL"] == "unix://" + sock_path
def invoke(method, args, tok=token):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall((json.dumps({"jsonrpc": "2.0", "id": 7, "method": "capsule/invoke",
                           "params": {"token": tok, "method": method, "args": args}}) + "\n").encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return json.loads(data)
print("ENDPOINT " + json.dumps({"socket": sock_path, "token": token}), flush=True)
print("GREETING " + json.dumps(invoke("greet", {"name": os.environ.get("WHO", "x")})), flush=True)
print("BAD " + json.dumps(invoke("greet", {"name": 5})), flush=True)
while not os.path.exists(os.environ.get("GO_FILE", "go")):
    time.sleep(0.05)
print("bye", flush=True)
'''


def provider_project(root: Path, idle: int = 2) -> Path:
    return write(root, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "greeter"
version = "0.1.0"
type = "app"
default_target = "app"

[isolation]
writable = ["data"]

[targets.app]
runtime = "source"
driver = "native"
entrypoint = "python3 provider.py"
env = {{ PROVIDER_LOG = "{root / 'data' / 'received.jsonl'}" }}

[ipc.exports]
name = "greeter"
[[ipc.exports.methods]]
name = "greet"
description = "Say hello"
input_schema = "schemas/greet.in.json"
output_schema = "schemas/greet.out.json"
[[ipc.exports.methods]]
name = "bad_greet"
input_schema = "schemas/greet.in.json"
output_schema = "schemas/greet.out.json"
[ipc.exports.sharing]
mode = "singleton"
idle_timeout = {idle}
""",
        "provider.py": PROVIDER_PY,
        "schemas/greet.in.json": json.dumps(GREET_IN),
        "schemas/greet.out.json": json.dumps(GREET_OUT),
        "data/.keep": "",
    })


def consumer_project(root: Path, who: str, provider: str = "../greeter") -> Path:
    return write(root, {
        "capsule.toml": f"""\
schema_version = "0.2"
name = "client-{who}"
version = "0.1.0"
type = "app"
default_target = "app"

[targets.app]
runtime = "source"
driver = "native"
entrypoint = "python3 consumer.py"
env = {{ WHO = "{who}", GO_FILE = "{root / 'go'}" }}

[ipc.imports.greeter]
from = "{provider}"
""",
        "consumer.py": CONSUMER_PY,
    })


def endpoint(p: Proc) -> dict:
    return json.loads(p.wait_line("ENDPOINT ", timeout=120).split(" ", 1)[1])


def line_json(p: Proc, tag: str) -> dict:
    return json.loads(p.wait_line(tag + " ", timeout=120).split(" ", 1)[1])


@pytest.fixture
def running(ato, tmp_path: Path):
    register_engine(ato)
    started: list[Proc] = []

    def start(project: Path) -> Proc:
        p = Proc(["run", str(project), "--yes"], env={"ATO_IPC_BROKER_IDLE_SECS": "5"})
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()
    ato(["close", "--all"])


def ps_ipc(ato) -> dict:
    res = ato(["ps", "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "ps")
    return doc


def test_two_consumers_share_one_provider_through_the_broker(ato, tmp_path: Path, running) -> None:
    provider_project(tmp_path / "greeter")
    a_dir = consumer_project(tmp_path / "a", "ada")
    b_dir = consumer_project(tmp_path / "b", "bo")
    a = running(a_dir)
    a_end = endpoint(a)
    assert line_json(a, "GREETING")["result"] == {"greeting": "hello ada"}
    b = running(b_dir)
    b_end = endpoint(b)
    assert line_json(b, "GREETING")["result"] == {"greeting": "hello bo"}

    # one provider, two consumers, visible in ps
    doc = ps_ipc(ato)
    services = doc["ipc"]["services"]
    assert len(services) == 1 and services[0]["consumer_count"] == 2, services
    provider_run = services[0]["provider"]["run_id"]
    provider_pid = services[0]["provider"]["pid"]
    record = next(r for r in doc["processes"] if r["id"] == provider_run)
    assert record["name"] == "greeter" and record["status"] in ("ready", "running")

    # schema violations are refused at the broker and never reach the provider
    for p in (a, b):
        assert line_json(p, "BAD")["error"]["code"] == -32003
    log = tmp_path / "greeter" / "data" / "received.jsonl"
    assert [r["params"]["name"] for r in received(log)] == ["ada", "bo"] or \
        sorted(r["params"]["name"] for r in received(log)) == ["ada", "bo"]
    # another consumer's token is refused on A's endpoint
    refused = call(a_end["socket"], b_end["token"], "greet", {"name": "mallory"})
    assert refused["error"]["code"] == -32001
    out = call(b_end["socket"], b_end["token"], "bad_greet", {"name": "bo"})
    assert out["error"]["code"] == -32003  # a result that breaks output_schema is not returned

    # A exits: uncounted, its token revoked (a replay on B's endpoint is refused); the provider stays
    (a_dir / "go").write_text("")
    assert a.wait(timeout=120) == 0
    wait_until(lambda: ps_ipc(ato)["ipc"]["services"][0]["consumer_count"] == 1, what="A to be uncounted")
    replay = call(b_end["socket"], a_end["token"], "greet", {"name": "again"})
    assert replay["error"]["code"] == -32001 and "revoked" in replay["error"]["message"]
    assert alive(provider_pid)

    # B exits: after the grace period the provider is stopped and every process of it is gone
    (b_dir / "go").write_text("")
    assert b.wait(timeout=120) == 0
    wait_until(lambda: not alive(provider_pid), timeout=120, what="the provider to stop after its grace period")
    final = ps_ipc(ato)
    assert next(r for r in final["processes"] if r["id"] == provider_run)["status"] == "stopped"
    assert "mallory" not in [r["params"]["name"] for r in received(log)]


def test_close_of_a_background_consumer_leaves_no_provider(ato, tmp_path: Path, running) -> None:
    provider_project(tmp_path / "greeter", idle=1)
    c_dir = consumer_project(tmp_path / "c", "cy")
    res = ato(["run", str(c_dir), "--yes", "--background", "--json"], env={"ATO_IPC_BROKER_IDLE_SECS": "5"})
    assert res.code == 0, res.stderr
    consumer = res.json()["process"]["id"]
    svc = wait_until(lambda: (ps_ipc(ato)["ipc"]["services"] or [None])[0], what="the provider to be counted")
    assert [c["id"] for c in svc["consumers"]] == [consumer]
    provider_pid = svc["provider"]["pid"]
    assert ato(["close", "--id", consumer]).code == 0
    wait_until(lambda: not alive(provider_pid), timeout=120, what="the provider to stop once its consumer closed")


def test_sigint_on_a_consumer_stops_its_provider_after_the_grace_and_leaves_nothing(ato, tmp_path: Path,
                                                                                  running) -> None:
    provider_project(tmp_path / "greeter", idle=1)
    c_dir = consumer_project(tmp_path / "c", "di")
    c = running(c_dir)
    token = endpoint(c)["token"]
    assert line_json(c, "GREETING")["result"] == {"greeting": "hello di"}
    assert line_json(c, "BAD")["error"]["code"] == -32003
    svc = wait_until(lambda: (ps_ipc(ato)["ipc"]["services"] or [None])[0], what="the provider to be counted")
    assert svc["consumer_count"] == 1
    record = next(r for r in ps_ipc(ato)["processes"] if r["id"] == svc["provider"]["run_id"])
    provider_tree = {record["supervisor_pid"]: "provider supervisor", **descendants(record["supervisor_pid"])}
    assert svc["provider"]["pid"] in provider_tree
    consumer_tree = wait_until(lambda: (d := descendants(c.p.pid)) and len(d) >= 2 and d, what="the consumer's tree")

    os.kill(c.p.pid, signal.SIGINT)  # Ctrl-C on the consumer's ato run
    assert c.wait(timeout=120) == 130
    assert_all_gone(consumer_tree, within=60)
    # the provider outlives its consumer by its grace period (idle_timeout = 1), then every process of it goes
    wait_until(lambda: not alive(svc["provider"]["pid"]), timeout=120, what="the provider to stop after its grace")
    assert_all_gone(provider_tree, within=60)
    final = ps_ipc(ato)
    assert next(r for r in final["processes"] if r["id"] == record["id"])["status"] == "stopped"
    assert all(s["consumer_count"] == 0 for s in final["ipc"]["services"])

    # the schema violation was logged by the broker (code and reason, never the token or the values)
    log = (Path(os.environ["ATO_HOME"]) / "run" / "ipc" / "broker.log").read_text()
    refused = [line for line in log.splitlines() if " refused " in line and "code=-32003" in line]
    assert refused and "method=greet" in refused[0], log
    assert token not in log


def test_an_import_of_publisher_slug_installs_the_provider_from_the_registry(ato, tmp_path: Path, running) -> None:
    from tests.e2e.registry_support import TOKEN, Registry

    registry = Registry(tmp_path / "registry-data")
    try:
        greeter = provider_project(tmp_path / "greeter")
        text = (greeter / "capsule.toml").read_text()  # an installed copy logs inside its own sandbox's /tmp
        (greeter / "capsule.toml").write_text(text.replace(str(greeter / "data" / "received.jsonl"),
                                                           "/tmp/received.jsonl"))
        res = ato(["publish", "--registry", registry.url, "--scoped-id", "acme/greeter"], cwd=greeter,
                  env={"ATO_TOKEN": TOKEN})
        assert res.code == 0, res.stderr
        c_dir = consumer_project(tmp_path / "c", "eve", provider="acme/greeter")
        refused = ato(["run", str(c_dir), "--registry", registry.url], env={"ATO_IPC_BROKER_IDLE_SECS": "5"})
        # installing the provider needs consent like any install (the consumer's own plan is not the question)
        assert refused.code == 1 and "installing the provider acme/greeter" in refused.stderr, refused.stderr
        c = Proc(["run", str(c_dir), "--yes", "--registry", registry.url],
                 env={"ATO_IPC_BROKER_IDLE_SECS": "5"})
        try:
            assert line_json(c, "GREETING")["result"] == {"greeting": "hello eve"}
            svc = wait_until(lambda: (ps_ipc(ato)["ipc"]["services"] or [None])[0], what="the provider")
            record = next(r for r in ps_ipc(ato)["processes"] if r["id"] == svc["provider"]["run_id"])
            assert record["scoped_id"] == "acme/greeter" and svc["consumer_count"] == 1
            (c_dir / "go").write_text("")
            assert c.wait(timeout=120) == 0
            wait_until(lambda: not alive(svc["provider"]["pid"]), timeout=120, what="the provider to stop")
        finally:
            c.kill()
    finally:
        registry.stop()
