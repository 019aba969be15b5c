"""Helpers for the registry tests: a real ``ato registry serve`` process, projects, forged capsules,
data-dir snapshots and a byte-counting TCP proxy."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import selectors
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import httpx

from pipeline.registry.blobs import open_blob_store
from tests import hostile_support
from tests.conftest import cli_path

TOKEN = "pwd"


class Registry:
    """``ato registry serve --host 127.0.0.1 --port 0`` as a subprocess."""

    def __init__(self, data_dir: Path, token: str | None = TOKEN, home: Path | None = None,
                 extra_args: list[str] | None = None, database: str | None = None, workers: int = 1,
                 port: int = 0, backend: Any = None) -> None:
        self.data_dir = data_dir
        self.token = token
        self.database = database
        self.blob_store = backend.blob_store if backend is not None else None
        if extra_args and "--blob-store" in extra_args:
            self.blob_store = extra_args[extra_args.index("--blob-store") + 1]
        args = [cli_path("ato"), "registry", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--data-dir", str(data_dir), "--workers", str(workers)]
        if database:
            args += ["--database", database]
        if backend is not None:  # a tests.conftest.RegistryBackend
            args += backend.serve_args()
        if token:
            args += ["--auth-token", token]
        args += extra_args or []
        env = dict(os.environ)
        if home is not None:
            env.update(HOME=str(home), ATO_HOME=str(home / ".ato"))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.url = self._read_url()
        self.wait_ready()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 240  # generous: the machine may be shared with other test runs
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.2):
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("Local registry serving at "):
                return line.split()[-1].strip()
        self.proc.kill()
        _out, err = self.proc.communicate()
        raise RuntimeError(f"registry did not start: {err}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/.well-known/capsule.json", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("registry never answered")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def snapshot(target: Any) -> dict[str, Any]:
    """Every path under a registry's data dir with its type, mode and content digest, and every row
    of its index (``target``: a data dir, a :class:`Registry` or a ``RegistryStore``).

    The index is compared by content, table by table, whichever database holds it: the bytes of
    an SQLite file change when a row is written and removed again (an upload session opened and
    closed), though nothing in it does.
    """
    if isinstance(target, str | os.PathLike):
        root, index = Path(target), None
    else:
        root, index = Path(getattr(target, "data_dir", None) or target.root), getattr(target, "index", None)
    url = index.url if index is not None else getattr(target, "database", None)
    out: dict[str, Any] = {"index": index_rows(url or f"sqlite:///{root / 'registry.sqlite3'}")}
    blobs = getattr(target, "blobs", None) or (
        open_blob_store(target.blob_store, root) if getattr(target, "blob_store", None) else None)
    if blobs is not None and blobs.local_path("artifacts") is None:  # a bucket: its objects, by content
        for key in blobs.keys():
            out["blob:" + key] = hashlib.sha256(blobs.read(key)).hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            out[rel] = ("dir",)
        for name in sorted(filenames):
            if name.startswith("registry.sqlite3"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            with open(path, "rb") as fh:
                out[rel] = ("file", os.lstat(path).st_mode, hashlib.sha256(fh.read()).hexdigest())
    return out


def index_rows(url: str) -> dict[str, list[str]]:
    """Every row of every table of a registry index, sorted (empty when there is no index yet)."""
    from sqlalchemy import MetaData, create_engine

    from pipeline.registry.index import database_url
    url = database_url(url, Path("."))
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return {}
    engine = create_engine(url)
    try:
        md = MetaData()
        with engine.connect() as conn:
            md.reflect(conn)
            return {name: sorted(repr(tuple(r)) for r in conn.execute(table.select()))
                    for name, table in sorted(md.tables.items())}
    finally:
        engine.dispose()


def settle(root: Any, before: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """The data dir once in-flight cleanup (e.g. after a dropped connection) has finished."""
    deadline = time.monotonic() + timeout
    after = snapshot(root)
    while after != before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = snapshot(root)
    return after


MANIFEST = """\
schema_version = "0.2"
name = "{name}"
version = "{version}"
type = "app"
default_target = "default"
description = "{description}"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "main.py"
port = 8080
"""


def make_project(root: Path, name: str, version: str = "0.1.0", *, description: str = "a test capsule",
                 files: dict[str, bytes] | None = None, metadata: str | None = None) -> Path:
    """A python capsule project; ``metadata`` is the body of a ``[metadata]`` table, and ``files`` (a
    README.md among them) are written last."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = MANIFEST.format(name=name, version=version, description=description)
    if metadata:
        manifest += f"\n[metadata]\n{metadata.strip()}\n"
    (root / "capsule.toml").write_text(manifest)
    (root / "main.py").write_text(f"print('hello from {name}')\n")
    (root / "README.md").write_text(f"# {name}\n\nThe {name} capsule.\n")
    for rel, data in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def set_version(project: Path, version: str) -> None:
    text = (project / "capsule.toml").read_text()
    lines = [f'version = "{version}"' if line.startswith("version = ") else line for line in text.splitlines()]
    (project / "capsule.toml").write_text("\n".join(lines) + "\n")


def build_in_process(project: Path) -> Path:
    """Build with the library (same code path as ``ato build``) in this test process's ATO_HOME."""
    from pipeline.graph import run_build
    from stages.build import BuildOptions, plan_build
    doc = run_build(plan_build(project, BuildOptions()))
    return Path(doc["artifact"])


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            info.size = len(data) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def forge_capsule(out: Path, name: str, version: str, members: list[tuple[str, bytes]] | None = None,
                  raw_entries: list[tuple[tarfile.TarInfo, bytes]] | None = None, *,
                  single_frame: bool = False) -> Path:
    """A capsule with every digest right, around an arbitrary payload tar (e.g. one with ``..``).

    ``single_frame`` compresses the whole payload as one zstd frame: still a valid capsule, but its
    frames are not its chunks (what another tool might produce).
    """
    entries = list(raw_entries or [])
    for path, data in members or []:
        info = tarfile.TarInfo(path)
        info.mode = 0o644
        entries.append((info, data))
    return hostile_support.capsule(out, name, version, raw_tar=_tar_bytes(entries), single_frame=single_frame)


def digests(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "blake3": blake3.blake3(data).hexdigest()}


class CountingProxy:
    """A loopback TCP proxy that counts the bytes the upstream sends back (what a client downloads)."""

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.down = 0
        self.up = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    if direction == "down":
                        self.down += len(data)
                    else:
                        self.up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        with self.lock:
            self.down = self.up = 0

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def install_flags() -> list[str]:
    """Extra ``ato install`` flags for the unsigned test artifacts.

    Issue 6 (trust) makes install refuse unsigned artifacts unless ``--allow-unsigned``;
    these tests are about transport and storage, so they opt in when the flag exists.
    """
    global _INSTALL_FLAGS
    if _INSTALL_FLAGS is None:
        out = subprocess.run([cli_path("ato"), "install", "--help"], capture_output=True, text=True).stdout
        _INSTALL_FLAGS = ["--allow-unsigned"] if "--allow-unsigned" in out else []
    return list(_INSTALL_FLAGS)


_INSTALL_FLAGS: list[str] | None = None
