"""Safe-trial runner for ``cap review --run-trials`` (and ``cap publish --local``, which runs the same review).

A safe trial is a publisher's claim that a command reads no credentials and changes nothing but
the paths it declares under ``writes``. We do not take the claim on trust: each trial runs without
a shell, from a fresh temp copy of the package, with its own empty HOME, CAP_HOME and TMPDIR, an
environment built from a short allowlist (so host tokens and keys never reach it), stdin closed,
and a timeout that kills its whole process group. single-file-url artifacts are never downloaded
or executed here.

Writes. ``writes`` entries name what a trial may change: ``~/...`` or ``$HOME/...`` (the trial's
HOME), ``$CAP_HOME/...``, or a path relative to the package; a declared path covers everything
under it (and the directories leading to it may be created). The trial's TMPDIR is scratch space.
HOME, CAP_HOME and the package copy are compared before and after the run: any other change there
fails the trial and is listed in ``undeclared_writes``. They are writable *private* copies rather
than read-only, so that a write is found and named, never silently refused.

Sandbox. When the bundled bubblewrap engine (``ato-nacelle``) works on this host, the trial runs
inside it: the whole host filesystem is read-only, the host's real HOME is hidden (only the
top-level dirs of HOME that hold PATH entries, like ``~/.nvm``, stay visible, read-only), ``/tmp`` is
private, only the trial's own tree is writable, and the network is cut off unless the trial declares
``network`` entries. Without it (no ``bwrap``, or no user namespaces) the trial runs as a plain child
process (``sandbox: "none"``, warning ``trials.unsandboxed``): undeclared writes inside its private
dirs are still found and fail it, but nothing stops it from reading the host's files or writing to
them by absolute path, or from using the network.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.cap.bins import bin_file, path_problem
from pipeline.cap.manifest import BACKEND_LOCAL, CapManifest, Trial

DEFAULT_TIMEOUT = 30.0
OUTPUT_TAIL = 4000
SANDBOX_ENGINE = "ato-nacelle"
ENGINE_SPEC = "0.1.0"
ENGINE_FAILURE = 125

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
    """What one trial did; ``status`` is passed, failed or skipped; ``sandbox`` is how it was confined."""

    command: str
    status: str
    exit_code: int | None = None
    duration_ms: int = 0
    stdout: str = ""
    stderr: str = ""
    reason: str | None = None
    sandbox: str | None = None
    undeclared_writes: list[str] = field(default_factory=list)

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
        # a Python bin would otherwise drop __pycache__ next to its modules: an undeclared write
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


# ---------------------------------------------------------------- declared writes


@dataclass
class TrialDirs:
    """The private tree of one trial run."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cap_home(self) -> Path:
        return self.root / "cap-home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def labelled(self) -> dict[str, Path]:
        """The watched dirs, by the prefix a report names them with."""
        return {"~": self.home, "$CAP_HOME": self.cap_home, ".": self.work}


def resolve_write(declared: str, dirs: TrialDirs) -> Path | None:
    """Where a ``writes`` entry points inside the trial's tree (None: TMPDIR, always writable).

    Raises ValueError for a path a trial cannot be granted (absolute, or climbing out with ``..``).
    """
    text = declared.strip()
    roots = (("~", dirs.home), ("$HOME", dirs.home), ("${HOME}", dirs.home), ("$CAP_HOME", dirs.cap_home),
             ("${CAP_HOME}", dirs.cap_home), ("$TMPDIR", None), ("${TMPDIR}", None))
    found = next(((base, text[len(prefix):].lstrip("/")) for prefix, base in roots
                  if text == prefix or text.startswith(prefix + "/")), None)
    if found is None:
        if text.startswith("/") or not text:
            raise ValueError(f'writes entry "{declared}" is not inside the trial (use ~/..., $CAP_HOME/..., '
                             "$TMPDIR/... or a path in the package)")
        found = (dirs.work, text)
    base, rest = found
    parts = PurePosixPath(rest).parts if rest else ()
    if ".." in parts:
        raise ValueError(f'writes entry "{declared}" climbs out with ".."')
    if base is None:
        return None
    return base.joinpath(*[p for p in parts if p != "."])


