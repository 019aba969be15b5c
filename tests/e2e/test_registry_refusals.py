"""Every refusal leaves the registry's data dir exactly as it was (tree listing + digests)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import tarfile
from pathlib import Path

import blake3
import httpx
import pytest

from tests.conftest import INDEX_BACKENDS, cli_path
from tests.e2e.registry_support import (
    TOKEN,
    Registry,
    build_in_process,
    digests,
    forge_capsule,
    make_project,
    settle,
    snapshot,
)

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=INDEX_BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One registry for the module, on each index backend in turn."""
    home = tmp_path_factory.mktemp("reg-home")
    pg = request.getfixturevalue("postgres_server") if request.param == "postgresql+s3" else None
    name = pg.create_database() if pg else None
    extra: list[str] = []
    saved = dict(os.environ)
    if pg:
        s3 = request.getfixturevalue("s3_server")
        os.environ.update(s3.env())
        extra = ["--database", pg.url(name), "--blob-store", f"s3://{s3.create_bucket()}/refusals"]
    try:  # the registry and the snapshots read the AWS variables
        reg = Registry(tmp_path_factory.mktemp("refusals") / "data", token=TOKEN, home=home, extra_args=extra)
        yield reg
        reg.stop()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if pg:
        pg.drop_database(name)


@pytest.fixture
def seeded(server: Registry, tmp_path: Path, ato) -> tuple[Registry, Path]:
    """The registry with one release in it, and a fresh valid artifact of another capsule."""
    if server.get("/v1/capsules/by/local/base-app").status_code == 404:
        base = build_in_process(make_project(tmp_path / "base", "base-app"))
        res = ato(["publish", "--artifact", str(base), "--registry", server.url], env={"ATO_TOKEN": TOKEN})
        assert res.code == 0, res.stderr
    artifact = build_in_process(make_project(tmp_path / "cand", "cand-app", "1.0.0"))
    return server, artifact


