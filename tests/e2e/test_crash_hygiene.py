"""``kill -9`` in the middle of build, install, publish and the registry, then a retry.

Each test runs the real ``ato`` (or ``ato registry serve``) as a subprocess with
``ATO_TEST_STOP_AT=<point>`` (cas/stoppoints.py): the process freezes itself at that point,
the test checks it really is frozen there with its temp files written, then sends SIGKILL.
Points and what is on disk when they are reached:

- ``artifact.written``: the build's whole ``.capsule`` in its temp file, not renamed;
- ``cas.publish-temps``: a build's new CAS frames in a temp pack, not renamed;
- ``cas.pack-renamed``: an install's verified artifact linked into ``cas/packs/``, not yet in the
  index, and still in its temp file (or a build's pack renamed, not yet in the index);
- ``unpack.written`` (run) / ``fetch.unpacked``: the payload tree in its temp dir, not renamed;
- ``install.downloaded``: the downloaded artifact in its temp file, nothing stored;
- ``publish.uploading``: the registry holds the uploaded frames in a session, no commit (a delta
  publish: a first one sends the whole file in one request);
- ``registry.upload-received``: the registry has the uploaded artifact (or frames) in a temp file;
- ``registry.commit``: the registry linked objects and the artifact, the rows not committed.

After the kill: the retry succeeds, ``ato cas verify`` is clean, no temp file is left after
``ato cas gc`` / a registry restart, and a rebuild is byte-identical to a clean build.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from cas import tempfiles
from cas.stoppoints import ENV as STOP_AT
from tests.conftest import assert_schema, cli_path, home_env, process_state
from tests.e2e.registry_support import TOKEN, Registry, digests, install_flags, make_project, set_version

DEADLINE = 120.0


def wait_stopped(proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    """Wait (generously) until ``proc`` has frozen itself at its stop point."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process_state(proc.pid) == "T":
            return
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log else ""
            pytest.fail(f"{what} exited with {proc.returncode} before its stop point: {detail}")
        time.sleep(0.02)
    pytest.fail(f"{what} never reached its stop point")


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def ato_killed_at(point: str, args: list[str], *, env: dict[str, str], cwd: Path, tmp: Path) -> None:
    """Run ``ato args`` until it freezes at ``point``, then ``kill -9`` it."""
    log = tmp / f"killed-{point}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([cli_path("ato"), *args], cwd=cwd, env={**os.environ, **env, STOP_AT: point},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_stopped(proc, f"ato {args[0]}", log)
    finally:
        if proc.poll() is None:
            kill9(proc)


def temps(*roots: Path) -> list[Path]:
    return [p for root in roots for p in tempfiles.find(root, recursive=True)]


def assert_cas_clean(ato, env: dict[str, str]) -> None:
    """``ato cas verify`` finds every object intact and no temp file left behind."""
    res = ato(["cas", "verify", "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cas-verify")
    assert doc["ok"] and doc["leftover_temps"] == [] and doc["leftover_temp_bytes"] == 0, doc


def gc_leaves_no_temps(ato, env: dict[str, str], *roots: Path) -> None:
    res = ato(["cas", "gc", "--json"], env=env)
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "cas-gc")
    assert temps(*roots) == []


def crash_project(root: Path) -> Path:
    rng = random.Random(12)  # the same bytes every run: the reference build is reproducible
    files = {f"assets/blob{i}.bin": rng.randbytes(300_000) for i in range(4)}
    return make_project(root, "crashy", "0.1.0", files=files)


