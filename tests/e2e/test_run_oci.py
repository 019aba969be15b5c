"""OCI targets under a real podman: an image built here from Debian's busybox-static, no registry.

The image is a rootfs tar with /bin/busybox, imported with `podman import`. The capsule
serves HTTP with busybox httpd on its mapped port (env, required_env and a read-only
mount of the capsule's `site` dir mapped in), shows in `ato ps`, and is gone after
`ato close`; `kill -9` of a foreground `ato run` removes its container too; without
podman on PATH the same capsule fails closed with ATO_ERR_ENGINE_MISSING.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import uuid
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.test_run_e2e import Proc, free_port, http_get, wait_for, write

PODMAN = shutil.which("podman")
BUSYBOX = Path("/bin/busybox")
CONF = Path(__file__).with_name("podman-containers.conf")
pytestmark = pytest.mark.skipif(PODMAN is None or not BUSYBOX.is_file(),
                                reason="needs podman and busybox-static (make system-deps)")


def podman(*args: str, check: bool = True) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    proc = subprocess.run([PODMAN, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """localhost/ato-test-busybox:<unique>, imported from a rootfs tar (removed afterwards)."""
    root = tmp_path_factory.mktemp("rootfs")
    tar_path = root / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tf:
        for d in ("bin", "tmp", "www"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        tf.add(BUSYBOX, "bin/busybox")
        for applet in ("sh", "httpd", "touch", "echo", "sleep"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(link)
    ref = f"localhost/ato-test-busybox:{uuid.uuid4().hex[:12]}"
    podman("import", str(tar_path), ref)
    yield ref
    podman("rmi", "--force", ref, check=False)


CGI = """\
#!/bin/sh
echo "Content-Type: text/plain"
echo
if touch /www/probe 2>/dev/null; then echo "mount=writable"; else echo "mount=read-only"; fi
echo "greeting=$GREETING who=$WHO port=$PORT"
"""


def oci_capsule(root: Path, image: str, port: int) -> Path:
    project = write(root, {"capsule.toml": f"""\
schema_version = "0.2"
name = "oci-web"
version = "0.1.0"
type = "app"
default_target = "box"

[targets.box]
runtime = "oci"
image = "{image}"
cmd = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]
port = {port}
required_env = ["GREETING"]
env = {{ WHO = "capsule" }}
mounts = [{{ source = "site", target = "/www" }}]
""", "site/index.html": "hello from a container\n", "site/cgi-bin/env": CGI})
    (project / "site" / "cgi-bin" / "env").chmod(0o755)
    return project


def containers(name_part: str) -> list[str]:
    out = podman("ps", "--all", "--format", "json")
    return [n for c in json.loads(out or "[]") for n in c.get("Names", []) if name_part in n]


ENV = {"CONTAINERS_CONF": str(CONF), "GREETING": "hi there", "ATO_STOP_GRACE_SECS": "2"}


def test_oci_capsule_serves_on_its_port_shows_in_ps_and_is_gone_after_close(tmp_path, ato, image):
    port = free_port()
    project = oci_capsule(tmp_path, image, port)
    res = ato(["run", str(project), "-y", "--background", "--json"], env=ENV)
    assert res.code == 0, res.stderr
    record = res.json()["process"]
    try:
        _check_serving(res, record, project, port)
    finally:
        res = ato(["close", "--id", record["id"], "--json"], env=ENV)
    assert res.code == 0, res.stderr
    assert res.json()["stopped"][0]["was_running"] is True
    assert containers("ato-oci-web-") == []  # gone from podman, not only stopped
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http_get(record["url"], timeout=1)
    row = next(r for r in ato(["ps", "--json"]).json()["processes"] if r["id"] == record["id"])
    assert row["status"] == "stopped"


def _check_serving(res, record: dict, project: Path, port: int) -> None:
    from tests.conftest import cli_path

    assert_schema(res.json(), "run-background")
    assert record["status"] == "ready" and record["runtime"] == "oci/podman" and record["route"] == "oci"
    assert record["url"] == f"http://127.0.0.1:{port}/"
    assert http_get(record["url"]) == "hello from a container\n"
    cgi = http_get(f"http://127.0.0.1:{port}/cgi-bin/env")
    assert cgi == f"mount=read-only\ngreeting=hi there who=capsule port={port}\n"
    assert not (project / "site" / "probe").exists()
    ps = subprocess.run([cli_path("ato"), "ps", "--json"], capture_output=True, text=True, timeout=60)
    rows = [r for r in json.loads(ps.stdout)["processes"] if r["id"] == record["id"]]
    assert rows and rows[0]["status"] == "ready" and rows[0]["port"] == port
    assert len(containers("ato-oci-web-")) == 1


def test_kill_9_of_a_foreground_oci_run_removes_its_container(tmp_path, image):
    port = free_port()
    project = oci_capsule(tmp_path, image, port)
    p = Proc(["run", str(project), "-y"], env=ENV)
    try:
        p.wait_line(f"is available at http://127.0.0.1:{port}/", stream="err", timeout=60)
        assert http_get(f"http://127.0.0.1:{port}/") == "hello from a container\n"
        assert len(containers("ato-oci-web-")) == 1
        os.kill(p.p.pid, signal.SIGKILL)
        p.p.wait()
        wait_for(lambda: containers("ato-oci-web-") == [], timeout=20)
    finally:
        p.kill()


def test_without_podman_the_capsule_fails_closed(tmp_path, ato, image):
    empty = tmp_path / "bin"
    empty.mkdir()
    port = free_port()
    project = oci_capsule(tmp_path / "cap", image, port)
    started = time.monotonic()
    res = ato(["run", str(project), "-y"], env={**ENV, "PATH": str(empty)})
    assert res.code == 1, res.stderr
    lines = [x for x in res.stderr_json_lines() if x.get("code") == "ATO_ERR_ENGINE_MISSING"]
    assert lines and "podman" in lines[0]["message"], res.stderr
    assert res.stdout == "" and containers("ato-oci-web-") == []
    assert time.monotonic() - started < 60