def put(reg: Registry, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.put(reg.url + path, content=body, headers=headers, timeout=60)


def digest_headers(data: bytes) -> dict[str, str]:
    return {"x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
            "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest()}


def test_wrong_and_missing_token(seeded, ato) -> None:
    reg, artifact = seeded
    before = snapshot(reg)
    data = artifact.read_bytes()
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic cHdk"},
                    {"authorization": "Bearer " + TOKEN + "x"}):
        r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", data, {**digest_headers(data), **headers})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = httpx.post(reg.url + "/v1/sync/negotiate", json={"chunks": []}, headers=headers, timeout=30)
        assert r.status_code == 401
    for env in ({}, {"ATO_TOKEN": "wrong"}):
        res = ato(["publish", "--artifact", str(artifact), "--registry", reg.url, "--json"], env=env)
        assert res.code == 1 and '"E201"' in res.stderr and "ATO_ERR_AUTH_REQUIRED" in res.stderr
    # runtime config and delete are writes too
    r = httpx.put(reg.url + "/v1/local/capsules/by/local/base-app/runtime-config", json={"targets": {}}, timeout=30)
    assert r.status_code == 401
    r = httpx.delete(reg.url + "/v1/local/capsules/by/local/base-app?confirmed=true", timeout=30)
    assert r.status_code == 401
    assert snapshot(reg) == before


def test_tampered_body_and_digest_mismatch(seeded) -> None:
    reg, artifact = seeded
    before = snapshot(reg)
    data = artifact.read_bytes()
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", bytes(tampered), {**digest_headers(data), **AUTH})
    assert r.status_code == 422 and r.json() == {"error": "hash_mismatch", "message": "sha256 mismatch"}
    headers = {**digest_headers(data), **AUTH, "x-ato-blake3": "blake3:" + "0" * 64}
    r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", data, headers)
    assert r.status_code == 422 and r.json()["message"] == "blake3 mismatch"
    r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", data, {**AUTH, "x-ato-sha256": "sha256:" + "0" * 64})
    assert r.status_code == 400 and r.json()["error"] == "missing_header"
    # tampered inside the payload *and* re-hashed: the headers match the body, the capsule's own digests do not
    with tarfile.open(artifact) as tf:
        member = tf.getmember("payload.tar.zst")
    for where in (member.offset_data + 2, member.offset_data + member.size - 1):
        bad = bytearray(data)
        bad[where] ^= 0x40
        r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", bytes(bad), {**digest_headers(bytes(bad)), **AUTH})
        assert r.status_code == 422 and r.json()["error"] == "invalid_artifact", r.text
    # tampered in a small member (signature.json, the SBOM, the lock) and re-hashed: still refused
    with tarfile.open(artifact) as tf:
        smalls = [tf.getmember(n) for n in ("signature.json", "sbom.spdx.json", "capsule.lock.json")]
    for member in smalls:
        bad = bytearray(data)
        bad[member.offset_data + member.size // 2] ^= 0x01
        r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0", bytes(bad), {**digest_headers(bytes(bad)), **AUTH})
        assert r.status_code == 422 and r.json()["error"] == "invalid_artifact", (member.name, r.text)
    assert snapshot(reg) == before


def test_name_and_version_mismatch(seeded, ato) -> None:
    reg, artifact = seeded
    before = snapshot(reg)
    data = artifact.read_bytes()
    headers = {**digest_headers(data), **AUTH}
    r = put(reg, "/v1/local/capsules/local/other-app/1.0.0", data, headers)
    assert r.status_code == 400 and r.json()["error"] == "scoped_id_mismatch"
    r = put(reg, "/v1/local/capsules/local/cand-app/9.9.9", data, headers)
    assert r.status_code == 400 and r.json()["error"] == "version_mismatch"
    for bad in ("/v1/local/capsules/Local/cand-app/1.0.0", "/v1/local/capsules/local/cand--app/1.0.0"):
        assert put(reg, bad, data, headers).json()["error"] == "invalid_scope"
    r = put(reg, "/v1/local/capsules/local/cand-app/1.0.0?file_name=../x.capsule", data, headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_file_name"
    # the chunk protocol: frames staged in a session, then a commit under the wrong name
    layout = _negotiate_and_stage(reg, artifact)
    commit = {**layout, "publisher": "local", "slug": "other-app", "version": "1.0.0"}
    r = httpx.post(reg.url + "/v1/sync/commit", params={"session": layout["session_id"]}, json=commit,
                   headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "scoped_id_mismatch"
    # the CLI refuses a --scoped-id whose slug is not the manifest name before contacting anyone
    res = ato(["publish", "--artifact", str(artifact), "--registry", reg.url, "--scoped-id", "team/other-app"],
              env={"ATO_TOKEN": TOKEN})
    assert res.code == 1 and "must match artifact manifest.name" in res.stderr
    assert settle(reg, before) == before


def _negotiate_and_stage(reg: Registry, artifact: Path) -> dict:
    from stages.publish import _frame_offsets, inspect_local, negotiate_body
    art = inspect_local(artifact)
    nego = httpx.post(reg.url + "/v1/sync/negotiate", json=negotiate_body(art, "local", art.name, False),
                      headers=AUTH, timeout=30).json()
    session = nego["session_id"]
    data = artifact.read_bytes()
    frames = b"".join(data[off:off + f.frame_size] for f, off in zip(art.frames, _frame_offsets(art), strict=True))
    r = httpx.post(reg.url + "/v1/sync/chunks", params={"session": session}, content=frames, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text
    return {"session_id": session, "file_name": f"{art.name}-{art.version}.capsule",
            "sha256": "sha256:" + art.sha256, "blake3": "blake3:" + art.blake3,
            "prefix": base64.b64encode(data[:art.prefix_size]).decode(),
            "suffix": base64.b64encode(data[art.prefix_size + art.payload_size:]).decode(),
            "chunks": [{"raw_hash": "blake3:" + f.raw_hash, "raw_size": f.raw_size} for f in art.frames]}


def test_commit_with_wrong_digest_or_missing_chunks(seeded) -> None:
    reg, artifact = seeded
    before = snapshot(reg)
    layout = _negotiate_and_stage(reg, artifact)
    body = {**layout, "publisher": "local", "slug": "cand-app", "version": "1.0.0", "blake3": "blake3:" + "1" * 64}
    r = httpx.post(reg.url + "/v1/sync/commit", params={"session": layout["session_id"]}, json=body, headers=AUTH,
                   timeout=60)
    assert r.status_code == 422 and r.json()["error"] == "hash_mismatch"
    body = {**layout, "publisher": "local", "slug": "cand-app", "version": "1.0.0"}
    r = httpx.post(reg.url + "/v1/sync/commit", json=body, headers=AUTH, timeout=60)  # no session: chunks missing
    assert r.status_code == 400 and r.json()["error"] == "missing_chunks"
    # a frame that is not what its name says
    r = httpx.put(reg.url + "/v1/chunks/" + "ab" * 32, content=b"\x28\xb5\x2f\xfd garbage",
                  headers={**AUTH, "x-raw-size": "10"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"] == "chunk_validation_failed"
    assert settle(reg, before) == before


def test_truncated_upload(seeded) -> None:
    reg, artifact = seeded
    before = snapshot(reg)
    data = artifact.read_bytes()
    host, port = reg.url.split("://")[1].split(":")
    head = (f"PUT /v1/local/capsules/local/cand-app/1.0.0 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in digest_headers(data).items()) + "\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    assert settle(reg, before) == before
    assert reg.get("/v1/capsules/by/local/cand-app").status_code == 404
    # the same through the chunk route
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/sync/chunks?session={'a' * 32} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{TOKEN}\r\nContent-Length: 100000\r\n\r\n".encode() + b"\x28\xb5\x2f\xfd" * 100)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    assert settle(reg, before) == before


@pytest.mark.parametrize("entry", ["../escape.txt", "/etc/evil.conf", "a/../../up.txt", "link"])
def test_payload_with_dotdot_absolute_or_escaping_entries(seeded, tmp_path: Path, ato, entry: str) -> None:
    reg, _artifact = seeded
    before = snapshot(reg)
    if entry == "link":
        info = tarfile.TarInfo("lib/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../outside"
        evil = forge_capsule(tmp_path / "evil-app-1.0.0.capsule", "evil-app", "1.0.0",
                             members=[("main.py", b"print(1)\n")], raw_entries=[(info, b"")])
    else:
        evil = forge_capsule(tmp_path / "evil-app-1.0.0.capsule", "evil-app", "1.0.0",
                             members=[("main.py", b"print(1)\n"), (entry, b"owned\n")])
    with tarfile.open(evil) as tf:  # the forged artifact is otherwise a well-formed capsule
        assert tf.getnames()[:2] == ["capsule.toml", "capsule.lock.json"]
    data = evil.read_bytes()
    r = put(reg, "/v1/local/capsules/local/evil-app/1.0.0", data, {**digest_headers(data), **AUTH})
    assert r.status_code == 422 and r.json()["error"] == "unsafe_payload", r.text
    res = ato(["publish", "--artifact", str(evil), "--registry", reg.url, "--json"], env={"ATO_TOKEN": TOKEN})
    assert res.code == 1 and '"E208"' in res.stderr
    assert snapshot(reg) == before


def test_the_forged_capsule_helper_makes_acceptable_capsules(seeded, tmp_path: Path) -> None:
    """Control for the test above: the same forging with safe entries is accepted."""
    reg, _artifact = seeded
    good = forge_capsule(tmp_path / "forged-ok-1.0.0.capsule", "forged-ok", "1.0.0",
                         members=[("main.py", b"print(1)\n"), ("lib/x.txt", b"x\n")])
    data = good.read_bytes()
    r = put(reg, "/v1/local/capsules/local/forged-ok/1.0.0", data, {**digest_headers(data), **AUTH})
    assert r.status_code == 201, r.text
    assert r.json()["blake3"] == "blake3:" + digests(good)["blake3"]


def _serve(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "ATO_HOME": str(home / ".ato"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([cli_path("ato"), "registry", "serve", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_startup_refusals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("untouched")
    before = snapshot(data)
    res = _serve(["--host", "0.0.0.0", "--port", "0", "--data-dir", str(data)], tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--auth-token is required" in res.stderr and "E301" in res.stderr
    assert "ATO_ERR_POLICY_VIOLATION" in res.stderr
    res = _serve(["--host", "0.0.0.0", "--port", "0", "--data-dir", str(data), "--auth-token", "  "], tmp_path)
    assert res.returncode == 1 and "--auth-token is required" in res.stderr
    assert snapshot(data) == before
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = _serve(["--port", str(port), "--data-dir", str(data)], tmp_path)
    assert res.returncode == 3 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Another process is already listening" in lines[0] and str(port) in lines[0]
    res = _serve(["--host", "no-such-host.invalid", "--port", "0", "--auth-token", "t", "--data-dir", str(data)],
                 tmp_path)
    assert res.returncode == 3 and "cannot resolve host" in res.stderr and "Traceback" not in res.stderr
    res = _serve(["--host", "192.0.2.1", "--port", "0", "--auth-token", "t", "--data-dir", str(data)], tmp_path)
    assert res.returncode == 3 and "not available on this machine" in res.stderr
    assert snapshot(data) == before
