"""Upstream's negative IPC manifests (IPC-001 conflicting exports, IPC-002 reserved names, IPC-003 circular
imports): `ato build` and `ato run` refuse them with their codes, before anything is packed or started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.test_run_e2e import write

APP = """\
schema_version = "0.2"
name = "{name}"
version = "0.1.0"
type = "app"
default_target = "app"

[targets.app]
runtime = "source"
driver = "native"
entrypoint = "sh run.sh"
"""


def capsule(root: Path, name: str, ipc: str) -> Path:
    return write(root, {"capsule.toml": APP.format(name=name) + ipc, "run.sh": "echo started > started\n"})


def conflict(tmp: Path) -> Path:  # one method exported twice
    return capsule(tmp / "conflict", "ipc-conflict", """
[ipc.exports]
name = "greeter"
[[ipc.exports.methods]]
name = "greet"
[[ipc.exports.methods]]
name = "greet"
""")


def reserved(tmp: Path) -> Path:  # a service name in ato's own namespace (its DAG nodes _ipc_*, _setup, _main)
    return capsule(tmp / "reserved", "ipc-reserved", '\n[ipc.exports]\nname = "_ipc_greeter"\n'
                                                     '[[ipc.exports.methods]]\nname = "greet"\n')


def circular(tmp: Path) -> Path:  # a imports b, b imports a
    capsule(tmp / "b", "ipc-b", '\n[ipc.exports]\nname = "b"\n[[ipc.exports.methods]]\nname = "pong"\n'
                                '\n[ipc.imports.a]\nfrom = "../a"\n')
    return capsule(tmp / "a", "ipc-a", '\n[ipc.exports]\nname = "a"\n[[ipc.exports.methods]]\nname = "ping"\n'
                                       '\n[ipc.imports.b]\nfrom = "../b"\n')


@pytest.mark.parametrize(("make", "code", "words"), [(conflict, "IPC-001", "greet"), (reserved, "IPC-002", "_ipc_greeter"),
                                                     (circular, "IPC-003", "circular")])
def test_negative_manifests_are_refused_at_build_and_run(ato, tmp_path: Path, make, code: str, words: str) -> None:
    project = make(tmp_path)
    built = ato(["build", str(project), "--json"])
    assert built.code == 1, built.stderr
    doc = json.loads(built.stderr)  # the error envelope
    assert doc["error"]["code"] == code and words in doc["error"]["message"], doc
    assert doc["error"]["details"]["findings"][0]["code"] == code
    assert not list(project.glob("*.capsule"))  # nothing packed
    human = ato(["build", str(project)])
    assert human.code == 1 and f"[{code}]" in human.stderr and "Traceback" not in human.stderr
    for command in (["validate", str(project), "--json"], ["inspect", "requirements", str(project), "--json"]):
        res = ato(command)
        assert res.code == 1 and json.loads(res.stderr)["error"]["code"] == code, (command, res.stderr)
    ran = ato(["run", str(project), "--yes", "--json"])
    assert ran.code == 1 and json.loads(ran.stderr)["error"]["code"] == code, ran.stderr
    assert not (project / "started").exists()  # nothing ran


def test_a_valid_export_builds(ato, tmp_path: Path) -> None:
    project = capsule(tmp_path / "ok", "greeter", '\n[ipc.exports]\nname = "greeter"\n[[ipc.exports.methods]]\n'
                                                 'name = "greet"\n')
    res = ato(["build", str(project), "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "build")
    consumer = capsule(tmp_path / "use", "user", '\n[ipc.imports.greeter]\nfrom = "../ok"\n')
    req = ato(["inspect", "requirements", str(consumer), "--json"])
    assert req.code == 0, req.stderr
    assert_schema(req.json(), "inspect-requirements")
    (item,) = [s for s in req.json()["requirements"]["services"] if s["key"] == "greeter"]
    assert item["required"] is True and "IPC import of ../ok" in item["description"]
    val = ato(["validate", str(consumer), "--json"])
    assert val.code == 0, val.stderr
    assert_schema(val.json(), "validate")
