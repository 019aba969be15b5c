"""The lifecycle runner: ``[tasks]`` and ``[services]`` as one DAG, with readiness and fail-fast.

A unit starts when every dependency is done: a task has exited 0, a service has
passed its readiness probe (or has none). A task that fails, a service that exits
before it is ready, or a probe that times out stops everything started so far.
Once all services are up, the first one to exit — with any code — stops the rest
(SIGTERM to each process group, SIGKILL after the grace period) and its exit code
becomes ato's. Each unit runs in its own process group; under the supervisor the
runner also holds a :class:`~pipeline.runtime.containment.Tree`, so stopping stops
every process the run started (a shell's children, ``npm start``'s ``node``, a
daemon that double-forked, the sandbox around a workload), and a unit's
``stop_argv`` (``podman rm -f`` for a container) runs first.

A service without a readiness probe is ready as soon as it has been spawned: its
dependants start right away, so nothing orders their output against its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.errors import AtoError
from pipeline.runtime import deno, probes
from pipeline.runtime.containment import Tree

POLL = 0.05
PROBE_EVERY = 0.05
DEFAULT_GRACE = 5.0
DEFAULT_PROBE_TIMEOUT = 30.0


def grace_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get("ATO_STOP_GRACE_SECS", DEFAULT_GRACE)))
    except ValueError:
        return DEFAULT_GRACE


@dataclass
class Unit:
    """One process of the DAG, fully resolved (argv, env, cwd), ready to spawn."""

    name: str
    kind: str  # task | service
    argv: list[str]
    env: dict[str, str]
    cwd: str
    depends_on: list[str] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    entry: bool = False
    url: str | None = None
    stop_argv: list[str] | None = None  # run before signalling (a container engine's own stop)
    watch_permissions: bool = False  # a Deno program: its stderr is scanned for permission errors

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Unit:
        return cls(**doc)


def exit_code_of(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Running:
    def __init__(self, unit: Unit, proc: subprocess.Popen, pumps: list[threading.Thread]) -> None:
        self.unit = unit
        self.proc = proc
        self.pumps = pumps
        self.ready = False
        self.started = time.monotonic()
        self.probe: probes.Probe | None = None
        self.next_probe = 0.0
        self.code: int | None = None
        self.denial: tuple[str, str] | None = None  # (permission, resource) Deno refused


class Runner:
    """Runs a list of units; :meth:`run` returns ato's exit code.

    ``prefix``: re-emit each line as ``[name] line`` on the same stream (services
    mode); otherwise the units inherit ato's stdio. ``on_event(kind, data)`` is
    told about ``started``, ``ready`` and ``exited`` (the background supervisor
    writes them into the process record).
    """

    def __init__(self, units: list[Unit], *, prefix: bool, on_event: Callable[[str, dict], None] | None = None,
                 probe_timeout: float | None = None, grace: float | None = None,
                 out: IO[bytes] | None = None, err: IO[bytes] | None = None, foreground_tty: bool = False,
                 tree: Tree | None = None, tty_home: int | None = None) -> None:
        self.units = {u.name: u for u in units}
        self.prefix = prefix
        self.on_event = on_event or (lambda kind, data: None)
        self.probe_timeout = probe_timeout
        self.grace = grace if grace is not None else grace_seconds()
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer
        self.write_lock = threading.Lock()
        self.running: dict[str, _Running] = {}
        self.order: list[str] = []
        self.done: set[str] = set()
        self.stop_requested: int | None = None
        self.foreground_tty = foreground_tty
        self.tree = tree
        self.tty_home = tty_home if tty_home is not None else os.getpgrp()

    # ---------------------------------------------------------- spawning

    def _pump(self, stream: IO[bytes], sink: IO[bytes], name: str, running: _Running | None = None) -> None:
        tag = f"[{name}] ".encode() if self.prefix else b""
        muted = False
        for line in iter(stream.readline, b""):
            if running is not None:  # a Deno program: note the permission it was refused
                text = line.decode("utf-8", "replace")
                found = deno.denial_in(text)
                if found and running.denial is None:
                    running.denial = found
                if deno.uncaught_denial(text):
                    muted = True  # Deno's report and stack trace become one ATO_ERR line instead
            if muted:
                continue
            if not line.endswith(b"\n"):
                line += b"\n"
            with self.write_lock:
                try:
                    sink.write(tag + line)
                    sink.flush()
                except (OSError, ValueError):
                    pass
        stream.close()

    def _preexec(self) -> Callable[[], None] | None:
        tree = self.tree
        tty = self.foreground_tty
        if tree is None and not tty:
            return None

        def setup() -> None:  # runs in the child between fork and exec
            if tree is not None:
                tree.join()
            if tty:  # become the terminal's foreground group
                try:
                    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                    os.tcsetpgrp(0, os.getpgrp())
                    signal.signal(signal.SIGTTOU, old)
                except OSError:
                    pass
        return setup

    def spawn(self, unit: Unit) -> _Running:
        stdout = subprocess.PIPE if self.prefix else None
        stderr = subprocess.PIPE if self.prefix or unit.watch_permissions else None
        preexec = self._preexec()
        try:
            proc = subprocess.Popen(unit.argv, cwd=unit.cwd, env=unit.env, stdin=subprocess.DEVNULL if self.prefix
                                    else None, stdout=stdout, stderr=stderr, preexec_fn=preexec,
                                    process_group=0)
        except OSError as exc:
            raise AtoError("ATO_ERR_RUNTIME_LAUNCH_FAILED", f"cannot start {unit.kind} '{unit.name}': {exc}", details={"unit": unit.name, "argv": unit.argv[:1]}) from None
        if self.foreground_tty:
            try:  # the parent side of the terminal hand-over (whichever runs first wins)
                old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                os.tcsetpgrp(sys.stdin.fileno(), proc.pid)
                signal.signal(signal.SIGTTOU, old)
            except OSError:
                pass
        running = _Running(unit, proc, [])
        streams = [(proc.stdout, self.out, None), (proc.stderr, self.err, running if unit.watch_permissions
                                                                          else None)]
        for stream, sink, watched in streams:
            if stream is None:
                continue
            t = threading.Thread(target=self._pump, args=(stream, sink, unit.name, watched), daemon=True)
            t.start()
            running.pumps.append(t)
        if unit.kind == "service" and unit.probe:
            running.probe = probes.resolve_probe(unit.probe, unit.env, unit.name)
        self.running[unit.name] = running
        self.order.append(unit.name)
        self.on_event("started", {"name": unit.name, "pid": proc.pid, "kind": unit.kind, "entry": unit.entry})
        return running

    # ---------------------------------------------------------- stopping

    def _reap(self) -> None:
        for r in self.running.values():
            if r.code is None and r.proc.poll() is not None:
                r.code = exit_code_of(r.proc.returncode)

    def stop_all(self, force: bool = False) -> None:
        """Stop every unit and everything it started: SIGTERM, then SIGKILL after the grace period."""
        live = [self.running[n] for n in reversed(self.order)]
        self._run_stop_hooks(live, force)
        if self.tree is not None:
            self.tree.terminate(self.grace, keep=[r.proc.pid for r in live], force=force, wait=self._reap)
        else:
            for r in live:
                signal_group(r.proc.pid, signal.SIGKILL if force else signal.SIGTERM)
            deadline = time.monotonic() + (0 if force else self.grace)
            while time.monotonic() < deadline:
                self._reap()
                if not any(group_alive(r.proc.pid) for r in live):
                    break
                time.sleep(POLL)
            for r in live:
                if group_alive(r.proc.pid):
                    signal_group(r.proc.pid, signal.SIGKILL)
        for r in live:
            try:
                r.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for t in r.pumps:
                t.join(timeout=1)
        self._reap()
        if self.foreground_tty:
            try:
                old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                os.tcsetpgrp(sys.stdin.fileno(), self.tty_home)
                signal.signal(signal.SIGTTOU, old)
            except OSError:
                pass

    def _run_stop_hooks(self, live: list[_Running], force: bool) -> None:
        for r in live:
            if not r.unit.stop_argv:
                continue
            argv = list(r.unit.stop_argv)
            if force and "{grace}" in argv:
                argv = [a.replace("{grace}", "0") for a in argv]
            argv = [a.replace("{grace}", str(max(1, int(self.grace)))) for a in argv]
            try:
                subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=self.grace + 30, env=r.unit.env)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def request_stop(self, signum: int) -> None:
        self.stop_requested = signum

    # ---------------------------------------------------------- the loop

    def _deps_done(self, unit: Unit) -> bool:
        return all(d in self.done for d in unit.depends_on)

    def _fail(self, code: str, message: str, **details: Any) -> AtoError:
        self.stop_all()
        return AtoError(code, message, details=details)

    def run(self) -> int:
        pending = [n for n in self.units]
        all_ready_sent = False
        services = [n for n, u in self.units.items() if u.kind == "service"]
        try:
            while True:
                if self.stop_requested is not None:
                    self.stop_all()
                    self.on_event("stopped", {"signal": self.stop_requested})
                    return 128 + self.stop_requested
                for name in list(pending):
                    unit = self.units[name]
                    if self._deps_done(unit):
                        pending.remove(name)
                        self.spawn(unit)
                now = time.monotonic()
                for name, r in list(self.running.items()):
                    if r.code is not None and name in self.done:
                        continue
                    rc = r.proc.poll()
                    if rc is not None and r.code is None:
                        r.code = exit_code_of(rc)
                        # Drain its output before anything that depends on it starts, so logs keep
                        # DAG order even on a loaded machine (only a grandchild holding the pipe waits).
                        for t in r.pumps:
                            t.join(timeout=5)
                        self.on_event("exited", {"name": name, "code": r.code, "kind": r.unit.kind})
                        if r.denial is not None and r.code != 0:
                            self.stop_all()
                            raise deno.denied_error(*r.denial, name, r.unit.kind, r.code)
                    if r.unit.kind == "task":
                        if r.code is None:
                            continue
                        if r.code != 0:
                            raise self._fail("ATO_ERR_TASK_FAILED", f"task '{name}' failed with exit code "
                                                                   f"{r.code}", task=name, exit_code=r.code)
                        self.done.add(name)
                        if r.unit.entry:  # [lifecycle] run names a task: the run is that task
                            self.stop_all()
                            return 0
                        continue
                    # services
                    if not r.ready and r.probe is None:  # no readiness contract: up as soon as it is started
                        r.ready = True
                        self.done.add(name)
                        self.on_event("ready", {"name": name, "pid": r.proc.pid, "entry": r.unit.entry,
                                                "url": r.unit.url})
                    if not r.ready:
                        if r.code is not None:
                            raise self._fail("ATO_ERR_RUNTIME_LAUNCH_FAILED",
                                             f"service '{name}' exited before readiness check passed (exit code: "
                                             f"{r.code})", service=name, exit_code=r.code)
                        if now < r.next_probe:
                            continue
                        if probes.check(r.probe):
                            r.ready = True
                            self.done.add(name)
                            self.on_event("ready", {"name": name, "pid": r.proc.pid, "entry": r.unit.entry,
                                                    "url": r.unit.url})
                        elif now - r.started > self._timeout(r.unit):
                            raise self._fail("ATO_ERR_RUNTIME_LAUNCH_FAILED",
                                             f"service '{name}' readiness check timed out after "
                                             f"{self._timeout(r.unit):g}s ({r.probe.describe()})", service=name)
                        else:
                            r.next_probe = time.monotonic() + PROBE_EVERY
                        continue
                    if r.code is not None:  # a ready service exited: everything stops, its code is ours
                        self.stop_all()
                        self.on_event("finished", {"name": name, "code": r.code})
                        return r.code
                if not all_ready_sent and not pending and all(self.running.get(s) and self.running[s].ready
                                                              for s in services):
                    all_ready_sent = True
                    self.on_event("all_ready", {})
                if not pending and not services and all(n in self.done for n in self.units):
                    return 0
                time.sleep(POLL)
        except BaseException:
            if any(r.code is None for r in self.running.values()):
                self.stop_all()
            raise

    def _timeout(self, unit: Unit) -> float:
        if unit.probe and isinstance(unit.probe.get("timeout"), int | float):
            return float(unit.probe["timeout"])
        if self.probe_timeout is not None:
            return self.probe_timeout
        try:
            return float(os.environ.get("ATO_READINESS_TIMEOUT_SECS", DEFAULT_PROBE_TIMEOUT))
        except ValueError:
            return DEFAULT_PROBE_TIMEOUT


def select_units(units: list[Unit], entry: str | None) -> list[Unit]:
    """The entry unit and everything it (transitively) depends on; all units when there is no entry."""
    if entry is None:
        return units
    by_name = {u.name: u for u in units}
    keep: set[str] = set()
    stack = [entry]
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep.add(name)
        stack.extend(by_name[name].depends_on)
    return [u for u in units if u.name in keep]


def cwd_of(path: Path) -> str:
    return str(path)
