"""Dependency contracts at run time: ``[dependencies.<alias>]`` providers as units of the consumer's own DAG.

A 0.3 consumer names a provider capsule and the contract it must offer::

    [dependencies.db]
    capsule = "capsule://ato/acme/kv@1.0.0"      # publisher/slug@version in the run's registry
    contract = "service@1"
    parameters = { database = "reports" }
    credentials = { password = "{{env.DB_PASS}}" }
    [targets.app]
    needs = ["db"]
    env = { DATABASE_URL = "{{deps.db.runtime_exports.DATABASE_URL}}" }

and the provider offers it (``[contracts."service@1"]``: the target that runs, a ``ready`` probe,
typed parameters and credentials, exports). :func:`plan` resolves each provider (installed, or
installed from the registry with the usual trust checks and consent), fills in its templates —
``{{host}}`` is 127.0.0.1, ``{{port}}`` a free port chosen now, ``{{state.dir}}`` its state
directory, ``{{params.K}}`` the consumer's value or the contract's default, ``{{credentials.K}}``
the path of a 0600 file holding the secret in the provider's command and env (so it never shows
in a process listing) and the value itself in exports — and plans it under its own policy
(its own consent, sandbox and permissions). The consumer's ``{{deps.<alias>.…}}`` and
``{{env.X}}`` are rendered into its env. :func:`merge` then puts the providers' units into the
consumer's run: the provider's entry unit is named ``<alias>`` and carries the contract's ready
probe; the consumer's units wait for the providers their target ``needs`` (all of them when
``needs`` is empty). One supervisor owns the whole tree, so a provider stops with its consumer —
on exit, on fail-fast, on ``ato close`` and on Ctrl-C — like ``docker compose up``.

Secret values (credentials, and exports marked ``secret = true`` or built from credentials) are
never printed or logged: they travel in the run's 0600 plan file and the units' environment only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import E_MANIFEST, AtoError, Problem
from pipeline.manifest import Manifest, Target
from pipeline.manifest.contracts import CAPSULE_URL, Contract, Dependency
from pipeline.manifest.templates import Expr, TemplateError, parse
from pipeline.runtime.drivers import Launch, free_port
from pipeline.runtime.lifecycle import Unit
from pipeline.runtime.resolve import Resolved
from pipeline.runtime.router import Route, route

HOST = "127.0.0.1"
CONTRACT = "ATO_ERR_EXECUTION_CONTRACT_INVALID"
NOT_RESOLVED = "ATO_ERR_RUNTIME_NOT_RESOLVED"
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h)?\s*$")


def render(text: str, lookup: Callable[[Expr], str]) -> str:
    """``text`` with every ``{{ expr }}`` replaced by ``lookup(expr)`` (the grammar was checked at load)."""
    def one(match: re.Match[str]) -> str:
        try:
            (expr,) = parse("{{" + match.group(1) + "}}")
        except (TemplateError, ValueError) as exc:
            raise AtoError(E_MANIFEST, f"invalid template {match.group(0)!r}: {exc}") from None
        return lookup(expr)
    return _TEMPLATE.sub(one, text)


def seconds(value: Any, default: float = 30.0) -> float:
    """A ready ``timeout`` (``"30s"``, ``"2m"``, ``500ms``, a number of seconds)."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise AtoError(E_MANIFEST, f"ready.timeout {value!r}: expected a duration such as 30s or 2m")
    n = int(m.group(1))
    return {"ms": n / 1000, "s": n, None: n, "m": n * 60, "h": n * 3600}[m.group(2)]


def provider_ref(url: str, alias: str = "") -> str:
    """``capsule://ato/<publisher>/<slug>@<version>`` -> ``publisher/slug@version`` (what ``ato run`` resolves)."""
    m = CAPSULE_URL.match(url)
    parts = m.group("path").split("/") if m else []
    if m is None or m.group("authority") != "ato" or len(parts) != 2:
        raise AtoError(NOT_RESOLVED, f"dependency {alias!r} needs {url}, which this ato cannot resolve: only "
                                     "capsule://ato/<publisher>/<slug>@<version> providers are resolved (from the "
                                     "installed capsules and the run's registry)",
                       details={"dependency": alias, "capsule": url},
                       hint="publish the provider to your registry and name it capsule://ato/<publisher>/<slug>@<ver>")
    return f"{parts[0]}/{parts[1]}@{m.group('ref')}"


@dataclass
class Provided:
    """One dependency, resolved and planned: its units, its exports, what it needs from the host."""

    alias: str
    resolved: Resolved
    contract: Contract
    launch: Launch
    ready: dict[str, Any]  # the probe of its entry unit (rendered)
    timeout: float
    exports: dict[str, str]  # runtime exports, rendered
    identity: dict[str, str]  # identity exports, rendered
    secret_exports: set[str] = field(default_factory=set)
    consent: str = ""
    state_dir: str | None = None  # the consumer-owned state it runs on, held by one run at a time