# ------------------------------------------------------------------ build


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A clean build of the crash project, in a home of its own."""
    root = tmp_path_factory.mktemp("reference")
    project = crash_project(root / "p")
    proc = subprocess.run([cli_path("ato"), "build", ".", "--json"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **home_env(root / "home")}, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    return Path(json.loads(proc.stdout)["artifact"]).read_bytes()


@pytest.mark.parametrize("point", ["cas.publish-temps", "artifact.written"])
def test_build_killed_then_rebuilt_is_byte_identical(ato, tmp_path: Path, reference: bytes, point: str) -> None:
    project = crash_project(tmp_path / "p")
    env = home_env(tmp_path / "home")
    ato_home = Path(env["ATO_HOME"])
    ato_killed_at(point, ["build", "."], env=env, cwd=project, tmp=tmp_path)
    left = temps(ato_home)
    assert left, "the build was killed holding temp files"
    assert temps(project) == [], "the temp artifact is written outside the tree the build packs"
    assert not list(project.glob("*.capsule"))

    res = ato(["build", ".", "--json"], cwd=project, env=env)
    assert res.code == 0, res.stderr
    assert Path(res.json()["artifact"]).read_bytes() == reference
    assert not any(p.exists() for p in left), "the next build sweeps what the killed one left"
    assert_cas_clean(ato, env)
    gc_leaves_no_temps(ato, env, ato_home, project)


def test_a_killed_builds_temp_artifact_in_the_project_is_never_packed(ato, tmp_path: Path,
                                                                     reference: bytes) -> None:
    """Leftovers of older builds (and anything named like ato's temps) stay out of the payload."""
    project = crash_project(tmp_path / "p")
    (project / ".crashy-0.1.0.capsule.k3j2h1g0.tmp").write_bytes(os.urandom(1 << 20))  # an older ato's name
    (project / tempfiles.temp_name("crashy.capsule")).write_bytes(os.urandom(1 << 20))
    res = ato(["build", ".", "--json"], cwd=project, env=home_env(tmp_path / "home"))
    assert res.code == 0, res.stderr
    assert Path(res.json()["artifact"]).read_bytes() == reference


def test_a_live_writers_temp_file_is_never_swept(ato, tmp_path: Path) -> None:
    """A sweep removes only temp files whose owner is gone: this test process's own stay."""
    env = home_env(tmp_path / "home")
    cas_tmp = Path(env["ATO_HOME"]) / "cas" / "tmp"
    cas_tmp.mkdir(parents=True)
    mine = cas_tmp / tempfiles.temp_name("live.zst")
    mine.write_bytes(b"in progress")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # a name owned by another live process (same pid and start time as /proc reports)
        start = Path(f"/proc/{sleeper.pid}/stat").read_bytes()
        ticks = start[start.rfind(b")") + 2:].split()[19].decode()
        theirs = cas_tmp / f".other.zst.{sleeper.pid}-{ticks}.0badf00d{tempfiles.SUFFIX}"
        theirs.write_bytes(b"also in progress")
        recycled = cas_tmp / f".old.zst.{sleeper.pid}-{int(ticks) - 1}.0badf00d{tempfiles.SUFFIX}"  # pid reused
        recycled.write_bytes(b"left by a dead process whose pid was reused")
        res = ato(["cas", "gc", "--json"], env=env)
        assert res.code == 0, res.stderr
        assert mine.exists() and theirs.exists() and not recycled.exists()
        assert res.json()["temps_removed"] == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    res = ato(["cas", "verify", "--json"], env=env)
    assert res.json()["leftover_temps"] == [str(theirs)]  # the sleeper is gone now; this process is not
    assert "ato cas gc" in ato(["cas", "verify"], env=env).stdout


@pytest.mark.parametrize("verb,point", [("run", "unpack.written"), ("fetch", "fetch.unpacked")])
def test_run_and_fetch_killed_mid_unpack_then_retried(ato, tmp_path: Path, verb: str, point: str) -> None:
    """A killed unpack leaves only a temp dir: never taken for a complete tree, swept by the next run/fetch."""
    project = crash_project(tmp_path / "p")
    if verb == "run":  # a program Tier 1 runs (Node under Deno) with nothing to install
        (project / "capsule.toml").write_text((project / "capsule.toml").read_text().replace(
            'driver = "python"', 'driver = "node"').replace('entrypoint = "main.py"', 'entrypoint = "main.js"'))
        (project / "main.js").write_text("console.log('hello from crashy')\n")
        (project / "capsule.lock").write_text('version = "1"\n')
        (project / "package-lock.json").write_text('{"lockfileVersion": 3, "packages": {}}\n')
    env = home_env(tmp_path / "home")
    ato_home = Path(env["ATO_HOME"])
    res = ato(["build", ".", "--json"], cwd=project, env=env)
    assert res.code == 0, res.stderr
    artifact = res.json()["artifact"]
    args = [verb, artifact, "--yes"] if verb == "run" else [verb, artifact]
    ato_killed_at(point, args, env=env, cwd=tmp_path, tmp=tmp_path)
    left = temps(ato_home)
    assert left and all(p.is_dir() for p in left), left
    trees = ato_home / ("unpacked" if verb == "run" else "fetches")
    assert [p for p in trees.iterdir() if p not in left] == [], "nothing but the temp dir is there"

    res = ato(args, cwd=tmp_path, env=env)
    assert res.code == 0, res.stderr
    if verb == "run":
        assert "hello from crashy" in res.stdout
    assert not any(p.exists() for p in left), f"the next {verb} sweeps what the killed one left"
    assert temps(ato_home) == []
    assert_cas_clean(ato, env)


# ------------------------------------------------------------------ install and publish


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "data", token=TOKEN)
    yield reg
    reg.stop()


