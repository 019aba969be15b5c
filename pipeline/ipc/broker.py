"""The IPC broker: one process per ATO_HOME that sits between every consumer and the providers it imports.

Seed 003 moves the broker role into the CLI: service resolution, reference counting, tokens and
schema validation. The broker is started on demand by the first ``ato run`` that imports a
service (``python -m pipeline.ipc.broker``, detached; a second one started at the same time
exits, the flock on ``broker.lock`` decides) and exits once it has had nothing to do for
``ATO_IPC_BROKER_IDLE_SECS`` (default 30) — the way systemd socket activation holds a socket and
starts the service behind it only when it is needed.

What it does:

* **Endpoints.** Each consumer gets its own socket per import (``<root>/c-<id>/<alias>.sock``,
  0700 directory) and its own token; the broker checks the token on every call (see
  :mod:`pipeline.ipc.tokens`), so a token used on another consumer's endpoint, or after its
  consumer stopped, is refused (-32001).
* **Validation.** ``args`` are checked against the method's ``input_schema`` before anything is
  forwarded and the provider's ``result`` against ``output_schema`` before it is returned
  (-32003); unknown methods are refused (-32601). Refusals are logged (never tokens or values).
* **Reference counting.** Provider instances are keyed by scope (the provider's identity; for
  ``exclusive`` sharing, also the consumer). Attaching counts a consumer; a consumer that detaches
  — or whose process is gone, checked every 200 ms — is uncounted and its tokens revoked. A
  ``singleton`` with no consumer left is stopped after its ``idle_timeout``; an ``exclusive`` one
  at once; a ``daemon`` only when it is closed. A new consumer within the grace period cancels it.
* **State.** Every change is written to ``$ATO_HOME/run/ipc/state.json`` (no tokens), which ``ato
  ps`` shows; a broker that starts finds the instances a killed broker left and stops them, since
  nobody can reach them any more.

Control requests (one JSON object per line on ``<root>/broker.sock``, from ``ato`` itself):
``attach``, ``detach``, ``rebind``, ``status``, ``shutdown``; see :mod:`pipeline.ipc.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cas.atomic import write_bytes_atomic
from pipeline.ipc import sockets
from pipeline.ipc.messages import MethodTable
from pipeline.ipc.protocol import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVOKE,
    MAX_MESSAGE,
    METHOD_NOT_FOUND,
    SERVICE_UNAVAILABLE,
    RpcError,
    decode,
    encode,
    error_response,
    result_response,
)
from pipeline.ipc.sockets import control_path, short_id
from pipeline.ipc.tokens import Grant, TokenTable
from pipeline.runtime.table import proc_alive

MONITOR_EVERY = 0.2
CALL_TIMEOUT = 30.0
DEFAULT_IDLE_EXIT = 30.0
STATE_VERSION = "1"

StopProvider = Callable[[dict[str, Any]], None]


def _now_text(epoch: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch if epoch is not None else time.time()))


@dataclass
class Instance:
    """One running provider in one scope, and who uses it."""

    key: str
    service: str
    provider: dict[str, Any]  # pid, start, socket, run_id?, name?
    mode: str
    idle_timeout: float
    methods: MethodTable
    refs: dict[str, set[str]] = field(default_factory=dict)  # consumer id -> its aliases for this instance
    state: str = "running"  # running | idle | stopping | failed
    idle_since: float | None = None
    timer: asyncio.TimerHandle | None = None
    started_at: float = field(default_factory=time.time)

    def to_json(self, consumers: dict[str, Consumer]) -> dict[str, Any]:
        stops_at = (self.idle_since + self.idle_timeout if self.state == "idle" and self.mode == "singleton"
                    and self.idle_since else None)
        return {"key": self.key, "service": self.service, "state": self.state, "sharing": self.mode,
                "idle_timeout": self.idle_timeout,
                "provider": {k: self.provider.get(k) for k in ("name", "run_id", "pid", "socket")},
                "consumer_count": len(self.refs),
                "consumers": [{"id": c, "pid": consumers[c].pid if c in consumers else None,
                               "aliases": sorted(a)} for c, a in sorted(self.refs.items())],
                "methods": self.methods.names(), "started_at": _now_text(self.started_at),
                "idle_since": _now_text(self.idle_since) if self.idle_since else None,
                "stops_at": _now_text(stops_at) if stops_at else None}


@dataclass
class Consumer:
    id: str
    pid: int
    start: str | None
    endpoints: dict[str, tuple[Any, Path]] = field(default_factory=dict)  # alias -> (asyncio server, socket)


def signal_stop(provider: dict[str, Any], grace: float = 5.0) -> None:
    """Stop a provider process (and its process group, when it leads one): SIGTERM, then SIGKILL."""
    pid, start = provider.get("pid"), provider.get("start")
    if not proc_alive(pid, start):
        return
    leader = False
    with contextlib.suppress(OSError):
        leader = os.getpgid(pid) == pid
    send = (lambda sig: os.killpg(pid, sig)) if leader else (lambda sig: os.kill(pid, sig))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc_alive(pid, start):
        time.sleep(0.05)
    if proc_alive(pid, start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(signal.SIGKILL)


class Broker:
    def __init__(self, root: Path, state_dir: Path, *, stop_provider: StopProvider = signal_stop,
                 idle_exit: float = DEFAULT_IDLE_EXIT, log: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.state_dir = state_dir
        self.stop_provider = stop_provider
        self.idle_exit = idle_exit
        self._log = log or (lambda line: None)
        self.tokens = TokenTable()
        self.instances: dict[str, Instance] = {}
        self.consumers: dict[str, Consumer] = {}
        self._done = asyncio.Event()
        self._idle_since = time.monotonic()
        self._next_id = 0
        self._stopping: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ bookkeeping

    def log(self, event: str, **fields: Any) -> None:
        parts = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        self._log(f"{_now_text()} {event} {parts}".rstrip())

    def state_doc(self) -> dict[str, Any]:
        return {"schema_version": STATE_VERSION, "broker": {"pid": os.getpid(), "socket": str(control_path(self.root))},
                "updated_at": _now_text(),
                "services": [i.to_json(self.consumers) for _k, i in sorted(self.instances.items())],
                "consumers": [{"id": c.id, "pid": c.pid, "aliases": sorted(c.endpoints)}
                              for _i, c in sorted(self.consumers.items())]}

    def write_state(self) -> None:
        doc = self.state_doc()
        doc["instances_for_cleanup"] = [{"key": i.key, "provider": i.provider} for i in self.instances.values()]
        write_bytes_atomic(self.state_dir / "state.json", (json.dumps(doc, indent=2) + "\n").encode())

    # ------------------------------------------------------------ control requests

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "attach":
            return await self.attach(req)
        if op == "detach":
            await self.detach(str(req.get("consumer")), reason="detached")
            return {"ok": True}
        if op == "rebind":
            return self.rebind(req)
        if op == "status":
            return {"ok": True, **self.state_doc()}
        if op == "shutdown":
            self._done.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        who = req.get("consumer") or {}
        cid, alias, key = str(who.get("id") or ""), str(req.get("alias") or ""), str(req.get("key") or "")
        if not cid or not alias or not key or not isinstance(who.get("pid"), int):
            return {"ok": False, "error": "attach needs consumer {id, pid}, alias and key"}
        inst = self.instances.get(key)
        if inst is not None and inst.state == "stopping":
            return {"ok": True, "state": "stopping"}
        if inst is not None and (inst.state == "failed" or not proc_alive(inst.provider.get("pid"),
                                                                           inst.provider.get("start"))):
            if req.get("provider") is None:
                return {"ok": True, "state": "absent"}
            self.log("provider-replaced", key=key, pid=inst.provider.get("pid"))
            refs = inst.refs
            del self.instances[key]
            inst = None
        else:
            refs = {}
        if inst is None:
            provider = req.get("provider")
            if provider is None:
                return {"ok": True, "state": "absent"}
            sharing = req.get("sharing") or {}
            try:
                methods = MethodTable(req.get("methods") or {})
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            inst = Instance(key, str(req.get("service") or key), dict(provider), str(sharing.get("mode", "singleton")),
                            float(sharing.get("idle_timeout", 300)), methods, refs)
            self.instances[key] = inst
            self.log("provider-registered", key=key, service=inst.service, pid=provider.get("pid"),
                     run=provider.get("run_id"))
        consumer = self.consumers.get(cid)
        if consumer is None:
            consumer = self.consumers[cid] = Consumer(cid, who["pid"], who.get("start"))
        if alias in consumer.endpoints:
            return {"ok": False, "error": f"consumer {cid} already imports {alias!r}"}
        directory = sockets.private_dir(self.root / f"c-{short_id(cid)}")
        path = directory / f"{alias[:24]}.sock"
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(lambda r, w: self._serve_consumer(r, w, cid, alias), path=str(path),
                                                 limit=MAX_MESSAGE + 2)
        os.chmod(path, 0o600)
        consumer.endpoints[alias] = (server, path)
        token = self.tokens.mint(Grant(cid, alias, key))
        self._cancel_idle(inst)
        inst.refs.setdefault(cid, set()).add(alias)
        self.log("attach", consumer=cid, alias=alias, key=key, consumers=len(inst.refs))
        self.write_state()
        return {"ok": True, "state": "attached", "socket": str(path), "token": token,
                "consumer_count": len(inst.refs)}

    def rebind(self, req: dict[str, Any]) -> dict[str, Any]:
        """The consumer's process changed (``ato run --background`` hands over to its supervisor)."""
        consumer = self.consumers.get(str(req.get("consumer")))
        if consumer is None or not isinstance(req.get("pid"), int):
            return {"ok": False, "error": "no such consumer"}
        consumer.pid, consumer.start = req["pid"], req.get("start")
        self.write_state()
        return {"ok": True}

    async def detach(self, cid: str, *, reason: str) -> None:
        consumer = self.consumers.pop(cid, None)
        revoked = self.tokens.revoke_consumer(cid)
        if consumer is not None:
            for server, path in consumer.endpoints.values():
                server.close()
                path.unlink(missing_ok=True)
            shutil.rmtree(self.root / f"c-{short_id(cid)}", ignore_errors=True)
        for inst in list(self.instances.values()):
            if cid in inst.refs:
                del inst.refs[cid]
                if not inst.refs and inst.state == "failed":
                    del self.instances[inst.key]  # its process is gone already: nothing to wait for
                elif not inst.refs:
                    self._idle(inst)
        if consumer is not None or revoked:
            self.log("detach", consumer=cid, reason=reason, tokens_revoked=revoked)
        self.write_state()

    # ------------------------------------------------------------ reference counting

    def _cancel_idle(self, inst: Instance) -> None:
        if inst.timer is not None:
            inst.timer.cancel()
            inst.timer = None
        inst.state, inst.idle_since = "running", None

    def _idle(self, inst: Instance) -> None:
        inst.state, inst.idle_since = "idle", time.time()
        if inst.mode == "daemon":
            return
        delay = 0.0 if inst.mode == "exclusive" else max(0.0, inst.idle_timeout)
        loop = asyncio.get_running_loop()
        inst.timer = loop.call_later(delay, lambda: self._spawn_stop(inst, "idle"))
        self.log("idle", key=inst.key, stops_in=f"{delay:g}s")

    def _spawn_stop(self, inst: Instance, reason: str) -> None:
        task = asyncio.ensure_future(self._stop(inst, reason))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, inst: Instance, reason: str) -> None:
        if inst.refs or inst.state == "stopping" or self.instances.get(inst.key) is not inst:
            return
        inst.state, inst.timer = "stopping", None
        self.write_state()
        self.log("provider-stopping", key=inst.key, reason=reason, pid=inst.provider.get("pid"))
        try:
            await asyncio.to_thread(self.stop_provider, inst.provider)
        except Exception as exc:  # noqa: BLE001 - a stop that fails is logged; the monitor sees what is left
            self.log("provider-stop-failed", key=inst.key, error=f"{type(exc).__name__}: {exc}")
        if self.instances.get(inst.key) is inst:
            del self.instances[inst.key]
        self.log("provider-stopped", key=inst.key)
        self.write_state()

    # ------------------------------------------------------------ consumer traffic

    async def _serve_consumer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: str,
                              alias: str) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial
                    if not line.strip():
                        break
                except asyncio.LimitOverrunError:
                    writer.write(encode(error_response(None, RpcError(-32004, f"message is larger than "
                                                                              f"{MAX_MESSAGE} bytes"))))
                    self.log("refused", consumer=cid, alias=alias, code=-32004)
                    break
                if not line.strip():
                    continue
                reply = await self._call(line, cid, alias)
                if reply is not None:
                    writer.write(encode(reply))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _call(self, line: bytes, cid: str, alias: str) -> dict[str, Any] | None:
        msg_id: Any = None
        notify = False
        method = None
        try:
            doc = decode(line)
            msg_id, notify = doc.get("id"), "id" not in doc
            if doc["method"] != INVOKE:
                raise RpcError(METHOD_NOT_FOUND, f"method not found: {doc['method']!r}",
                               f"call {INVOKE} with params {{token, method, args}}")
            params = doc.get("params")
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "invalid params: expected {token, method, args}")
            grant = self.tokens.check(params.get("token"), cid, alias)
            inst = self.instances.get(grant.key)
            if inst is None or inst.state in ("stopping", "failed"):
                raise RpcError(SERVICE_UNAVAILABLE, f"service unavailable: {alias} is not running")
            method = params.get("method")
            if not isinstance(method, str) or not method:
                raise RpcError(INVALID_PARAMS, "invalid params: method must be the name of an exported method")
            args = params.get("args", {})
            inst.methods.check_input(method, args)
            answer = await self._forward(inst, method, args, notify)
            if notify or answer is None:
                return None
            if "error" in answer:
                err = answer["error"] if isinstance(answer["error"], dict) else {}
                return {"jsonrpc": "2.0", "id": msg_id, "error": {
                    "code": err.get("code") if isinstance(err.get("code"), int) else INTERNAL_ERROR,
                    "message": str(err.get("message", "provider error")),
                    "data": err.get("data") if isinstance(err.get("data"), dict) else {"hint": "the provider failed"}}}
            inst.methods.check_output(method, answer.get("result"))
            return result_response(msg_id, answer.get("result"))
        except RpcError as err:
            self.log("refused", consumer=cid, alias=alias, method=method, code=err.code, reason=err.message)
            return None if notify else error_response(msg_id, err)

    async def _forward(self, inst: Instance, method: str, args: Any, notify: bool) -> dict[str, Any] | None:
        self._next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": args}
        if not notify:
            request["id"] = self._next_id
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(inst.provider["socket"], limit=MAX_MESSAGE + 2), timeout=CALL_TIMEOUT)
        except (OSError, TimeoutError):
            raise RpcError(SERVICE_UNAVAILABLE, f"service unavailable: cannot reach {inst.service}") from None
        try:
            writer.write(encode(request))
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            if notify:
                return None
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout=CALL_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                line = exc.partial
            except (TimeoutError, asyncio.LimitOverrunError):
                raise RpcError(SERVICE_UNAVAILABLE, f"service unavailable: {inst.service} did not answer") from None
        except OSError:
            raise RpcError(SERVICE_UNAVAILABLE, f"service unavailable: {inst.service} closed the connection") from None
        finally:
            with contextlib.suppress(Exception):
                writer.close()
        try:
            answer = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise RpcError(INTERNAL_ERROR, f"{inst.service} answered with something that is not JSON") from None
        if not isinstance(answer, dict) or ("result" not in answer and "error" not in answer):
            raise RpcError(INTERNAL_ERROR, f"{inst.service} answered with something that is not a JSON-RPC response")
        return answer

    # ------------------------------------------------------------ the loop

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                writer.close()
                return
        except OSError:
            writer.close()
            return
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    reply = await self.handle(req) if isinstance(req, dict) else {"ok": False, "error": "bad request"}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                except OSError as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _monitor(self) -> None:
        while not self._done.is_set():
            for cid, consumer in list(self.consumers.items()):
                if not proc_alive(consumer.pid, consumer.start):
                    await self.detach(cid, reason="consumer-exited")
            for inst in list(self.instances.values()):
                if inst.state in ("running", "idle") and not proc_alive(inst.provider.get("pid"),
                                                                         inst.provider.get("start")):
                    inst.state = "failed"
                    if inst.timer is not None:
                        inst.timer.cancel()
                    self.log("provider-exited", key=inst.key, pid=inst.provider.get("pid"))
                    if not inst.refs:
                        del self.instances[inst.key]
                    self.write_state()
            busy = self.instances or self.consumers or self._stopping
            if busy:
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since > self.idle_exit:
                self.log("broker-idle-exit")
                self._done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), MONITOR_EVERY)

    def _cleanup_previous(self) -> None:
        """Providers a killed broker left running: nobody can reach them (their endpoints died with it)."""
        try:
            old = json.loads((self.state_dir / "state.json").read_text("utf-8"))
        except (OSError, ValueError):
            return
        for item in old.get("instances_for_cleanup") or []:
            provider = item.get("provider") or {}
            if proc_alive(provider.get("pid"), provider.get("start")):
                self.log("orphan-stopped", key=item.get("key"), pid=provider.get("pid"))
                with contextlib.suppress(Exception):
                    self.stop_provider(provider)
        for entry in self.root.glob("c-*"):
            shutil.rmtree(entry, ignore_errors=True)

    async def serve(self) -> None:
        self._cleanup_previous()
        path = control_path(self.root)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._serve_control, path=str(path))
        os.chmod(path, 0o600)
        self.log("broker-started", pid=os.getpid(), socket=path)
        self.write_state()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._done.set)
        try:
            await self._monitor()
        finally:
            server.close()
            path.unlink(missing_ok=True)
            for cid in list(self.consumers):
                await self.detach(cid, reason="broker-exit")
            for inst in list(self.instances.values()):
                inst.refs.clear()
                if inst.timer is not None:
                    inst.timer.cancel()
                await self._stop(inst, "broker-exit")
            if self._stopping:
                await asyncio.gather(*self._stopping, return_exceptions=True)
            self.write_state()
            self.log("broker-exited")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.ipc.broker``: run the broker of this ATO_HOME unless one already runs."""
    from pipeline.ipc.providers import stop_provider

    state_dir = sockets.private_dir(sockets.state_dir())
    lock = open(state_dir / "broker.lock", "a")  # noqa: SIM115 - held for the broker's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another broker serves this ATO_HOME
    try:
        idle = float(os.environ.get("ATO_IPC_BROKER_IDLE_SECS", DEFAULT_IDLE_EXIT))
    except ValueError:
        idle = DEFAULT_IDLE_EXIT
    log_file = state_dir / "broker.log"

    def log(line: str) -> None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    broker = Broker(sockets.socket_root(), state_dir, stop_provider=stop_provider, idle_exit=idle, log=log)
    asyncio.run(broker.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