class Context:
    """The values of one provider's templates."""

    def __init__(self, alias: str, dependency: Dependency, contract: Contract, port: int, state_dir: Path | None,
                 secrets_dir: Path, socket: Path) -> None:
        self.alias = alias
        self.port = port
        self.state_dir = state_dir
        self.socket = socket
        self.params: dict[str, str] = {}
        for name, schema in contract.parameters.items():
            value = dependency.parameters.get(name, schema.get("default"))
            if value is None:
                if schema.get("required"):
                    raise AtoError(E_MANIFEST, f"dependencies.{alias}.parameters.{name}: required by the provider's "
                                               f"{contract.id}", details={"dependency": alias, "parameter": name})
                continue
            self.params[name] = render(value, self._env_only) if isinstance(value, str) else \
                str(value).lower() if isinstance(value, bool) else str(value)
        self.credentials: dict[str, str] = {}
        self.credential_files: dict[str, Path] = {}
        for name, template in dependency.credentials.items():
            value = render(template, self._env_only)
            self.credentials[name] = value
            path = secrets_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(value)
            self.credential_files[name] = path
        for name, schema in contract.credentials.items():
            if schema.get("required") and name not in self.credentials:
                raise AtoError(E_MANIFEST, f"dependencies.{alias}.credentials.{name}: required by the provider's "
                                           f"{contract.id}", details={"dependency": alias, "credential": name})

    def _env_only(self, expr: Expr) -> str:
        if expr.kind != "env":
            raise AtoError(E_MANIFEST, f"{{{{{expr}}}}} cannot be used here (only {{{{env.X}}}})")
        return host_env(expr.key or "", f"dependencies.{self.alias}")

    def lookup(self, *, credentials_as_files: bool) -> Callable[[Expr], str]:
        def value(expr: Expr) -> str:
            if expr.kind == "host":
                return HOST
            if expr.kind == "port":
                return str(self.port)
            if expr.kind == "socket":
                return str(self.socket)
            if expr.kind == "state.dir":
                if self.state_dir is None:
                    raise AtoError(E_MANIFEST, f"{{{{state.dir}}}}: dependency {self.alias!r} names no state "
                                               "(dependencies.<alias>.state.name)")
                return str(self.state_dir)
            if expr.kind == "params":
                if expr.key not in self.params:
                    raise AtoError(E_MANIFEST, f"{{{{{expr}}}}}: parameter {expr.key!r} has no value")
                return self.params[expr.key or ""]
            if expr.kind == "credentials":
                if expr.key not in self.credentials:
                    raise AtoError(E_MANIFEST, f"{{{{{expr}}}}}: the consumer passes no credential {expr.key!r}")
                return str(self.credential_files[expr.key or ""]) if credentials_as_files else \
                    self.credentials[expr.key or ""]
            if expr.kind == "env":
                return host_env(expr.key or "", f"the provider of {self.alias!r}")
            raise AtoError(E_MANIFEST, f"{{{{{expr}}}}} is not available in a provider (it has no dependencies of "
                                       "its own here)")
        return value


def host_env(name: str, where: str) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        message = f"{{{{env.{name}}}}} in {where} reads {name}, which is not set"
        raise AtoError("ATO_ERR_MISSING_REQUIRED_ENV", message, details={"name": name},
                       problems=[Problem("ATO_ERR_MISSING_REQUIRED_ENV", message, {"name": name})])
    return value


def _uses_credentials(text: str) -> bool:
    return any(e.kind == "credentials" for e in parse(text))


def _ready_probe(contract: Contract, lookup: Callable[[Expr], str], port: int) -> tuple[dict[str, Any], float]:
    ready = dict(contract.ready or {"type": "tcp", "target": "{{host}}:{{port}}"})
    kind = ready.get("type")
    timeout = seconds(ready.get("timeout"))
    value = {k: render(v, lookup) if isinstance(v, str) else v for k, v in ready.items()}
    if kind == "tcp":
        target = str(value.get("target") or f"{HOST}:{port}")
        return {"tcp_connect": target, "port": port}, timeout
    if kind == "http":
        return {"http_url": value["url"], "expect_status": value.get("expect_status")}, timeout
    if kind == "postgres":
        return {"postgres": {"host": value.get("host") or HOST, "port": value["port"], "user": value.get("user"),
                             "database": value.get("database")}}, timeout
    if kind == "unix_socket":
        return {"unix_socket": value["path"]}, timeout
    raise AtoError(CONTRACT, f"contracts.{contract.id}.ready: type {kind!r} is not run by this ato (a command "
                             "from the provider would run outside its sandbox); use tcp, http, postgres or "
                             "unix_socket", details={"contract": contract.id, "type": kind})


