"""Two ``ato registry serve`` processes on different ports, each with a data dir of its own (as on two
hosts), sharing one PostgreSQL index and one S3-compatible bucket: racing publishes are decided by
the database, nothing is lost, and either process serves the same bytes; a process killed in the
middle of a publish loses nothing the other acknowledged, and its upload can be retried."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from cas.stoppoints import ENV as STOP_AT
from tests.conftest import cli_path
from tests.e2e.registry_support import (
    TOKEN,
    Registry,
    build_in_process,
    digests,
    install_flags,
    make_project,
    set_version,
)
from tests.e2e.test_crash_hygiene import kill9, wait_stopped

DEADLINE = 600


@pytest.fixture
def team(postgres_url: str, s3_bucket: str) -> list[str]:
    """The shared part of a team's registry: ``serve`` arguments naming one database and one bucket."""
    return ["--database", postgres_url, "--blob-store", f"s3://{s3_bucket}/team"]


@pytest.fixture
def pair(tmp_path: Path, team: list[str]):
    """Registry A (two worker processes) and registry B (one), each with a data dir of its own."""
    a = Registry(tmp_path / "host-a", token=TOKEN, extra_args=team, workers=2)
    b = Registry(tmp_path / "host-b", token=TOKEN, extra_args=team)
    yield a, b
    a.stop()
    b.stop()


