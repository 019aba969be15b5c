"""The tests' own PostgreSQL server: Debian's ``initdb`` + ``pg_ctl`` in a temp dir on a free port.

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to
``nobody`` (its data dir is created for it and handed over) and every server command runs
through ``runuser``. The server listens on 127.0.0.1 only, trusts local connections (it holds
nothing but test data) and skips fsync; one server serves a whole test session (one per xdist
worker) and every test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

UNPRIVILEGED = "nobody"


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary (PATH first, then Debian's /usr/lib/postgresql/<major>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running cluster; ``url(db)`` names a database in it."""

    def __init__(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL server binaries are missing: run `make system-deps` (Debian's "
                               "postgresql package)")
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="ato-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            entry = pwd.getpwnam(UNPRIVILEGED)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.as_user = ["runuser", "-u", UNPRIVILEGED, "--"]
        subprocess.run([*self.as_user, initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-instructions", "-N"],
                       check=True, capture_output=True, cwd=self.root, timeout=300)
        for _attempt in range(5):
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                       "-c shared_buffers=64MB")
            res = subprocess.run([*self.as_user, pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                                  "-w", "-t", "120", "start"], capture_output=True, text=True, cwd=self.root,
                                 timeout=180)
            if res.returncode == 0:
                break
            time.sleep(0.2)  # the port was taken between probe and bind: another one
        else:
            raise RuntimeError(f"PostgreSQL did not start: {res.stderr}\n{self.log_text()}")

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-4000:]
        return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=self.root, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)
