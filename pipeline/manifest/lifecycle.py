"""The lifecycle graph: ``[services]`` (resident) and ``[tasks]`` (terminating) with ``depends_on``.

Both kinds share one namespace and one DAG (seed 003), so a service may wait on a
task such as ``install``. Unknown dependencies and cycles are manifest errors,
found here rather than when the runtime is half-way through starting things.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING
from pipeline.manifest.keypath import describe, fail, key_path, quote
from pipeline.manifest.model import Service, Task

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SERVICE_KEYS = frozenset({"entrypoint", "command", "cmd", "target", "depends_on", "expose", "env",
                          "readiness_probe", "network", "state_bindings"})
TASK_KEYS = frozenset({"cmd", "depends_on", "env"})


def read_services(table: dict[str, Any], file: str, targets: set[str], warnings: list[str]) -> dict[str, Service]:
    """``[services.<name>]`` -> Service, checking each one's own rules (the graph is checked later)."""
    out: dict[str, Service] = {}
    for name in sorted(table):
        spec, parts = table[name], ["services", name]
        _check_name(name, parts, file)
        _warn_unknown(spec, SERVICE_KEYS, parts, file, warnings)
        entrypoint = (spec.get("entrypoint") or spec.get("command") or "").strip() or None
        cmd = spec.get("cmd")
        cmd = tuple(cmd) if isinstance(cmd, list) else (cmd.strip() or None if isinstance(cmd, str) else None)
        target = spec.get("target")
        if target is not None:
            if entrypoint or cmd:
                raise fail(file, parts + ["target"], "expected either target or entrypoint/cmd, not both")
            if target not in targets:
                raise fail(file, parts + ["target"], f"unknown target {quote(target)} "
                                                     f"(declared: {', '.join(sorted(targets)) or 'none'})")
        elif not entrypoint and not cmd:
            raise fail(file, parts + ["entrypoint"], "required key is missing (a service needs entrypoint, cmd "
                                                     "or target)", code=E_MANIFEST_MISSING)
        probe = spec.get("readiness_probe")
        if probe is not None:
            check_probe(probe, parts + ["readiness_probe"], file)
        out[name] = Service(name=name, entrypoint=entrypoint, cmd=cmd, depends_on=_deps(spec),
                            env=dict(spec.get("env") or {}), readiness_probe=probe, target=target)
    return out


def read_tasks(table: dict[str, Any], file: str, warnings: list[str]) -> dict[str, Task]:
    out: dict[str, Task] = {}
    for name in sorted(table):
        spec, parts = table[name], ["tasks", name]
        _check_name(name, parts, file)
        _warn_unknown(spec, TASK_KEYS, parts, file, warnings)
        cmd = spec["cmd"]
        if isinstance(cmd, str) and not cmd.strip() or isinstance(cmd, list) and not cmd:
            raise fail(file, parts + ["cmd"], "expected a non-empty command")
        out[name] = Task(name=name, cmd=tuple(cmd) if isinstance(cmd, list) else cmd.strip(),
                         depends_on=_deps(spec), env=dict(spec.get("env") or {}))
    return out


def check_probe(probe: dict[str, Any], parts: list[str | int], file: str) -> None:
    """A readiness probe is ``{http_get, port}`` or ``{tcp_connect, port}``; port names an env var."""
    if "http_get" not in probe and "tcp_connect" not in probe:
        raise fail(file, parts, "expected http_get or tcp_connect (with port)", code=E_MANIFEST_MISSING)
    port = probe["port"]
    if isinstance(port, int) and not isinstance(port, bool):
        if not 1 <= port <= 65535:
            raise fail(file, parts + ["port"], f"expected a port number between 1 and 65535, got {port}")
    elif not ENV_NAME.match(port):
        raise fail(file, parts + ["port"], f"expected the name of an environment variable holding the port "
                                           f"(e.g. \"PORT\") or a port number, got {describe(port)}")


def check_graph(services: dict[str, Service], tasks: dict[str, Task], file: str) -> None:
    """Names unique across services and tasks, every dependency declared, no cycle."""
    for name in sorted(set(services) & set(tasks)):
        raise fail(file, ["tasks", name], f'name is also used by services.{name}; tasks and services share one '
                                          "dependency graph")
    table = {name: "services" for name in services} | {name: "tasks" for name in tasks}
    deps = {name: s.depends_on for name, s in services.items()} | {name: t.depends_on for name, t in tasks.items()}
    for name in sorted(deps):
        for i, dep in enumerate(deps[name]):
            if dep not in deps:
                what = "service or task" if tasks else "service"
                raise fail(file, [table[name], name, "depends_on", i],
                           f"unknown {what} {quote(dep)} (declared: {', '.join(sorted(deps))})")
    cycle = find_cycle(deps)
    if cycle:
        raise fail(file, [table[cycle[0]], cycle[0], "depends_on"], f"dependency cycle: {' -> '.join(cycle)}")


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle as a closed path (``[a, b, a]``), searching depth-first in name order; None if acyclic."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(deps.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(deps):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def topological_order(deps: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Kahn layers, each sorted by name: what may start together once the previous layer is ready."""
    remaining = {name: set(d) for name, d in deps.items()}
    layers: list[list[str]] = []
    while remaining:
        ready = sorted(name for name, d in remaining.items() if not d)
        if not ready:
            raise ValueError("dependency graph has a cycle")
        layers.append(ready)
        for name in ready:
            del remaining[name]
        for d in remaining.values():
            d.difference_update(ready)
    return layers


def _deps(spec: dict[str, Any]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d.strip() for d in spec.get("depends_on") or () if d.strip()))


def _check_name(name: str, parts: list[str | int], file: str) -> None:
    if not NAME.match(name):
        raise fail(file, parts, "expected a name of letters, digits, '.', '_' or '-' (starting with a letter or "
                                "digit, at most 64 characters)")


def _warn_unknown(spec: dict[str, Any], known: frozenset[str], parts: list[str | int], file: str,
                  warnings: list[str]) -> None:
    for key in sorted(spec):
        if key not in known:
            warnings.append(f"{file}: {key_path(parts + [key])}: unknown key, ignored")
