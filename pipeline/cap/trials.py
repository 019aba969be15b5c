"""Safe-trial runner for ``cap review --run-trials``.

A safe trial is a publisher's claim that a command reads no credentials and
changes nothing. We do not take the claim on trust: each trial runs without a
shell, from a fresh temp copy of the package, with its own empty HOME, CAP_HOME
and TMPDIR, an environment built from a short allowlist (so host tokens and keys
never reach it), stdin closed, and a timeout that kills its whole process group.
single-file-url artifacts are never downloaded or executed here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.cap.bins import bin_file, path_problem
from pipeline.cap.manifest import BACKEND_LOCAL, CapManifest, Trial

DEFAULT_TIMEOUT = 30.0
OUTPUT_TAIL = 4000

# The only host variables a trial inherits; everything else is dropped.
ENV_ALLOWLIST = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "TZ")
# Even an allowlisted name is dropped when it looks like it carries a secret.
SECRET_MARKERS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE",
                  "SESSION", "PRIVATE", "AWS_", "GITHUB_", "GH_", "NPM_", "OPENAI", "ANTHROPIC")
# Copied as a symlink rather than duplicated: big, and only read by a --help trial.
LINKED_DIRS = ("node_modules",)
SKIPPED_DIRS = (".git",)


@dataclass
class TrialResult:
    """What one trial did; ``status`` is passed, failed or skipped."""

    command: str
    status: str
    exit_code: int | None = None
    duration_ms: int = 0
    stdout: str = ""
    stderr: str = ""
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def trial_env(root: Path, host: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a trial: allowlisted host values plus the isolated dirs."""
    host = dict(os.environ) if host is None else host
    env = {k: host[k] for k in ENV_ALLOWLIST if k in host and not looks_secret(k)}
    env.setdefault("PATH", os.defpath)
    home = root / "home"
    env.update({
        "HOME": str(home),
        "CAP_HOME": str(root / "cap-home"),
        "TMPDIR": str(root / "tmp"),
        "TMP": str(root / "tmp"),
        "TEMP": str(root / "tmp"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "CAP_REVIEW": "1",
    })
    return env


def _copy_source(src: Path, dst: Path) -> None:
    """Copy the package so relative writes land in the copy, not the publisher's tree."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*SKIPPED_DIRS, *LINKED_DIRS))
    for name in LINKED_DIRS:
        if (src / name).is_dir():
            os.symlink(src / name, dst / name)


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - OUTPUT_TAIL))
        return fh.read().decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_trial(m: CapManifest, trial: Trial, timeout: float) -> TrialResult:
    """Run one local-bin trial in a fresh sandbox directory tree and report what happened."""
    words = shlex.split(trial.command)
    with tempfile.TemporaryDirectory(prefix="cap-trial-") as tmp:
        root = Path(tmp)
        for sub in ("home", "cap-home", "tmp"):
            (root / sub).mkdir()
        work = root / "work"
        try:
            _copy_source(m.source_dir, work)
        except (OSError, shutil.Error) as exc:
            return TrialResult(trial.command, "failed", reason=f"could not copy the package source: {exc}")
        argv = [str(bin_file(m, words[0], work)), *words[1:]]
        out, err = root / "stdout", root / "stderr"
        started = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            try:
                proc = subprocess.Popen(argv, cwd=work, env=trial_env(root), stdin=subprocess.DEVNULL,
                                        stdout=fo, stderr=fe, start_new_session=True)
            except OSError as exc:
                return TrialResult(trial.command, "failed",
                                   reason=f"could not start {words[0]}: {exc.strerror or exc} "
                                          "(is the bin executable with a #! line?)")
            try:
                code: int | None = proc.wait(timeout=timeout)
                reason = None if code == 0 else f"exited with code {code}"
            except subprocess.TimeoutExpired:
                code, reason = None, f"timed out after {timeout:g}s"
            finally:
                _kill_group(proc)
                proc.wait()
        elapsed = int((time.monotonic() - started) * 1000)
        return TrialResult(trial.command, "passed" if reason is None else "failed", code, elapsed,
                           _tail(out), _tail(err), reason)


def skip_reason(m: CapManifest, trial: Trial) -> str | None:
    """Why a trial is not run (other checks report the underlying problem), or None to run it."""
    if m.backend != BACKEND_LOCAL:
        return f"{m.backend} artifacts are not downloaded or executed during local review"
    try:
        words = shlex.split(trial.command)
    except ValueError as exc:
        return f"command does not parse: {exc}"
    if not words or words[0] not in m.bins:
        return "command does not start with a declared bin"
    if path_problem(m, words[0]) or not bin_file(m, words[0]).is_file():
        return "bin file is missing or not a regular file"
    return None


def run_trials(m: CapManifest, timeout: float = DEFAULT_TIMEOUT) -> list[TrialResult]:
    """Run every runnable trial; the rest are reported as skipped with the reason."""
    results = []
    for trial in m.trials:
        reason = skip_reason(m, trial)
        results.append(TrialResult(trial.command, "skipped", reason=reason) if reason
                       else run_trial(m, trial, timeout))
    return results
