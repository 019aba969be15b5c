"""`.sync` end to end: build, open at once from the local copy, refresh after the TTL from a real local
HTTP server, refuse tampered/foreign/rolled-back updates while keeping the last good payload."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cas.digest import blake3_file, label
from tests.conftest import assert_schema, cli_path, forget_local_builds

HOUR = 3600


class Source:
    """A real HTTP server on 127.0.0.1 serving one .sync (swappable), counting requests.

    ``hold`` (an Event) makes a request wait until the test releases it; ``etag`` enables 304s.
    """

    def __init__(self) -> None:
        self.body = b""
        self.etag: str | None = None
        self.requests: list[dict[str, str]] = []
        self.hold: threading.Event | None = None
        self.arrived = threading.Event()
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                source.requests.append(dict(self.headers))
                source.arrived.set()
                if source.hold is not None:
                    source.hold.wait(60)
                if source.etag and self.headers.get("If-None-Match") == source.etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.magnetic.sync+zip")
                self.send_header("Content-Length", str(len(source.body)))
                if source.etag:
                    self.send_header("ETag", source.etag)
                self.end_headers()
                self.wfile.write(source.body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/q3.sync"

    def serve(self, path: Path) -> None:
        self.body = path.read_bytes()

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def source():
    s = Source()
    yield s
    s.close()


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


@pytest.fixture
def key(ato, tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "k.json"
    assert ato(["key", "gen", "--out", str(path)]).code == 0
    return path


def build(ato, work: Path, text: str, out: Path, *, key: Path | None, source: str | None, created: float,
          ttl: str = "1h") -> dict:
    payload = work / "q3.csv"
    payload.write_text(text)
    args = ["sync", "build", str(payload), "--out", str(out), "--ttl", ttl, "--created-at", rfc3339(created), "--json"]
    if key is not None:
        args += ["--key", str(key)]
    if source is not None:
        args += ["--source", source]
    res = ato(args)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "sync-build")
    return doc


def open_json(ato, path: Path, *extra: str) -> dict:
    res = ato(["open", str(path), "--yes", "--json", *extra])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "sync-open")
    return doc


def test_build_is_reproducible_and_verifies(ato, tmp_path: Path, key: Path) -> None:
    created = time.time() - 60
    a = build(ato, tmp_path, "a,b\n1,2\n", tmp_path / "a.sync", key=key, source=None, created=created)
    b = build(ato, tmp_path, "a,b\n1,2\n", tmp_path / "b.sync", key=key, source=None, created=created)
    assert (tmp_path / "a.sync").read_bytes() == (tmp_path / "b.sync").read_bytes()
    assert a["file_digest"] == b["file_digest"] == label(blake3_file(tmp_path / "a.sync"))
    with zipfile.ZipFile(tmp_path / "a.sync") as zf:  # an independent reader agrees on the layout
        assert [i.filename for i in zf.infolist()] == ["manifest.toml", "payload", "sync.wasm"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert zf.read("payload") == b"a,b\n1,2\n"
    res = ato(["sync", "verify", str(tmp_path / "a.sync"), "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "sync-verify")
    assert res.json()["signer"]["key_id"] == a["signer"]


def test_opens_at_once_from_the_local_copy_before_the_refresh(ato, tmp_path: Path, key: Path, source: Source) -> None:
    """The payload is on stdout while the (due) refresh is still waiting for the source."""
    local = tmp_path / "q3.sync"
    build(ato, tmp_path, "old,1\n", local, key=key, source=source.url, created=time.time() - 2 * HOUR)
    newer = tmp_path / "v2.sync"
    build(ato, tmp_path, "new,2\n", newer, key=key, source=source.url, created=time.time() - 60)
    source.serve(newer)
    source.hold = threading.Event()
    proc = subprocess.Popen([cli_path("ato"), "open", str(local), "--yes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # arrives although the source has not answered yet
        assert first == b"old,1\n"
        assert source.arrived.wait(60), "the refresh never reached the source"
        assert proc.poll() is None  # still waiting for the held response
    finally:
        source.hold.set()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == b""
    assert b"updated from" in err
    # the next open shows the new payload, straight from the (replaced) local copy
    res = ato(["open", str(local), "--yes"])
    assert res.code == 0 and res.stdout == "new,2\n"


def test_not_due_means_no_request(ato, tmp_path: Path, key: Path, source: Source) -> None:
    local = tmp_path / "q3.sync"
    built = build(ato, tmp_path, "x\n", local, key=key, source=source.url, created=time.time() - 10)
    doc = open_json(ato, local)
    assert doc["refresh"]["status"] == "not-due" and not source.requests
    assert doc["payload"]["digest"] == built["payload"]["digest"]
    assert doc["ttl_seconds"] == HOUR and 0 <= doc["age_seconds"] < HOUR
    assert 0 < doc["next_refresh_in_seconds"] <= HOUR
    assert doc["trust"]["status"] == "new-pin" and doc["signed"] is True


def test_refreshes_after_ttl_then_waits_a_ttl(ato, tmp_path: Path, key: Path, source: Source) -> None:
    local = tmp_path / "q3.sync"
    old = build(ato, tmp_path, "old\n", local, key=key, source=source.url, created=time.time() - 2 * HOUR)
    newer = tmp_path / "v2.sync"
    new = build(ato, tmp_path, "new\n", newer, key=key, source=source.url, created=time.time() - 30)
    source.serve(newer)
    source.etag = '"v2"'
    doc = open_json(ato, local)
    assert doc["refresh"] == {"status": "updated", "source": source.url, "previous_digest": old["payload"]["digest"],
                              "error": None}
    assert doc["payload"]["digest"] == new["payload"]["digest"] and doc["display_name"] == "q3.csv"
    assert local.read_bytes() == newer.read_bytes()
    assert doc["checked_at"] is not None and doc["next_refresh_in_seconds"] > HOUR - 120
    assert len(source.requests) == 1
    doc = open_json(ato, local)  # just checked: not due again for a TTL
    assert doc["refresh"]["status"] == "not-due" and len(source.requests) == 1
    forced = ato(["sync", "refresh", str(local), "--yes", "--json"])  # a forced check: the server says 304
    assert forced.code == 0, forced.stderr
    assert forced.json()["refresh"]["status"] == "unchanged"
    assert source.requests[-1].get("If-None-Match") == '"v2"'


def _tamper(src: Path, out: Path, payload: bytes) -> None:
    """The same signed manifest with another payload (a valid ZIP: only the signature can tell)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, payload if info.filename == "payload" else zin.read(info))


