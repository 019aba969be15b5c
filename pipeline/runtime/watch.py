"""``--watch``: rerun the capsule when its files change (debounced by CAPSULE_WATCH_DEBOUNCE_MS).

The capsule runs as a child ``ato run`` (so every check runs again after an edit,
a changed capsule.toml included); a change stops it (SIGTERM, then SIGKILL after
the grace period) and starts it again. Ctrl-C stops both and exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.runtime.lifecycle import grace_seconds, group_alive, signal_group

IGNORED_DIRS = {".git", "node_modules", "__pycache__", ".venv", ".ato", "target"}
DEFAULT_DEBOUNCE_MS = 300


def debounce_ms() -> int:
    raw = (os.environ.get("CAPSULE_WATCH_DEBOUNCE_MS") or "").strip()
    return int(raw) if raw.isdigit() else DEFAULT_DEBOUNCE_MS


def _interesting(_change: object, path: str) -> bool:
    parts = Path(path).parts
    return not any(p in IGNORED_DIRS for p in parts) and not path.endswith((".log", ".pyc", "~", ".swp"))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None or group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_seconds())
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def watch(project_dir: Path, child_args: list[str], notify: Callable[[str], None]) -> int:
    import watchfiles

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    debounce = debounce_ms()
    notify(f"👀 watching {project_dir} (debounce {debounce}ms)")
    cmd = [sys.executable, "-m", "pipeline.cli.main", "run", *child_args]
    env = {**os.environ, "CAPSULE_WATCH_MODE": "1"}

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, process_group=0)

    proc = start()
    try:
        for changes in watchfiles.watch(project_dir, watch_filter=_interesting, debounce=debounce, step=50,
                                         stop_event=stop, rust_timeout=500, yield_on_timeout=False,
                                         raise_interrupt=False):
            if stop.is_set():
                break
            changed = sorted({p for _c, p in changes})
            notify(f"📝 changed: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}")
            notify("🔄 restarting capsule")
            _stop(proc)
            proc = start()
    finally:
        _stop(proc)
    notify("👋 watch mode stopped")
    return 0
