"""One ``ato run``: resolve -> route -> fail-closed checks -> consent -> provision -> launch.

Every check that can refuse the run happens in :func:`prepare`, before any
workload process exists: required env, lockfiles, runtime tools, the Tier 2
engine, the container engine, consent. :func:`run_foreground` and
:func:`run_background` only start what ``prepare`` approved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import AtoError, Problem
from pipeline.manifest.contracts import unmet_at_run
from pipeline.runtime import drivers, engines, policy, table
from pipeline.runtime.resolve import Resolved, resolve
from pipeline.runtime.router import Route, route

DEFAULT_READY_WAIT = 30.0


@dataclass
class Request:
    input: str = "."
    registry: str | None = None
    target: str | None = None
    yes: bool = False
    background: bool = False
    args: tuple[str, ...] = ()
    nacelle: str | None = None
    dangerous: bool = False
    run_id: str | None = None  # chosen by the caller when others must know it first (the IPC broker)


@dataclass
class Wiring:
    """What the IPC broker hands a run before it is planned: variables for every unit, socket dirs to reach."""

    env: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    request: Request
    resolved: Resolved
    route: Route
    launch: drivers.Launch
    consent: str


def prepare(req: Request, *, notify: Callable[[str], None], prompt: Callable[[Any], bool] | None,
            resolved: Resolved | None = None, wire: Callable[[Resolved], Wiring] | None = None) -> Prepared:
    """``resolved``: the input, already resolved by the caller. ``wire``: called once the capsule is known
    and before its units are planned, for what the IPC broker injects (its imports' sockets and tokens)."""
    policy.check_dangerous_flag(req.dangerous)

    def confirm_install(scoped: str, registry: str, other_installed: bool = False) -> None:
        if req.yes:
            return
        if not policy.interactive():
            state = (f"the installed {scoped} is not the release {registry} publishes" if other_installed
                     else f"{scoped} is not installed")
            raise policy.fail(policy.CONSENT, f"{state}; installing it from {registry} needs "
                                              "consent: re-run with -y/--yes", scoped_id=scoped, registry=registry)
        if prompt is None or not prompt(f"Install {scoped} from {registry}?"):
            raise policy.fail(policy.CONSENT, f"install of {scoped} was not approved", scoped_id=scoped)

    if resolved is None:
        resolved = resolve(req.input, registry=req.registry, confirm_install=confirm_install)
    manifest = resolved.manifest
    for warning in manifest.warning_lines():
        notify(f"warning: {warning}")
    if "ipc" in manifest.raw:  # upstream's IPC-00x checks come first, as in ato validate and ato build
        from pipeline import paths
        from pipeline.manifest.ipc import check_document

        for finding in check_document(manifest.raw, manifest.project_dir, str(manifest.path),
                                      store_dir=paths.store_dir()):
            notify(f"warning: [{finding.code}] {finding.message} (at {finding.location})")
    rt = route(manifest, req.target or resolved.selected_target)
    req.run_id = req.run_id or table.new_id()
    provided: list[Any] = []
    if manifest.dependencies:  # [dependencies.<alias>]: providers planned (each under its own policy) first
        from pipeline.runtime import dependencies

        def plan_provider(res: Resolved, prt: Route, inject: dict[str, str], reach: list[str]) -> tuple[Any, str]:
            return _plan_provider(req, res, prt, inject, reach, notify=notify, prompt=prompt)

        provided = dependencies.plan(
            manifest, rt.target, run_id=req.run_id, plan_provider=plan_provider,
            resolve_provider=lambda ref: resolve(ref, registry=req.registry, confirm_install=confirm_install))
        rt = dataclasses.replace(rt, target=dependencies.consumer_target(rt.target, provided))
    try:
        prep = _prepare_consumer(req, resolved, rt, provided, notify=notify, prompt=prompt, wire=wire)
    except BaseException:
        if provided:
            from pipeline.runtime import dependencies

            dependencies.discard(req.run_id)
        raise
    return prep


def _prepare_consumer(req: Request, resolved: Resolved, rt: Route, provided: list[Any], *,
                      notify: Callable[[str], None], prompt: Callable[[Any], bool] | None,
                      wire: Callable[[Resolved], Wiring] | None) -> Prepared:
    manifest = resolved.manifest
    deps = manifest.dependencies
    unmet = unmet_at_run(dataclasses.replace(rt.target, needs=tuple(n for n in rt.target.needs if n not in deps)),
                         {} if provided else deps)
    if unmet:
        raise policy.fail("ATO_ERR_RUNTIME_NOT_RESOLVED", unmet, target=rt.label)
    overrides = resolved.overrides(rt.label)
    dangerous = req.dangerous
    if overrides.permission_mode == "dangerous" and rt.tier == 2 and not dangerous:
        # saved in the registry UI; the same guard as the flag applies
        if os.environ.get("CAPSULE_ALLOW_UNSAFE") != "1":
            raise policy.fail(policy.POLICY, "the saved runtime config asks for permission_mode=dangerous, which "
                                             "requires CAPSULE_ALLOW_UNSAFE=1", target=rt.label)
        dangerous = True

    # 1. required env (from the target env, the saved overrides, and our environment)
    policy.check_required_env(rt, [{**rt.target.env, **overrides.env}, dict(os.environ)])
    # 2. lockfiles
    locks = policy.check_lockfiles(rt, manifest.project_dir)
    # 3. runtimes and engines
    drivers.check_runtime_available(rt)
    opts = drivers.Options(args=list(req.args), dangerous=dangerous, engine_flag=req.nacelle,
                           background=req.background,
                           dependencies={p.alias: f"127.0.0.1:{p.launch.port}" for p in provided})
    planner = drivers.Planner(manifest, rt, overrides, opts)
    engine = None
    if rt.tier == 2 and not dangerous:
        engine = engines.discover(req.nacelle, manifest.raw, manifest.project_dir)
    if rt.tier == 2 and dangerous:
        notify("warning: dangerous mode: running a Tier 2 target on the host without the sandbox")
    launch = planner.build()
    for port in launch.listen_ports:
        if not _port_free(port):
            raise policy.fail("ATO_ERR_PORT_IN_USE", f"port {port} is already in use on 127.0.0.1; stop what "
                                                     "listens there or set another port", port=port)
    # 4. consent for exactly this plan
    plan = policy.Plan(capsule=resolved.scoped_id or manifest.name, version=manifest.version, target=rt.label,
                       runtime=rt.runtime, driver=rt.driver, tier=rt.tier, permissions=launch.permissions)
    how = policy.ensure_consent(plan, yes=req.yes, prompt=prompt)
    if wire is not None:  # the capsule's imports: providers started (each with its own consent), sockets handed over
        wiring = wire(resolved)
        opts.inject_env, opts.inject_paths = dict(wiring.env), list(wiring.paths)
        launch = planner.build()
    # 5. provisioning (outside the sandbox), then wrap Tier 2 units for the engine
    launch = _provision_and_wrap(planner, launch, manifest, rt, locks, engine)
    if provided:
        from pipeline.runtime import dependencies

        launch = dependencies.merge(launch, provided, rt.target.needs, req.run_id or "")
    return Prepared(req, resolved, rt, launch, how)


def _provision_and_wrap(planner: drivers.Planner, launch: drivers.Launch, manifest: Any, rt: Route,
                        locks: dict[str, Path], engine: Any) -> drivers.Launch:
    """Provisioning outside the sandbox (a Python target's environment), then Tier 2 units wrapped for the engine."""
    if rt.driver == "python" and rt.runtime in ("source", "web"):
        from pipeline.runtime.provision import python_environment

        python, readable = python_environment(manifest.project_dir, locks["uv.lock"])
        planner.python_bin = python
        launch = planner.build()  # rebuilt with the environment on PATH
        if not engine:
            venv_bin = str(python.parent)
            for unit in launch.units:
                unit.env["PATH"] = f"{venv_bin}:{unit.env.get('PATH', '')}"
                unit.env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    else:
        readable = []
    if engine is not None:
        drivers.sandbox_wrap(launch, manifest, engine.path, readable)
    return launch


def _plan_provider(req: Request, resolved: Resolved, rt: Route, inject: dict[str, str], reach: list[str], *,
                   notify: Callable[[str], None], prompt: Callable[[Any], bool] | None) -> tuple[drivers.Launch, str]:
    """A dependency provider's units, planned like a run of its own: its checks, its consent, its sandbox.

    ``inject``: variables ato sets (its state directory); ``reach``: host dirs it may use (state, credentials).
    It never inherits the consumer's ``-U``: a provider runs sandboxed (or not at all).
    """
    manifest = resolved.manifest
    for warning in manifest.warning_lines():
        notify(f"warning: {manifest.name}: {warning}")
    overrides = resolved.overrides(rt.label)
    policy.check_required_env(rt, [{**rt.target.env, **overrides.env}, dict(os.environ)])
    locks = policy.check_lockfiles(rt, manifest.project_dir)
    drivers.check_runtime_available(rt)
    opts = drivers.Options(engine_flag=req.nacelle, background=req.background, inject_env=dict(inject),
                           inject_paths=list(reach))
    planner = drivers.Planner(manifest, rt, overrides, opts)
    engine = engines.discover(req.nacelle, manifest.raw, manifest.project_dir) if rt.tier == 2 else None
    launch = planner.build()
    plan = policy.Plan(capsule=resolved.scoped_id or manifest.name, version=manifest.version, target=rt.label,
                       runtime=rt.runtime, driver=rt.driver, tier=rt.tier, permissions=launch.permissions)
    how = policy.ensure_consent(plan, yes=req.yes, prompt=prompt)
    return _provision_and_wrap(planner, launch, manifest, rt, locks, engine), how


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ foreground


def run_foreground(prep: Prepared, *, notify: Callable[[str], None]) -> int:
    """Run the units through a foreground supervisor that dies with us (and takes every unit with it)."""
    launch = prep.launch
    tty = not launch.prefix and sys.stdin.isatty() and os.getpgrp() == _tty_pgrp()
    run_id = prep.request.run_id or table.new_id()
    _write_plan(run_id, launch, tty=tty)
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "pipeline.runtime.supervisor", "--id", run_id, "--foreground",
            "--events-fd", str(write_fd), "--parent-pid", str(os.getpid())]
    if tty:
        argv += ["--tty-home", str(os.getpgrp())]
    try:
        proc = subprocess.Popen(argv, pass_fds=(write_fd,), process_group=0,
                                cwd=str(prep.resolved.manifest.project_dir))
    except OSError as exc:
        table.plan_path(run_id).unlink(missing_ok=True)
        raise AtoError("ATO_ERR_RUNTIME_LAUNCH_FAILED", f"cannot start the run supervisor: {exc}") from None
    finally:
        os.close(write_fd)

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    error: dict[str, Any] | None = None
    code: int | None = None
    try:
        with os.fdopen(read_fd, "rb") as events:
            for line in events:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "ready" and doc.get("url"):
                    what = f"web target '{prep.route.label}'" if not launch.prefix else f"service '{doc['name']}'"
                    notify(f"🌐 {what} is available at {doc['url']}")
                elif doc.get("event") == "error":
                    error = doc
                elif doc.get("event") == "exit":
                    code = int(doc["code"])
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if error is not None:
        raise AtoError(error["code"], error["message"], details=error.get("details") or {}, hint=error.get("hint"),
                       problems=[Problem(p["code"], p["message"], p.get("details") or {})
                                 for p in error.get("problems") or []])
    if code is None:  # the supervisor died without a word (killed from outside)
        code = 128 - status if status < 0 else status
    return code


