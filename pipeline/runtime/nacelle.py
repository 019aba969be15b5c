"""ato-nacelle: our sandbox engine, implementing the nacelle engine contract with bubblewrap.

The contract (what ``ato`` relies on from any engine, ours or a downloaded one)::

    <engine> --version
    <engine> internal --input <file|-> features
        request  {"spec_version": "0.1.0"}
        stdout   {"ok": true, "spec_version": "0.1.0", "engine": {"name", "version"},
                  "capabilities": {"sandbox": ["bubblewrap"], "filesystem_isolation": bool,
                                   "network_isolation": bool}}
        An empty ``capabilities.sandbox`` means: this host cannot sandbox; ato fails closed.
    <engine> internal --input <file|-> exec
        request  {"spec_version": "0.1.0",
                  "workload": {"argv": [abs-or-bare program, args...], "cwd": "/abs/dir"},
                  "env": {"K": "V"},             # the complete environment of the workload
                  "policy": {"network": "none" | "host",
                             "read_only": ["/abs", ...],   # visible, not writable
                             "read_write": ["/abs", ...],  # the only host paths it may write
                             "hide": ["/abs", ...]},        # replaced by empty tmpfs
                  "interactive": bool}
        The engine checks the request and *replaces itself* with the sandboxed workload:
        stdio, process group and exit status are the workload's (a workload killed by
        signal N exits 128+N). When it cannot start the workload it prints one line
        ``{"ok": false, "error": {"code", "message"}}`` on stderr and exits 125.

Sandbox: the host root is mounted read-only, ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are
private tmpfs, ``/proc`` and ``/dev`` are fresh, pid/ipc/uts (and net unless
``network = "host"``) namespaces are new, and only ``read_write`` paths are writable.

This module imports only the standard library so the engine starts quickly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

SPEC_VERSION = "0.1.0"
ENGINE_NAME = "ato-nacelle"
ENGINE_VERSION = "0.1.0"
EXIT_ENGINE_FAILURE = 125
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def sandbox_works(bwrap: str) -> bool:
    """bubblewrap is installed *and* may create namespaces here (a real smoke run)."""
    try:
        proc = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
             "--unshare-net", "--", "/bin/sh", "-c", "exit 0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def features() -> dict:
    bwrap = bwrap_path()
    ok = bool(bwrap and sandbox_works(bwrap))
    return {"ok": True, "spec_version": SPEC_VERSION,
            "engine": {"name": ENGINE_NAME, "version": ENGINE_VERSION},
            "capabilities": {"sandbox": ["bubblewrap"] if ok else [], "filesystem_isolation": ok,
                             "network_isolation": ok}}


def _abs_paths(policy: dict, key: str) -> list[str]:
    values = policy.get(key) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError("invalid_request", f"policy.{key} must be a list of absolute paths")
    out = []
    for v in values:
        if not os.path.isabs(v) or ".." in v.split("/"):
            raise RequestError("invalid_request", f"policy.{key}: {v!r} is not a normalized absolute path")
        out.append(os.path.normpath(v))
    return out


def build_argv(request: dict, bwrap: str) -> list[str]:
    """The bubblewrap command line for an exec request (raises RequestError when it is malformed)."""
    if request.get("spec_version") != SPEC_VERSION:
        raise RequestError("unsupported_spec", f"spec_version {request.get('spec_version')!r} is not "
                                               f"{SPEC_VERSION}")
    workload = request.get("workload") or {}
    argv = workload.get("argv")
    cwd = workload.get("cwd")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError("invalid_request", "workload.argv must be a non-empty list of strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise RequestError("invalid_request", "workload.cwd must be an absolute path")
    env = request.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise RequestError("invalid_request", "env must map names to strings")
    policy = request.get("policy") or {}
    network = policy.get("network", "none")
    if network not in ("none", "host"):
        raise RequestError("invalid_request", f"policy.network must be none|host, got {network!r}")
    read_only = _abs_paths(policy, "read_only")
    read_write = _abs_paths(policy, "read_write")
    hide = _abs_paths(policy, "hide")
    for path in read_only + read_write:
        if not os.path.exists(path):
            raise RequestError("invalid_request", f"{path} does not exist")

    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in PRIVATE_TMPFS:
        args += ["--tmpfs", path]
    for path in hide:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
    # Later mounts stack on earlier ones: re-expose allowed paths that a tmpfs above covered.
    for path in read_only:
        args += ["--ro-bind", path, path]
    for path in read_write:
        args += ["--bind", path, path]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if network == "none":
        args += ["--unshare-net"]
    if request.get("interactive") and _tiocsti_possible():
        # A new session keeps a sandboxed program from pushing input into our terminal;
        # it then leaves our process group, so it must die with us.
        args += ["--new-session", "--die-with-parent"]
    args += ["--chdir", cwd, "--clearenv"]
    for key in sorted(env):
        args += ["--setenv", key, env[key]]
    program = argv[0]
    if "/" not in program:
        resolved = shutil.which(program, path=env.get("PATH"))
        if not resolved:
            raise RequestError("program_not_found", f"{program} was not found on the workload PATH")
        program = resolved
    return args + ["--", program, *argv[1:]]


def _tiocsti_possible() -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        with open("/proc/sys/dev/tty/legacy_tiocsti") as fh:
            return fh.read().strip() != "0"
    except OSError:
        return True


def _read_request(source: str) -> dict:
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
            if os.path.basename(source).startswith(".nacelle-request-"):
                os.unlink(source)  # single use: ato wrote it for this exec only
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise RequestError("invalid_request", f"cannot read the request: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("invalid_request", "the request must be a JSON object")
    return doc


def _fail(code: str, message: str) -> int:
    sys.stderr.write(json.dumps({"ok": False, "error": {"code": code, "message": message}}) + "\n")
    return EXIT_ENGINE_FAILURE


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-V"]):
        print(f"{ENGINE_NAME} {ENGINE_VERSION} (spec {SPEC_VERSION})")
        return 0
    if len(args) != 4 or args[0] != "internal" or args[1] != "--input" or args[3] not in ("features", "exec"):
        sys.stderr.write("usage: ato-nacelle internal --input <file|-> features|exec\n")
        return 2
    try:
        request = _read_request(args[2])
        if args[3] == "features":
            sys.stdout.write(json.dumps(features()) + "\n")
            return 0
        bwrap = bwrap_path()
        if not bwrap:
            return _fail("sandbox_unavailable", "bubblewrap (bwrap) is not installed")
        command = build_argv(request, bwrap)
    except RequestError as exc:
        return _fail(exc.code, exc.message)
    sys.stdout.flush()
    try:
        os.execv(command[0], command)
    except OSError as exc:
        return _fail("exec_failed", f"cannot start bubblewrap: {exc}")
    return EXIT_ENGINE_FAILURE  # not reached


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