def _covered(path: Path, allowed: list[Path], is_dir: bool) -> bool:
    """Inside a declared path, or a directory on the way to one."""
    return any(path == a or a in path.parents or (is_dir and path in a.parents) for a in allowed)


def snapshot(dirs: TrialDirs) -> dict[str, tuple[Any, ...]]:
    """Every entry of the watched dirs: type and mode; size and mtime for files; target for symlinks.

    Directory mtimes are left out (creating a declared file changes its parent's), and symlinked
    dirs (node_modules) are not followed."""
    out: dict[str, tuple[Any, ...]] = {}
    for top in dirs.labelled().values():
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    kind = stat.S_IFMT(st.st_mode)
                    facts: tuple[Any, ...] = (kind, stat.S_IMODE(st.st_mode))
                    if stat.S_ISREG(kind):
                        facts += (st.st_size, st.st_mtime_ns)
                    elif stat.S_ISLNK(kind):
                        facts += (os.readlink(path),)
                    out[str(path)] = facts
    return out


def undeclared_writes(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]], dirs: TrialDirs,
                      allowed: list[Path]) -> list[str]:
    """Paths created, changed or removed outside the declared ones, named as the trial sees them."""
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    names = []
    for p in changed:
        path = Path(p)
        is_dir = all(f is None or stat.S_ISDIR(f[0]) for f in (before.get(p), after.get(p)))
        if _covered(path, allowed, is_dir):
            continue
        for label, top in dirs.labelled().items():
            if top in path.parents:
                names.append(f"{label}/{path.relative_to(top).as_posix()}")
                break
    return sorted(names)


# ---------------------------------------------------------------- the sandbox engine


def engine_path() -> str | None:
    """The bundled engine: next to this interpreter (the same install), else on PATH."""
    sibling = Path(sys.executable).parent / SANDBOX_ENGINE
    return str(sibling) if sibling.is_file() else shutil.which(SANDBOX_ENGINE)


@functools.lru_cache(maxsize=1)
def sandbox_engine() -> str | None:
    """The engine's path when it can sandbox on this host (asked once per process), else None."""
    engine = engine_path()
    if engine is None:
        return None
    try:
        proc = subprocess.run([engine, "internal", "--input", "-", "features"], input=json.dumps(
            {"spec_version": ENGINE_SPEC}), capture_output=True, text=True, timeout=30)
        caps = json.loads(proc.stdout).get("capabilities", {})
    except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
        return None
    return engine if proc.returncode == 0 and caps.get("sandbox") and caps.get("filesystem_isolation") else None


def engine_request(argv: list[str], dirs: TrialDirs, env: dict[str, str], network: bool,
                   extra_read_only: list[Path]) -> dict[str, Any]:
    """An exec request: the host read-only with its real HOME hidden; the trial's own tree writable."""
    host_home = Path(os.path.expanduser("~"))
    hide = [str(host_home)] if host_home.is_absolute() and host_home.is_dir() and host_home != Path("/") else []
    read_only = [*extra_read_only, *tool_dirs_in(host_home, env.get("PATH", ""))]
    return {
        "spec_version": ENGINE_SPEC,
        "workload": {"argv": argv, "cwd": str(dirs.work)},
        "env": env,
        "policy": {"network": "host" if network else "none",
                   "read_only": [str(p) for p in dict.fromkeys(read_only)],
                   "read_write": [str(p) for p in (dirs.home, dirs.cap_home, dirs.tmp, dirs.work)],
                   "hide": hide},
        "interactive": False,
    }


