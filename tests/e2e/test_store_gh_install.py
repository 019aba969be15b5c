"""`ato install --from-gh-repo` against repository archives served from a loopback "GitHub API"."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.registry_support import MANIFEST


def tarball(files: dict[str, bytes], top: str = "acme-hello-0123abc") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def github():
    archives: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            host = f"127.0.0.1:{self.server.server_address[1]}"
            parts = self.path.strip("/").split("/")
            if len(parts) == 4 and parts[0] == "repos" and parts[3] == "tarball":
                repo = f"{parts[1]}/{parts[2]}"
                if repo == "acme/elsewhere":
                    target = f"http://localhost:{self.server.server_address[1]}/codeload/{repo}"
                else:
                    target = f"http://{host}/codeload/{repo}"
                self.send_response(302)
                self.send_header("location", target)
                self.end_headers()
                return
            if parts[0] == "codeload" and "/".join(parts[1:3]) in archives:
                body = archives["/".join(parts[1:3])]
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(404)
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", archives
    srv.shutdown()
    srv.server_close()


def test_install_from_gh_repo_builds_and_installs(ato, github, isolated_home: Path) -> None:
    base, archives = github
    manifest = MANIFEST.format(name="hello", version="0.3.0", description="from github").encode()
    archives["acme/hello"] = tarball({"capsule.toml": manifest, "main.py": b"print('hi from github')\n",
                                      "README.md": b"# hello\n"})
    archives["acme/bare"] = tarball({"main.py": b"print('no manifest')\n"})
    archives["acme/elsewhere"] = archives["acme/hello"]
    env = {"ATO_GITHUB_API_URL": base}

    res = ato(["install", "--from-gh-repo", "acme/hello", "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "install")
    assert doc["scoped_id"] == "acme/hello" and doc["version"] == "0.3.0"
    path = Path(doc["path"])
    assert path.is_file() and path.is_relative_to(isolated_home / ".ato" / "store" / "acme" / "hello")
    assert doc["signed"] is False and doc["trust"]  # a local build: accepted as such

    res = ato(["install", "--from-gh-repo", "acme/bare"], env=env)
    assert res.code == 1 and "has no capsule.toml" in res.stderr and "E003" in res.stderr
    res = ato(["install", "--from-gh-repo", "acme/missing"], env=env)
    assert res.code == 1 and "was not found" in res.stderr
    res = ato(["install", "--from-gh-repo", "acme/elsewhere"], env=env)
    assert res.code == 1 and "refusing to follow a redirect to another host" in res.stderr
    res = ato(["install", "--from-gh-repo", "not a repo"], env=env)
    assert res.code == 1 and "expects owner/repo" in res.stderr
    res = ato(["install", "acme/hello", "--from-gh-repo", "acme/hello"], env=env)
    assert res.code == 1 and "cannot be combined" in res.stderr
    res = ato(["install", "--from-gh-repo", "acme/hello"], env={"ATO_GITHUB_API_URL": "http://127.0.0.1:9"})
    assert res.code == 3 and "cannot download" in res.stderr


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def test_a_repository_archive_that_expands_past_the_ceiling_is_refused_before_extraction(
        ato, github, isolated_home: Path) -> None:
    """A gzip bomb (64 MiB of zeros in a few hundred KB) against a 16 MiB ceiling: E212, exit 1, one
    line naming the ceiling and how to raise it; nothing is built or stored."""
    base, archives = github
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        manifest = MANIFEST.format(name="bomb", version="0.1.0", description="x").encode()
        info = tarfile.TarInfo("acme-bomb-0123abc/capsule.toml")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
        info = tarfile.TarInfo("acme-bomb-0123abc/zeros.bin")
        info.size = 64 << 20
        tf.addfile(info, _Zeros(info.size))
    archives["acme/bomb"] = buf.getvalue()
    assert len(archives["acme/bomb"]) < 1 << 20
    res = ato(["install", "--from-gh-repo", "acme/bomb"],
              env={"ATO_GITHUB_API_URL": base, "ATO_MAX_PAYLOAD_BYTES": str(16 << 20)})
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert res.code == 1 and len(errors) == 1, res.stderr
    assert errors[0].startswith("error[E212]: repository archive expands to more than 16777216 bytes"), res.stderr
    assert "payload.max_bytes" in res.stderr and "Traceback" not in res.stderr
    store = isolated_home / ".ato" / "store"
    assert not store.exists() or not list(store.rglob("*.capsule"))
