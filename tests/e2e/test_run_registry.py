"""`ato run publisher/slug --registry`: install on demand, then the runtime config saved in the registry applies."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.registry_support import TOKEN, Registry
from tests.e2e.test_run_e2e import free_port, http_get, procs, write  # noqa: F401 - procs is a fixture

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "registry-data", token=TOKEN)
    yield reg
    reg.stop()


def test_run_installs_from_the_registry_and_applies_saved_runtime_config(ato, tmp_path, registry, procs):  # noqa: F811
    write(tmp_path / "proj", {
        "capsule.toml": """\
schema_version = "0.2"
name = "greeter"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "web"
driver = "node"
entrypoint = "server.js"
port = 18080
readiness_probe = { http_get = "/", port = "PORT" }
""",
        "capsule.lock": 'version = "1"\n', "package-lock.json": "{}\n",
        "server.js": """\
require('http').createServer((q, s) => s.end('greeting=' + (process.env.GREETING || 'none')))
  .listen(Number(process.env.PORT), '127.0.0.1');
""",
    })
    built = ato(["build", str(tmp_path / "proj"), "--json"])
    assert built.code == 0, built.stderr
    artifact = Path(built.json()["artifact"])
    pub = ato(["publish", "--artifact", str(artifact), "--registry", registry.url, "--scoped-id", "local/greeter",
               "--json"], env={"ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr
    port = free_port()
    saved = httpx.put(f"{registry.url}/v1/local/capsules/by/local/greeter/runtime-config",
                      json={"targets": {"web": {"port": port, "env": {"GREETING": "from-the-ui"}}}},
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert saved.status_code == 200, saved.text
    # not installed + non-interactive + no --yes: refused before anything is downloaded
    res = ato(["run", "local/greeter", "--registry", registry.url, "--allow-unsigned"])
    assert res.code == 1 and "ATO_ERR_CONSENT_REQUIRED" in res.stderr
    store = Path(os.environ["ATO_HOME"]) / "store"
    assert not store.exists() or not any(store.rglob("*.capsule"))
    p = procs(["run", "local/greeter", "--registry", registry.url, "--yes", "--allow-unsigned"])
    p.wait_line(f"http://127.0.0.1:{port}/", stream="err", timeout=60)
    assert http_get(f"http://127.0.0.1:{port}/") == "greeting=from-the-ui"
    assert any(store.rglob("greeter-0.1.0.capsule"))
    os.kill(p.p.pid, signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM

    # installed and byte-identical to the registry's release: the installed copy runs (no --yes, no download)
    installed = next(store.rglob("greeter-0.1.0.capsule"))
    before = installed.stat().st_mtime_ns
    again = procs(["run", "local/greeter", "--registry", registry.url, "--allow-unsigned"])
    again.wait_line(f"http://127.0.0.1:{port}/", stream="err", timeout=60)
    assert http_get(f"http://127.0.0.1:{port}/") == "greeting=from-the-ui"
    assert not any("not installed" in line or "CONSENT" in line for line in again.err), again.err
    assert installed.stat().st_mtime_ns == before
    os.kill(again.p.pid, signal.SIGTERM)
    assert again.wait() == 128 + signal.SIGTERM
