"""Provisioning outside the sandbox: a uv environment for Tier 2 python, keyed by its lockfile.

``uv sync --frozen`` installs exactly what uv.lock pins (never re-resolving) into
``$ATO_HOME/runtimes/envs/<key>``; the sandboxed workload then runs that
environment's python read-only. With ATO_OFFLINE=1 (or when nothing needs
downloading, as for a project without dependencies) uv never touches the network.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import blake3

from pipeline import paths
from pipeline.errors import AtoError, Problem
from pipeline.runtime.drivers import which

READY = ".ato-ready"


def _truthy(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy("ATO_OFFLINE") or _truthy("UV_OFFLINE")


def _uv() -> str:
    uv = which("uv")
    if uv is None:
        message = "uv runtime is not resolved: python targets run with uv (pip install uv)"
        raise AtoError("ATO_ERR_RUNTIME_NOT_RESOLVED", message, details={"runtime": "uv"},
                       problems=[Problem("ATO_ERR_RUNTIME_NOT_RESOLVED", message, {"runtime": "uv"})])
    return uv


def _uv_env() -> dict[str, str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    if offline():
        env["UV_OFFLINE"] = "1"
    return env


def python_environment(project_dir: Path, uv_lock: Path) -> tuple[Path, list[Path]]:
    """(python to run, host paths the sandbox must be able to read) for a uv project."""
    uv = _uv()
    pyproject = uv_lock.parent / "pyproject.toml"
    if not pyproject.is_file():
        proc = subprocess.run([uv, "python", "find"], capture_output=True, text=True, env=_uv_env(), timeout=60)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise AtoError("ATO_ERR_RUNTIME_NOT_RESOLVED", f"no python interpreter found by uv: "
                                                           f"{proc.stderr.strip()[:300]}")
        return Path(proc.stdout.strip()), []
    hasher = blake3.blake3(uv_lock.read_bytes())
    hasher.update(b"\0" + pyproject.read_bytes() + b"\0" + str(uv_lock.parent.resolve()).encode())
    env_dir = paths.runtime_envs_dir() / hasher.hexdigest()[:32]
    python = env_dir / "bin" / "python"
    if (env_dir / READY).is_file() and python.exists():
        return python, [env_dir]
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ((env_dir / READY).is_file() and python.exists()):
            cmd = [uv, "sync", "--frozen", "--no-dev", "--no-install-project"]
            if offline():
                cmd.append("--offline")
            proc = subprocess.run(cmd, cwd=uv_lock.parent, capture_output=True, text=True, timeout=900,
                                  env={**_uv_env(), "UV_PROJECT_ENVIRONMENT": str(env_dir)})
            if proc.returncode != 0:
                message = f"uv sync --frozen failed for {uv_lock}: {proc.stderr.strip()[-400:]}"
                raise AtoError("ATO_ERR_PROVISIONING_FAILED", message,
                               details={"lockfile": str(uv_lock)},
                               problems=[Problem("ATO_ERR_PROVISIONING_FAILED", message,
                                                 {"lockfile": str(uv_lock)})])
            (env_dir / READY).write_text("ok\n", "utf-8")
    return python, [env_dir]