@pytest.mark.parametrize("attack", ["tampered", "other-key", "rollback", "unsigned", "garbage"])
def test_a_bad_update_keeps_the_last_good_payload(ato, tmp_path: Path, key: Path, source: Source,
                                                  attack: str) -> None:
    local = tmp_path / "q3.sync"
    build(ato, tmp_path, "good\n", local, key=key, source=source.url, created=time.time() - 2 * HOUR)
    before = local.read_bytes()
    bad = tmp_path / "bad.sync"
    if attack == "tampered":
        build(ato, tmp_path, "evil\n", tmp_path / "v2.sync", key=key, source=source.url, created=time.time() - 60)
        _tamper(tmp_path / "v2.sync", bad, b"evil!\n")
    elif attack == "other-key":
        other = tmp_path / "keys" / "other.json"
        assert ato(["key", "gen", "--out", str(other)]).code == 0
        build(ato, tmp_path, "evil\n", bad, key=other, source=source.url, created=time.time() - 60)
    elif attack == "rollback":
        build(ato, tmp_path, "older\n", bad, key=key, source=source.url, created=time.time() - 3 * HOUR)
    elif attack == "unsigned":
        build(ato, tmp_path, "evil\n", bad, key=None, source=source.url, created=time.time() - 60)
    else:
        bad.write_bytes(b"<html>not a package</html>")
    source.serve(bad)
    res = ato(["open", str(local), "--yes"])
    assert res.code == 0, res.stderr
    assert res.stdout == "good\n"
    assert "kept the last good payload" in res.stderr
    doc = open_json(ato, local)
    assert doc["refresh"]["status"] == "failed"
    assert doc["refresh"]["error"]["code"] == "E208", doc["refresh"]["error"]
    assert local.read_bytes() == before
    assert not list(tmp_path.glob(".*ato-tmp"))  # the rejected download is gone
    forced = ato(["sync", "refresh", str(local), "--yes"])
    assert forced.code == 1 and "error[E208]" in forced.stderr
    assert local.read_bytes() == before


