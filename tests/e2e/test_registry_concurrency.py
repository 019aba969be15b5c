"""Concurrency: 20 publishes of different capsules, 50 installs, and racing publishes of one version."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from cas import tempfiles
from pipeline.registry.blobs import open_blob_store
from tests.conftest import cli_path, sqlite_index_only
from tests.e2e.registry_support import (
    TOKEN,
    Registry,
    build_in_process,
    digests,
    install_flags,
    make_project,
)


def spawn(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([cli_path("ato"), *args], env={**os.environ, **env}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.fixture
def registry(tmp_path: Path, registry_backend):
    reg = Registry(tmp_path / "data", token=TOKEN, backend=registry_backend)
    yield reg
    reg.stop()


@sqlite_index_only
def test_20_concurrent_publishes_then_50_concurrent_installs(tmp_path: Path, registry: Registry) -> None:
    shared = os.urandom(200_000)  # every capsule shares these chunks: concurrent commits of the same objects
    artifacts = []
    for i in range(20):
        project = make_project(tmp_path / f"p{i}", f"conc-{i:02d}", "1.0.0",
                               files={"data/shared.bin": shared, "data/own.bin": os.urandom(50_000 + i)})
        artifacts.append(build_in_process(project))
    homes = [tmp_path / f"pub{i}" for i in range(20)]  # separate publisher machines
    procs = [spawn(["publish", "--artifact", str(a), "--registry", registry.url, "--json"],
                   {"ATO_TOKEN": TOKEN, "HOME": str(h), "ATO_HOME": str(h / ".ato")})
             for a, h in zip(artifacts, homes, strict=True)]
    results = finish(procs)
    assert [code for code, _o, _e in results] == [0] * 20, [e for c, _o, e in results if c]

    page = registry.get("/v1/capsules?limit=50").json()
    assert sorted(c["scoped_id"] for c in page["capsules"]) == [f"local/conc-{i:02d}" for i in range(20)]
    for i, artifact in enumerate(artifacts):
        want = digests(artifact)
        dist = registry.get(f"/v1/capsules/by/local/conc-{i:02d}/distributions").json()
        assert dist["blake3"] == "blake3:" + want["blake3"]
        assert httpx.get(dist["artifact_url"], timeout=30).content == artifact.read_bytes()
    # the registry's own blobs, written by 20 concurrent commits: one per artifact (the pack of its
    # chunks) and per payload manifest, no object per chunk, every chunk located in an artifact
    blobs = open_blob_store(registry.blob_store, registry.data_dir)
    keys = list(blobs.keys())
    assert len([k for k in keys if k.startswith("artifacts/")]) == 20 and not any(k.startswith("chunks/") for k in keys)
    assert len([k for k in keys if k.startswith("manifests/")]) == 20, keys
    assert not (registry.data_dir / "cas" / "objects").exists()

    # 50 installs at once: 5 consumer machines, 10 installs each (several into one store and CAS at a time)
    consumers = [tmp_path / f"consumer{i}" for i in range(5)]
    jobs = [(i % 20, consumers[i % 5]) for i in range(50)]
    procs = [spawn(["install", f"local/conc-{n:02d}", "--registry", registry.url, "--json", *install_flags()],
                   {"HOME": str(h), "ATO_HOME": str(h / ".ato")}) for n, h in jobs]
    results = finish(procs)
    assert [code for code, _o, _e in results] == [0] * 50, [e for c, _o, e in results if c][:3]
    for (n, home), (_code, _stdout, _stderr) in zip(jobs, results, strict=True):
        installed = home / ".ato" / "store" / "local" / f"conc-{n:02d}" / "1.0.0" / f"conc-{n:02d}-1.0.0.capsule"
        assert digests(installed) == digests(artifacts[n])
    for home in consumers:  # no temp files left behind in the stores or CAS
        leftovers = list(tempfiles.find(home / ".ato", recursive=True))
        assert leftovers == []
        verify = subprocess.run([cli_path("ato"), "cas", "verify", "--json"], capture_output=True, text=True,
                                env={**os.environ, "HOME": str(home), "ATO_HOME": str(home / ".ato")})
        assert verify.returncode == 0, verify.stderr


def test_racing_publishes_of_one_version_make_exactly_one_release(tmp_path: Path, registry: Registry) -> None:
    artifacts = []
    for i in range(4):  # four different artifacts claiming race-app 1.0.0
        project = make_project(tmp_path / f"r{i}", "race-app", "1.0.0", files={"x.bin": os.urandom(80_000)})
        artifacts.append(build_in_process(project))
        os.rename(artifacts[-1], tmp_path / f"race-{i}.capsule")
        artifacts[-1] = tmp_path / f"race-{i}.capsule"
    procs = [spawn(["publish", "--artifact", str(a), "--registry", registry.url, "--json"],
                   {"ATO_TOKEN": TOKEN, "HOME": str(tmp_path / f"h{i}"), "ATO_HOME": str(tmp_path / f"h{i}/.ato")})
             for i, a in enumerate(artifacts)]
    results = finish(procs)
    winners = [i for i, (code, _o, _e) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for i, (code, _o, stderr) in enumerate(results):
        if i not in winners:
            assert code == 1 and '"E202"' in stderr, stderr
    detail = registry.get("/v1/capsules/by/local/race-app").json()
    assert [r["version"] for r in detail["releases"]] == ["1.0.0"]
    assert detail["releases"][0]["blake3"] == "blake3:" + digests(artifacts[winners[0]])["blake3"]
    dist = registry.get("/v1/capsules/by/local/race-app/distributions").json()
    assert httpx.get(dist["artifact_url"], timeout=30).content == artifacts[winners[0]].read_bytes()
    # only the winner's artifact file exists; nothing is left in tmp/
    blobs = open_blob_store(registry.blob_store, registry.data_dir)
    assert list(blobs.keys("artifacts/")) == ["artifacts/local/race-app/1.0.0/race-app-1.0.0.capsule"]
    assert [p for p in (registry.data_dir / "tmp").rglob("*") if p.is_file()] == []
