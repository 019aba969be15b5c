"""Readiness probes: ``http_get`` (a 2xx-4xx answer on 127.0.0.1:<port>) and ``tcp_connect``.

The probe's ``port`` names an environment variable of the service (``"PORT"``,
``"API_PORT"``) or is a number; the value is looked up in the env the service was
started with, so the probe and the service always agree on the port.

A dependency contract's ``ready`` (:mod:`pipeline.runtime.dependencies`) adds three kinds, its
values already rendered: ``http_url`` (GET that URL; ``expect_status``, else any 2xx-3xx),
``unix_socket`` (the socket accepts a connection) and ``postgres`` (``pg_isready``'s rule: the
server answers a startup message with an authentication request or any error other than
57P03 "the database system is starting up").
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from pipeline.errors import AtoError

CONTRACT = "ATO_ERR_EXECUTION_CONTRACT_INVALID"


@dataclass(frozen=True)
class Probe:
    kind: str  # http | tcp | http_url | unix_socket | postgres
    host: str
    port: int
    path: str = "/"
    url: str | None = None  # http_url
    expect_status: int | None = None  # http_url
    user: str = "postgres"  # postgres
    database: str | None = None  # postgres

    def describe(self) -> str:
        if self.kind == "http":
            return f"GET http://{self.host}:{self.port}{self.path}"
        if self.kind == "http_url":
            return f"GET {self.url}"
        if self.kind == "unix_socket":
            return f"unix socket {self.path}"
        if self.kind == "postgres":
            return f"postgres {self.host}:{self.port}"
        return f"tcp {self.host}:{self.port}"


def _contract_probe(spec: dict[str, Any]) -> Probe | None:
    """The rendered ``ready`` of a dependency contract (see the module doc), or None for a manifest probe."""
    if "http_url" in spec:
        from urllib.parse import urlsplit

        url = str(spec["http_url"])
        parts = urlsplit(url)
        expect = spec.get("expect_status")
        return Probe("http_url", parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80),
                     url=url, expect_status=int(expect) if expect is not None else None)
    if "unix_socket" in spec:
        return Probe("unix_socket", "", 0, path=str(spec["unix_socket"]))
    if "postgres" in spec:
        pg = spec["postgres"]
        return Probe("postgres", str(pg.get("host") or "127.0.0.1"), int(pg["port"]), user=str(pg.get("user") or
                                                                                              "postgres"),
                     database=str(pg["database"]) if pg.get("database") else None)
    return None


def resolve_probe(spec: dict[str, Any], env: dict[str, str], service: str) -> Probe:
    """Turn a manifest probe into host/port/path using the service's env."""
    found = _contract_probe(spec)
    if found is not None:
        return found
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
    if probe.kind == "http_url":
        return _check_url(probe, timeout)
    if probe.kind == "unix_socket":
        return _check_unix(probe.path, timeout)
    if probe.kind == "postgres":
        return postgres_ready(probe.host, probe.port, probe.user, probe.database, timeout)
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


def _check_url(probe: Probe, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(probe.url or "", timeout=timeout) as resp:  # noqa: S310 - http(s) checked at load
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError):
        return False
    return status == probe.expect_status if probe.expect_status is not None else 200 <= status < 400


def _check_unix(path: str, timeout: float) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def postgres_ready(host: str, port: int, user: str, database: str | None, timeout: float = 1.0) -> bool:
    """``pg_isready``: a protocol 3.0 startup message answered by ``R`` (authentication), or by ``E`` with any
    SQLSTATE but 57P03 (the server runs but refuses this user or database: it is up)."""
    import struct

    params = b"user\0" + user.encode() + b"\0" + (b"database\0" + database.encode() + b"\0" if database else b"")
    body = struct.pack("!I", 196608) + params + b"\0"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            while True:
                head = _recv_exact(sock, 5)
                if head is None:
                    return False
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                if length < 4 or length > 1 << 16:
                    return False
                payload = _recv_exact(sock, length - 4)
                if payload is None:
                    return False
                if kind == b"R":
                    return True
                if kind == b"E":
                    fields = {f[:1]: f[1:] for f in payload.split(b"\0") if f}
                    return fields.get(b"C") != b"57P03"
                if kind != b"N":  # a notice may come first; anything else is not a PostgreSQL server
                    return False
    except OSError:
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
