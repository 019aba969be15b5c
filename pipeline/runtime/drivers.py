"""Drivers: turn a routed manifest into the concrete units (argv, env, cwd) the runner starts.

* web/static   — our static file server on 127.0.0.1:<port>
* node, deno   — Tier 1, host processes (deno with its permission flags)
* python       — Tier 2, a uv-provisioned environment, run through the engine
* native       — Tier 2, the entrypoint run through the engine
* wasm         — WASI through wasmtime (stdio only; the project dir read-only)
* oci          — a working podman or docker, never a silent fallback

Tier 2 units are wrapped last: the unit's argv/env become an engine request and
the unit itself runs ``<engine> internal --input <request> exec``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import AtoError, Problem
from pipeline.manifest import Manifest
from pipeline.runtime import deno, probes
from pipeline.runtime.lifecycle import Unit
from pipeline.runtime.resolve import Overrides
from pipeline.runtime.router import Route

RUNTIME_NOT_RESOLVED = "ATO_ERR_RUNTIME_NOT_RESOLVED"
ENGINE_MISSING = "ATO_ERR_ENGINE_MISSING"
POLICY = "ATO_ERR_POLICY_VIOLATION"
SHELL_CHARS = re.compile(r"[|&;<>$`*?(){}\\\n]")
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_THROUGH = ("LANG", "LC_ALL", "TERM", "TZ")
TOOLS = {"node": "node", "nodejs": "node", "python": "python", "python3": "python", "uv": "uv"}


def _err(code: str, message: str, **details: Any) -> AtoError:
    return AtoError(code, message, details=details, problems=[Problem(code, message, dict(details))])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_command(cmd: str | tuple[str, ...] | list[str] | None) -> list[str]:
    """A command as argv: lists are taken as is; strings with shell syntax run under ``/bin/sh -c``."""
    if cmd is None:
        return []
    if isinstance(cmd, list | tuple):
        return [str(c) for c in cmd]
    text = cmd.strip()
    if SHELL_CHARS.search(text.replace("\\ ", "")):
        return ["/bin/sh", "-c", text]
    try:
        return shlex.split(text)
    except ValueError:
        return ["/bin/sh", "-c", text]


def which(name: str, env: dict[str, str] | None = None) -> str | None:
    if name == "uv":
        local = Path(sys.executable).parent / "uv"
        if local.is_file():
            return str(local)
    return shutil.which(name, path=(env or os.environ).get("PATH"))


def tool_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+(?:\.\d+)*)", out)
    return match.group(1) if match else None


def check_version(tool: str, binary: str, wanted: str, where: str) -> None:
    """Fail closed when the host tool's major version differs from the pinned one."""
    have = tool_version(binary)
    want_major = wanted.lstrip("v^~=").split(".")[0]
    if have is None or have.split(".")[0] != want_major:
        raise _err(RUNTIME_NOT_RESOLVED, f"{tool} {wanted} is pinned by {where}, but the host has "
                                         f"{tool} {have or 'of unknown version'} ({binary})",
                   runtime=tool, wanted=wanted, found=have)


@dataclass
class Options:
    args: list[str] = field(default_factory=list)
    dangerous: bool = False
    engine_flag: str | None = None
    background: bool = False
    # What ato injects (seed 003: the broker decides, the sandbox only lets it through): variables every
    # unit gets (CAPSULE_IPC_*, rendered dependency exports) and host directories every unit may read and
    # write (IPC socket dirs, a dependency's state and credential files): bound into the sandbox, granted
    # to Deno, mounted into a container at the same path
    inject_env: dict[str, str] = field(default_factory=dict)
    inject_paths: list[str] = field(default_factory=list)
    # [dependencies.<alias>] this run starts first: the consumer reaches them on 127.0.0.1 (host:port each)
    dependencies: dict[str, str] = field(default_factory=dict)


