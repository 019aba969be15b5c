"""The IPC broker as a real process: real consumer and provider processes, real Unix sockets.

One provider instance for two consumers, counted; every call's token checked (another consumer's,
a made-up and a revoked one are refused); args and results checked against the method's JSON
Schemas before anything is forwarded; the provider stopped after its grace period once the last
consumer is gone (its process exits), and a new consumer within the grace period keeps it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ipc import client, sockets
from pipeline.ipc.protocol import (
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PERMISSION_DENIED,
    SCHEMA_VALIDATION_FAILED,
)
from pipeline.runtime.table import proc_start_time
from tests.ipc_support import METHODS, PROVIDER_PY, alive, call, received, wait_until


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A broker of this test's ATO_HOME, a provider program, and consumer processes to attach."""
    monkeypatch.setenv("ATO_IPC_BROKER_IDLE_SECS", "2")
    script = tmp_path / "provider.py"
    script.write_text(PROVIDER_PY)
    procs: list[subprocess.Popen] = []

    class World:
        log = tmp_path / "received.jsonl"

        def consumer(self) -> dict:
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            procs.append(p)
            return {"id": f"capsule-{p.pid:08x}", "pid": p.pid, "start": proc_start_time(p.pid), "proc": p}

        def start_provider(self) -> dict:
            path = sockets.socket_root() / "p-test.sock"
            env = {**__import__("os").environ, "CAPSULE_IPC_LISTEN_SOCKET": str(path), "PROVIDER_LOG": str(self.log)}
            p = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                                 stdout=subprocess.DEVNULL)
            procs.append(p)
            wait_until(lambda: path.exists(), what="the provider's socket")
            return {"pid": p.pid, "start": proc_start_time(p.pid), "socket": str(path), "name": "greeter"}

        def attach(self, who: dict, alias: str = "greeter", idle: float = 1.0) -> dict:
            req = {"op": "attach", "consumer": {k: who[k] for k in ("id", "pid", "start")}, "alias": alias,
                   "key": "local:greeter", "service": "greeter", "methods": METHODS,
                   "sharing": {"mode": "singleton", "idle_timeout": idle}}
            reply = client.request(req)
            if reply["state"] == "absent":
                reply = client.request({**req, "provider": self.start_provider()})
            assert reply["state"] == "attached", reply
            return reply

    yield World()
    if client.running():
        client.request({"op": "shutdown"}, start=False)
    for p in procs:
        p.kill()
        p.wait()


def _service(status: dict) -> dict | None:
    return next(iter(status["services"]), None)


def test_one_provider_two_consumers_tokens_and_schemas(world) -> None:
    a, b = world.consumer(), world.consumer()
    ra = world.attach(a)
    rb = world.attach(b)
    svc = _service(client.status())
    assert svc["consumer_count"] == 2 and svc["state"] == "running"
    provider_pid = svc["provider"]["pid"]
    assert len([s for s in client.status()["services"]]) == 1  # one instance for both
    assert ra["token"] != rb["token"] and len(ra["token"]) == 64

    ok = call(ra["socket"], ra["token"], "greet", {"name": "Ada"})
    assert ok["result"] == {"greeting": "hello Ada"} and ok["id"] == 1
    # another consumer's token on A's endpoint, a made-up token, no token
    for token, why in ((rb["token"], "another consumer"), ("0" * 64, "unknown"), (None, "no token")):
        refused = call(ra["socket"], token, "greet", {"name": "Ada"})
        assert refused["error"]["code"] == PERMISSION_DENIED and why in refused["error"]["message"], refused
    # schema violations: refused at the broker, never forwarded
    before = len(received(world.log))
    bad = call(ra["socket"], ra["token"], "greet", {"name": 5, "extra": True})
    assert bad["error"]["code"] == SCHEMA_VALIDATION_FAILED
    assert "5" not in bad["error"]["message"]  # the refusal names the rule, never the value
    assert call(ra["socket"], ra["token"], "nope", {})["error"]["code"] == METHOD_NOT_FOUND
    assert call(ra["socket"], None, "x", {}, raw=b"{not json\n")["error"]["code"] == PARSE_ERROR
    assert len(received(world.log)) == before
    # a provider result that breaks output_schema is refused too (it was forwarded, not returned)
    out = call(rb["socket"], rb["token"], "bad_greet", {"name": "Bo"})
    assert out["error"]["code"] == SCHEMA_VALIDATION_FAILED and "result of bad_greet" in out["error"]["message"]
    log = (sockets.state_dir() / "broker.log").read_text()
    assert "refused" in log and ra["token"] not in log and rb["token"] not in log

    # A stops: its token is revoked at once (a replay on B's endpoint is refused); the provider stays for B
    a["proc"].kill()
    wait_until(lambda: _service(client.status())["consumer_count"] == 1, what="A to be uncounted")
    replay = call(rb["socket"], ra["token"], "greet", {"name": "Ada"})
    assert replay["error"]["code"] == PERMISSION_DENIED and "revoked" in replay["error"]["message"]
    assert not Path(ra["socket"]).exists()
    assert call(rb["socket"], rb["token"], "greet", {"name": "Bo"})["result"] == {"greeting": "hello Bo"}

    # B stops: after the grace period the provider is stopped and its process is gone
    b["proc"].kill()
    wait_until(lambda: not alive(provider_pid), what="the provider to be stopped after its grace period")
    wait_until(lambda: not client.status()["services"], what="the instance to be dropped")


def test_a_consumer_within_the_grace_period_keeps_the_provider(world) -> None:
    a = world.consumer()
    world.attach(a, idle=30)
    pid = _service(client.status())["provider"]["pid"]
    client.detach(a["id"])
    svc = _service(client.status())
    assert svc["state"] == "idle" and svc["stops_at"] and svc["consumer_count"] == 0
    b = world.consumer()
    rb = world.attach(b, idle=30)
    svc = _service(client.status())
    assert svc["state"] == "running" and svc["provider"]["pid"] == pid and svc["consumer_count"] == 1
    assert call(rb["socket"], rb["token"], "greet", {"name": "C"})["result"]["greeting"] == "hello C"


def test_the_broker_stops_its_providers_when_it_exits(world) -> None:
    a = world.consumer()
    world.attach(a, idle=300)
    pid = _service(client.status())["provider"]["pid"]
    client.request({"op": "shutdown"}, start=False)
    wait_until(lambda: not alive(pid), what="the provider to stop with the broker")
    wait_until(lambda: not client.running(), what="the broker to exit")