def spawn_publish(artifact: Path, url: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "ATO_TOKEN": TOKEN, "HOME": str(home), "ATO_HOME": str(home / ".ato")}
    return subprocess.Popen([cli_path("ato"), "publish", "--artifact", str(artifact), "--registry", url, "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=DEADLINE)
        assert "Traceback" not in stderr, stderr
        out.append((p.returncode, stdout, stderr))
    return out


def install(url: str, ref: str, version: str, home: Path) -> Path:
    env = {**os.environ, "HOME": str(home), "ATO_HOME": str(home / ".ato")}
    res = subprocess.run([cli_path("ato"), "install", f"{ref}@{version}", "--registry", url, "--json",
                          *install_flags()], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert res.returncode == 0, res.stderr
    name = ref.split("/")[1]
    return home / ".ato" / "store" / "local" / name / version / f"{name}-{version}.capsule"


def test_30_racing_publishes_of_one_version_across_two_processes(tmp_path: Path, pair, team: list[str],
                                                                 s3_server) -> None:
    a, b = pair
    artifacts = []
    for i in range(30):
        project = make_project(tmp_path / f"r{i}", "race-app", "1.0.0", files={"x.bin": os.urandom(40_000)})
        built = build_in_process(project)
        artifacts.append(built.rename(tmp_path / f"race-{i}.capsule"))
    procs = [spawn_publish(art, (a, b)[i % 2].url, tmp_path / f"h{i}") for i, art in enumerate(artifacts)]
    results = finish(procs)
    winners = [i for i, (code, _o, _e) in enumerate(results) if code == 0]
    assert len(winners) == 1, [e[-300:] for _c, _o, e in results]
    losers = [e for i, (_c, _o, e) in enumerate(results) if i not in winners]
    assert len(losers) == 29 and all(results[i][0] == 1 for i in range(30) if i not in winners)
    assert all('"E202"' in e for e in losers), losers[:2]
    for reg in (a, b):
        detail = reg.get("/v1/capsules/by/local/race-app").json()
        assert [r["version"] for r in detail["releases"]] == ["1.0.0"]
        assert detail["releases"][0]["blake3"] == "blake3:" + digests(artifacts[winners[0]])["blake3"]
    for reg in (a, b):
        dist = reg.get("/v1/capsules/by/local/race-app/distributions").json()
        assert httpx.get(dist["artifact_url"], timeout=60).content == artifacts[winners[0]].read_bytes()
    # the bytes are in the bucket, none on either host; exactly one artifact object, no chunk objects
    bucket = team[3].removeprefix("s3://").split("/")[0]
    keys = s3_server.keys(bucket)
    assert [k for k in keys if k.startswith("team/artifacts/")] == ["team/artifacts/local/race-app/1.0.0/"
                                                                     "race-app-1.0.0.capsule"], keys
    assert not any(k.startswith("team/chunks/") for k in keys), keys
    assert not (a.data_dir / "artifacts").exists() and not (b.data_dir / "artifacts").exists()


def test_30_publishes_of_different_versions_lose_none_and_both_serve_the_same_bytes(tmp_path: Path, pair) -> None:
    a, b = pair
    shared = os.urandom(300_000)  # every version shares these chunks: both processes claim the same rows
    project = make_project(tmp_path / "multi", "multi-app", "1.0.0", files={"shared.bin": shared})
    artifacts = {}
    for i in range(30):
        version = f"1.0.{i}"
        set_version(project, version)
        (project / "own.bin").write_bytes(os.urandom(20_000))
        artifacts[version] = build_in_process(project).rename(tmp_path / f"multi-{version}.capsule")
    procs = [spawn_publish(art, (a, b)[i % 2].url, tmp_path / f"h{i}") for i, art in enumerate(artifacts.values())]
    results = finish(procs)
    assert [code for code, _o, _e in results] == [0] * 30, [e[-300:] for c, _o, e in results if c]
    for reg in (a, b):
        detail = reg.get("/v1/capsules/by/local/multi-app").json()
        assert sorted(r["version"] for r in detail["releases"]) == sorted(artifacts)
        assert detail["latest_version"] == "1.0.29"
        for r in detail["releases"]:
            assert r["blake3"] == "blake3:" + digests(artifacts[r["version"]])["blake3"]
    for version in ("1.0.0", "1.0.17", "1.0.29"):
        from_a = install(a.url, "local/multi-app", version, tmp_path / f"ca-{version}")
        from_b = install(b.url, "local/multi-app", version, tmp_path / f"cb-{version}")
        assert from_a.read_bytes() == from_b.read_bytes() == artifacts[version].read_bytes()


@pytest.mark.parametrize("point", ["registry.upload-received", "registry.commit"])
def test_a_process_killed_mid_upload_loses_nothing_the_other_acknowledged(tmp_path: Path, team: list[str],
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          point: str) -> None:
    b = Registry(tmp_path / "host-b", token=TOKEN, extra_args=team)
    monkeypatch.setenv(STOP_AT, point)
    a = Registry(tmp_path / "host-a", token=TOKEN, extra_args=team)  # freezes at `point` on its first publish
    monkeypatch.delenv(STOP_AT)
    try:
        shared = os.urandom(200_000)
        before = build_in_process(make_project(tmp_path / "before", "before-app", "1.0.0",
                                               files={"shared.bin": shared}))
        victim = build_in_process(make_project(tmp_path / "victim", "victim-app", "1.0.0",
                                               files={"shared.bin": shared, "own.bin": os.urandom(100_000)}))
        during = build_in_process(make_project(tmp_path / "during", "during-app", "1.0.0",
                                               files={"own.bin": os.urandom(100_000)}))
        assert finish([spawn_publish(before, b.url, tmp_path / "hb")])[0][0] == 0
        doomed = spawn_publish(victim, a.url, tmp_path / "hv")
        wait_stopped(a.proc, "registry A")
        # while A is frozen mid-publish (holding its transaction, if it got that far), B keeps publishing
        code, _o, err = finish([spawn_publish(during, b.url, tmp_path / "hd")])[0]
        assert code == 0, err
        kill9(a.proc)
        doomed.communicate(timeout=DEADLINE)
        assert doomed.returncode == 3  # the registry went away
        # nothing B acknowledged is lost, and the interrupted publish can be retried on B
        code, _o, err = finish([spawn_publish(victim, b.url, tmp_path / "hv")])[0]
        assert code == 0, err
        for art, name in ((before, "before-app"), (during, "during-app"), (victim, "victim-app")):
            assert install(b.url, f"local/{name}", "1.0.0", tmp_path / f"c-{name}").read_bytes() == art.read_bytes()
        restarted = Registry(tmp_path / "host-a", token=TOKEN, extra_args=team)
        try:
            got = install(restarted.url, "local/victim-app", "1.0.0", tmp_path / "c-again")
            assert got.read_bytes() == victim.read_bytes()
        finally:
            restarted.stop()
    finally:
        a.stop()
        b.stop()


def test_redirect_downloads_install_from_the_bucket(tmp_path: Path, team: list[str]) -> None:
    """With --redirect-downloads the registry answers artifact downloads with a presigned URL and
    ``ato install`` fetches the bytes from the bucket itself (checked against the digests as always)."""
    reg = Registry(tmp_path / "host", token=TOKEN, extra_args=[*team, "--redirect-downloads"])
    try:
        artifact = build_in_process(make_project(tmp_path / "p", "redirect-app", "1.0.0",
                                                 files={"x.bin": os.urandom(150_000)}))
        assert finish([spawn_publish(artifact, reg.url, tmp_path / "hp")])[0][0] == 0
        dist = reg.get("/v1/capsules/by/local/redirect-app/distributions").json()
        hop = httpx.get(dist["artifact_url"], timeout=60)
        assert hop.status_code == 307 and not hop.headers["location"].startswith(reg.url)
        assert install(reg.url, "local/redirect-app", "1.0.0", tmp_path / "c").read_bytes() == artifact.read_bytes()
    finally:
        reg.stop()


def test_a_bucket_that_is_not_there_is_refused_at_start(tmp_path: Path, s3_bucket: str) -> None:
    res = subprocess.run([cli_path("ato"), "registry", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                          "--blob-store", "s3://no-such-bucket/x"], capture_output=True, text=True, timeout=DEADLINE)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "no-such-bucket" in res.stderr and "does not exist" in res.stderr, res.stderr
    res = subprocess.run([cli_path("ato"), "registry", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                          "--blob-store", "ftp://x/y"], capture_output=True, text=True, timeout=DEADLINE)
    assert res.returncode != 0 and "s3://bucket/prefix" in res.stderr and "Traceback" not in res.stderr
