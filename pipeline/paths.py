"""Every on-disk location the program uses, derived from ATO_HOME / HOME / XDG.

No other module builds a path under the user's home; tests isolate themselves by
pointing HOME and ATO_HOME at temp dirs.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def ato_home() -> Path:
    env = os.environ.get("ATO_HOME")
    return Path(env) if env else home() / ".ato"


def cas_root() -> Path:
    return ato_home() / "cas"


def state_dir() -> Path:
    return ato_home() / "state"


def sync_state_dir() -> Path:
    """When each ``.sync`` package was last checked against its source (one small JSON per package path)."""
    return state_dir() / "sync"


def doit_db_path() -> Path:
    return state_dir() / "doit.db"


def local_builds_dir() -> Path:
    """One marker per artifact digest this machine built: the provenance of unsigned local builds."""
    return state_dir() / "built"


def build_cache_dir() -> Path:
    """Per-project build records (payload manifests) kept between builds."""
    return state_dir() / "builds"


def fetches_dir() -> Path:
    return ato_home() / "fetches"


def apps_dir() -> Path:
    return ato_home() / "apps"


def projections_dir() -> Path:
    return ato_home() / "native-delivery" / "projections"


def store_dir() -> Path:
    return ato_home() / "store"


def local_registry_dir() -> Path:
    return ato_home() / "local-registry"


def run_dir() -> Path:
    return ato_home() / "run"


def logs_dir() -> Path:
    return ato_home() / "logs"


def keys_dir() -> Path:
    return ato_home() / "keys"


def config_path() -> Path:
    return ato_home() / "config.toml"


def credentials_path() -> Path:
    return ato_home() / "credentials.json"


def trust_store_path() -> Path:
    return home() / ".capsule" / "trust_store.json"


def xdg_data_home() -> Path:
    env = os.environ.get("XDG_DATA_HOME")
    return Path(env) if env else home() / ".local" / "share"


def applications_dir() -> Path:
    return xdg_data_home() / "applications"


def user_bin_dir() -> Path:
    return home() / ".local" / "bin"


def macos_applications_dir() -> Path:
    return home() / "Applications"


def engines_dir() -> Path:
    """Installed sandbox engines (``nacelle-<version>``)."""
    return ato_home() / "engines"


def unpacked_dir() -> Path:
    """Payloads of ``.capsule`` artifacts extracted for running, one dir per payload digest."""
    return ato_home() / "unpacked"


def consent_path() -> Path:
    """Approved execution plans (JSONL, mode 0600 in a 0700 dir)."""
    return ato_home() / "consent" / "executionplan_v1.jsonl"


def capsule_state_dir() -> Path:
    """Writable ``[state.<name>]`` directories handed to sandboxed capsules."""
    return ato_home() / "capsule-state"


def runtime_envs_dir() -> Path:
    """Provisioned language environments (uv virtualenvs keyed by lockfile digest)."""
    return ato_home() / "runtimes" / "envs"


def temp_sites() -> list[tuple[Path, bool]]:
    """Where ato's writers leave temp files (``(dir, recursive)``): what ``ato cas gc`` sweeps and
    ``ato cas verify`` reports. Content trees (unpacked payloads, fetched artifacts, capsule state)
    are never walked: only their parent directories, where their temp dirs are made."""
    return [
        (cas_root(), True), (state_dir(), True), (store_dir(), True),
        (ato_home(), False), (fetches_dir(), False), (unpacked_dir(), False), (apps_dir(), False),
        (projections_dir(), False), (keys_dir(), False), (engines_dir(), False), (run_dir(), True),
        (consent_path().parent, False), (trust_store_path().parent, False),
        (user_bin_dir(), False), (applications_dir(), False),
    ]
