"""`ato source rebuild` / `ato source sync-status` against `ato registry serve` acting as the Store:
a git repository registered as a source is rebuilt at a ref, signed and published as a sync run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry, make_project

ALICE = "alice-session-token"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(repo: Path, *args: str) -> str:
    import os

    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


@pytest.fixture
def store(tmp_path: Path):
    reg = Registry(tmp_path / "store-data", token=TOKEN,
                   extra_args=["--store-user", f"alice={ALICE}", "--store-user", "bob=bob-token"])
    yield reg
    reg.stop()


@pytest.fixture
def source(store: Registry, tmp_path: Path) -> str:
    repo = make_project(tmp_path / "src-app", "src-app", "0.1.0")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "tag", "v0.1.0")
    git(repo, "checkout", "-q", "-b", "broken")
    (repo / "capsule.toml").write_text('name = "src-app"\nversion = \n')
    git(repo, "commit", "-q", "-am", "break the manifest")
    git(repo, "checkout", "-q", "main")
    resp = httpx.post(store.url + "/v1/sources", json={"repository": f"file://{repo}", "default_ref": "main"},
                      headers={"authorization": f"Bearer {ALICE}"}, timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["source_id"]


def test_rebuild_wait_and_sync_status(ato, store: Registry, source: str) -> None:
    env = {"ATO_STORE_API_URL": store.url}
    res = ato(["source", "rebuild", "--source-id", source], env=env)
    assert res.code == 1 and "requires authentication" in res.stderr and "E201" in res.stderr
    assert ato(["login", "--token", ALICE], env=env).code == 0

    res = ato(["source", "rebuild", "--source-id", source, "--ref", "v0.1.0", "--wait", "--poll-interval", "0.2",
               "--json"], env=env, timeout=300)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "source-sync-run")
    assert doc["status"] == "succeeded" and doc["scoped_id"] == "alice/src-app" and doc["version"] == "0.1.0"
    assert len(doc["target_commit"]) == 40
    detail = store.get("/v1/capsules/by/alice/src-app").json()
    assert detail["latest_version"] == "0.1.0"

    status = ato(["source", "sync-status", "--source-id", source, "--sync-run-id", doc["sync_run_id"], "--json"],
                 env=env)
    assert status.code == 0, status.stderr
    assert_schema(status.json(), "source-sync-run")
    assert status.json()["status"] == "succeeded"
    human = ato(["source", "sync-status", "--source-id", source, "--sync-run-id", doc["sync_run_id"]], env=env)
    assert human.code == 0 and f"sync_run_id={doc['sync_run_id']} status=succeeded" in human.stdout

    # the release is signed by the Store's source key: installing it asks about (and with --yes pins) that key
    inst = ato(["install", "alice/src-app", "--yes", "--json"], env=env)
    assert inst.code == 0, inst.stderr
    assert inst.json()["signed"] is True

    # same version again: the run fails with a reason, and --wait reports it on one line
    again = ato(["source", "rebuild", "--source-id", source, "--wait", "--poll-interval", "0.2"], env=env,
                timeout=300)
    assert again.code == 1 and "failure_reason=version_exists" in again.stderr and "E220" in again.stderr


def test_rebuild_failures(ato, store: Registry, source: str) -> None:
    env = {"ATO_STORE_API_URL": store.url, "ATO_TOKEN": ALICE}
    res = ato(["source", "rebuild", "--source-id", source, "--ref", "broken", "--wait", "--poll-interval", "0.2"],
              env=env, timeout=300)
    assert res.code == 1 and "failure_reason=build_failed" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error")]) == 1
    res = ato(["source", "rebuild", "--source-id", source, "--ref", "no-such-ref", "--wait", "--poll-interval",
               "0.2"], env=env, timeout=300)
    assert res.code == 1 and "failure_reason=ref_not_found" in res.stderr

    res = ato(["source", "rebuild", "--source-id", source, "--wait", "--timeout", "0"], env=env)
    assert res.code == 1 and "Rebuild wait timeout" in res.stderr and "ato source sync-status" in res.stderr

    res = ato(["source", "rebuild", "--source-id", source, "--json"], env=env)
    assert res.code == 0, res.stderr
    assert res.json()["status"] == "queued"

    res = ato(["source", "rebuild", "--source-id", "src_0000000000000000"], env=env)
    assert res.code == 1 and "not found" in res.stderr
    res = ato(["source", "sync-status", "--source-id", source, "--sync-run-id", "run_ffff"], env=env)
    assert res.code == 1 and "not found" in res.stderr
    res = ato(["source", "sync-status", "--source-id", source, "--sync-run-id", "run_ffff"],
              env={**env, "ATO_TOKEN": "wrong"})
    assert res.code == 1 and "rejected the session token" in res.stderr
    res = ato(["source", "rebuild", "--source-id", source], env={**env, "ATO_TOKEN": "bob-token"})
    assert res.code == 1 and "belongs to another publisher" in res.stderr
    res = ato(["source", "rebuild", "--source-id", source],
              env={"ATO_STORE_API_URL": "http://127.0.0.1:9", "ATO_TOKEN": ALICE})
    assert res.code == 3 and "cannot reach" in res.stderr