def state_lock(state_dir: Path) -> Path:
    """The lock file beside a dependency's state directory (the run's supervisor holds it while it runs)."""
    return state_dir.with_name(state_dir.name + ".lock")


def check_free(lock: Path, alias: str) -> None:
    """Refuse early when another run holds the state (the supervisor takes the lock for real)."""
    if not try_lock(lock, release=True):
        raise AtoError("ATO_ERR_STATE_IN_USE", f"dependency {alias!r}: its state {lock.with_suffix('')} is in use by "
                                               "another run; stop that run first (ato ps, ato close)",
                       details={"dependency": alias, "state": str(lock.with_suffix(""))})


def try_lock(lock: Path, *, release: bool = False) -> int | None:
    """An exclusive, non-blocking flock on ``lock``: the open fd (kept open to hold it), or None when held."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if release:
        os.close(fd)
        return -1
    return fd


def secrets_dir(run_id: str) -> Path:
    """Where one run's credential files live (0700, removed with the run)."""
    return paths.run_dir() / "secrets" / run_id


def discard(run_id: str) -> None:
    """Remove what :func:`plan` wrote for a run that will not start."""
    shutil.rmtree(secrets_dir(run_id), ignore_errors=True)


Planner = Callable[[Resolved, Route, dict[str, str], list[str]], tuple[Launch, str]]


def plan(manifest: Manifest, target: Target, *, run_id: str, resolve_provider: Callable[[str], Resolved],
         plan_provider: Planner) -> list[Provided]:
    """Resolve, render and plan every dependency of ``manifest`` (see the module doc)."""
    if not manifest.dependencies:
        return []
    out: list[Provided] = []
    secrets_root = secrets_dir(run_id)
    try:
        for alias, dep in sorted(manifest.dependencies.items()):
            out.append(_plan_one(manifest, alias, dep, run_id, secrets_root, resolve_provider, plan_provider))
    except BaseException:
        shutil.rmtree(secrets_root, ignore_errors=True)
        raise
    return out


def _plan_one(manifest: Manifest, alias: str, dep: Dependency, run_id: str, secrets_root: Path,
              resolve_provider: Callable[[str], Resolved], plan_provider: Planner) -> Provided:
    try:
        resolved = resolve_provider(provider_ref(dep.capsule, alias))
    except AtoError as err:
        if err.code != NOT_RESOLVED:
            err.message = f"dependency {alias!r} ({dep.capsule}): {err.message}"
        raise
    pm = resolved.manifest
    contract = pm.contracts.get(dep.contract)
    if contract is None:
        raise AtoError(E_MANIFEST, f"dependencies.{alias}: the provider {pm.name} does not offer {dep.contract} "
                                   f"(it offers: {', '.join(sorted(pm.contracts)) or 'nothing'})",
                       details={"dependency": alias, "contract": dep.contract})
    if pm.dependencies:
        raise AtoError(CONTRACT, f"dependencies.{alias}: the provider {pm.name} has dependencies of its own, which "
                                 "this ato does not start (one level of providers)", details={"dependency": alias})
    mount = (contract.state or {}).get("mount")
    if dep.state is not None and isinstance(mount, str) and mount.startswith("/"):
        raise AtoError(CONTRACT, f"dependencies.{alias}: the provider's {contract.id} mounts its state at {mount}, "
                                 "and this ato does not mount a state at a fixed path (it would be silently missing)",
                       details={"dependency": alias, "mount": mount},
                       hint='in the provider, name an environment variable (state.mount = "PGDATA") or use '
                            "{{state.dir}} in its command")
    own_secrets = secrets_root / alias
    secrets_root.parent.parent.mkdir(parents=True, exist_ok=True)
    for d in (secrets_root.parent, secrets_root, own_secrets):  # 0700 all the way: they hold passwords
        d.mkdir(mode=0o700, exist_ok=d is not own_secrets)
        os.chmod(d, 0o700)
    state_dir = None
    if dep.state is not None:
        version = str((contract.state or {}).get("version") or "0")
        state_dir = paths.state_dir() / "dependencies" / manifest.name / alias / version / dep.state
        state_dir.mkdir(parents=True, exist_ok=True)
        check_free(state_lock(state_dir), alias)
    port = free_port()
    ctx = Context(alias, dep, contract, port, state_dir, own_secrets, own_secrets / "s.sock")
    in_process = ctx.lookup(credentials_as_files=True)
    t = pm.targets.get(contract.target)
    if t is None:
        raise AtoError(E_MANIFEST, f"contracts.{contract.id}.target {contract.target!r} is not a target of {pm.name}")
    rendered = dataclasses.replace(
        t, port=port, entrypoint=render(t.entrypoint, in_process) if t.entrypoint else t.entrypoint,
        cmd=tuple(render(a, in_process) for a in t.cmd),
        env={k: render(v, in_process) for k, v in t.env.items()})
    rt = route(pm, contract.target)
    rt = dataclasses.replace(rt, target=rendered)
    inject: dict[str, str] = {}
    if state_dir is not None and isinstance(mount, str) and not mount.startswith("/"):
        inject[mount] = str(state_dir)  # the env var that receives the state directory
    reach = [str(own_secrets)] + ([str(state_dir)] if state_dir is not None else [])
    launch, consent = plan_provider(resolved, rt, inject, reach)
    values = ctx.lookup(credentials_as_files=False)
    probe, timeout = _ready_probe(contract, values, port)
    exports, secret = {}, set()
    for name, export in contract.runtime_exports.items():
        exports[name] = render(export.value, values)
        if export.secret or _uses_credentials(export.value):
            secret.add(name)
    identity = {name: render(v, values) for name, v in contract.identity_exports.items()}
    return Provided(alias, resolved, contract, launch, probe, timeout, exports, identity, secret, consent,
                    str(state_dir) if state_dir is not None else None)


