"""Seed 000's "Terminal 1 / Terminal 2" flow exactly as written, on one machine:

    ato registry serve --host 127.0.0.1 --port <port>
    ato build .
    ATO_TOKEN=pwd ato publish --artifact ./<name>.capsule --registry http://127.0.0.1:<port>
    ato install <publisher>/<slug> --registry http://127.0.0.1:<port>
    ato run <publisher>/<slug> --registry http://127.0.0.1:<port> --yes

The artifact is unsigned (the default build), and no extra flag is passed: this ATO_HOME
built exactly those bytes, so trust accepts it as a local build. Another machine installing
the same unsigned artifact still needs --allow-unsigned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

FILES = {
    "capsule.toml": """\
schema_version = "0.2"
name = "seed-hello"
version = "0.1.0"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "node"
entrypoint = "main.js"
""",
    "capsule.lock": 'version = "1"\n',
    "package-lock.json": '{"name": "seed-hello", "lockfileVersion": 3, "packages": {}}\n',
    "main.js": "console.log('hello from a capsule');\n",
}


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "registry-data", token=TOKEN)
    yield reg
    reg.stop()


def test_seed_flow_exactly_as_written(ato, tmp_path: Path, registry: Registry) -> None:
    project = tmp_path / "seed-hello"
    project.mkdir()
    for name, text in FILES.items():
        (project / name).write_text(text)

    built = ato(["build", "."], cwd=project)
    assert built.code == 0, built.stderr
    assert (project / "seed-hello.capsule").is_file()

    pub = ato(["publish", "--artifact", "./seed-hello.capsule", "--registry", registry.url], cwd=project,
              env={"ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr

    inst = ato(["install", "local/seed-hello", "--registry", registry.url])
    assert inst.code == 0, inst.stderr
    doc = ato(["install", "local/seed-hello", "--registry", registry.url, "--json"]).json()
    assert_schema(doc, "install")
    assert doc["install_kind"] == "Standard" and doc["trust"]["status"] == "local-build"

    run = ato(["run", "local/seed-hello", "--registry", registry.url, "--yes"])
    assert run.code == 0, run.stderr
    assert "hello from a capsule" in run.stdout

    # Another machine: the same unsigned bytes are an unknown party's artifact there.
    other = tmp_path / "other"
    other.mkdir()
    env = {"HOME": str(other), "ATO_HOME": str(other / ".ato")}
    refused = ato(["install", "local/seed-hello", "--registry", registry.url], env=env)
    assert refused.code == 1 and "unsigned" in refused.stderr and "--allow-unsigned" in refused.stderr
    assert not (other / ".ato" / "store" / "local" / "seed-hello").exists()
    refused = ato(["run", "local/seed-hello", "--registry", registry.url, "--yes"], env=env)
    assert refused.code == 1 and "--allow-unsigned" in refused.stderr
    assert "hello from a capsule" not in refused.stdout
    assert not (other / ".ato" / "store" / "local" / "seed-hello").exists(), "run stored an unverified artifact"
    ok = ato(["install", "local/seed-hello", "--registry", registry.url, "--allow-unsigned"], env=env)
    assert ok.code == 0, ok.stderr