def built_artifact(ato, tmp_path: Path) -> Path:
    project = crash_project(tmp_path / "src")
    res = ato(["build", ".", "--json"], cwd=project, env=home_env(tmp_path / "publisher"))
    assert res.code == 0, res.stderr
    return Path(res.json()["artifact"])


def publish(ato, artifact: Path, url: str, tmp_path: Path):
    return ato(["publish", "--artifact", str(artifact), "--registry", url, "--json"], cwd=tmp_path,
               env={**home_env(tmp_path / "publisher"), "ATO_TOKEN": TOKEN})


@pytest.mark.parametrize("point", ["install.downloaded", "cas.pack-renamed"])
def test_install_killed_then_retried(ato, tmp_path: Path, registry, point: str) -> None:
    artifact = built_artifact(ato, tmp_path)
    assert publish(ato, artifact, registry.url, tmp_path).code == 0
    env = home_env(tmp_path / "consumer")
    args = ["install", "local/crashy", "--registry", registry.url, *install_flags()]
    ato_killed_at(point, args, env=env, cwd=tmp_path, tmp=tmp_path)
    ato_home = Path(env["ATO_HOME"])
    left = temps(ato_home)
    assert left
    version_dir = ato_home / "store" / "local" / "crashy" / "0.1.0"
    assert not list(version_dir.glob("*.capsule"))

    res = ato([*args, "--json"], env=env)
    assert res.code == 0, res.stderr
    assert digests(Path(res.json()["path"])) == digests(artifact)
    assert not any(p.exists() for p in left), "the next install sweeps what the killed one left"
    assert_cas_clean(ato, env)
    gc_leaves_no_temps(ato, env, ato_home)


def staged_batches(data: Path) -> list[Path]:
    return sorted((data / "sessions").glob("*/*.frames"))


