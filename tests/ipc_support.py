"""What the IPC tests share: a real provider program, a JSON-RPC client, schemas and polling helpers."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A provider: JSON-RPC 2.0 lines on the Unix socket the broker names in CAPSULE_IPC_LISTEN_SOCKET.
# Every request it receives is appended to $PROVIDER_LOG (or ./received.jsonl), so a test can prove a
# refused call never reached it. `greet` answers per its output schema; `bad_greet` breaks it.
PROVIDER_PY = r'''
import json, os, socket, sys, signal
path = os.environ["CAPSULE_IPC_LISTEN_SOCKET"]
log = os.environ.get("PROVIDER_LOG", "received.jsonl")
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(16)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(f"provider {os.getpid()} listening", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
        if not buf.strip():
            continue  # a readiness check: connected, sent nothing
        req = json.loads(buf)
        with open(log, "a") as fh:
            fh.write(json.dumps(req) + "\n")
        if "id" not in req:
            continue
        args = req.get("params") or {}
        if req["method"] == "greet":
            result = {"greeting": "hello " + str(args.get("name"))}
        elif req["method"] == "bad_greet":
            result = {"greeting": 42}
        else:
            conn.sendall((json.dumps({"jsonrpc": "2.0", "id": req["id"],
                                      "error": {"code": -32601, "message": "no such method"}}) + "\n").encode())
            continue
        conn.sendall((json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result}) + "\n").encode())
'''

GREET_IN = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["name"], "properties": {"name": {"type": "string", "maxLength": 64}},
            "additionalProperties": False}
GREET_OUT = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
             "required": ["greeting"], "properties": {"greeting": {"type": "string"}}}
METHODS = {"greet": {"input_schema": GREET_IN, "output_schema": GREET_OUT},
           "bad_greet": {"input_schema": GREET_IN, "output_schema": GREET_OUT}}


def call(socket_path: str | Path, token: str | None, method: str, args: Any, *, msg_id: int = 1,
         raw: bytes | None = None, timeout: float = 30) -> dict[str, Any]:
    """One capsule/invoke through a broker endpoint (upstream's framing: one line, half-close, read)."""
    params: dict[str, Any] = {"method": method, "args": args}
    if token is not None:
        params["token"] = token
    line = raw if raw is not None else (json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "capsule/invoke",
                                                    "params": params}) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    return json.loads(buf.splitlines()[0])


def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (generous deadline: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def received(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