def test_unsigned_from_elsewhere_needs_allow_unsigned(ato, tmp_path: Path) -> None:
    local = tmp_path / "q3.sync"
    build(ato, tmp_path, "u\n", local, key=None, source=None, created=time.time())
    assert ato(["open", str(local)]).stdout == "u\n"  # built here: accepted like a local .capsule build
    forget_local_builds()
    res = ato(["open", str(local), "--yes"])
    assert res.code == 1 and "unsigned" in res.stderr and res.stdout == ""
    res = ato(["open", str(local), "--allow-unsigned", "--json"])
    assert res.code == 0 and res.json()["trust"]["status"] == "unsigned"


@pytest.mark.parametrize("hostile", ["compressed", "extra-member", "no-payload", "manifest-edit", "not-zip"])
def test_hostile_local_packages_are_refused_before_anything_is_shown(ato, tmp_path: Path, key: Path,
                                                                    hostile: str) -> None:
    good = tmp_path / "good.sync"
    build(ato, tmp_path, "secret\n", good, key=key, source=None, created=time.time())
    bad = tmp_path / "bad.sync"
    with zipfile.ZipFile(good) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    if hostile == "not-zip":
        bad.write_bytes(b"ttl = 1\n")
    else:
        if hostile == "extra-member":
            members["../../escape"] = b"x"
        elif hostile == "no-payload":
            del members["payload"]
        elif hostile == "manifest-edit":
            members["manifest.toml"] = members["manifest.toml"].replace(b"ttl = 3600", b"ttl = 999999")
        with zipfile.ZipFile(bad, "w") as zout:
            for name, data in members.items():
                zout.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if hostile == "compressed"
                              else zipfile.ZIP_STORED)
    res = ato(["open", str(bad), "--yes", "--json"])
    assert res.code == 1, res.stdout
    assert res.stdout == ""
    assert json.loads(res.stderr.strip().splitlines()[-1])["error"]["code"] == "E208"
    assert ato(["sync", "verify", str(bad)]).code == 1


def test_build_refuses_a_plain_http_source_off_loopback(ato, tmp_path: Path) -> None:
    (tmp_path / "q3.csv").write_text("x")
    res = ato(["sync", "build", str(tmp_path / "q3.csv"), "--source", "http://example.org/q3.sync"])
    assert res.code == 1 and "https" in res.stderr
    res = ato(["run", str(tmp_path / "q3.sync"), "--background"])  # shown, not launched
    assert res.code == 1 and "does not apply to a .sync" in res.stderr


def test_refresh_contacts_only_allowed_hosts(ato, tmp_path: Path, key: Path, source: Source) -> None:
    """A redirect to a host the package does not allow is refused, and nothing is fetched from it."""
    other = Source()
    try:
        redirect_to = other.url.replace("127.0.0.1", "localhost")  # another host name for the same machine
        local = tmp_path / "q3.sync"
        build(ato, tmp_path, "good\n", local, key=key, source=source.url, created=time.time() - 2 * HOUR)
        source.server.RequestHandlerClass.do_GET = lambda self: (self.send_response(302),  # type: ignore[method-assign]
                                                                 self.send_header("Location", redirect_to),
                                                                 self.end_headers())
        doc = open_json(ato, local)
        assert doc["refresh"]["status"] == "failed"
        assert "allow_hosts" in doc["refresh"]["error"]["message"]
        assert not other.requests
    finally:
        other.close()
