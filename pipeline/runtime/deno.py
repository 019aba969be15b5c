"""Tier 1 under Deno: the binary, the permissions a manifest grants, and Node commands in Deno's terms.

``web/node``, ``source/node``, ``web/deno`` and ``source/deno`` run through
``deno run`` (Node programs in Deno's Node-compatibility mode, with the project's
``package.json``/``node_modules``). Nothing is granted that the manifest does not
declare:

* ``--allow-net``: the ports the run listens on (the target's port, every probe
  port) and ``[network] egress_allow``;
* ``--allow-read``: the capsule directory, Deno's cache, the writable dirs below;
* ``--allow-write``: ``[state.<name>]`` dirs, ``[isolation] writable`` dirs and a
  per-run temp dir (``TMPDIR``);
* ``--allow-env``: exactly the variables the unit is given (declared ones and the
  ones ato injects);
* never ``--allow-run``, ``--allow-ffi``, ``--allow-sys`` or ``-A``.

A program that needs more dies with Deno's permission error; the runner turns it
into one ``ATO_ERR_PERMISSION_DENIED`` line naming the permission (see
:func:`denial_in`). Commands are translated, never handed to a shell: ``node
<file>``, ``deno run|serve <file>``, ``npm start|test|run <script>`` (the
package.json script must itself be such a command) and ``npm ci|install`` (``deno
install``: npm lifecycle scripts never run). Anything else is refused before the
first process starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import AtoError, Problem

POLICY = "ATO_ERR_POLICY_VIOLATION"
NOT_RESOLVED = "ATO_ERR_RUNTIME_NOT_RESOLVED"
DENIED = "ATO_ERR_PERMISSION_DENIED"
FLAGS = "@@ato:deno-permissions@@"  # replaced by the unit's permission flags once every port is known
PASS_THROUGH = ("LANG", "LC_ALL", "TZ")
DENO_ENV = ("DENO_DIR", "DENO_NO_UPDATE_CHECK", "DENO_NO_PROMPT", "NO_COLOR")
NPM_RUN = ("start", "test", "stop", "restart")
NPM_INSTALL = ("ci", "install", "i")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_DENIAL = re.compile(r"Requires (\w+) access to (\"[^\"]*\"|[^,\s]+)(?:, run again with the --allow-(\w+) flag)?")
HINTS = {
    "net": "declare the host (and port) in [network] egress_allow",
    "read": "a Tier 1 program may read only its capsule directory and its state directories",
    "write": "declare a state directory ([state.<name>] or [isolation] writable); TMPDIR is writable",
    "env": "declare the variable (target env, required_env or [isolation] allow_env)",
    "run": "Tier 1 programs may not start processes; run the target under the sandbox engine (driver = \"native\")",
    "ffi": "Tier 1 programs may not load native libraries; run the target under the sandbox engine",
    "sys": "Tier 1 programs may not query system information",
    "import": "remote imports must be in the project's deno.lock",
}


def _policy(message: str, **details: Any) -> AtoError:
    return AtoError(POLICY, message, details=details, problems=[Problem(POLICY, message, dict(details))])


def binary() -> str:
    """The deno binary of the ``deno`` package this ato was installed with (never a PATH lookup)."""
    try:
        from deno import find_deno_bin

        path = find_deno_bin()
    except (ImportError, FileNotFoundError):
        message = "deno runtime is not resolved: the `deno` Python package (Tier 1 engine) is not installed"
        raise AtoError(NOT_RESOLVED, message, details={"runtime": "deno"},
                       problems=[Problem(NOT_RESOLVED, message, {"runtime": "deno"})],
                       hint="reinstall ato (`pip install ato`); it depends on `deno`") from None
    return path


def cache_dir() -> Path:
    return paths.ato_home() / "runtimes" / "deno"


# ------------------------------------------------------------------ permissions


@dataclass
class Grants:
    """What the manifest lets the run's Deno programs touch (shared by every unit of the run)."""

    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    net: list[str] = field(default_factory=list)
    everything: bool = False  # --dangerously-skip-permissions (with CAPSULE_ALLOW_UNSAFE=1) only

    def flags(self, env_names: list[str]) -> list[str]:
        if self.everything:
            return ["--no-prompt", "--allow-all"]
        out = ["--no-prompt"]
        for name, values in (("read", self.read), ("write", self.write), ("net", self.net)):
            if values:
                out.append(f"--allow-{name}=" + ",".join(sorted(set(values))))
        names = sorted(set(env_names) - set(DENO_ENV))
        if names:
            out.append("--allow-env=" + ",".join(names))
        return out


