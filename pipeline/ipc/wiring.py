"""``ato run`` of a capsule that imports services: resolve, start (once), attach, hand over the socket and token.

:class:`RunWiring` is the ``wire`` hook of :func:`pipeline.runtime.session.prepare`. Once the
consumer is resolved and its plan approved, for each ``[ipc.imports.<alias>]``:

1. **Resolve** the provider like ``ato run`` resolves its input — a path (relative to the
   consumer's directory), an installed capsule, or ``publisher/slug`` installed from the registry
   with the usual trust checks and consent — and name its scope: the provider's identity (its
   directory, or its artifact), plus the consumer for ``exclusive`` sharing.
2. **Attach** through the broker, under a lock on the scope so two consumers starting together
   start one provider. When no instance runs, the provider is prepared and started as a
   background run under its own policy (its own consent, sandbox and permissions; ``-y`` of the
   consumer's run approves it too), with ``CAPSULE_IPC_LISTEN_SOCKET`` naming the socket it must
   listen on; it is ready once that socket accepts a connection (``ATO_READINESS_TIMEOUT_SECS``).
   Its own imports are wired the same way, recursively.
3. **Hand over** ``CAPSULE_IPC_<ALIAS>_URL`` (``unix://<socket>``), ``CAPSULE_IPC_<ALIAS>_SOCKET``
   and ``CAPSULE_IPC_<ALIAS>_TOKEN``, plus ``CAPSULE_IPC_PROTOCOL=jsonrpc-2.0`` and
   ``CAPSULE_IPC_TRANSPORT=unix-socket``, to every unit of the consumer; the endpoint's directory
   is the only socket directory its sandbox may reach.

The consumer is this ``ato run`` process (a background run hands over to its supervisor with
:meth:`RunWiring.rebind`); when it is gone the broker uncounts it and revokes its tokens.
``activation = "lazy"`` imports are started at the consumer's start like eager ones.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cas.filelock import flocked
from pipeline.errors import AtoError, Problem
from pipeline.ipc import client, sockets
from pipeline.manifest.ipc import SCOPED, Finding, IpcImport, read_ipc
from pipeline.runtime import session, table
from pipeline.runtime.resolve import Resolved, resolve

MAX_DEPTH = 8
ATTACH_TRIES = 200
LAUNCH_FAILED = "ATO_ERR_RUNTIME_LAUNCH_FAILED"


def _provider_ref(imp: IpcImport, consumer_dir: Path) -> str:
    """``from`` as ``ato run`` takes it: an absolute path, or ``publisher/slug[@version]``."""
    if imp.is_path():
        base = Path(imp.source).expanduser()
        return str(base if base.is_absolute() else (consumer_dir / base).resolve())
    m = SCOPED.match(imp.source)
    if m:
        return f"{m.group(1)}/{m.group(2)}" + (f"@{m.group(3)}" if m.group(3) else "")
    return imp.source


def _scope(resolved: Resolved) -> str:
    if resolved.artifact is not None:
        return f"artifact:{resolved.artifact.resolve()}"
    return f"path:{resolved.project_dir.resolve()}"


def _methods(resolved: Resolved, methods: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        spec: dict[str, Any] = {}
        for key in ("input_schema", "output_schema"):
            rel = getattr(m, key)
            if rel is not None:
                spec[key] = json.loads((resolved.project_dir / rel).read_text("utf-8"))  # checked (IPC-008)
        out[m.name] = spec
    return out


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def _ready_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get("ATO_READINESS_TIMEOUT_SECS", 30)))
    except ValueError:
        return 30.0


class RunWiring:
    """The IPC side of one run (see the module doc): a callable ``wire`` hook for ``session.prepare``."""

    def __init__(self, *, registry: str | None, yes: bool, prompt: Callable[[Any], bool] | None,
                 notify: Callable[[str], None], listen: Path | None = None, depth: int = 0) -> None:
        self.run_id = table.new_id()
        self.registry = registry
        self.yes = yes
        self.prompt = prompt
        self.notify = notify
        self.listen = listen  # a provider: the socket it must listen on
        self.depth = depth
        self.attached: list[str] = []
        self.pid = os.getpid()

    # ------------------------------------------------------------ the hook

    def __call__(self, resolved: Resolved) -> session.Wiring:
        wiring = session.Wiring()
        if self.listen is not None:
            wiring.env["CAPSULE_IPC_LISTEN_SOCKET"] = str(self.listen)
            wiring.paths.append(str(self.listen.parent))
        if "ipc" not in resolved.manifest.raw:
            return wiring
        decl = read_ipc(resolved.manifest.raw, [])
        for alias, imp in sorted(decl.imports.items()):
            try:
                reply = self._import(resolved, imp)
            except AtoError as exc:
                if not imp.optional:
                    raise
                self.notify(f"warning: optional IPC import '{alias}' not available: {exc.message}")
                continue
            prefix = imp.env_prefix
            wiring.env.update({prefix + "URL": "unix://" + reply["socket"], prefix + "SOCKET": reply["socket"],
                               prefix + "TOKEN": reply["token"]})
            wiring.paths.append(str(Path(reply["socket"]).parent))
        if decl.imports:
            wiring.env.update({"CAPSULE_IPC_PROTOCOL": "jsonrpc-2.0", "CAPSULE_IPC_TRANSPORT": "unix-socket"})
        return wiring

    # ------------------------------------------------------------ one import

    def _confirm_install(self, scoped: str, registry: str, other_installed: bool = False) -> None:
        from pipeline.runtime import policy

        if self.yes:
            return
        if not policy.interactive() or self.prompt is None or not self.prompt(
                f"Install {scoped} from {registry} (a service this capsule imports)?"):
            raise policy.fail(policy.CONSENT, f"installing the provider {scoped} from {registry} needs consent: "
                                              "re-run with -y/--yes", scoped_id=scoped, registry=registry)

    def _import(self, consumer: Resolved, imp: IpcImport) -> dict[str, Any]:
        if self.depth >= MAX_DEPTH:
            raise AtoError("IPC-003", f"imports nest deeper than {MAX_DEPTH} providers (a cycle?)")
        ref = _provider_ref(imp, consumer.project_dir)
        provider = resolve(ref, registry=self.registry, cwd=consumer.project_dir,
                           confirm_install=self._confirm_install)
        findings: list[Finding] = []
        export = read_ipc(provider.manifest.raw, findings).export
        if export is None:
            raise AtoError("IPC-006", f"{imp.source} ({provider.manifest.name}) exports no service ([ipc.exports] "
                                      f"is missing)", details={"import": imp.alias, "from": imp.source})
        key = _scope(provider) + (f"#{self.run_id}" if export.sharing.mode == "exclusive" else "")
        request = {"op": "attach", "consumer": {"id": self.run_id, "pid": self.pid,
                                                "start": table.proc_start_time(self.pid)},
                   "alias": imp.alias, "key": key, "service": export.name or provider.manifest.name,
                   "methods": _methods(provider, export.methods),
                   "sharing": {"mode": export.sharing.mode, "idle_timeout": export.sharing.idle_timeout}}
        locks = sockets.private_dir(sockets.state_dir() / "locks")
        with flocked(locks / f"{sockets.short_id(key, 16)}.lock"):
            for _ in range(ATTACH_TRIES):
                reply = client.request(request)
                if reply["state"] == "absent":
                    reply = client.request({**request, "provider": self._start(provider, key)})
                if reply["state"] == "attached":
                    self.attached.append(imp.alias)
                    return reply
                time.sleep(0.1)  # the previous instance is stopping; a fresh one starts after it
        raise AtoError(LAUNCH_FAILED, f"could not attach to the provider of {imp.alias!r}")

    def _start(self, provider: Resolved, key: str) -> dict[str, Any]:
        directory = sockets.private_dir(sockets.socket_root() / f"p-{sockets.short_id(key, 16)}")
        listen = directory / "s.sock"
        listen.unlink(missing_ok=True)
        child = RunWiring(registry=self.registry, yes=self.yes, prompt=self.prompt, notify=self.notify,
                          listen=listen, depth=self.depth + 1)
        self.notify(f"starting {provider.manifest.name} (a service this capsule imports)")
        req = session.Request(input=str(provider.input), registry=self.registry, yes=self.yes, background=True,
                              run_id=child.run_id)
        try:
            prep = session.prepare(req, notify=self.notify, prompt=self.prompt, resolved=provider, wire=child)
            record = session.run_background(prep)
        except BaseException:
            child.detach()
            raise
        child.rebind(record.get("supervisor_pid"), record.get("supervisor_start"))
        deadline = time.monotonic() + _ready_timeout()
        while not _connectable(listen):
            current = table.read(record["id"]) or record
            if current.get("status") not in table.ACTIVE or time.monotonic() > deadline:
                session.stop(current, force=False)
                why = ("exited before it listened" if current.get("status") not in table.ACTIVE
                       else f"did not listen within {_ready_timeout():g}s")
                msg = f"provider {provider.manifest.name} {why} on CAPSULE_IPC_LISTEN_SOCKET (see {record['log_path']})"
                raise AtoError(LAUNCH_FAILED, msg, details={"provider": provider.manifest.name, "id": record["id"],
                                                            "log_path": record["log_path"]},
                               problems=[Problem(LAUNCH_FAILED, msg, {"provider": provider.manifest.name})])
            time.sleep(0.05)
        return {"pid": record["supervisor_pid"], "start": record.get("supervisor_start"), "socket": str(listen),
                "run_id": record["id"], "name": provider.manifest.name}

    # ------------------------------------------------------------ the consumer's lifetime

    def rebind(self, pid: int | None, start: str | None) -> None:
        """The consumer is now ``pid`` (a background run's supervisor), not this process."""
        if not self.attached or not pid:
            return
        self.pid = pid
        client.request({"op": "rebind", "consumer": self.run_id, "pid": pid, "start": start})

    def detach(self) -> None:
        if self.attached:
            client.detach(self.run_id)
            self.attached = []
