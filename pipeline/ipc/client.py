"""Talking to the broker from ``ato`` (the CLI, ``ato ps``): start it on demand, then one request per call."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import AtoError
from pipeline.ipc import sockets
from pipeline.ipc.sockets import control_path

START_WAIT = 20.0
REQUEST_TIMEOUT = 60.0


class BrokerError(AtoError):
    """The broker refused a request or could not be reached."""


def _send(path: Path, doc: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall((json.dumps(doc) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("broker reply is not an object")
    return reply


def running() -> bool:
    try:
        _send(control_path(sockets.socket_root(create=False)), {"op": "status"}, 5)
        return True
    except (OSError, ValueError):
        return False


def ensure_broker() -> Path:
    """The control socket of this ATO_HOME's broker, starting the broker if none answers."""
    path = control_path(sockets.socket_root())
    try:
        _send(path, {"op": "status"}, 5)
        return path
    except (OSError, ValueError):
        pass
    state = sockets.private_dir(sockets.state_dir())
    with open(state / "broker.out", "ab") as out, open(os.devnull, "rb") as devnull:
        subprocess.Popen([sys.executable, "-m", "pipeline.ipc.broker"], stdin=devnull, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        try:
            _send(path, {"op": "status"}, 5)
            return path
        except (OSError, ValueError):
            time.sleep(0.05)
    raise BrokerError("ATO_ERR_RUNTIME_LAUNCH_FAILED", f"the IPC broker did not start within {START_WAIT:g}s",
                      details={"log": str(state / "broker.log")})


def request(doc: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
    """Send one control request; BrokerError when the broker says no."""
    path = ensure_broker() if start else control_path(sockets.socket_root(create=False))
    try:
        reply = _send(path, doc, REQUEST_TIMEOUT)
    except (OSError, ValueError) as exc:
        raise BrokerError("ATO_ERR_RUNTIME_LAUNCH_FAILED", f"the IPC broker did not answer: {exc}") from None
    if not reply.get("ok"):
        raise BrokerError("ATO_ERR_POLICY_VIOLATION", f"the IPC broker refused: {reply.get('error')}",
                          details={"op": doc.get("op")})
    return reply


def status() -> dict[str, Any] | None:
    """The broker's state, or None when no broker runs (``ato ps`` never starts one)."""
    try:
        return _send(control_path(sockets.socket_root(create=False)), {"op": "status"}, 5)
    except (OSError, ValueError):
        return None


def detach(consumer: str) -> None:
    """Uncount a consumer and revoke its tokens (quietly nothing when no broker runs)."""
    try:
        _send(control_path(sockets.socket_root(create=False)), {"op": "detach", "consumer": consumer},
              REQUEST_TIMEOUT)
    except (OSError, ValueError):
        pass