@dataclass
class Launch:
    """Everything the runner needs, decided before anything starts."""

    units: list[Unit]
    prefix: bool
    entry: str
    runtime_label: str
    port: int | None
    url: str | None
    network: str  # none | host (what the sandbox allows; host processes always have the network)
    permissions: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    engine_path: str | None = None
    request_dir: str | None = None
    listen_ports: list[int] = field(default_factory=list)  # checked free before anything starts
    make_dirs: list[str] = field(default_factory=list)  # created by the supervisor before the first unit
    scratch_dirs: list[str] = field(default_factory=list)  # created 0700 for the run, removed after it
    inject_paths: list[str] = field(default_factory=list)  # injected dirs the units may reach (see Options)
    dependencies: list[dict[str, Any]] = field(default_factory=list)  # providers in this run (for ato ps)
    hold_locks: list[str] = field(default_factory=list)  # lock files the supervisor holds for the whole run


class Planner:
    def __init__(self, manifest: Manifest, route: Route, overrides: Overrides, opts: Options) -> None:
        self.m = manifest
        self.route = route
        self.target = route.target
        self.ov = overrides
        self.opts = opts
        self.project = manifest.project_dir.resolve()
        self.notes: list[str] = []
        self.sandboxed = route.tier == 2 and not opts.dangerous
        self.python_bin: Path | None = None
        self.probe_ports: list[int] = []  # every port a readiness probe checks
        self.deno_tier = route.tier == 1 and route.driver in ("node", "deno")
        self.deno_bin = deno.binary() if self.deno_tier else ""
        self.scratch = str(paths.run_dir() / "tmp" / f"run-{secrets.token_hex(6)}") if self.deno_tier else ""

    # -------------------------------------------------------------- shared pieces

    def target_env(self) -> dict[str, str]:
        return {**self.target.env, **self.ov.env}

    def port(self) -> int | None:
        return self.ov.port or self.target.port

    def runtime_dir(self) -> Path:
        if self.target.working_dir:  # checked to stay inside the project when the manifest was read
            return self.project / self.target.working_dir
        source = self.project / "source"
        return source if source.is_dir() and not (self.project / (self.target.entrypoint or "-")).exists() \
            else self.project

    def listens(self) -> bool:
        has_probe = bool(self.target.readiness_probe) or any(s.readiness_probe for s in self.m.services.values())
        return self.port() is not None or self.route.runtime == "web" or has_probe

    def egress(self) -> list[str]:
        return sorted({str(h).strip() for h in self.m.network.get("egress_allow") or [] if str(h).strip()})

    def network_mode(self) -> str:
        egress = [h for h in self.m.network.get("egress_allow") or [] if str(h).strip()]
        return "host" if egress or self.listens() or self.opts.dependencies else "none"

    def host_env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **self.target_env(), **extra}

    def sandbox_env(self, extra: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {"PATH": SANDBOX_PATH, "HOME": "/tmp", "TMPDIR": "/tmp"}
        for key in PASS_THROUGH:
            if os.environ.get(key):
                env[key] = os.environ[key]
        allow = list(self.m.isolation.get("allow_env") or []) + list(self.target.required_env) + \
            list(self.target.optional_env)
        for key in allow:
            if key in os.environ:
                env[key] = os.environ[key]
        if self.python_bin is not None:
            venv_bin = self.python_bin.parent
            env["PATH"] = f"{venv_bin}:{env['PATH']}"
            if (venv_bin.parent / "pyvenv.cfg").is_file():
                env["VIRTUAL_ENV"] = str(venv_bin.parent)
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            env["UV_CACHE_DIR"] = "/tmp/uv-cache"
        return {**env, **self.target_env(), **extra}

    def map_argv(self, argv: list[str], env: dict[str, str]) -> list[str]:
        """Resolve the program: project-relative paths become absolute; tool names are found now."""
        if not argv:
            return argv
        head = argv[0]
        if "/" in head and not head.startswith("/"):
            path = self.runtime_dir() / head
            if path.is_file() and not os.access(path, os.X_OK) and path.suffix == ".sh":
                return ["/bin/sh", str(path), *argv[1:]]
            return [str(path), *argv[1:]]
        local = self.runtime_dir() / head
        if "/" not in head and local.is_file() and head not in ("node", "deno", "python", "python3", "uv"):
            if not os.access(local, os.X_OK) and local.suffix == ".sh":
                return ["/bin/sh", str(local), *argv[1:]]
            return [str(local), *argv[1:]]
        if "/" not in head and self.sandboxed:
            return argv  # the engine resolves bare names on the workload PATH inside the sandbox
        if head in ("python", "python3") and self.route.driver == "python":
            if self.python_bin is None:
                return argv  # resolved once the uv environment is provisioned (after consent)
            return [str(self.python_bin), *argv[1:]]
        if "/" not in head:
            found = which(head, env)
            if found is None:
                raise _err(RUNTIME_NOT_RESOLVED, f"{head} runtime is not resolved: not found on PATH",
                           runtime=head)
            return [found, *argv[1:]]
        return argv

    # -------------------------------------------------------------- the target's own command

    def target_argv(self) -> list[str]:
        t = self.target
        ep = (t.entrypoint or "").strip()
        words = split_command(ep) if ep else []
        words += list(t.cmd)
        words += self.opts.args
        if not words:
            raise AtoError("E101", f"target '{t.label}' has nothing to run (no entrypoint or cmd)")
        driver = self.route.driver
        head = words[0].rsplit("/", 1)[-1]
        if self.deno_tier:
            return self._translate(words, f"targets.{t.label}")
        if driver == "python" and head not in ("python", "python3", "uv", "/bin/sh"):
            return ["python", str(self.runtime_dir() / words[0]), *words[1:]]
        return words

    def _translate(self, argv: list[str], where: str) -> list[str]:
        """A Tier 1 command as a ``deno`` command line (refused here when it is anything else)."""
        return deno.translate(argv, self.runtime_dir(), where, deno=self.deno_bin, driver=self.route.driver)

    # -------------------------------------------------------------- units

    def build(self) -> Launch:
        self.probe_ports = []
        runtime = self.route.runtime
        if runtime == "oci":
            return self.oci()
        if runtime == "wasm":
            return self.wasm()
        if self.route.driver == "static":
            return self.static()
        if self.m.services or self.m.tasks:
            return self.services_mode()
        return self.single()

    def _entry_env(self, port: int | None) -> dict[str, str]:
        return {"PORT": str(port)} if port is not None else {}

    def single(self) -> Launch:
        port = self.port()
        probe = self.target.readiness_probe
        extra = self._entry_env(port)
        probe_port = self._probe_port(probe, {**self.target_env(), **extra}, extra, port, "main")
        if port is None and probe_port is not None:
            port = probe_port
        argv = self.target_argv()
        if self.route.driver == "native" and self.target.digest and self.target.entrypoint:
            program = self.runtime_dir() / self.target.entrypoint.split()[0]
            if not program.is_file():
                raise AtoError("E101", f"{self.target.entrypoint} (targets.{self.target.label}) was not found in the "
                                       "capsule", details={"entrypoint": self.target.entrypoint})
            _check_digest(program, self.target.digest)  # a tool's per-platform program is pinned by sha256
        env = self._env(extra)
        url = f"http://127.0.0.1:{port}/" if port and self.route.runtime == "web" else None
        unit = Unit("main", "service", self.map_argv(argv, env), env, str(self.runtime_dir()),
                    probe=probe, entry=True, url=url)
        return self._finish([unit], prefix=False, entry="main", port=port, url=url)

    def _probe_port(self, probe: dict[str, Any] | None, env: dict[str, str], extra: dict[str, str],
                    fallback: int | None, unit: str) -> int | None:
        """The port a readiness probe checks, made true before anything starts.

        ``port = "NAME"`` names an env var of the unit. When the unit's env does not set it,
        ato injects it (into ``extra``): the target's port for the entry unit, else a free port.
        A probe that cannot be resolved is refused here, not after earlier units started.
        """
        if not probe:
            return None
        ref = probe.get("port", "PORT")
        if isinstance(ref, str) and not (env.get(ref) or "").strip():
            value = fallback if fallback is not None else free_port()
            extra[ref] = str(value)
            env = {**env, ref: str(value)}
        resolved = probes.resolve_probe(probe, env, unit)
        self.probe_ports.append(resolved.port)
        return resolved.port

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        extra = {**extra, **self.opts.inject_env}  # ato's values win: a manifest cannot redirect an import
        if self.deno_tier:
            return self.deno_env(extra)
        return self.sandbox_env(extra) if self.sandboxed else self.host_env(extra)

    def deno_env(self, extra: dict[str, str]) -> dict[str, str]:
        """Only what the manifest declares (values of required/allowed host vars included) and what ato injects."""
        declared = {k: os.environ[k] for k in (*(self.m.isolation.get("allow_env") or []), *self.target.required_env,
                                               *self.target.optional_env) if k in os.environ}
        declared.update(self.state_env())
        return deno.unit_env({**declared, **self.target_env(), **extra}, self.scratch)

    def state_env(self) -> dict[str, str]:
        return state_env(self.m)

    def services_mode(self) -> Launch:
        m = self.m
        entry = m.lifecycle_run or ("main" if "main" in m.services else None)
        if entry is None and len(m.services) == 1:
            entry = next(iter(m.services))
        port = self.port()
        if port is None and entry in m.services:
            port = free_port()
        entry_port = port
        units: list[Unit] = []
        for name, task in m.tasks.items():
            argv = split_command(task.cmd)
            self._check_tool_pin(argv, f"tasks.{name}")
            if self.deno_tier:
                argv = self._translate(argv, f"tasks.{name}")
            env = self._env(dict(task.env))
            units.append(Unit(name, "task", self.map_argv(argv, env), env, str(self.runtime_dir()),
                              depends_on=list(task.depends_on), entry=name == entry))
        for name, svc in m.services.items():
            if svc.target:
                raise AtoError("E002", f"services.{name}.target: target-based (orchestration) services are not "
                                       "supported by this runner; give the service an entrypoint")
            argv = split_command(svc.entrypoint if svc.entrypoint else svc.cmd)
            self._check_tool_pin(argv, f"services.{name}")
            if name == entry:
                argv += self.opts.args
            if self.deno_tier:
                argv = self._translate(argv, f"services.{name}")
            extra = dict(svc.env)
            if name == entry and port is not None and "PORT" not in extra:
                extra["PORT"] = str(port)
            probe_port = self._probe_port(svc.readiness_probe, {**self.target_env(), **extra}, extra,
                                          port if name == entry else None, f"services.{name}")
            if name == entry and probe_port is not None:
                entry_port = probe_port  # the URL is the port the probe checked
            env = self._env(extra)
            url = f"http://127.0.0.1:{entry_port}/" if name == entry and entry_port is not None else None
            units.append(Unit(name, "service", self.map_argv(argv, env), env, str(self.runtime_dir()),
                              depends_on=list(svc.depends_on), probe=svc.readiness_probe, entry=name == entry,
                              url=url))
        if not m.services and m.tasks:
            # Only tasks: the target's own entrypoint is the service they prepare.
            if self.target.entrypoint or self.target.cmd:
                argv = self.target_argv()
                extra = self._entry_env(port)
                probe_port = self._probe_port(self.target.readiness_probe, {**self.target_env(), **extra}, extra,
                                              port, "main")
                entry_port = probe_port if probe_port is not None else port
                env = self._env(extra)
                units.append(Unit("main", "service", self.map_argv(argv, env), env, str(self.runtime_dir()),
                                  depends_on=sorted(m.tasks), probe=self.target.readiness_probe,
                                  entry=entry is None))
                entry = entry or "main"
        from pipeline.runtime.lifecycle import select_units
        units = select_units(units, entry if m.lifecycle_run else None)
        url = next((u.url for u in units if u.entry and u.url), None)
        return self._finish(units, prefix=True, entry=entry or units[-1].name, port=entry_port, url=url)

    def _check_tool_pin(self, argv: list[str], where: str) -> None:
        head = argv[0].rsplit("/", 1)[-1] if argv else ""
        tool = TOOLS.get(head)
        if tool is None or not where.startswith("services"):
            return
        pins = self.target.runtime_tools
        if tool not in pins:
            raise _err(POLICY, f"targets.{self.target.label}.runtime_tools.{tool} is required when {where} "
                               f"references '{head}'", tool=tool, where=where)
        if tool == "python" and self.sandboxed:
            return  # the provisioned environment decides; checked when it is created
        if tool == "node" and self.deno_tier:
            return  # Node programs run under Deno's Node compatibility, not a host node
        binary = which("python3" if tool == "python" else tool)
        if binary is None:
            raise _err(RUNTIME_NOT_RESOLVED, f"{tool} runtime is not resolved: not on PATH", runtime=tool)
        check_version(tool, binary, pins[tool], f"targets.{self.target.label}.runtime_tools.{tool}")

    def static(self) -> Launch:
        port = self.port()
        if port is None:
            raise AtoError("E003", f"targets.{self.target.label}.port is required for web/static")
        rel = (self.target.entrypoint or ".").strip()
        directory = (self.project / rel).resolve()
        try:
            directory.relative_to(self.project)
        except ValueError:
            raise _err(POLICY, f"web/static entrypoint '{rel}' resolves outside the manifest directory",
                       entrypoint=rel) from None
        if not directory.is_dir():
            raise AtoError("E101", f"web/static entrypoint '{rel}' must be an existing directory",
                           details={"entrypoint": rel})
        argv = [sys.executable, "-m", "pipeline.runtime.static_server", "--dir", str(directory), "--port",
                str(port), "--host", "127.0.0.1"]
        env = {**os.environ, "PORT": str(port)}
        url = f"http://127.0.0.1:{port}/"
        unit = Unit("main", "service", argv, env, str(self.project), probe={"tcp_connect": "127.0.0.1",
                                                                           "port": "PORT"}, entry=True, url=url)
        return self._finish([unit], prefix=False, entry="main", port=port, url=url, label="web-static")

    def wasm(self) -> Launch:
        module = self.wasm_module()
        env = {k: v for k, v in self.target_env().items()}
        argv = [sys.executable, "-m", "pipeline.runtime.wasm_host", "--module", str(module), "--dir",
                str(self.project), "--env-json", json.dumps(env), "--", *list(self.target.cmd), *self.opts.args]
        host_env = {**os.environ}
        unit = Unit("main", "service", argv, host_env, str(self.project), entry=True)
        return self._finish([unit], prefix=False, entry="main", port=None, url=None, label="wasm")

    def wasm_module(self) -> Path:
        t = self.target
        ep = (t.entrypoint or "").split(" ")[0]
        if ep:
            path = (self.project / ep).resolve()
            if not path.is_file():
                raise AtoError("E101", f"wasm module '{ep}' was not found", details={"entrypoint": ep})
            if t.digest:
                _check_digest(path, t.digest)
            return path
        if t.digest:
            for candidate in sorted(self.project.rglob("*.wasm")):
                try:
                    _check_digest(candidate, t.digest)
                    return candidate
                except AtoError:
                    continue
            raise AtoError("ATO_ERR_INTEGRITY_FAILURE", f"no .wasm module in the project matches {t.digest}")
        raise AtoError("E101", "wasm target has no module (entrypoint or digest)")

    def oci(self) -> Launch:
        """``podman run`` (or docker) in the foreground: port, env, required_env and read-only mounts mapped.

        The container is named for the run; stopping it is the engine's job (``rm -f``), run
        before the run's process tree is signalled, so no container outlives ``ato``.
        """
        engine = container_engine()
        image = self.target.image or (self.target.entrypoint or "").strip()
        if not image:
            raise AtoError("E003", "OCI runtime selected but no image specified")
        port = self.port()
        name = f"ato-{re.sub(r'[^a-zA-Z0-9_.-]', '-', self.m.name)}-{secrets.token_hex(4)}"
        argv = [engine, "run", "--rm", "--name", name, "--security-opt", "no-new-privileges"]
        if container_init_available():
            argv.append("--init")  # PID 1 that forwards SIGTERM and reaps, so stops are prompt
        if port:
            argv += ["-p", f"127.0.0.1:{port}:{port}", "-e", f"PORT={port}"]
        for key, value in sorted(self.target_env().items()):
            argv += ["-e", f"{key}={value}"]
        for key in self.target.required_env:
            if key not in self.target_env():
                argv += ["-e", key]  # the value is taken from our environment (checked set before start)
        for key, value in sorted(self.opts.inject_env.items()):
            argv += ["-e", f"{key}={value}"]
        for source, target in self.oci_mounts():
            argv += ["-v", f"{source}:{target}:ro"]
        for path in self.opts.inject_paths:  # at the same path, so the injected variables hold inside
            argv += ["-v", f"{path}:{path}"]
        argv += [image, *list(self.target.cmd), *self.opts.args]
        env = {**os.environ}
        probe = self.target.readiness_probe
        if port:
            env["PORT"] = str(port)
            probe = probe or {"tcp_connect": "127.0.0.1", "port": "PORT"}  # ready once the mapped port answers
        unit = Unit("main", "service", argv, env, str(self.project), probe=probe, entry=True,
                    url=f"http://127.0.0.1:{port}/" if port else None,
                    stop_argv=[engine, "rm", "--force", "--ignore", "--time", "{grace}", name]
                    if Path(engine).name == "podman" else [engine, "stop", "--time", "{grace}", name])
        if probe:
            self._probe_port(probe, env, env, port, "main")
        return self._finish([unit], prefix=False, entry="main", port=port, url=unit.url,
                            label=f"oci/{Path(engine).name}")

    def oci_mounts(self) -> list[tuple[str, str]]:
        """``mounts = [{ source = "<dir in the capsule>", target = "/abs/in/container" }]``, all read-only."""
        raw = self.m.target_table(self.target.label).get("mounts") or []
        where = f"targets.{self.target.label}.mounts"
        if not isinstance(raw, list):
            raise AtoError("E002", f"{where}: expected a list of {{ source, target }} tables")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("source"), str) or \
                    not isinstance(item.get("target"), str):
                raise AtoError("E002", f"{where}[{i}]: expected {{ source = \"dir\", target = \"/path\" }}")
            if item.get("read_only", True) is not True:
                raise _err(POLICY, f"{where}[{i}]: only read-only mounts are allowed (read_only = true)",
                           mount=item["source"])
            target = item["target"]
            if not target.startswith("/") or ".." in target.split("/") or ":" in target:
                raise AtoError("E002", f"{where}[{i}].target: expected an absolute container path, got {target!r}")
            source = (self.project / item["source"]).resolve()
            try:
                source.relative_to(self.project)
            except ValueError:
                raise _err(POLICY, f"{where}[{i}].source '{item['source']}' resolves outside the capsule",
                           mount=item["source"]) from None
            if not source.exists() or ":" in str(source):
                raise AtoError("E101", f"{where}[{i}].source '{item['source']}' does not exist in the capsule",
                               details={"mount": item["source"]})
            out.append((str(source), target))
        return out

    def _finish(self, units: list[Unit], *, prefix: bool, entry: str, port: int | None, url: str | None,
                label: str | None = None) -> Launch:
        network = self.network_mode() if self.sandboxed else "host"
        perms = self.permissions(network)
        listen = sorted({*self.probe_ports, *([port] if port is not None else [])})
        make_dirs: list[str] = []
        scratch_dirs: list[str] = []
        if self.deno_tier:
            writable = [str(p) for p in writable_paths(self.m)]
            injected = list(self.opts.inject_paths)
            grants = deno.Grants(read=[str(self.project), str(deno.cache_dir()), self.scratch, *writable, *injected],
                                 write=[self.scratch, *writable, *injected],
                                 net=[*deno.listen_hosts(listen), *self.egress(),
                                      *self.opts.dependencies.values()],
                                 everything=self.opts.dangerous)  # -U: the user bypassed every barrier
            for unit in units:
                unit.argv = deno.materialize(unit.argv, unit.env, grants)
                unit.watch_permissions = bool(unit.argv) and unit.argv[0] == self.deno_bin
            make_dirs = [str(deno.cache_dir()), *writable]
            scratch_dirs = [self.scratch]
            label = label or "deno"
        launch = Launch(units=units, prefix=prefix, entry=entry, port=port, url=url, network=network,
                        permissions=perms, notes=self.notes,
                        listen_ports=listen, make_dirs=make_dirs, scratch_dirs=scratch_dirs,
                        inject_paths=list(self.opts.inject_paths),
                        runtime_label=label or ("nacelle" if self.sandboxed else
                                                "host-dangerous" if self.route.tier == 2 else "host"))
        return launch

    def permissions(self, network: str) -> dict[str, Any]:
        from pipeline.manifest.requirements import is_secret

        perms: dict[str, Any] = {}
        if self.deno_tier:
            perms["host_execution"] = f"{self.route.pair} runs under Deno with the permissions below"
        elif self.route.tier == 2 and not self.sandboxed:
            perms["host_execution"] = f"{self.route.pair} runs on the host without a sandbox"
        if self.route.runtime == "oci":
            perms["host_execution"] = "container engine"
        egress = self.egress()
        if egress:
            perms["network"] = egress
        if self.sandboxed and network == "host" and not egress:
            perms["network"] = ["host network (the capsule reaches its dependencies)" if not self.listens()
                                 else "host network (the capsule listens on a port)"]
        if self.opts.dependencies:  # aliases only: their ports change from run to run, the consent must not
            perms["dependencies"] = sorted(self.opts.dependencies)
        port = self.port()
        if port is not None or self.route.runtime == "web":
            perms["listen"] = [f"127.0.0.1:{port}" if port else "an ephemeral port"]
        writable = writable_paths(self.m)
        if writable:
            perms["read_write"] = [str(p) for p in writable]
        secrets = [k for k in self.target.required_env if is_secret(k)]
        if secrets:
            perms["secrets"] = secrets
        if self.opts.dangerous:
            perms["dangerous"] = "all permission and sandbox barriers bypassed"
        return perms