def test_publish_killed_mid_upload_then_retried(ato, tmp_path: Path) -> None:
    """The killed client's upload session outlives a registry restart (another worker may be serving
    it); the retry succeeds in a new session, and the old one goes when it expires."""
    data = tmp_path / "data"
    reg = Registry(data, token=TOKEN)
    try:
        assert publish(ato, built_artifact(ato, tmp_path), reg.url, tmp_path).code == 0
        # 0.2.0 changes one blob: a delta, its new frames uploaded into a session
        project = tmp_path / "src"
        (project / "assets" / "blob1.bin").write_bytes(random.Random(13).randbytes(300_000))
        set_version(project, "0.2.0")
        res = ato(["build", ".", "--json"], cwd=project, env=home_env(tmp_path / "publisher"))
        assert res.code == 0, res.stderr
        artifact = Path(res.json()["artifact"])
        env = {**home_env(tmp_path / "publisher"), "ATO_TOKEN": TOKEN}
        ato_killed_at("publish.uploading", ["publish", "--artifact", str(artifact), "--registry", reg.url],
                      env=env, cwd=tmp_path, tmp=tmp_path)
        left = staged_batches(data)
        assert left, "the registry holds the killed upload's frames in its session"
        res = publish(ato, artifact, reg.url, tmp_path)
        assert res.code == 0, res.stderr
        assert res.json()["publish"]["already_existed"] is False
        assert res.json()["publish"]["transfer"]["mode"] == "chunks"
    finally:
        reg.stop()
    reg = Registry(data, token=TOKEN)  # restart: temps of the killed processes go, open sessions stay
    try:
        assert temps(data) == []
        assert staged_batches(data) == left
        assert_installs_the_same_bytes(ato, reg.url, artifact, tmp_path, "0.2.0")
    finally:
        reg.stop()
    gc = ato(["registry", "gc", "--data-dir", str(data), "--json"])
    assert gc.code == 0, gc.stderr
    assert_schema(gc.json(), "registry-gc")
    assert gc.json()["sessions_expired"] == 0 and staged_batches(data) == left
    # an hour later: the session has expired
    db = sqlite3.connect(data / "registry.sqlite3")
    db.execute("UPDATE upload_sessions SET expires_at = expires_at - 7200")
    db.commit()
    db.close()
    gc = ato(["registry", "gc", "--data-dir", str(data), "--json"])
    # the killed upload's session (and the one the first publish negotiated before it sent the whole file)
    assert gc.code == 0 and gc.json()["sessions_expired"] >= 1, gc.stdout
    assert staged_batches(data) == [] and not any((data / "sessions").glob("*"))  # nothing, or no dir at all
    assert_cas_clean(ato, home_env(tmp_path / "publisher"))


def assert_installs_the_same_bytes(ato, url: str, artifact: Path, tmp_path: Path, version: str = "0.1.0") -> None:
    env = home_env(tmp_path / "installer")
    res = ato(["install", "local/crashy", "--version", version, "--registry", url, "--json", *install_flags()],
              env=env)
    assert res.code == 0, res.stderr
    assert digests(Path(res.json()["path"])) == digests(artifact)
    shutil.rmtree(tmp_path / "installer")


@pytest.mark.parametrize("point", ["registry.upload-received", "registry.commit"])
def test_registry_killed_mid_publish_then_restarted(ato, tmp_path: Path, monkeypatch, point: str) -> None:
    artifact = built_artifact(ato, tmp_path)
    data = tmp_path / "data"
    monkeypatch.setenv(STOP_AT, point)
    reg = Registry(data, token=TOKEN)
    monkeypatch.delenv(STOP_AT)
    log = tmp_path / "publish.log"
    try:
        with open(log, "wb") as out:
            client = subprocess.Popen(
                [cli_path("ato"), "publish", "--artifact", str(artifact), "--registry", reg.url],
                cwd=tmp_path, env={**os.environ, **home_env(tmp_path / "publisher"), "ATO_TOKEN": TOKEN},
                stdout=out, stderr=subprocess.STDOUT)
        wait_stopped(reg.proc, "ato registry serve")
        assert temps(data), "the registry was killed holding temp files"
        kill9(reg.proc)
        client.wait(DEADLINE)
        assert client.returncode == 3, log.read_text()  # E900: the registry went away
        assert "Traceback" not in log.read_text()
    finally:
        reg.stop()
    reg = Registry(data, token=TOKEN)  # restart on the same data dir
    try:
        assert temps(data) == [], "a restart sweeps what the killed server left"
        res = publish(ato, artifact, reg.url, tmp_path)
        assert res.code == 0, res.stderr
        assert_installs_the_same_bytes(ato, reg.url, artifact, tmp_path)
        # what is left is the running server's own (its chunk-upload sessions), nothing of the killed one
        assert [p for p in temps(data) if not tempfiles.owner_alive(p.name)] == []
    finally:
        reg.stop()
