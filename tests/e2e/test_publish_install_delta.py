"""Version 2 after version 1 moves only the changed chunks, both ways (bytes counted on the wire)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stages.capsule import read_capsule
from tests.conftest import assert_schema
from tests.e2e.registry_support import (
    TOKEN,
    CountingProxy,
    Registry,
    digests,
    install_flags,
    make_project,
    set_version,
)


@pytest.fixture
def registry(tmp_path: Path, registry_backend):
    reg = Registry(tmp_path / "data", token=TOKEN, backend=registry_backend)
    proxy = CountingProxy(reg.url)
    yield reg, proxy
    proxy.close()
    reg.stop()


def frames_of(artifact: Path) -> dict[str, int]:
    """raw hash → frame size (payload.tar.zst is the concatenation of these frames)."""
    return {c.raw_hash: c.zstd_size_hint for c in read_capsule(artifact).payload_manifest.chunks}


def test_v2_after_v1_transfers_only_changed_chunks(ato, tmp_path: Path, registry) -> None:
    reg, proxy = registry
    files = {f"assets/blob{i}.bin": os.urandom(400_000) for i in range(6)}
    project = make_project(tmp_path / "app", "delta-app", "1.0.0", files=files)
    built = Path(ato(["build", ".", "--json"], cwd=project).json()["artifact"])
    v1 = tmp_path / "v1.capsule"  # the v2 build writes the same <name>.capsule: keep v1's bytes aside
    shutil.copyfile(built, v1)
    pub1 = ato(["publish", "--artifact", str(v1), "--registry", proxy.url, "--json"], cwd=project,
               env={"ATO_TOKEN": TOKEN})
    assert pub1.code == 0, pub1.stderr

    consumer = {"HOME": str(tmp_path / "consumer"), "ATO_HOME": str(tmp_path / "consumer" / ".ato")}
    proxy.reset()
    i1 = ato(["install", "local/delta-app", "--registry", proxy.url, "--json", *install_flags()], env=consumer)
    assert i1.code == 0, i1.stderr
    d1 = i1.json()
    assert_schema(d1, "install")
    v1_size = v1.stat().st_size
    assert d1["transfer"]["chunks_downloaded"] == d1["transfer"]["chunks_total"] == len(frames_of(v1))
    assert proxy.down >= v1_size  # the first install moves the whole payload

    # version 2: one of six blobs changes
    (project / "assets" / "blob3.bin").write_bytes(os.urandom(400_000))
    set_version(project, "2.0.0")
    v2 = Path(ato(["build", ".", "--json"], cwd=project).json()["artifact"])
    old, new = frames_of(v1), frames_of(v2)
    changed = {h: size for h, size in new.items() if h not in old}
    changed_bytes = sum(changed.values())
    assert 0 < len(changed) < len(new) and changed_bytes < v2.stat().st_size / 3

    proxy.reset()
    pub2 = ato(["publish", "--artifact", str(v2), "--registry", proxy.url, "--json"], cwd=project,
               env={"ATO_TOKEN": TOKEN})
    assert pub2.code == 0, pub2.stderr
    t = pub2.json()["publish"]["transfer"]
    assert t["mode"] == "chunks" and t["chunks_uploaded"] == len(changed)
    skeleton = v2.stat().st_size - sum(new.values())  # bytes around the payload, sent once with the commit
    assert proxy.up < changed_bytes + 2 * skeleton + 64_000, (proxy.up, changed_bytes)

    proxy.reset()
    i2 = ato(["install", "local/delta-app", "--registry", proxy.url, "--json", *install_flags()], env=consumer)
    assert i2.code == 0, i2.stderr
    d2 = i2.json()
    assert_schema(d2, "install")
    t2 = d2["transfer"]
    assert t2["mode"] == "delta"
    assert t2["chunks_downloaded"] == len(changed) and t2["bytes_downloaded"] == changed_bytes
    assert t2["chunks_reused"] == len(new) - len(changed)
    # on the wire: the changed frames, the skeleton (base64 in JSON) and small JSON/headers; not the artifact
    assert changed_bytes <= proxy.down < changed_bytes + 2 * skeleton + 64_000, (proxy.down, changed_bytes)
    assert proxy.down < v2.stat().st_size / 2
    installed = Path(d2["path"])
    assert installed.name == "delta-app-2.0.0.capsule" and digests(installed) == digests(v2)
    # v1 is still installed next to it, byte-identical
    v1_installed = installed.parent.parent / "1.0.0" / "delta-app-1.0.0.capsule"
    assert digests(v1_installed) == digests(v1)


def test_release_whose_frames_are_not_its_chunks_is_installed_whole(ato, tmp_path: Path, registry) -> None:
    """An artifact compressed as one frame (not ato build's layout) is accepted but cannot be spliced."""
    reg, proxy = registry
    import hashlib

    import blake3
    import httpx

    from tests.e2e.registry_support import forge_capsule
    artifact = forge_capsule(tmp_path / "one-frame-1.0.0.capsule", "one-frame", "1.0.0",
                             members=[("main.py", b"print(1)\n"), ("big.bin", os.urandom(300_000))],
                             single_frame=True)
    data = artifact.read_bytes()
    r = httpx.put(reg.url + "/v1/local/capsules/local/one-frame/1.0.0", content=data, timeout=60,
                  headers={"authorization": f"Bearer {TOKEN}",
                           "x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                           "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest()})
    assert r.status_code == 201 and r.json()["spliceable"] is False, r.text
    assert reg.get("/v1/releases/local/one-frame/1.0.0/skeleton").json()["error"] == "not_spliceable"
    consumer = {"HOME": str(tmp_path / "c"), "ATO_HOME": str(tmp_path / "c" / ".ato")}
    res = ato(["install", "local/one-frame", "--registry", proxy.url, "--json", *install_flags()], env=consumer)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["transfer"]["mode"] == "full" and doc["transfer"]["bytes_downloaded"] == len(data)
    assert Path(doc["path"]).read_bytes() == data
    # the CLI publishes such an artifact whole, too (no chunk protocol possible)
    again = forge_capsule(tmp_path / "one-frame-2.0.0.capsule", "one-frame", "2.0.0",
                          members=[("main.py", b"print(2)\n"), ("big.bin", os.urandom(300_000))],
                          single_frame=True)
    pub = ato(["publish", "--artifact", str(again), "--registry", reg.url, "--json"], env={"ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr
    assert pub.json()["publish"]["transfer"]["mode"] == "full"
