"""Source-backed publishing for the registry acting as a Store (issue 8).

A *source* is a git repository (a local path or ``file://`` URL) registered by a Store user.
``rebuild`` records a *sync run* and works through it in a background thread:

``queued`` → ``running`` (clone, check out the ref, build with ``ato build`` under the
registry's own ``ATO_HOME``) → ``awaiting_signature`` (signed with the registry's source key)
→ ``succeeded`` (committed as ``<handle>/<name>`` like any upload) or ``failed`` with a
``failure_reason`` (``ref_not_found``, ``build_failed``, ``signature_failed``, ``version_exists``,
``publish_failed``) and a one-line ``error_message``.

Sources and runs live in the registry index (``sources``, ``source_runs``), so any worker answers
for any run. The worker doing a run renews its ``heartbeat_at`` while it works; a pending run
whose heartbeat is older than :data:`STALE_SECONDS` (its worker died, or the server stopped) is
marked failed (``interrupted``) by whichever worker next looks. Source JSON files written under
``<data>/sources/`` by an earlier ato are imported once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blake3

from cas.filelock import flocked
from pipeline.registry.storage import RegistryError, RegistryStore, Upload

PENDING = ("queued", "running", "awaiting_signature")
BUILD_TIMEOUT = 900
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _one_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def _check_id(value: str, prefix: str, what: str) -> str:
    if not value.startswith(prefix) or not value[len(prefix):].isalnum():
        raise RegistryError(404, "not_found", f"{what} '{value}' not found")
    return value


class SourceService:
    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self.index = store.index
        self.root = store.root / "sources"
        self.root.mkdir(parents=True, exist_ok=True)
        self._import_files()

    def _import_files(self) -> None:
        """Sources and runs an earlier ato kept as JSON files: into the index, once (then renamed)."""
        files = sorted((self.root / "sources").glob("src_*.json")) if (self.root / "sources").is_dir() else []
        runs = sorted((self.root / "runs").glob("*/run_*.json")) if (self.root / "runs").is_dir() else []
        if not files and not runs:
            return
        with self.index.write() as conn:
            for path in files:
                src = json.loads(path.read_text("utf-8"))
                self.index.run(conn, "INSERT INTO sources(source_id, owner, doc, created_at) VALUES(:i, :o, :d, :t) "
                                     "ON CONFLICT(source_id) DO NOTHING",
                               {"i": src["source_id"], "o": src["owner"], "d": json.dumps(src),
                                "t": src.get("created_at") or _now()})
            for path in runs:
                run = json.loads(path.read_text("utf-8"))
                self.index.run(conn, "INSERT INTO source_runs(sync_run_id, source_id, status, doc, heartbeat_at) "
                                     "VALUES(:i, :s, :st, :d, 0) ON CONFLICT(sync_run_id) DO NOTHING",
                               {"i": run["sync_run_id"], "s": run["source_id"], "st": run["status"],
                                "d": json.dumps(run)})
        for d in ("sources", "runs"):
            if (self.root / d).is_dir():
                os.replace(self.root / d, self.root / f"{d}.imported")

    # ---------------------------------------------------------------- records

    def get(self, source_id: str) -> dict[str, Any]:
        _check_id(source_id, "src_", "source")
        with self.index.read() as conn:
            doc = self.index.scalar(conn, "SELECT doc FROM sources WHERE source_id=:i", i=source_id)
        if doc is None:
            raise RegistryError(404, "not_found", f"source '{source_id}' not found")
        return json.loads(doc)

    def owned(self, source_id: str, handle: str) -> dict[str, Any]:
        src = self.get(source_id)
        if src["owner"] != handle:
            raise RegistryError(403, "forbidden", f"source '{source_id}' belongs to another publisher")
        return src

    def register(self, handle: str, body: dict[str, Any]) -> dict[str, Any]:
        repo = str(body.get("repository") or "").strip()
        if not repo:
            raise RegistryError(400, "invalid_source", "body needs \"repository\" (a git repository path or file:// URL)")
        parsed = urlsplit(repo)
        if parsed.scheme not in ("", "file"):
            raise RegistryError(400, "invalid_source", "only local git repositories (path or file:// URL) are supported")
        path = Path(parsed.path if parsed.scheme == "file" else repo)
        if not path.is_absolute() or not (path / ".git").exists() and not (path / "HEAD").is_file():
            raise RegistryError(400, "invalid_source", f"not a git repository: {repo}")
        src = {"source_id": "src_" + secrets.token_hex(8), "owner": handle, "repository": str(path),
               "default_ref": str(body.get("default_ref") or "HEAD"), "created_at": _now()}
        with self.index.write() as conn:
            self.index.run(conn, "INSERT INTO sources(source_id, owner, doc, created_at) VALUES(:i, :o, :d, :t)",
                           {"i": src["source_id"], "o": handle, "d": json.dumps(src), "t": src["created_at"]})
        return src

    def run(self, source_id: str, run_id: str) -> dict[str, Any]:
        self.get(source_id)
        _check_id(run_id, "run_", "sync run")
        self._interrupt_stale()
        with self.index.read() as conn:
            doc = self.index.scalar(conn, "SELECT doc FROM source_runs WHERE sync_run_id=:r AND source_id=:s",
                                    r=run_id, s=source_id)
        if doc is None:
            raise RegistryError(404, "not_found", f"sync run '{run_id}' not found for source '{source_id}'")
        return json.loads(doc)

    def _save_run(self, run: dict[str, Any]) -> None:
        with self.index.write() as conn:
            self.index.run(conn, "INSERT INTO source_runs(sync_run_id, source_id, status, doc, heartbeat_at) "
                                 "VALUES(:i, :s, :st, :d, :h) ON CONFLICT(sync_run_id) DO UPDATE SET "
                                 "status=excluded.status, doc=excluded.doc, heartbeat_at=excluded.heartbeat_at",
                           {"i": run["sync_run_id"], "s": run["source_id"], "st": run["status"],
                            "d": json.dumps(run), "h": time.time()})

    def _heartbeat(self, run_id: str, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            with self.index.write() as conn:
                self.index.run(conn, "UPDATE source_runs SET heartbeat_at=:h WHERE sync_run_id=:i",
                               {"h": time.time(), "i": run_id})

    def _interrupt_stale(self) -> None:
        """Pending runs whose worker stopped renewing them: failed, ``interrupted``."""
        cutoff = time.time() - STALE_SECONDS
        with self.index.write() as conn:
            stale = self.index.values_in(conn, "SELECT sync_run_id, doc FROM source_runs WHERE status IN :keys "
                                               "AND heartbeat_at < :c", PENDING, c=cutoff)
            for row in stale:
                run = json.loads(row["doc"])
                run.update(status="failed", failure_reason="interrupted", completed_at=_now(),
                           error_message="the registry stopped while this run was in progress")
                self.index.run(conn, "UPDATE source_runs SET status=:st, doc=:d WHERE sync_run_id=:i AND "
                                     "heartbeat_at < :c", {"st": "failed", "d": json.dumps(run),
                                                            "i": row["sync_run_id"], "c": cutoff})

    # ---------------------------------------------------------------- rebuild

    def rebuild(self, src: dict[str, Any], ref: str | None, trigger: str = "manual") -> dict[str, Any]:
        run = {"sync_run_id": "run_" + secrets.token_hex(8), "source_id": src["source_id"], "status": "queued",
               "trigger": trigger, "ref": ref or src["default_ref"], "target_commit": None, "failure_reason": None,
               "signature_failure_reason": None, "error_message": None, "attempt_count": 1,
               "scoped_id": None, "version": None, "started_at": _now(), "completed_at": None}
        self._save_run(run)
        threading.Thread(target=self._work, args=(src, dict(run)), daemon=True,
                         name=f"source-{run['sync_run_id']}").start()
        return run

    def _fail(self, run: dict[str, Any], reason: str, message: str, **extra: Any) -> None:
        run.update(status="failed", failure_reason=reason, error_message=message, completed_at=_now(), **extra)
        self._save_run(run)

    def _work(self, src: dict[str, Any], run: dict[str, Any]) -> None:
        work = self.root / "work" / run["sync_run_id"]
        done = threading.Event()
        threading.Thread(target=self._heartbeat, args=(run["sync_run_id"], done), daemon=True).start()
        try:
            self._build_and_publish(src, run, work)
        except Exception as exc:  # noqa: BLE001 - a run always ends in a recorded state
            self._fail(run, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            done.set()
            shutil.rmtree(work, ignore_errors=True)

    def _ato(self, args: list[str], timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["ATO_HOME"] = str(self.root / "builder-home")
        env.pop("ATO_TOKEN", None)
        return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)

    def _key(self) -> Path:
        key = self.root / "source-signing.key"
        with flocked(self.root / ".signing-key.lock"):  # one key, whichever worker or process asks first
            if not key.is_file():
                res = self._ato(["key", "gen", "--out", str(key)], timeout=120)
                if res.returncode != 0:
                    raise RuntimeError(f"cannot create the source signing key: {_one_line(res.stderr)}")
        return key

    def _build_and_publish(self, src: dict[str, Any], run: dict[str, Any], work: Path) -> None:
        run.update(status="running")
        self._save_run(run)
        checkout = work / "checkout"
        work.mkdir(parents=True, exist_ok=True)
        git = ["git", "-c", "advice.detachedHead=false"]
        res = subprocess.run([*git, "clone", "--quiet", "--no-hardlinks", src["repository"], str(checkout)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return self._fail(run, "clone_failed", f"git clone failed: {_one_line(res.stderr)}")
        res = subprocess.run([*git, "-C", str(checkout), "rev-parse", "--verify", "--quiet",
                              f"{run['ref']}^{{commit}}"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            # a branch that only exists as origin/<ref> in the clone
            res = subprocess.run([*git, "-C", str(checkout), "rev-parse", "--verify", "--quiet",
                                  f"origin/{run['ref']}^{{commit}}"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return self._fail(run, "ref_not_found", f"ref '{run['ref']}' was not found in {src['repository']}")
        commit = res.stdout.strip()
        run["target_commit"] = commit
        subprocess.run([*git, "-C", str(checkout), "checkout", "--quiet", commit], capture_output=True, check=True)
        shutil.rmtree(checkout / ".git", ignore_errors=True)
        out = work / "out.capsule"
        res = self._ato(["--json", "build", str(checkout), "--out", str(out)])
        if res.returncode != 0 or not out.is_file():
            return self._fail(run, "build_failed", f"build failed: {_one_line(res.stderr) or 'no artifact'}")
        run.update(status="awaiting_signature")
        self._save_run(run)
        try:
            key = self._key()
        except RuntimeError as exc:
            return self._fail(run, "signature_failed", str(exc), signature_failure_reason="key_unavailable")
        signed = work / "signed.capsule"
        res = self._ato(["sign", str(out), "--key", str(key), "--out", str(signed)], timeout=300)
        if res.returncode != 0 or not signed.is_file():
            return self._fail(run, "signature_failed", f"signing failed: {_one_line(res.stderr)}",
                              signature_failure_reason="sign_failed")
        self._ingest(src, run, signed)

    def _ingest(self, src: dict[str, Any], run: dict[str, Any], artifact: Path) -> None:
        from stages.capsule import read_capsule

        manifest = read_capsule(artifact).manifest
        name, version = str(manifest.get("name") or ""), str(manifest.get("version") or "")
        tmp = self.store.new_temp()
        sha, b3, size = hashlib.sha256(), blake3.blake3(), 0
        with open(artifact, "rb") as fh, open(tmp, "wb") as dst:
            while data := fh.read(1 << 20):
                sha.update(data)
                b3.update(data)
                size += len(data)
                dst.write(data)
        try:
            upload = Upload(tmp, src["owner"], name, version, f"{name}-{version}.capsule", False, sha.hexdigest(),
                            b3.hexdigest(), size)
            self.store.publish(upload)
        except RegistryError as err:
            reason = "version_exists" if err.code == "version_exists" else "publish_failed"
            return self._fail(run, reason, f"{err.code}: {err}", scoped_id=f"{src['owner']}/{name}",
                              version=version)
        finally:
            tmp.unlink(missing_ok=True)
        run.update(status="succeeded", scoped_id=f"{src['owner']}/{name}", version=version, completed_at=_now())
        self._save_run(run)
