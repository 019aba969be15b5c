"""The lifecycle graph: ``[services]`` (resident) and ``[tasks]`` (terminating) with ``depends_on``.

Both kinds share one namespace and one DAG (seed 003), so a service may wait on a
task such as ``install``. Unknown dependencies and cycles are manifest errors,
found here rather than when the runtime is half-way through starting things.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import E_CHAIN_TOO_LONG, E_MANIFEST_MISSING, AtoError
from pipeline.manifest.keypath import describe, fail, quote
from pipeline.manifest.model import Service, Task

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_CHAIN = 256  # units that may wait on each other in a row (each waits for the previous one to be ready)


def read_services(table: dict[str, Any], file: str, targets: set[str], warnings: list[str]) -> dict[str, Service]:
    """``[services.<name>]`` -> Service, checking each one's own rules (the graph is checked later)."""
    out: dict[str, Service] = {}
    for name in sorted(table):
        spec, parts = table[name], ["services", name]
        _check_name(name, parts, file)
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
    cycle, longest = _walk(deps)
    if cycle:
        raise fail(file, [table[cycle[0]], cycle[0], "depends_on"], f"dependency cycle: {' -> '.join(cycle)}")
    if longest > MAX_CHAIN:
        raise AtoError(E_CHAIN_TOO_LONG, f"{file}: a depends_on chain is {longest} services and tasks long; at "
                       f"most {MAX_CHAIN} may wait on each other in a row",
                       details={"file": file, "length": longest, "max_length": MAX_CHAIN},
                       hint="let independent services start side by side instead of in one line")


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle as a closed path (``[a, b, a]``), searching depth-first in name order; None if acyclic."""
    return _walk(deps)[0]


def longest_chain(deps: dict[str, tuple[str, ...]]) -> int:
    """How many units the longest ``depends_on`` chain has (0 for no units); the graph must be acyclic."""
    return _walk(deps)[1]


def _walk(deps: dict[str, tuple[str, ...]]) -> tuple[list[str] | None, int]:
    """One depth-first walk in name order, with an explicit stack (a 3,000-unit chain is no RecursionError):
    the first cycle found, else the length of the longest chain."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    chain: dict[str, int] = {}  # units in the longest chain that starts here
    path: list[str] = []
    for root in sorted(deps):
        if root in state:
            continue
        state[root] = 1
        path.append(root)
        todo: list[list[str]] = [sorted(deps.get(root, ()), reverse=True)]
        while todo:
            node = path[-1]
            if todo[-1]:
                dep = todo[-1].pop()
                if state.get(dep) == 1:
                    return path[path.index(dep):] + [dep], 0
                if dep not in state:
                    state[dep] = 1
                    path.append(dep)
                    todo.append(sorted(deps.get(dep, ()), reverse=True))
                continue
            todo.pop()
            path.pop()
            state[node] = 2
            chain[node] = 1 + max((chain.get(d, 0) for d in deps.get(node, ())), default=0)
    return None, max(chain.values(), default=0)


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