def _check_digest(path: Path, digest: str) -> None:
    import hashlib

    import blake3

    algo, _, hexd = digest.partition(":")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest() if algo == "sha256" else blake3.blake3(data).hexdigest()
    if actual != hexd.lower():
        raise _err("ATO_ERR_INTEGRITY_FAILURE", f"{path.name} does not match {digest} (got {algo}:{actual})",
                   module=str(path))


def container_engine() -> str:
    """A podman or docker that actually answers ``info``; otherwise ATO_ERR_ENGINE_MISSING naming both."""
    tried = []
    for name in ("podman", "docker"):
        binary = shutil.which(name)
        if binary is None:
            tried.append(f"{name}: not found on PATH")
            continue
        try:
            proc = subprocess.run([binary, "info"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{name}: {exc}")
            continue
        if proc.returncode == 0:
            return binary
        last = (proc.stderr or proc.stdout).strip().splitlines()
        tried.append(f"{name}: `{name} info` failed ({last[-1][:160] if last else f'exit {proc.returncode}'})")
    message = "runtime=oci needs a working container engine (podman or docker), and none is usable: " + \
        "; ".join(tried)
    raise AtoError(ENGINE_MISSING, message, details={"engine": "podman|docker", "looked_for": ["podman", "docker"],
                                                     "tried": tried},
                   problems=[Problem(ENGINE_MISSING, message, {"engine": "podman|docker",
                                                               "looked_for": ["podman", "docker"]})],
                   hint="install podman or docker and make sure `podman info` / `docker info` works")


def container_init_available() -> bool:
    """podman's ``--init`` needs catatonit (Debian: package catatonit)."""
    return any(Path(p).is_file() for p in ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit",
                                           "/usr/local/libexec/podman/catatonit"))


def writable_paths(m: Manifest) -> list[Path]:
    """Host paths a sandboxed capsule may write: ``[isolation] writable`` dirs and ``[state.*]`` dirs."""
    out = []
    project = m.project_dir.resolve()
    for rel in m.isolation.get("writable") or []:
        path = (project / str(rel)).resolve()
        try:
            path.relative_to(project)
        except ValueError:
            raise _err(POLICY, f"isolation.writable '{rel}' resolves outside the project", path=str(rel)) from None
        out.append(path)
    for name in sorted(m.state):
        out.append(paths.capsule_state_dir() / m.name / name)
    return out


def state_env(m: Manifest) -> dict[str, str]:
    """``ATO_STATE_<NAME>``: where each ``[state.<name>]`` directory is, for the capsule's programs."""
    return {f"ATO_STATE_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}":
            str(paths.capsule_state_dir() / m.name / name) for name in m.state}


def sandbox_wrap(launch: Launch, m: Manifest, engine: Path, provisioned: list[Path]) -> None:
    """Rewrite every unit of ``launch`` into an engine exec request (files in a private 0700 dir)."""
    # not a cas.tempfiles name: the detached supervisor, not this process, reads and removes it
    request_dir = Path(tempfile.mkdtemp(prefix="requests-", dir=_ensure_private(paths.run_dir() / "requests")))
    launch.request_dir = str(request_dir)
    launch.engine_path = str(engine)
    project = m.project_dir.resolve()
    writable = writable_paths(m)
    for path in writable:
        path.mkdir(parents=True, exist_ok=True)
    states = state_env(m)
    home = paths.home()
    hide = [str(paths.ato_home())] + [str(home / d) for d in (".ssh", ".gnupg", ".aws", ".capsule", ".config/gcloud")]
    read_only = [str(project)] + [str(p) for p in provisioned]
    for unit in launch.units:
        request = {"spec_version": "0.1.0", "interactive": not launch.prefix and sys.stdin.isatty(),
                   "workload": {"argv": unit.argv, "cwd": unit.cwd},
                   "env": {**unit.env, **states},
                   "policy": {"network": launch.network, "read_only": read_only,
                              "read_write": [str(p) for p in writable] + list(launch.inject_paths), "hide": hide}}
        fd, req_path = tempfile.mkstemp(prefix=".nacelle-request-", suffix=".json", dir=request_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(request, fh)
        unit.argv = [str(engine), "internal", "--input", req_path, "exec"]
        unit.env = {"PATH": os.environ.get("PATH", SANDBOX_PATH), **{k: os.environ[k] for k in PASS_THROUGH
                                                                    if k in os.environ}}
        # the probe still reads the port from the workload env it was resolved against
        port_key = unit.probe.get("port") if unit.probe else None
        if isinstance(port_key, str) and port_key in request["env"]:
            unit.env[port_key] = request["env"][port_key]


def _ensure_private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def check_runtime_available(route: Route) -> None:
    """Host tools the route needs, checked before anything starts."""
    if route.runtime == "wasm":
        try:
            import wasmtime  # noqa: F401
        except ImportError:
            raise _err(RUNTIME_NOT_RESOLVED, "wasm runtime is not resolved: the wasmtime package is not "
                                             "installed", runtime="wasmtime") from None


def ensure_runtime_error(exc: Exception) -> AtoError:
    return AtoError("ATO_ERR_RUNTIME_LAUNCH_FAILED", str(exc))
