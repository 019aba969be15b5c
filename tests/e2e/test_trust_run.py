"""Trust at run time: `ato run` verifies every .capsule before it unpacks or executes anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import paths
from tests.conftest import forget_local_builds
from tests.e2e.test_trust_cli import build, failure, gen_key, ok_json

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

MANIFEST = """\
schema_version = "0.2"
name = "node-app"
version = "{version}"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "node"
entrypoint = "main.js"
"""
GREETING = "hello from a verified capsule"


def node_project(root: Path, version: str = "1.0.0") -> Path:
    root.mkdir(parents=True)
    (root / "capsule.toml").write_text(MANIFEST.format(version=version))
    (root / "main.js").write_text(f'console.log("{GREETING}")\n')
    (root / "package.json").write_text(json.dumps({"name": "node-app", "version": version}))
    (root / "package-lock.json").write_text(json.dumps({"name": "node-app", "version": version, "lockfileVersion": 3,
                                                        "requires": True, "packages": {"": {"name": "node-app"}}}))
    return root


def test_unsigned_capsule_runs_only_with_allow_unsigned(ato, tmp_path: Path) -> None:
    art = tmp_path / "u.capsule"
    build(ato, node_project(tmp_path / "p"), art)
    forget_local_builds()  # as if the artifact came from another machine
    res = ato(["run", str(art), "--yes"])
    assert res.code == 1 and GREETING not in res.stdout
    assert any(x.get("code") == "ATO_ERR_POLICY_VIOLATION" for x in res.stderr_json_lines()), res.stderr
    assert "--allow-unsigned" in res.stderr
    res = ato(["run", str(art), "--yes", "--allow-unsigned"])
    assert res.code == 0 and GREETING in res.stdout, res.stderr


def test_signed_capsule_pins_on_first_run_and_tampering_stops_it(ato, tmp_path: Path) -> None:
    gen_key(ato, tmp_path / "k.json")
    art = tmp_path / "s.capsule"
    build(ato, node_project(tmp_path / "p"), art, tmp_path / "k.json")
    res = ato(["run", str(art), "--yes"])
    assert res.code == 0 and GREETING in res.stdout, res.stderr
    assert "first sight of capsule:node-app" in res.stderr
    res = ato(["run", str(art), "--yes"])
    assert res.code == 0 and "first sight" not in res.stderr
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x10
    art.write_bytes(bytes(data))
    res = ato(["run", str(art), "--yes", "--json"])
    failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert GREETING not in res.stdout


def test_revoked_key_stops_an_installed_capsule_from_running(ato, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    art = tmp_path / "s.capsule"
    build(ato, node_project(tmp_path / "p"), art, tmp_path / "k.json")
    dest = paths.store_dir() / "acme" / "node-app" / "1.0.0" / "node-app-1.0.0.capsule"  # as `ato install` stores it
    dest.parent.mkdir(parents=True)
    shutil.copyfile(art, dest)
    res = ato(["run", "acme/node-app", "--yes"])
    assert res.code == 0 and GREETING in res.stdout, res.stderr
    assert ok_json(ato(["trust", "ls", "--json"]), "trust")["identities"][0]["identity"] == "acme"
    ok_json(ato(["trust", "revoke", k["key_id"], "--reason", "stolen", "--json"]), "trust")
    res = ato(["run", "acme/node-app", "--yes", "--json"])
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert "revoked (stolen)" in err["message"] and GREETING not in res.stdout
