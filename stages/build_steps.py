"""Build steps: the commands a manifest asks ``ato build`` to run before the source set is packed.

0.3's ``build = "npm ci && npm run build"`` (and ``[build.lifecycle]`` prepare/build,
a target's ``build``) and v1's ``[[build.steps]]`` run in the project, in a clean
environment (the few variables a toolchain needs plus the target's ``[env]``), so
that what they produce (``dist/``...) is packed. They are host commands: the build
asks for consent first, under the same rules as a run's ``[tasks]`` (a recorded
approval, ``--yes``, or a prompt on a terminal; refused otherwise). Output is
captured and shown only when a step fails (error E102 with its last lines).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.errors import E_LOCKFILE, E_MANIFEST, AtoError
from pipeline.manifest import Manifest
from pipeline.manifest import relpath as relpaths
from pipeline.manifest.model import BuildStep

# What a clean build environment keeps from ours (plus the target's own [env]).
CLEAN_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM",
                  "SOURCE_DATE_EPOCH")
OUTPUT_TAIL = 2000
STEP_TIMEOUT = 3600  # seconds one build command may take


def clean_env(manifest: Manifest) -> dict[str, str]:
    env = {k: os.environ[k] for k in CLEAN_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update({str(k): str(v) for k, v in manifest.primary_target().env.items()})
    return env


def shown(step: BuildStep) -> str:
    """A step as a person reads it (and as consent records it)."""
    return step.command if isinstance(step.command, str) else " ".join(step.command)


def argv(step: BuildStep) -> list[str]:
    """A string is a command line for ``/bin/sh -c``; an array is argv, run without a shell."""
    return ["/bin/sh", "-c", step.command] if isinstance(step.command, str) else list(step.command)


def run_steps(manifest: Manifest) -> list[dict[str, Any]]:
    """Run every build step in order; the first failure stops the build."""
    ran = []
    for step in manifest.build_steps:
        workdir = working_dir(manifest, step.working_dir, step.key)
        run_command(argv(step), workdir, clean_env(manifest), what=f"build step ({step.key})", shown_as=shown(step),
                    lines=3)
        ran.append({"command": shown(step), "key": step.key, "working_dir": str(workdir)})
    return ran


def working_dir(manifest: Manifest, rel: str | None, key: str) -> Path:
    """``rel`` inside the project (the project itself when None); it must exist."""
    project = manifest.project_dir.resolve()
    if not rel:
        return project
    reason = relpaths.escape_reason(rel)
    if reason:
        raise AtoError(E_MANIFEST, f"{manifest.path.name}: {key}: working_dir {rel!r} {reason}")
    path = project / relpaths.normalize(rel)
    if not path.is_dir():
        raise AtoError(E_MANIFEST, f"{manifest.path.name}: {key}: working_dir is not a directory: {path}")
    return path


def run_command(command: list[str], workdir: Path, env: dict[str, str], *, what: str, shown_as: str,
                lines: int = 1) -> None:
    """Run one build command; its output is captured and shown (its last ``lines`` lines in the message,
    the tail in the details) only when it fails."""
    try:
        proc = subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=STEP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AtoError(E_LOCKFILE, f"the {what} '{shown_as}' took more than {STEP_TIMEOUT} s and was stopped",
                       details={"command": command, "working_dir": str(workdir), "timeout": STEP_TIMEOUT}) from None
    except OSError as exc:
        raise AtoError(E_LOCKFILE, f"cannot run the {what} '{shown_as}' in {workdir}: {exc.strerror or exc}",
                       details={"command": command, "working_dir": str(workdir)}) from None
    if proc.returncode != 0:
        output = proc.stdout.decode("utf-8", "replace")
        last = " | ".join([ln.strip() for ln in output.splitlines() if ln.strip()][-lines:])
        status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        raise AtoError(E_LOCKFILE, f"{what} failed with {status}: {shown_as}" + (f": {last}" if last else ""),
                       details={"command": command, "working_dir": str(workdir),
                                "output_tail": output[-OUTPUT_TAIL:]})
