"""Source-backed publishing for the registry acting as a Store (issue 8).

A *source* is a git repository (a local path or ``file://`` URL) registered by a Store user.
``rebuild`` records a *sync run* and works through it in a background thread:

``queued`` → ``running`` (clone, check out the ref, build with ``ato build`` under the
registry's own ``ATO_HOME``) → ``awaiting_signature`` (signed with the registry's source key)
→ ``succeeded`` (committed as ``<handle>/<name>`` like any upload) or ``failed`` with a
``failure_reason`` (``ref_not_found``, ``build_failed``, ``signature_failed``, ``version_exists``,
``publish_failed``) and a one-line ``error_message``.

State is JSON under ``<data>/sources/`` (written temp + rename), so runs survive a restart; a run
that was in flight when the server stopped is marked failed (``interrupted``) on start-up.
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

from cas.atomic import write_text_atomic
from pipeline.registry.storage import RegistryError, RegistryStore, Upload

PENDING = ("queued", "running", "awaiting_signature")
BUILD_TIMEOUT = 900


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, doc: Any) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2))


def _one_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


class SourceService:
    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self.root = store.root / "sources"
        self.lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for run_path in (self.root / "runs").glob("*/*.json") if (self.root / "runs").is_dir() else []:
            run = json.loads(run_path.read_text("utf-8"))
            if run.get("status") in PENDING:
                run.update(status="failed", failure_reason="interrupted", completed_at=_now(),
                           error_message="the registry stopped while this run was in progress")
                _write_json(run_path, run)

    # ---------------------------------------------------------------- records

    def _source_path(self, source_id: str) -> Path:
        if not source_id.startswith("src_") or not source_id[4:].isalnum():
            raise RegistryError(404, "not_found", f"source '{source_id}' not found")
        return self.root / "sources" / f"{source_id}.json"

    def get(self, source_id: str) -> dict[str, Any]:
        path = self._source_path(source_id)
        try:
            return json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise RegistryError(404, "not_found", f"source '{source_id}' not found") from None

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
        _write_json(self._source_path(src["source_id"]), src)
        return src

    def _run_path(self, source_id: str, run_id: str) -> Path:
        if not run_id.startswith("run_") or not run_id[4:].isalnum():
            raise RegistryError(404, "not_found", f"sync run '{run_id}' not found")
        return self.root / "runs" / source_id / f"{run_id}.json"

    def run(self, source_id: str, run_id: str) -> dict[str, Any]:
        self.get(source_id)
        try:
            return json.loads(self._run_path(source_id, run_id).read_text("utf-8"))
        except FileNotFoundError:
            raise RegistryError(404, "not_found", f"sync run '{run_id}' not found for source '{source_id}'") from None

    def _save_run(self, run: dict[str, Any]) -> None:
        with self.lock:
            _write_json(self._run_path(run["source_id"], run["sync_run_id"]), run)

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
        try:
            self._build_and_publish(src, run, work)
        except Exception as exc:  # noqa: BLE001 - a run always ends in a recorded state
            self._fail(run, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _ato(self, args: list[str], timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["ATO_HOME"] = str(self.root / "builder-home")
        env.pop("ATO_TOKEN", None)
        return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)

    def _key(self) -> Path:
        key = self.root / "source-signing.key"
        with self.lock:
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
