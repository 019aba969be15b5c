"""Shared test fixtures: isolated homes and the installed CLIs as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import paths
from pipeline.envelope import validation_errors

BIN_DIR = Path(sys.executable).parent


def cli_path(name: str) -> str:
    """The installed console script (``ato`` / ``cap``) next to this interpreter."""
    candidate = BIN_DIR / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed; run `make install`")
    return found


def home_env(root: Path) -> dict[str, str]:
    """The environment of another machine's user whose home is ``root``."""
    return {"HOME": str(root), "ATO_HOME": str(root / ".ato"), "XDG_DATA_HOME": str(root / ".local" / "share")}


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (R, S, T stopped, Z zombie ...); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    return stat[stat.rfind(b")") + 2:][:1].decode()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def stderr_json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr.splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


def assert_schema(doc: Any, schema: str) -> None:
    problems = validation_errors(doc, schema)
    assert not problems, f"{schema} schema violations: {problems}"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own HOME and ATO_HOME; nothing touches the real home."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ATO_HOME", str(home / ".ato"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.delenv("ATO_TOKEN", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.delenv("ATO_STRICT_MANIFEST", raising=False)
    for name in ("ATO_REGISTRY", "ATO_COLOR", "ATO_PROGRESS", "NO_COLOR"):  # settings come from each test alone
        monkeypatch.delenv(name, raising=False)
    return home


def _run(name: str, args: list[str], cwd: Path | None, env: dict[str, str] | None,
         input_text: str | None, timeout: float) -> Result:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [cli_path(name), *args], cwd=cwd, env=full_env, input=input_text,
        capture_output=True, text=True, timeout=timeout,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def ato():
    """Run the installed ``ato`` as a subprocess: ato(args, cwd=..., env=...)."""
    def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            input_text: str | None = None, timeout: float = 120) -> Result:
        return _run("ato", args, cwd, env, input_text, timeout)
    return run


@pytest.fixture
def cap():
    """Run the installed ``cap`` as a subprocess: cap(args, cwd=..., env=...)."""
    def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            input_text: str | None = None, timeout: float = 120) -> Result:
        return _run("cap", args, cwd, env, input_text, timeout)
    return run


def forget_local_builds() -> None:
    """Act as another machine: drop this ATO_HOME's record of the artifacts it built.

    An unsigned artifact built by this ATO_HOME is accepted as a local build; tests of
    the unsigned-refusal rule need the bytes to look foreign.
    """
    shutil.rmtree(paths.local_builds_dir(), ignore_errors=True)


@pytest.fixture(scope="session")
def hostile_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside every ATO_HOME that the hostile payloads of issue 12 aim at; it must never change."""
    root = tmp_path_factory.mktemp("sentinel")
    (root / "keep.txt").write_text("do not touch\n")
    (root / "x").write_text("the symlink chains aim here\n")
    return root


@pytest.fixture(scope="session")
def hostile_artifacts(tmp_path_factory: pytest.TempPathFactory, hostile_sentinel: Path) -> dict[str, Path]:
    """The hostile artifact classes of issue 12 (tests/e2e/hostile_cases.py), built once per test worker."""
    from tests.e2e.hostile_cases import build_all

    return build_all(tmp_path_factory.mktemp("hostile"), hostile_sentinel)


@pytest.fixture(scope="module")
def hostile_registry(tmp_path_factory: pytest.TempPathFactory):
    """An empty real `ato registry serve` that the hostile uploads of one test module go to."""
    from tests.e2e.registry_support import Registry

    root = tmp_path_factory.mktemp("registry")
    reg = Registry(root / "data", home=root / "home")
    yield reg
    reg.stop()


# ---------------------------------------------------------------- registry index backends


@pytest.fixture(scope="session")
def postgres_server():
    """The tests' own PostgreSQL server (one per session, i.e. per xdist worker), started on first use."""
    from tests.pg_support import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> Any:
    """A fresh, empty database of the tests' PostgreSQL server, dropped afterwards."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def s3_server():
    """The tests' own S3-compatible endpoint (moto's server mode), started on first use."""
    from tests.s3_support import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the AWS environment variables point every client (child processes too) at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.create_bucket()


class RegistryBackend:
    """Where a test registry keeps its index and its blobs."""

    def __init__(self, name: str, database: str | None = None, blob_store: str | None = None) -> None:
        self.name = name
        self.database = database
        self.blob_store = blob_store

    def store(self, data_dir: Path) -> Any:
        from pipeline.registry.storage import RegistryStore

        return RegistryStore(data_dir, self.database, blob_store=self.blob_store)

    def serve_args(self) -> list[str]:
        return ([f"--database={self.database}"] if self.database else []) + \
            ([f"--blob-store={self.blob_store}"] if self.blob_store else [])


INDEX_BACKENDS = ["sqlite+disk", "postgresql+s3"]
# For a test in a module whose registry runs on both backends but whose subject is not the index
# (client-side rules, load): it runs on the embedded default only, which keeps the suite's time down.
sqlite_index_only = pytest.mark.parametrize("registry_backend", ["sqlite+disk"], indirect=True)


@pytest.fixture(params=INDEX_BACKENDS)
def registry_backend(request: pytest.FixtureRequest) -> RegistryBackend:
    """The backends a test registry runs on: the embedded default (SQLite in the data dir, blobs on
    its disk) or the team setup (the tests' own PostgreSQL and S3-compatible endpoint).

    Parametrised: a test using it runs once per backend."""
    return make_backend(request, request.param)


def make_backend(request: pytest.FixtureRequest, name: str) -> RegistryBackend:
    if name == "sqlite+disk":
        return RegistryBackend(name)
    bucket = request.getfixturevalue("s3_bucket")
    return RegistryBackend(name, request.getfixturevalue("postgres_url"), f"s3://{bucket}/registry")
