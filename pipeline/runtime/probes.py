"""Readiness probes: ``http_get`` (a 2xx-4xx answer on 127.0.0.1:<port>) and ``tcp_connect``.

The probe's ``port`` names an environment variable of the service (``"PORT"``,
``"API_PORT"``) or is a number; the value is looked up in the env the service was
started with, so the probe and the service always agree on the port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from pipeline.errors import AtoError

CONTRACT = "ATO_ERR_EXECUTION_CONTRACT_INVALID"


@dataclass(frozen=True)
class Probe:
    kind: str  # http | tcp
    host: str
    port: int
    path: str = "/"

    def describe(self) -> str:
        if self.kind == "http":
            return f"GET http://{self.host}:{self.port}{self.path}"
        return f"tcp {self.host}:{self.port}"


def resolve_probe(spec: dict[str, Any], env: dict[str, str], service: str) -> Probe:
    """Turn a manifest probe into host/port/path using the service's env."""
    port_ref = spec.get("port", "PORT")
    if isinstance(port_ref, int) and not isinstance(port_ref, bool):
        port = port_ref
    else:
        value = (env.get(str(port_ref)) or "").strip()
        if not value:
            raise AtoError(CONTRACT, f"services.{service}.readiness_probe.port '{port_ref}' is not defined in the "
                                     "service env", details={"service": service})
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise AtoError(CONTRACT, f"services.{service}.readiness_probe.port '{port_ref}' resolved to "
                                     f"non-numeric value '{value}'",
                           details={"service": service})
        port = int(value)
    if spec.get("http_get") is not None:
        path = str(spec["http_get"]).strip() or "/"
        if not path.startswith("/"):
            path = "/" + path
        return Probe("http", "127.0.0.1", port, path)
    target = str(spec.get("tcp_connect") or "").strip()
    if ":" in target:
        host, _, p = target.rpartition(":")
        if p.isdigit():
            return Probe("tcp", host.strip("[]") or "127.0.0.1", int(p))
    host = target if target and target not in ("true", "PORT") and not target.isdigit() else "127.0.0.1"
    return Probe("tcp", host, port)


def check(probe: Probe, timeout: float = 1.0) -> bool:
    """One attempt: True when the service answers."""
    try:
        with socket.create_connection((probe.host, probe.port), timeout=timeout) as sock:
            if probe.kind == "tcp":
                return True
            sock.settimeout(timeout)
            sock.sendall(f"GET {probe.path} HTTP/1.1\r\nHost: {probe.host}\r\nConnection: close\r\n\r\n"
                         .encode("latin-1"))
            head = b""
            while b"\r\n" not in head and len(head) < 256:
                data = sock.recv(256)
                if not data:
                    break
                head += data
    except OSError:
        return False
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False
    return 200 <= int(parts[1]) <= 499
