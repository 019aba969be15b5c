"""`ato build` on the pack store: the same bytes as an independent construction, incremental rebuilds equal
to cold ones, concurrent builds, a build killed mid-write, and gc keeping what build records need."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import blake3
import rfc8785
import zstandard
from fastcdc import fastcdc_cy

from stages.payload import RECORD_NAME, record_artifact_hash
from tests.conftest import assert_schema, cli_path

EPOCH = 1_700_000_000
MANIFEST = """\
schema_version = "0.2"
name = "{name}"
version = "1.0.0"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "src/main.py"
"""


def make_project(root: Path, name: str = "packed", seed: int = 1, big: int = 900_000) -> Path:
    import random

    rng = random.Random(seed)
    (root / "src" / "deep" / "er").mkdir(parents=True)
    (root / "capsule.toml").write_text(MANIFEST.format(name=name))
    main = root / "src" / "main.py"
    main.write_text("print('hello')\n")
    main.chmod(0o755)
    (root / "src" / "notes.txt").write_text("".join(f"line {i} {rng.random()}\n" for i in range(4000)))
    (root / "src" / "deep" / "er" / "blob.bin").write_bytes(rng.randbytes(big))
    (root / "src" / "empty.txt").write_bytes(b"")
    os.symlink("main.py", root / "src" / "alias.py")
    return root


def build(ato, project: Path, *extra: str, home: Path | None = None) -> dict:
    env = {"SOURCE_DATE_EPOCH": str(EPOCH)}
    if home is not None:
        env["ATO_HOME"] = str(home)
    res = ato(["build", str(project), "--json", *extra], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "build")
    return doc


# ---------------------------------------------------------------- an independent construction of the bytes


def _ustar(name: str, size: int, mode: int, typeflag: bytes, link: str = "") -> bytes:
    """A POSIX ustar header as CONTRACTS.md §3 fixes it: uid/gid 0, no user/group names, mtime = epoch."""
    block = bytearray(512)
    block[0:100] = name.encode().ljust(100, b"\0")
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"%07o\0" % 0
    block[116:124] = b"%07o\0" % 0
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % EPOCH
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = link.encode().ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _reference_payload(project: Path) -> tuple[bytes, bytes, dict[str, str]]:
    """(payload.tar.zst, payload.v3.manifest.json, sha256 by path), built from the contract alone."""
    members = []
    for path in sorted(project.rglob("*"), key=lambda p: str(p.relative_to(project)).encode()):
        rel = str(path.relative_to(project))
        if rel in ("capsule.toml",) or path.is_dir() and not path.is_symlink():
            continue
        members.append((rel, path))
    tar, sha = bytearray(), {}
    for rel, path in members:
        if path.is_symlink():
            tar += _ustar(rel, 0, 0o777, b"2", os.readlink(path))
            continue
        data = path.read_bytes()
        mode = 0o755 if os.stat(path).st_mode & 0o111 else 0o644
        tar += _ustar(rel, len(data), mode, b"0") + data + b"\0" * (-len(data) % 512)
        sha[rel] = hashlib.sha256(data).hexdigest()
    tar += b"\0" * 1024
    comp = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    frames, chunks = [], []
    for c in fastcdc_cy.fastcdc_cy(bytes(tar), 16 * 1024, 64 * 1024, 256 * 1024, fat=False, hf=None):
        raw = bytes(tar[c.offset:c.offset + c.length])
        frame = comp.compress(raw)
        frames.append(frame)
        chunks.append((blake3.blake3(raw).hexdigest(), len(raw), len(frame)))
    params = {"algorithm": "fastcdc", "min_size": 16384, "avg_size": 65536, "max_size": 262144, "seed": 0}
    core = {"schema_version": 3, "cdc_params": params, "total_raw_size": len(tar),
            "chunks": [{"raw_hash": "blake3:" + h, "raw_size": n} for h, n, _ in chunks]}
    doc = dict(core, artifact_hash="blake3:" + blake3.blake3(rfc8785.dumps(core)).hexdigest(),
               chunks=[{"raw_hash": "blake3:" + h, "raw_size": n, "zstd_size_hint": z} for h, n, z in chunks])
    return b"".join(frames), rfc8785.dumps(doc), sha


def test_artifact_bytes_match_an_independent_construction(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    doc = build(ato, project, "--out", str(tmp_path / "out.capsule"))
    artifact = (tmp_path / "out.capsule").read_bytes()
    payload, manifest_json, sha = _reference_payload(project)
    with tarfile.open(tmp_path / "out.capsule") as tf:
        names = tf.getnames()
        member = {n: tf.extractfile(n).read() for n in names}
    assert names == ["capsule.toml", "capsule.lock.json", "sbom.spdx.json", "signature.json", "payload.tar.zst",
                     "payload.v3.manifest.json"]
    assert member["payload.tar.zst"] == payload
    assert member["payload.v3.manifest.json"] == manifest_json
    sbom = json.loads(member["sbom.spdx.json"])
    assert {f["fileName"]: f["checksums"][0]["checksumValue"] for f in sbom["files"]} == sha
    # the outer tar, framed from the contract: normalized headers, padding, two zero blocks, 10 KiB records
    outer = bytearray()
    for n in names:
        data = member[n]
        outer += _ustar(n, len(data), 0o644, b"0") + data + b"\0" * (-len(data) % 512)
    outer += b"\0" * 1024
    outer += b"\0" * (-len(outer) % 10240)
    assert artifact == bytes(outer)
    assert doc["artifact_blake3"] == "blake3:" + blake3.blake3(artifact).hexdigest()


# ---------------------------------------------------------------- incremental


def test_a_one_file_rebuild_reads_one_file_and_equals_a_cold_build(ato, tmp_path: Path, isolated_home: Path) -> None:
    project = make_project(tmp_path / "p", big=3_000_000)
    out = tmp_path / "out.capsule"
    first = build(ato, project, "--out", str(out))
    assert first["payload"]["files_read"] == 4  # main.py, notes.txt, blob.bin, empty.txt
    noop = build(ato, project, "--out", str(out))
    assert noop["up_to_date"] and noop["payload"]["files_read"] == 0
    with open(project / "src" / "notes.txt", "a") as fh:
        fh.write("one more line\n")
    again = build(ato, project, "--out", str(out))
    assert [t["status"] for t in again["tasks"]] == ["ran", "ran", "ran"]
    assert again["payload"]["files_read"] == 1 and 1 <= again["payload"]["chunks_inserted"] <= 3
    cold = build(ato, project, "--out", str(tmp_path / "cold.capsule"), home=tmp_path / "fresh-home")
    assert cold["payload"]["files_read"] == 4
    assert out.read_bytes() == (tmp_path / "cold.capsule").read_bytes()
    # the rebuild added about one chunk to the store, not a second copy of the payload
    assert again["payload"]["bytes_inserted"] < first["payload"]["bytes_inserted"] // 10
    res = ato(["build", str(project), "--out", str(out), "--explain"], env={"SOURCE_DATE_EPOCH": str(EPOCH)})
    assert res.code == 0 and "up-to-date" in res.stdout
    (project / "src" / "main.py").write_text("print('changed')\n")
    res = ato(["build", str(project), "--out", str(out), "--explain"], env={"SOURCE_DATE_EPOCH": str(EPOCH)})
    assert res.code == 0 and "changed file dep" in res.stdout and "src/main.py" in res.stdout


# ---------------------------------------------------------------- concurrency, crashes, gc


def test_concurrent_builds_into_one_home_leave_a_store_verify_accepts(ato, tmp_path: Path,
                                                                      isolated_home: Path) -> None:
    projects = [make_project(tmp_path / f"p{i}", name=f"c{i}", seed=i % 2) for i in range(3)]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH))
    procs = []
    for i, project in enumerate(projects + [projects[0]]):  # two builds of p0 at once, too
        out = tmp_path / f"out-{i}.capsule"
        procs.append((out, subprocess.Popen([cli_path("ato"), "build", str(project), "--out", str(out), "--json"],
                                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for _out, proc in procs:
        _stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0, res.stderr
    assert res.json()["ok"] and res.json()["manifests_checked"] == 2  # p0 and p2 pack the same files
    for i, project in enumerate(projects):
        ref = tmp_path / f"ref-{i}.capsule"
        build(ato, project, "--out", str(ref), home=tmp_path / f"ref-home-{i}")
        assert ref.read_bytes() == (tmp_path / f"out-{i}.capsule").read_bytes()
    assert (tmp_path / "out-3.capsule").read_bytes() == (tmp_path / "out-0.capsule").read_bytes()


def test_a_build_killed_while_writing_its_pack_leaves_a_sound_store(ato, tmp_path: Path, isolated_home: Path) -> None:
    project = make_project(tmp_path / "p", big=40_000_000)
    tmp_dir = isolated_home / ".ato" / "cas" / "tmp"
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH))
    proc = subprocess.Popen([cli_path("ato"), "build", str(project), "--json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_dir.is_dir() and any(p.stat().st_size > 1_000_000 for p in tmp_dir.iterdir())):
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0 and res.json()["leftover_temps"], res.stdout
    doc = build(ato, project)
    ref = build(ato, project, "--out", str(tmp_path / "ref.capsule"), home=tmp_path / "ref-home")
    assert Path(doc["artifact"]).read_bytes() == (tmp_path / "ref.capsule").read_bytes() and ref["ok"]
    res = ato(["cas", "gc", "--json"])
    assert res.code == 0
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0 and res.json()["leftover_temps"] == [] and res.json()["unindexed_packs"] == []


def test_a_build_killed_between_pack_rename_and_index_commit(ato, tmp_path: Path, isolated_home: Path) -> None:
    """The pack is in packs/ but the index never heard of it: verify says so, gc removes it, a rebuild is clean."""
    project = make_project(tmp_path / "p")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH), ATO_TEST_STOP_AT="cas.pack-renamed")
    proc = subprocess.Popen([cli_path("ato"), "build", str(project), "--json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _proc_state(proc.pid) != "T":
        assert proc.poll() is None and time.monotonic() < deadline, "the build never reached its stop point"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0 and len(res.json()["unindexed_packs"]) == 1, res.stdout
    doc = build(ato, project)
    ref = build(ato, project, "--out", str(tmp_path / "ref.capsule"), home=tmp_path / "ref-home")
    assert Path(doc["artifact"]).read_bytes() == (tmp_path / "ref.capsule").read_bytes() and ref["ok"]
    gc = ato(["cas", "gc", "--json"])
    assert gc.code == 0 and gc.json()["packs_removed"] == 1
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0 and res.json()["unindexed_packs"] == [] and res.json()["packs_checked"] == 1


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    return stat[stat.rfind(b")") + 2:].split()[0].decode()


def test_gc_keeps_every_chunk_a_build_record_needs(ato, tmp_path: Path, isolated_home: Path) -> None:
    a = make_project(tmp_path / "a", name="a", seed=1)
    b = make_project(tmp_path / "b", name="b", seed=2)
    build(ato, a)
    first_b = build(ato, b)
    res = ato(["cas", "gc", "--json"])
    assert res.code == 0 and res.json()["objects_removed"] == 0 and res.json()["packs_removed"] == 0
    # b's build record goes: its chunks are garbage, a's are not
    state = isolated_home / ".ato" / "state" / "builds"
    for record in state.glob(f"*/{RECORD_NAME}"):
        if record_artifact_hash(record.read_bytes()) == first_b["payload"]["artifact_hash"].split(":")[1]:
            record.unlink()
    res = ato(["cas", "gc", "--json"])
    assert res.code == 0 and res.json()["packs_removed"] == 1 and res.json()["manifests_removed"] == 1
    assert ato(["cas", "verify", "--json"]).code == 0
    assert build(ato, a)["up_to_date"]
    again = build(ato, b)
    assert again["artifact_blake3"] == first_b["artifact_blake3"] and again["payload"]["files_read"] == 4
