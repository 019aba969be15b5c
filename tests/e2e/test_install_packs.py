"""`ato install` on the pack store: the installed artifact is its own pack (one copy on disk), uninstalled
packs are collected, an install done by an earlier ato is adopted, and a build and installs running
at once into one ATO_HOME leave a store `ato cas verify` accepts."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from cas.objects import ObjectStore
from cas.payload_manifest import PayloadManifest
from stages.capsule import read_capsule
from tests.conftest import cli_path
from tests.e2e.registry_support import TOKEN, Registry, install_flags, make_project, set_version


def home(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(root), "ATO_HOME": str(root / ".ato")}


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "data", token=TOKEN)
    yield reg
    reg.stop()


def publish(ato, tmp_path: Path, registry: Registry, version: str = "0.1.0", seed: int = 3) -> Path:
    rng = random.Random(seed)
    project = make_project(tmp_path / "src", "packed", version,
                           files={f"assets/blob{i}.bin": rng.randbytes(2_000_000) for i in range(4)})
    set_version(project, version)
    built = ato(["build", str(project), "--json"], env=home(tmp_path / "publisher"))
    assert built.code == 0, built.stderr
    artifact = Path(built.json()["artifact"])
    res = ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--json"],
              env={**home(tmp_path / "publisher"), "ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr
    return artifact


def install(ato, registry: Registry, env: dict[str, str], version: str | None = None) -> dict:
    args = ["install", "local/packed", "--registry", registry.url, "--json", *install_flags()]
    res = ato(args + (["--version", version] if version else []), env=env)
    assert res.code == 0, res.stderr
    return res.json()


def test_an_installed_artifact_is_stored_once_and_is_its_own_pack(ato, tmp_path: Path, registry: Registry) -> None:
    artifact = publish(ato, tmp_path, registry)
    env = home(tmp_path / "consumer")
    doc = install(ato, registry, env)
    stored = Path(doc["path"])
    ato_home = Path(env["ATO_HOME"])
    packs = list((ato_home / "cas" / "packs").iterdir())
    assert [p.name for p in packs] == [doc["content_hash"].split(":")[1] + ".capsule"]
    assert packs[0].stat().st_ino == stored.stat().st_ino  # one inode: the bytes are on disk once
    assert stored.read_bytes() == artifact.read_bytes()
    assert not (ato_home / "cas" / "objects").exists()
    assert du(ato_home) <= 1.05 * artifact.stat().st_size, (du(ato_home), artifact.stat().st_size)
    res = ato(["cas", "verify", "--json"], env=env)
    assert res.code == 0 and res.json()["packs_checked"] == 1 and res.json()["objects_ok"] == doc["transfer"][
        "chunks_total"]
    gc = ato(["cas", "gc", "--json"], env=env)
    assert gc.code == 0 and gc.json()["packs_removed"] == 0 and gc.json()["objects_removed"] == 0
    assert install(ato, registry, env)["up_to_date"] is True
    # uninstalled (the store file removed): its pack is garbage
    stored.unlink()
    gc = ato(["cas", "gc", "--json"], env=env)
    assert gc.code == 0 and gc.json()["packs_removed"] == 1, gc.stdout
    assert list((ato_home / "cas" / "packs").iterdir()) == []
    # and a reinstall downloads it again
    again = install(ato, registry, env)
    assert again["transfer"]["chunks_downloaded"] == again["transfer"]["chunks_total"]


def test_v2_over_v1_downloads_only_new_chunks_and_splices_the_rest_from_the_v1_pack(
        ato, tmp_path: Path, registry: Registry) -> None:
    publish(ato, tmp_path, registry, "0.1.0")
    env = home(tmp_path / "consumer")
    install(ato, registry, env)
    rng = random.Random(3)
    files = {f"assets/blob{i}.bin": rng.randbytes(2_000_000) for i in range(4)}
    files["assets/blob2.bin"] = random.Random(99).randbytes(2_000_000)
    project = make_project(tmp_path / "src", "packed", "0.2.0", files=files)
    set_version(project, "0.2.0")
    built = ato(["build", str(project), "--json"], env=home(tmp_path / "publisher"))
    res = ato(["publish", "--artifact", built.json()["artifact"], "--registry", registry.url, "--json"],
              env={**home(tmp_path / "publisher"), "ATO_TOKEN": TOKEN})
    assert res.code == 0, res.stderr
    doc = install(ato, registry, env, "0.2.0")
    t = doc["transfer"]
    assert t["chunks_reused"] > 0 and t["chunks_downloaded"] < t["chunks_total"] // 2, t
    assert ato(["cas", "verify", "--json"], env=env).json()["packs_checked"] == 2


def test_an_install_done_by_an_earlier_ato_is_adopted(ato, tmp_path: Path, registry: Registry,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The old layout: the artifact in store/, each chunk again under cas/objects, a JSON manifest."""
    artifact = publish(ato, tmp_path, registry)
    env = home(tmp_path / "consumer")
    ato_home = Path(env["ATO_HOME"])
    target = ato_home / "store" / "local" / "packed" / "0.1.0" / "packed-0.1.0.capsule"
    target.parent.mkdir(parents=True)
    target.write_bytes(artifact.read_bytes())
    capsule = read_capsule(target)
    manifest: PayloadManifest = capsule.payload_manifest
    objects = ObjectStore(ato_home / "cas")
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(
        artifact.read_bytes()[capsule.payload_offset:capsule.payload_offset + capsule.payload_size],
        read_across_frames=True).read()
    offset = 0
    for c in manifest.chunks:
        objects.put(raw[offset:offset + c.raw_size])
        offset += c.raw_size
    legacy = ato_home / "cas" / "manifests" / "blake3" / f"{manifest.artifact_hash}.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(manifest.to_bytes())
    assert ato(["cas", "verify", "--json"], env=env).code == 0  # the old layout reads as it is
    doc = install(ato, registry, env)
    assert doc["up_to_date"] is True
    pack = ato_home / "cas" / "packs" / (doc["content_hash"].split(":")[1] + ".capsule")
    assert pack.stat().st_ino == target.stat().st_ino
    gc = ato(["cas", "gc", "--json"], env=env)
    assert gc.code == 0 and gc.json()["objects_removed"] == len({c.raw_hash for c in manifest.chunks})
    assert not (ato_home / "cas" / "objects").exists() and not (ato_home / "cas" / "manifests").exists()
    res = ato(["cas", "verify", "--json"], env=env)
    assert res.code == 0 and res.json()["manifests_checked"] == 1 and res.json()["packs_checked"] == 1


def test_a_build_and_installs_at_once_into_one_home(ato, tmp_path: Path, registry: Registry) -> None:
    publish(ato, tmp_path, registry, "0.1.0", seed=3)
    publish(ato, tmp_path / "second", registry, "0.2.0", seed=4)
    env = {**os.environ, **home(tmp_path / "shared")}
    rng = random.Random(5)
    project = make_project(tmp_path / "local-src", "local-one", files={"data.bin": rng.randbytes(3_000_000)})
    procs = [
        subprocess.Popen([cli_path("ato"), "build", str(project), "--json"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True),
        *[subprocess.Popen([cli_path("ato"), "install", "local/packed", "--version", v, "--registry", registry.url,
                            "--json", *install_flags()], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for v in ("0.1.0", "0.2.0", "0.1.0")],
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    res = ato(["cas", "verify", "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["ok"] and doc["packs_checked"] == 3 and doc["unindexed_packs"] == [] and doc["leftover_temps"] == []
