"""Where the broker's Unix sockets live: ``$ATO_SOCKET_DIR``, else ``$ATO_HOME/run/capsule-ipc``.

A Unix socket path holds at most 107 bytes. When the configured directory would make a socket
path too long (deep temp dirs, long home directories), a short private directory
``/tmp/ato-ipc-<uid>-<hash of the configured dir>`` is used instead: created 0700, owned by us
and not a symlink, or refused. Every directory holding sockets is 0700, so only this user can
connect; the socket of a provider is in a directory its consumers are never given.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from pipeline import paths

MAX_PATH = 107
LONGEST_NAME = 40  # "c-<8 hex>/<alias up to 24>.sock" and "p-<16 hex>.sock" fit below this


def configured_dir() -> Path:
    env = os.environ.get("ATO_SOCKET_DIR")
    return Path(env) if env else paths.run_dir() / "capsule-ipc"


def private_dir(path: Path) -> Path:
    """``path`` created 0700 (and checked: ours, a directory, not a symlink)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def socket_root(*, create: bool = True) -> Path:
    """The directory of every socket of this ATO_HOME (made 0700 unless ``create`` is off: readers only look)."""
    base = configured_dir()
    if len(str(base)) + 1 + LONGEST_NAME > MAX_PATH:
        base = Path("/tmp") / f"ato-ipc-{os.getuid()}-{hashlib.sha256(str(base).encode()).hexdigest()[:12]}"
    return private_dir(base) if create else base


def control_path(root: Path) -> Path:
    """The broker's control socket (``ato`` talks to it; capsules are never given its directory)."""
    return root / "broker.sock"


def short_id(text: str, n: int = 8) -> str:
    """A short stable name for something long (a consumer id, a provider key) in a socket path."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def state_dir() -> Path:
    """The broker's state (``state.json`` for ``ato ps``), lock and log: always under ``$ATO_HOME``."""
    return paths.run_dir() / "ipc"