def listen_hosts(ports: list[int]) -> list[str]:
    return [f"{host}:{port}" for port in ports for host in ("127.0.0.1", "localhost", "0.0.0.0")]


def materialize(argv: list[str], env: dict[str, str], grants: Grants) -> list[str]:
    """Put the unit's permission flags where the translation left :data:`FLAGS`."""
    if FLAGS not in argv:
        return argv
    i = argv.index(FLAGS)
    serve = ["--host=127.0.0.1", f"--port={env['PORT']}"] if argv[1:2] == ["serve"] and env.get("PORT") else []
    return [*argv[:i], *grants.flags(list(env)), *serve, *argv[i + 1:]]


def unit_env(declared: dict[str, str], scratch: str) -> dict[str, str]:
    """The complete environment of a Deno unit: what the manifest declares, what ato injects, Deno's own."""
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env.update(declared)
    env.update({"TMPDIR": scratch, "DENO_DIR": str(cache_dir()), "DENO_NO_UPDATE_CHECK": "1",
                "DENO_NO_PROMPT": "1", "NO_COLOR": "1"})
    return env


# ------------------------------------------------------------------ commands


def _script_path(base: Path, rel: str, where: str) -> str:
    path = (base / rel).resolve()
    if not path.is_file():
        raise AtoError("E101", f"{where}: the program '{rel}' was not found in the capsule",
                       details={"where": where, "program": rel})
    return str(path)


def _load_scripts(base: Path) -> dict[str, str]:
    try:
        doc = json.loads((base / "package.json").read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AtoError("E002", f"package.json is not valid JSON: {exc}", details={"file": "package.json"}) from None
    scripts = doc.get("scripts") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in scripts.items()} if isinstance(scripts, dict) else {}


def translate(argv: list[str], base: Path, where: str, *, deno: str, driver: str) -> list[str]:
    """``argv`` of a Tier 1 unit as a ``deno`` command line (with :data:`FLAGS` for its permissions)."""
    if not argv:
        raise AtoError("E101", f"{where}: nothing to run")
    head = argv[0].rsplit("/", 1)[-1]
    if head in ("node", "nodejs"):
        return _node(argv[1:], base, where, deno)
    if head == "deno":
        return _deno(argv[1:], base, where, deno)
    if head == "npm":
        return _npm(argv[1:], base, where, deno, driver)
    if argv[0].endswith((".js", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".jsx")):
        return _run(deno, argv[0], argv[1:], base, where)
    shown = " ".join(argv[2:] if argv[:2] == ["/bin/sh", "-c"] else argv)
    raise _policy(f"{where}: `{shown}` is not a node or deno program; Tier 1 runs only those, under Deno's "
                  "permissions (run other programs under the sandbox engine: driver = \"native\")",
                  where=where, command=shown)


def _run(deno: str, script: str, args: list[str], base: Path, where: str, verb: str = "run") -> list[str]:
    extra = ["--unstable-detect-cjs", "--unstable-bare-node-builtins", "--unstable-node-globals",
             "--node-modules-dir=manual"]
    lock = base / "deno.lock"
    extra += [f"--lock={lock}", "--frozen"] if lock.is_file() else ["--no-lock"]
    return [deno, verb, FLAGS, *extra, _script_path(base, script, where), *args]


def _node(args: list[str], base: Path, where: str, deno: str) -> list[str]:
    if not args:
        raise AtoError("E101", f"{where}: `node` without a program to run (the REPL is not supported)")
    if args[0].startswith("-"):
        raise _policy(f"{where}: node option '{args[0]}' is not supported when Node programs run under Deno",
                      where=where, option=args[0])
    return _run(deno, args[0], args[1:], base, where)