def consumer_target(target: Target, provided: list[Provided]) -> Target:
    """The consumer's target with ``{{deps.…}}`` and ``{{env.X}}`` rendered in its env, command and args."""
    by_alias = {p.alias: p for p in provided}

    def value(expr: Expr) -> str:
        if expr.kind == "env":
            return host_env(expr.key or "", f"targets.{target.label}")
        if expr.dep is not None and expr.dep in by_alias:
            p = by_alias[expr.dep]
            table = p.exports if expr.kind == "runtime_exports" else p.identity
            if expr.key in table:
                return table[expr.key or ""]
            raise AtoError(E_MANIFEST, f"{{{{{expr}}}}}: the provider's {p.contract.id} does not export {expr.key!r} "
                                       f"as {expr.kind}")
        raise AtoError(E_MANIFEST, f"{{{{{expr}}}}} cannot be used in a consumer's target")

    def fill(text: str | None) -> str | None:
        return render(text, value) if text and "{{" in text else text

    return dataclasses.replace(target, env={k: fill(v) or "" for k, v in target.env.items()},
                               entrypoint=fill(target.entrypoint), cmd=tuple(fill(a) or "" for a in target.cmd))


def merge(consumer: Launch, provided: list[Provided], needs: tuple[str, ...], run_id: str) -> Launch:
    """The consumer's launch with every provider's units in front, ordered before the units that need them."""
    if not provided:
        return consumer
    taken = {u.name for u in consumer.units}
    units: list[Unit] = []
    for p in provided:
        entry = p.launch.entry
        names = {u.name: p.alias if u.name == entry else f"{p.alias}.{u.name}" for u in p.launch.units}
        clash = taken & set(names.values())
        if clash:
            raise AtoError(CONTRACT, f"dependency unit name {sorted(clash)[0]!r} is also a unit of the consumer")
        for u in p.launch.units:
            u.name = names[u.name]
            u.depends_on = [names.get(d, d) for d in u.depends_on]
            u.url = None
            if u.name == p.alias:
                u.entry = False
                u.kind = "service"
                u.probe = {**p.ready, "timeout": p.timeout}
            else:
                u.entry = False
            units.append(u)
        consumer.make_dirs += p.launch.make_dirs
        consumer.scratch_dirs += p.launch.scratch_dirs + ([p.launch.request_dir] if p.launch.request_dir else [])
        consumer.listen_ports += p.launch.listen_ports
    wanted = [a for a in needs if any(p.alias == a for p in provided)] or [p.alias for p in provided]
    for u in consumer.units:
        u.depends_on = list(dict.fromkeys([*u.depends_on, *wanted]))
    consumer.units = units + consumer.units
    consumer.dependencies = [{"alias": p.alias, "provider": p.resolved.scoped_id or p.resolved.manifest.name,
                              "version": p.resolved.manifest.version, "contract": p.contract.id, "unit": p.alias}
                             for p in provided]
    consumer.prefix = True
    consumer.hold_locks += [str(state_lock(Path(p.state_dir))) for p in provided if p.state_dir is not None]
    consumer.scratch_dirs.append(str(secrets_dir(run_id)))  # the supervisor removes it when the run ends
    return consumer
