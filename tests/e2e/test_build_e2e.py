"""`ato build` end to end: reproducibility, the artifact layout, no-op rebuilds, fail-closed errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard

from cas import tempfiles
from tests.conftest import assert_schema

MANIFEST = """\
schema_version = "0.2"
name = "sample"
version = "1.2.3"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "src/main.py"
"""


def make_project(root: Path, manifest: str = MANIFEST) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "capsule.toml").write_text(manifest)
    (root / "README.md").write_text("# sample\n")
    main = root / "src" / "main.py"
    main.write_text("print('hello')\n")
    main.chmod(0o755)
    (root / "src" / "pkg" / "data.txt").write_text("data " * 1000)
    (root / "src" / "pkg" / "big.bin").write_bytes(os.urandom(600_000))
    os.symlink("main.py", root / "src" / "alias.py")
    (root / ".env").write_text("SECRET=1\n")
    (root / ".env.example").write_text("SECRET=\n")
    (root / "node_modules" / "x").mkdir(parents=True)
    (root / "node_modules" / "x" / "index.js").write_text("x")
    (root / "id_rsa").write_text("key")
    return root


def build_json(ato, project: Path, *extra: str, env: dict[str, str] | None = None):
    res = ato(["build", str(project), "--json", *extra], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "build")
    return doc


def payload_names(capsule: Path) -> list[str]:
    with tarfile.open(capsule) as tf:
        data = tf.extractfile("payload.tar.zst").read()
    raw = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    import io
    with tarfile.open(fileobj=io.BytesIO(raw)) as inner:
        return inner.getnames()


def test_build_envelope_layout_and_independent_digest(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    doc = build_json(ato, project)
    capsule = Path(doc["artifact"])
    assert capsule == project / "sample.capsule"
    assert doc["build_strategy"] == "source" and doc["schema_version"] == "0.1" and doc["target"] == "default"
    data = capsule.read_bytes()
    assert doc["artifact_blake3"] == "blake3:" + blake3.blake3(data).hexdigest()
    if shutil.which("b3sum"):
        out = subprocess.run(["b3sum", "--no-names", str(capsule)], capture_output=True, text=True, check=True)
        assert "blake3:" + out.stdout.strip() == doc["artifact_blake3"]
    listing = subprocess.run(["tar", "tvf", str(capsule)], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["capsule.toml", "capsule.lock.json", "sbom.spdx.json", "signature.json", "payload.tar.zst",
                     "payload.v3.manifest.json", "README.md"]
    assert all(" 0/0 " in line and line.startswith("-rw-r--r--") for line in listing.splitlines())
    inner = payload_names(capsule)
    assert inner == sorted(inner, key=lambda n: n.encode())
    assert "src/main.py" in inner and "src/alias.py" in inner and ".env.example" in inner
    for excluded in (".env", "node_modules/x/index.js", "id_rsa", "capsule.toml", "sample.capsule"):
        assert excluded not in inner
    with tarfile.open(capsule) as tf:
        sig = json.loads(tf.extractfile("signature.json").read())
        sbom = json.loads(tf.extractfile("sbom.spdx.json").read())
    assert sig["signed"] is False
    assert {f["fileName"] for f in sbom["files"]} == {n for n in inner if n != "src/alias.py"}


def test_two_builds_are_byte_identical_across_dirs_times_and_umasks(ato, tmp_path: Path) -> None:
    a = make_project(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b, symlinks=True)
    for p in b.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (1_000_000, 1_000_000))
    (b / "src" / "pkg" / "data.txt").chmod(0o600)  # permission bits other than x do not matter
    doc_a = build_json(ato, a)
    old = os.umask(0o077)
    try:
        doc_b = build_json(ato, b, env={"ATO_HOME": str(tmp_path / "other-home")})
    finally:
        os.umask(old)
    assert doc_a["artifact_blake3"] == doc_b["artifact_blake3"]
    assert Path(doc_a["artifact"]).read_bytes() == Path(doc_b["artifact"]).read_bytes()


def test_source_date_epoch_sets_every_mtime(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    doc = build_json(ato, project, env={"SOURCE_DATE_EPOCH": "1700000000"})
    with tarfile.open(doc["artifact"]) as tf:
        assert {m.mtime for m in tf.getmembers()} == {1700000000}
    bad = ato(["build", str(project)], env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert bad.code == 1 and "SOURCE_DATE_EPOCH" in bad.stderr


def test_noop_rebuild_and_one_file_change(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    first = build_json(ato, project)
    assert [t["status"] for t in first["tasks"]] == ["ran", "ran", "ran"]
    second = build_json(ato, project)
    assert second["up_to_date"] is True
    assert [t["status"] for t in second["tasks"]] == ["up-to-date"] * 3
    assert second["artifact_blake3"] == first["artifact_blake3"]
    (project / "src" / "pkg" / "data.txt").write_text("data " * 1001)
    third = build_json(ato, project)
    assert [t["status"] for t in third["tasks"]] == ["ran", "ran", "ran"]
    assert 1 <= third["payload"]["chunks_inserted"] <= 3
    assert third["payload"]["bytes_inserted"] < first["size"] // 2
    # Deleting the artifact re-runs only the artifact step.
    Path(third["artifact"]).unlink()
    fourth = build_json(ato, project)
    assert [t["status"] for t in fourth["tasks"]] == ["up-to-date", "up-to-date", "ran"]
    assert fourth["artifact_blake3"] == third["artifact_blake3"]


def test_global_and_local_json_flags_and_explain(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    res = ato(["--json", "build", str(project)])
    assert res.code == 0 and res.stderr == ""
    assert_schema(res.json(), "build")
    res = ato(["build", str(project), "--explain"])
    assert res.code == 0
    assert "lock" in res.stdout and "up-to-date" in res.stdout and "blake3:" in res.stdout


def test_out_path(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    out = tmp_path / "dist" / "x.capsule"
    doc = build_json(ato, project, "--out", str(out))
    assert doc["artifact"] == str(out) and out.is_file()


def _no_leftovers(project: Path) -> None:
    assert not list(project.rglob("*.capsule"))
    assert not list(tempfiles.find(project, recursive=True))


@pytest.mark.parametrize(("manifest", "code", "fragment"), [
    ('name = "x"\nversion = \n', "E001", "capsule.toml"),
    (MANIFEST.replace('version = "1.2.3"', "version = 3"), "E002", "version"),
    (MANIFEST.replace('name = "sample"\n', ""), "E003", "name"),
    (MANIFEST.replace('entrypoint = "src/main.py"', 'entrypoint = "/etc/passwd"'), "E101", "entrypoint"),
    (MANIFEST.replace('entrypoint = "src/main.py"', 'entrypoint = "../outside.py"'), "E101", "entrypoint"),
    (MANIFEST.replace('entrypoint = "src/main.py"', 'entrypoint = "src/missing.py"'), "E101", "entrypoint"),
    (MANIFEST + '\n[pack]\ninclude = ["../secrets/**"]\n', "E002", "pack"),
    (MANIFEST + '\n[pack]\nexclude = ["/etc/**"]\n', "E002", "pack"),
    (MANIFEST.replace('runtime = "source"\ndriver = "python"', 'runtime = "web"'), "E002", "driver"),
    (MANIFEST + '\n[services.main]\nentrypoint = "python a.py"\ndepends_on = ["api"]\n'
     '[services.api]\nentrypoint = "python b.py"\ndepends_on = ["main"]\n', "E002", "cycle"),
])
def test_bad_manifests_fail_closed(ato, tmp_path: Path, manifest: str, code: str, fragment: str) -> None:
    project = make_project(tmp_path / "p", manifest)
    res = ato(["build", str(project)])
    assert res.code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"[{code}]" in lines[0] and fragment in lines[0], res.stderr
    _no_leftovers(project)
    res = ato(["build", str(project), "--json"])
    err = json.loads(res.stderr.strip().splitlines()[-1])
    assert err["error"]["code"] == code and res.stdout == ""


def test_missing_manifest(ato, tmp_path: Path) -> None:
    res = ato(["build", str(tmp_path)])
    assert res.code == 1 and "CAPSULE_TOML_NOT_FOUND" in res.stderr


def test_symlink_escaping_the_project_is_refused(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    os.symlink("../../outside", project / "src" / "escape")
    res = ato(["build", str(project)])
    assert res.code == 1 and "escape" in res.stderr and "E102" in res.stderr
    _no_leftovers(project)


def test_strict_v3_refuses_fallback_and_builds_from_cas(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    res = ato(["build", str(project), "--strict-v3"])
    assert res.code == 1 and "E106" in res.stderr and "source_digest" in res.stderr
    _no_leftovers(project)
    res = ato(["build", str(project)], env={"ATO_STRICT_MANIFEST": "1"})
    assert res.code == 1 and "E106" in res.stderr
    res = ato(["build", str(project)], env={"ATO_STRICT_MANIFEST": "maybe"})
    assert res.code == 1 and "ATO_STRICT_MANIFEST" in res.stderr
    # Unverifiable digest: fails under strict mode.
    text = (project / "capsule.toml").read_text()
    (project / "capsule.toml").write_text(text.replace('entrypoint = "src/main.py"',
                                                       'entrypoint = "src/main.py"\nsource_digest = "blake3:' + "0" * 64 + '"'))
    res = ato(["build", str(project), "--strict-v3"])
    assert res.code == 1 and "E106" in res.stderr
    _no_leftovers(project)
    # A payload the CAS holds: strict builds take it from there, not from the files on disk.
    (project / "capsule.toml").write_text(text)
    first = build_json(ato, project)
    digest = first["payload"]["artifact_hash"]
    (project / "capsule.toml").write_text(text.replace('entrypoint = "src/main.py"',
                                                       f'entrypoint = "src/main.py"\nsource_digest = "{digest}"'))
    (project / "src" / "pkg" / "data.txt").write_text("changed on disk, but strict builds use the CAS")
    strict = build_json(ato, project, "--strict-v3")
    assert strict["payload"]["artifact_hash"] == digest


def test_large_payload_guard(ato, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    big = project / "src" / "pkg" / "huge.bin"
    with open(big, "wb") as fh:
        for _ in range(21):
            fh.write(os.urandom(10 * 1024 * 1024))
    res = ato(["build", str(project)])
    assert res.code == 1 and "E212" in res.stderr and "--force-large-payload" in res.stderr
    _no_leftovers(project)
    doc = build_json(ato, project, "--force-large-payload")
    assert doc["size"] > 200 * 1024 * 1024


def test_cas_verify_and_gc_commands(ato, tmp_path: Path, isolated_home: Path) -> None:
    project = make_project(tmp_path / "p")
    build_json(ato, project)
    res = ato(["cas", "verify", "--json"])
    assert res.code == 0
    assert_schema(res.json(), "cas-verify")
    res = ato(["cas", "gc", "--json"])
    assert res.code == 0
    doc = res.json()
    assert_schema(doc, "cas-gc")
    assert doc["objects_removed"] == 0
    packs = sorted((isolated_home / ".ato" / "cas" / "packs").glob("*.pack"))
    data = bytearray(packs[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    packs[0].write_bytes(bytes(data))
    res = ato(["cas", "verify", "--json"])
    assert res.code == 1 and "E208" in res.stderr
    doc = res.json()
    assert_schema(doc, "cas-verify")
    assert len(doc["corrupt"]) == 1 and doc["packs_checked"] == 1