def _deno(args: list[str], base: Path, where: str, deno: str) -> list[str]:
    verb = "run"
    if args and args[0] in ("run", "serve"):
        verb, args = args[0], args[1:]
    if not args or args[0].startswith("-"):
        raise _policy(f"{where}: `deno {verb}` takes no flags here (permissions come from the manifest): "
                      f"{' '.join(args[:1]) or 'no program'}", where=where)
    return _run(deno, args[0], args[1:], base, where, verb)


def _npm(args: list[str], base: Path, where: str, deno: str, driver: str) -> list[str]:
    if not args:
        raise AtoError("E101", f"{where}: `npm` without a command")
    verb, rest = args[0], args[1:]
    if verb in NPM_INSTALL:
        extra = [a for a in rest if a not in ("--ignore-scripts", "--no-audit", "--no-fund")]
        if extra:
            raise _policy(f"{where}: `npm {verb} {' '.join(extra)}` is not supported; dependencies come from "
                          "package.json", where=where)
        lock = base / "deno.lock"
        locked = [f"--lock={lock}", "--frozen"] if lock.is_file() else ["--no-lock"]  # never writes a lock
        return [deno, "install", "--node-modules-dir=auto", *locked]
    if verb in ("run", "run-script"):
        if not rest:
            raise AtoError("E101", f"{where}: `npm {verb}` without a script name")
        name, rest = rest[0], rest[1:]
    elif verb in NPM_RUN:
        name = verb
    else:
        raise _policy(f"{where}: `npm {verb}` is not supported in Tier 1 (supported: npm start|test|run <script>, "
                      "npm ci|install)", where=where, command=f"npm {verb}")
    if rest[:1] == ["--"]:
        rest = rest[1:]
    scripts = _load_scripts(base)
    if name not in scripts:
        raise AtoError("E101", f"{where}: package.json has no script '{name}'", details={"script": name})
    for hook in (f"pre{name}", f"post{name}"):
        if hook in scripts:
            raise _policy(f"{where}: package.json script '{hook}' would run around '{name}'; lifecycle hooks are "
                          "not run under Tier 1, so the capsule is refused rather than run without it",
                          where=where, script=hook)
    try:
        words = shlex.split(scripts[name])
    except ValueError:
        words = []
    assigns = []
    while words and _ASSIGN.match(words[0]):
        assigns.append(words.pop(0))
    if not words or words[0] not in ("node", "nodejs", "deno") or any(c in scripts[name] for c in "|&;<>$`"):
        raise _policy(f"{where}: package.json script '{name}' runs `{scripts[name]}`, which Tier 1 cannot run "
                      "under Deno's permissions (only `node <file>` or `deno run <file>`)",
                      where=where, script=name, command=scripts[name])
    if assigns:
        raise _policy(f"{where}: package.json script '{name}' sets variables inline ({', '.join(assigns)}); "
                      "declare them in the manifest env instead", where=where, script=name)
    return translate([*words, *rest], base, f"{where} (package.json script '{name}')", deno=deno, driver=driver)


# ------------------------------------------------------------------ denials


def denial_in(line: str) -> tuple[str, str] | None:
    """(permission, resource) when ``line`` carries Deno's permission error."""
    if "NotCapable" not in line and "PermissionDenied" not in line and "Requires " not in line:
        return None
    match = _DENIAL.search(line)
    if not match:
        return None
    return match.group(1), match.group(2).strip('"')


def uncaught_denial(line: str) -> bool:
    """The first line of Deno's report of an uncaught permission error (its stack trace follows)."""
    return line.startswith("error: Uncaught") and ("NotCapable" in line or "PermissionDenied" in line)


def denied_error(permission: str, resource: str, unit: str, kind: str, code: int) -> AtoError:
    message = (f"{kind} '{unit}' needs {permission} access to {resource}, which the manifest does not grant "
               f"(exit code {code})")
    details = {"permission": permission, "resource": resource, "unit": unit, "exit_code": code}
    return AtoError(DENIED, message, details=details, hint=HINTS.get(permission),
                    problems=[Problem(DENIED, message, {**details, "hint": HINTS.get(permission, "")})])