def tool_dirs_in(home: Path, path_var: str) -> list[Path]:
    """Top-level dirs of HOME that hold PATH entries (``~/.nvm``, ``~/.pyenv``, ``~/.local``): kept
    visible, read-only, when the rest of the real HOME (``~/.ssh``, ``~/.aws``, ...) is hidden."""
    out = []
    for entry in path_var.split(os.pathsep):
        p = Path(entry)
        if p.is_absolute() and home in p.parents:
            top = home / p.relative_to(home).parts[0]
            if top.is_dir():
                out.append(top)
    return out


def _exec_error(stderr_tail: str) -> str | None:
    """bubblewrap's own report that it could not exec the program (``bwrap: execvp X: Exec format error``)."""
    for line in stderr_tail.splitlines():
        if line.startswith("bwrap: execvp "):
            return line.rpartition(": ")[2]
    return None


def _engine_error(stderr_tail: str) -> str | None:
    for line in reversed(stderr_tail.strip().splitlines()):
        with contextlib.suppress(ValueError, AttributeError):
            doc = json.loads(line)
            if doc.get("ok") is False:
                return str(doc["error"]["message"])
    return None


# ---------------------------------------------------------------- running


def _copy_source(src: Path, dst: Path) -> list[Path]:
    """Copy the package so relative writes land in the copy, not the publisher's tree; returns the
    directories linked rather than copied."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*SKIPPED_DIRS, *LINKED_DIRS))
    linked = []
    for name in LINKED_DIRS:
        if (src / name).is_dir():
            os.symlink(src / name, dst / name)
            linked.append((src / name).resolve())
    return linked


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
    engine = sandbox_engine()
    mode = "bubblewrap" if engine else "none"
    with tempfile.TemporaryDirectory(prefix="cap-trial-") as tmp:
        dirs = TrialDirs(Path(tmp))
        for sub in (dirs.home, dirs.cap_home, dirs.tmp):
            sub.mkdir()
        try:
            linked = _copy_source(m.source_dir, dirs.work)
        except (OSError, shutil.Error) as exc:
            return TrialResult(trial.command, "failed", reason=f"could not copy the package source: {exc}",
                               sandbox=mode)
        try:
            allowed = [p for w in trial.writes if (p := resolve_write(w, dirs)) is not None]
        except ValueError as exc:
            return TrialResult(trial.command, "failed", reason=str(exc), sandbox=mode)
        env = trial_env(dirs.root)
        program = bin_file(m, words[0], dirs.work)
        if not os.access(program, os.X_OK):
            return TrialResult(trial.command, "failed", sandbox=mode,
                               reason=f"could not start {words[0]}: Permission denied "
                                      "(is the bin executable with a #! line?)")
        argv = [str(program), *words[1:]]
        if engine:
            request = engine_request(argv, dirs, env, bool(trial.network), linked)
            request_file = dirs.root / ".nacelle-request-trial.json"  # the engine deletes it once read
            request_file.write_text(json.dumps(request))
            argv = [engine, "internal", "--input", str(request_file), "exec"]
        before = snapshot(dirs)
        out, err = dirs.root / "stdout", dirs.root / "stderr"
        started = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            try:
                proc = subprocess.Popen(argv, cwd=dirs.work, env=env, stdin=subprocess.DEVNULL,
                                        stdout=fo, stderr=fe, start_new_session=True)
            except OSError as exc:
                return TrialResult(trial.command, "failed", sandbox=mode,
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
        stdout, stderr = _tail(out), _tail(err)
        if engine and code == ENGINE_FAILURE and (why := _engine_error(stderr)):
            reason = f"the sandbox could not start it: {why}"
        elif engine and code and (why := _exec_error(stderr)):
            reason = f"could not start {words[0]}: {why} (is the bin executable with a #! line?)"
        elif reason and "Read-only file system" in stderr:
            reason += " (it tried to write to the host, which the sandbox keeps read-only)"
        stray = undeclared_writes(before, snapshot(dirs), dirs, allowed)
        if stray:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            reason = f"wrote outside its declared writes: {shown}" + (f"; {reason}" if reason else "")
        return TrialResult(trial.command, "passed" if reason is None else "failed", code, elapsed,
                           stdout, stderr, reason, mode, stray)


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