def _tty_pgrp() -> int:
    try:
        return os.tcgetpgrp(sys.stdin.fileno())
    except OSError:
        return -1


def _write_plan(run_id: str, launch: drivers.Launch, *, tty: bool = False) -> None:
    """The units (environment included) for the supervisor: a 0600 file it deletes once read."""
    plan = {"units": [u.to_json() for u in launch.units], "prefix": launch.prefix, "entry": launch.entry,
            "request_dir": launch.request_dir, "tty": tty, "make_dirs": launch.make_dirs,
            "scratch_dirs": launch.scratch_dirs, "hold_locks": launch.hold_locks}
    plan_file = table.plan_path(run_id)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(plan_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(plan, fh)


# ------------------------------------------------------------------ background


def run_background(prep: Prepared) -> dict[str, Any]:
    launch = prep.launch
    run_id = prep.request.run_id or table.new_id()
    log_path = table.log_path(run_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    manifest = prep.resolved.manifest
    record = {
        "schema_version": table.SCHEMA_VERSION, "id": run_id, "name": manifest.name,
        "scoped_id": prep.resolved.scoped_id, "status": "starting", "pid": None, "pid_start": None,
        "supervisor_pid": None, "supervisor_start": None, "runtime": launch.runtime_label,
        "target": prep.route.label, "route": prep.route.pair, "tier": prep.route.tier,
        "manifest_path": str(manifest.path), "project_dir": str(manifest.project_dir), "log_path": str(log_path),
        "port": launch.port, "url": launch.url, "started_at": table.now(), "ready_at": None, "ended_at": None,
        "exit_code": None, "last_event": "spawned", "last_error": None, "services": [], "cgroup": None,
        "dependencies": launch.dependencies,
    }
    table.write(record)
    _write_plan(run_id, launch)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.runtime.supervisor", "--id", run_id],
                                stdin=devnull, stdout=log, stderr=log, start_new_session=True,
                                cwd=str(manifest.project_dir))
    table.update(run_id, supervisor_pid=proc.pid, supervisor_start=table.proc_start_time(proc.pid))
    wait = _ready_wait()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        current = table.read(run_id) or record
        if current["status"] != "starting":
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    current = table.read(run_id) or record
    if current["status"] in ("failed",) or (current["status"] == "exited" and current.get("exit_code")):
        raise AtoError("ATO_ERR_RUNTIME_LAUNCH_FAILED",
                       f"background capsule failed before readiness (ID: {run_id}): "
                       f"{current.get('last_error') or 'exit code ' + str(current.get('exit_code'))}. "
                       f"See logs at {log_path}",
                       details={"id": run_id, "log_path": str(log_path)})
    return current


def _ready_wait() -> float:
    try:
        value = float(os.environ.get("ATO_BACKGROUND_READY_WAIT_TIMEOUT_SECS", DEFAULT_READY_WAIT))
        return value if value > 0 else DEFAULT_READY_WAIT
    except ValueError:
        return DEFAULT_READY_WAIT


def stop(record: dict[str, Any], *, force: bool, wait: float | None = None) -> bool:
    """Stop a background run: SIGTERM its supervisor, which stops the whole tree; ``force`` SIGKILLs it all.

    True if it was running.
    """
    from pipeline.runtime import containment
    from pipeline.runtime.lifecycle import grace_seconds, signal_group

    if record.get("status") not in table.ACTIVE:
        return False
    wait = wait if wait is not None else grace_seconds() + 10
    sup = record.get("supervisor_pid")
    sup_alive = table.proc_alive(sup, record.get("supervisor_start"))
    groups = [s["pid"] for s in record.get("services") or [] if s.get("pid")]
    members: set[int] = set()
    if force or not sup_alive:
        members = containment.stop_recorded(sup if sup_alive else None, record.get("cgroup"), force=True)
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)
    else:
        os.kill(sup, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not table.proc_alive(sup, record.get("supervisor_start")) and not any(_group_alive(g) for g in groups) \
                and not any(containment.alive(p) for p in members):
            break
        time.sleep(0.05)
    else:
        raise AtoError("ATO_ERR_PROCESS_STUCK", f"process {sup} did not exit within {wait:g} seconds")
    containment.remove_cgroup(record.get("cgroup"))
    current = table.read(record["id"]) or record
    if current.get("status") in table.ACTIVE or force:
        table.update(record["id"], status="stopped", ended_at=current.get("ended_at") or table.now(),
                     last_event="stopped",
                     exit_code=current.get("exit_code") if current.get("status") not in table.ACTIVE else 137)
    return True


def _group_alive(pgid: int) -> bool:
    from pipeline.runtime.lifecycle import group_alive

    return group_alive(pgid)


def project_of(input_: str) -> Path | None:
    path = Path(input_).expanduser()
    return path.resolve() if path.exists() else None
