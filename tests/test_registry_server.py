"""The registry app in-process (Starlette TestClient): routes, auth, storage rules, rollback."""

from __future__ import annotations

import base64
import hashlib
import os
import warnings
from pathlib import Path

import blake3
import httpx
import pytest

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what this project ships
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from pipeline import names
from pipeline.registry.server import create_app, is_loopback, tokens_equal
from pipeline.registry.storage import RegistryError, RegistryStore, normalize_runtime_config
from tests.e2e.registry_support import forge_capsule, snapshot

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store(tmp_path: Path, registry_backend):
    """A registry store on each index backend (SQLite, then PostgreSQL)."""
    s = registry_backend.store(tmp_path / "data")
    s.initialize()
    yield s
    s.close()


@pytest.fixture
def client(store: RegistryStore):
    with TestClient(create_app(store, TOKEN, "http://127.0.0.1:1")) as c:
        yield c


def forged(tmp_path: Path, name: str, version: str, size: int = 150_000) -> bytes:
    path = forge_capsule(tmp_path / f"{name}-{version}.capsule", name, version,
                         members=[("main.py", f"print('{name} {version}')\n".encode()),
                                  ("data.bin", os.urandom(size))])
    return path.read_bytes()


def headers_for(data: bytes) -> dict[str, str]:
    return {**AUTH, "x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
            "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest()}


def upload(client: TestClient, data: bytes, p: str, s: str, v: str, **params: str):
    return client.put(f"/v1/local/capsules/{p}/{s}/{v}", content=data, headers=headers_for(data), params=params)


def test_well_known_search_detail_distributions_download(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/.well-known/capsule.json").json()["write_auth_required"] is True
    v1 = forged(tmp_path, "app-one", "1.9.0")
    v2 = forged(tmp_path, "app-one", "1.10.0")
    assert upload(client, v1, "acme", "app-one", "1.9.0").status_code == 201
    r = upload(client, v2, "acme", "app-one", "1.10.0")
    assert r.status_code == 201 and r.json()["spliceable"] is True
    detail = client.get("/v1/capsules/by/acme/app-one").json()
    assert detail["latestVersion"] == "1.10.0"  # semver order, not string order
    assert [r["version"] for r in detail["releases"]] == ["1.10.0", "1.9.0"]
    assert detail["manifest"]["version"] == "1.10.0" and detail["runtime_config"] == {"targets": {}}
    assert client.get("/v1/manifest/capsules/by/acme/app-one").json()["scoped_id"] == "acme/app-one"
    dist = client.get("/v1/capsules/by/acme/app-one/distributions", params={"version": "1.9.0"}).json()
    assert dist["blake3"] == "blake3:" + blake3.blake3(v1).hexdigest()
    r = client.get("/v1/capsules/by/acme/app-one/download", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"].endswith("/1.10.0/app-one-1.10.0.capsule")
    assert client.get(r.headers["location"]).content == v2
    ranged = client.get(r.headers["location"], headers={"range": "bytes=0-99"})
    assert ranged.status_code == 206 and ranged.content == v2[:100]
    assert client.get("/v1/capsules/by/acme/nope").json() == {"error": "not_found", "message": "Capsule not found"}
    assert client.get("/v1/capsules/by/acme/app-one/distributions?version=7.0.0").json()["error"] == \
        "version_not_found"
    # search: filter and pagination
    for i in range(3):
        assert upload(client, forged(tmp_path, f"other-{i}", "0.1.0", 1000), "acme", f"other-{i}", "0.1.0") \
            .status_code == 201
    page = client.get("/v1/capsules", params={"q": "other", "limit": 2}).json()
    assert len(page["capsules"]) == 2 and page["total"] == 3 and isinstance(page["next_cursor"], str)
    rest = client.get("/v1/capsules", params={"q": "other", "limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(rest["capsules"]) == 1 and rest["next_cursor"] is None and rest["total"] == 3
    assert {c["scoped_id"] for c in page["capsules"] + rest["capsules"]} == {f"acme/other-{i}" for i in range(3)}
    # the cursor is bound to its query, and a forged one is refused rather than read as "from the start"
    for bad in ({"q": "app", "cursor": page["next_cursor"]}, {"q": "other", "cursor": "not-a-cursor"}):
        r = client.get("/v1/capsules", params=bad)
        assert r.status_code == 400 and r.json()["error"] == "invalid_cursor"
    # the reference server's decimal offsets still work
    assert len(client.get("/v1/capsules", params={"q": "other", "cursor": "2"}).json()["capsules"]) == 1
    assert client.get("/v1/capsules", params={"q": "100%_"}).json()["capsules"] == []


def test_skeleton_and_batch_fetch_rebuild_the_exact_artifact(client: TestClient, tmp_path: Path) -> None:
    data = forged(tmp_path, "splice-me", "1.0.0", 400_000)
    assert upload(client, data, "acme", "splice-me", "1.0.0").status_code == 201
    skel = client.get("/v1/releases/acme/splice-me/1.0.0/skeleton").json()
    frames = skel["frames"]
    body = client.post("/v1/chunks/fetch", json={"chunks": [f["raw_hash"] for f in frames]}).content
    assert len(body) == sum(f["frame_size"] for f in frames)
    rebuilt = base64.b64decode(skel["prefix"]) + body + base64.b64decode(skel["suffix"])
    assert rebuilt == data
    one = client.get("/v1/chunks/" + frames[0]["raw_hash"])
    assert one.status_code == 200 and one.content == body[:frames[0]["frame_size"]]
    missing = client.post("/v1/chunks/fetch", json={"chunks": ["blake3:" + "0" * 64]})
    assert missing.status_code == 404 and missing.json()["missing_chunks"] == ["blake3:" + "0" * 64]
    assert client.get("/v1/releases/acme/splice-me/1.0.0/manifest").json()["schema_version"] == 3


def test_artifact_downloads_keep_range_requests(client: TestClient, store: RegistryStore, tmp_path: Path) -> None:
    """Whole, one range, a suffix range, an unsatisfiable range: the same answers from a file on disk
    and from an object streamed out of a bucket."""
    data = forged(tmp_path, "ranged", "1.0.0", 200_000)
    assert upload(client, data, "acme", "ranged", "1.0.0").status_code == 201
    url = "/v1/artifacts/acme/ranged/1.0.0/ranged-1.0.0.capsule"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["x-ato-blake3"] == "blake3:" + blake3.blake3(data).hexdigest()
    part = client.get(url, headers={"range": "bytes=1000-4999"})
    assert part.status_code == 206 and part.content == data[1000:5000]
    assert part.headers["content-range"] == f"bytes 1000-4999/{len(data)}"
    tail = client.get(url, headers={"range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == data[-100:]
    assert client.get(url, headers={"range": f"bytes={len(data) + 10}-"}).status_code == 416


def test_redirect_downloads_send_clients_to_the_bucket(store: RegistryStore, tmp_path: Path) -> None:
    """``--redirect-downloads``: a bucket answers with a presigned URL (Range works there too); a
    local store has none and keeps serving the file itself."""
    with TestClient(create_app(store, TOKEN, "http://127.0.0.1:1", redirect_downloads=True)) as c:
        data = forged(tmp_path, "redirected", "1.0.0", 100_000)
        assert upload(c, data, "acme", "redirected", "1.0.0").status_code == 201
        r = c.get("/v1/artifacts/acme/redirected/1.0.0/redirected-1.0.0.capsule", follow_redirects=False)
        if store.blobs.local_path("artifacts") is not None:
            assert r.status_code == 200 and r.content == data
            return
        assert r.status_code == 307 and "Signature" in r.headers["location"]
        assert r.headers["x-ato-sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert httpx.get(r.headers["location"], timeout=60).content == data
        part = httpx.get(r.headers["location"], headers={"range": "bytes=10-19"}, timeout=60)
        assert part.status_code == 206 and part.content == data[10:20]


def test_chunk_protocol_only_sends_what_is_missing(client: TestClient, tmp_path: Path) -> None:
    from stages.publish import _frame_offsets, inspect_local, negotiate_body
    first = tmp_path / "first.capsule"
    first.write_bytes(forged(tmp_path, "chunky", "1.0.0", 300_000))
    art = inspect_local(first)
    nego = client.post("/v1/sync/negotiate", json=negotiate_body(art, "acme", "chunky", False), headers=AUTH).json()
    assert len(nego["missing_chunks"]) == len(art.frames) and nego["existing"] is None
    data = first.read_bytes()
    frames = b"".join(data[o:o + f.frame_size] for f, o in zip(art.frames, _frame_offsets(art), strict=True))
    staged = client.post("/v1/sync/chunks", params={"session": nego["session_id"]}, content=frames, headers=AUTH)
    assert staged.status_code == 200 and staged.json()["inserted"] == len({f.raw_hash for f in art.frames})
    body = {"publisher": "acme", "slug": "chunky", "version": "1.0.0", "sha256": "sha256:" + art.sha256,
            "blake3": "blake3:" + art.blake3, "prefix": base64.b64encode(data[:art.prefix_size]).decode(),
            "suffix": base64.b64encode(data[art.prefix_size + art.payload_size:]).decode(),
            "chunks": [{"raw_hash": "blake3:" + f.raw_hash, "raw_size": f.raw_size} for f in art.frames]}
    r = client.post("/v1/sync/commit", params={"session": nego["session_id"]}, json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert client.get(r.json()["artifact_url"]).content == data
    # the same version again is refused at negotiation, before any chunk moves
    r = client.post("/v1/sync/negotiate", json=negotiate_body(art, "acme", "chunky", False), headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "version_exists"
    again = client.post("/v1/sync/negotiate", json=negotiate_body(art, "acme", "chunky", True), headers=AUTH).json()
    assert again["existing"] == {"version": "1.0.0", "same_artifact": True}
    r = client.post("/v1/sync/commit", json={**body, "allow_existing": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["already_existed"] is True
    # a new version shares every chunk: nothing is missing
    second = tmp_path / "second.capsule"
    second.write_bytes(data)
    art2 = inspect_local(second)
    nego2 = client.post("/v1/sync/negotiate", json={**negotiate_body(art2, "acme", "chunky", False),
                                                     "version": "1.0.1"}, headers=AUTH).json()
    assert nego2["missing_chunks"] == []
    # the single-chunk PUT route (reference compatible)
    raw = os.urandom(1000)
    frame = __import__("cas.objects", fromlist=["compress"]).compress(raw)
    h = blake3.blake3(raw).hexdigest()
    r = client.put(f"/v1/chunks/blake3:{h}", content=frame, headers={**AUTH, "x-raw-size": str(len(raw))})
    assert r.status_code == 201 and r.json()["inserted"] is True
    assert client.get(f"/v1/chunks/{h}").content == frame
    r = client.put(f"/v1/chunks/blake3:{h}", content=frame, headers={**AUTH, "x-raw-size": str(len(raw))})
    assert r.status_code == 200 and r.json()["inserted"] is False


def test_auth_is_required_for_writes_only(client: TestClient, tmp_path: Path) -> None:
    data = forged(tmp_path, "authy", "1.0.0", 1000)
    h = headers_for(data)
    for bad in ({}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}, {"authorization": "bearer " + TOKEN}):
        hdrs = {k: v for k, v in h.items() if k != "authorization"} | bad
        r = client.put("/v1/local/capsules/acme/authy/1.0.0", content=data, headers=hdrs)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert upload(client, data, "acme", "authy", "1.0.0").status_code == 201
    for method, path in (("put", "/v1/local/capsules/by/acme/authy/runtime-config"),
                         ("delete", "/v1/local/capsules/by/acme/authy?confirmed=true"),
                         ("post", "/v1/sync/negotiate"), ("post", "/v1/sync/commit"), ("post", "/v1/sync/chunks")):
        assert client.request(method, path, json={}).status_code == 401, path
    for path in ("/v1/capsules", "/v1/capsules/by/acme/authy", "/v1/local/capsules/by/acme/authy/runtime-config",
                 "/.well-known/capsule.json", "/"):
        assert client.get(path).status_code == 200, path
    assert tokens_equal("abc", "abc") and not tokens_equal("abc", "abcd") and not tokens_equal("abc", "")


def test_runtime_config_roundtrip_and_validation(client: TestClient, tmp_path: Path) -> None:
    assert upload(client, forged(tmp_path, "cfg", "1.0.0", 1000), "acme", "cfg", "1.0.0").status_code == 201
    url = "/v1/local/capsules/by/acme/cfg/runtime-config"
    r = client.put(url, headers=AUTH, json={"selected_target": " web ", "targets": {
        "web": {"port": "8080", "env": {"A": "1", " ": "dropped", "B": 2}, "permission_mode": "dangerous"},
        "empty": {"env": {}}, "": {"port": 1}}})
    assert r.status_code == 200
    want = {"selected_target": "web", "targets": {"web": {"port": 8080, "env": {"A": "1", "B": "2"},
                                                          "permission_mode": "dangerous"}}}
    assert r.json() == want and client.get(url).json() == want
    assert client.get("/v1/capsules/by/acme/cfg").json()["runtime_config"] == want
    for body, code in (({"targets": {"w": {"port": 0}}}, "invalid_port"),
                       ({"targets": {"w": {"port": 70000}}}, "invalid_port"),
                       ({"targets": {"w": {"permission_mode": "root"}}}, "invalid_permission_mode"),
                       ({"targets": {"w": {"env": {"BAD-NAME": "x"}}}}, "invalid_env"),
                       ({"targets": []}, "invalid_runtime_config"), ([], "invalid_runtime_config")):
        r = client.put(url, headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"] == code, body
    assert client.get(url).json() == want  # refused bodies changed nothing
    assert client.put(url, headers=AUTH, json={"targets": {}}).json() == {"targets": {}}
    assert client.get(url).json() == {"targets": {}}
    assert client.get("/v1/local/capsules/by/acme/none/runtime-config").status_code == 404
    assert client.put("/v1/local/capsules/by/acme/none/runtime-config", headers=AUTH, json={}).status_code == 404


def blob_keys(store: RegistryStore) -> set[str]:
    return set(store.blobs.keys())


def test_delete_release_then_capsule_frees_unshared_chunks(client: TestClient, store: RegistryStore,
                                                          tmp_path: Path) -> None:
    a = forged(tmp_path, "gone", "1.0.0", 200_000)
    b = forged(tmp_path, "gone", "2.0.0", 200_000)
    assert upload(client, a, "acme", "gone", "1.0.0").status_code == 201
    assert upload(client, b, "acme", "gone", "2.0.0").status_code == 201
    blobs_before = blob_keys(store)
    # each artifact is the pack of its chunks: one blob per artifact and payload manifest, none per chunk
    assert {k.split("/")[0] for k in blobs_before} == {"artifacts", "manifests"} and len(blobs_before) == 4
    assert client.delete("/v1/local/capsules/by/acme/gone", headers=AUTH).json()["error"] == \
        "confirmation_required"
    r = client.delete("/v1/local/capsules/by/acme/gone?confirmed=true&version=2.0.0", headers=AUTH).json()
    assert r["removed_versions"] == ["2.0.0"] and r["removed_capsule"] is False and r["removed_chunks"] > 0
    assert client.get("/v1/capsules/by/acme/gone").json()["latestVersion"] == "1.0.0"
    # the blobs are only marked: a sweep inside the grace period keeps them, one after it removes them
    assert blob_keys(store) == blobs_before
    assert store.gc(grace=3600)["files_removed"] == 0
    assert blob_keys(store) == blobs_before
    report = store.gc(grace=0)
    assert report["files_removed"] == 2  # the artifact and its payload manifest
    assert "artifacts/acme/gone/2.0.0/gone-2.0.0.capsule" not in blob_keys(store)
    assert client.get("/v1/capsules/by/acme/gone/distributions?version=1.0.0").status_code == 200
    r = client.delete("/v1/local/capsules/by/acme/gone?confirmed=true", headers=AUTH).json()
    assert r["removed_capsule"] is True
    assert store.gc(grace=0)["files_removed"] == 2
    assert blob_keys(store) == set()
    with store.index.read() as conn:
        assert store.index.scalar(conn, "SELECT COUNT(*) FROM chunks") == 0
    assert store.gc(grace=0)["files_removed"] == 0
    assert client.get("/v1/capsules/by/acme/gone").status_code == 404
    assert client.delete("/v1/local/capsules/by/acme/gone?confirmed=true", headers=AUTH).status_code == 404


def test_chunks_still_used_move_to_another_artifact_when_theirs_is_deleted(client: TestClient,
                                                                           store: RegistryStore,
                                                                           tmp_path: Path) -> None:
    """Two releases share most chunks, stored in the first one's artifact; deleting the first points
    them at the second's, so after the sweep every chunk of the second is still served."""
    shared = os.urandom(300_000)
    arts = []
    for v in ("1.0.0", "2.0.0"):
        path = forge_capsule(tmp_path / f"moved-{v}.capsule", "moved", v,
                             members=[("main.py", f"print('{v}')\n".encode()), ("data.bin", shared)])
        arts.append(path.read_bytes())
        assert upload(client, arts[-1], "acme", "moved", v).status_code == 201
    skel = client.get("/v1/releases/acme/moved/2.0.0/skeleton").json()
    hexes = [f["raw_hash"] for f in skel["frames"]]
    with store.index.read() as conn:
        where = {r["blob_key"] for r in store.index.values_in(
            conn, "SELECT blob_key FROM chunks WHERE raw_hash IN :keys", [h.removeprefix("blake3:") for h in hexes])}
    assert "artifacts/acme/moved/1.0.0/moved-1.0.0.capsule" in where
    client.delete("/v1/local/capsules/by/acme/moved?confirmed=true&version=1.0.0", headers=AUTH)
    assert store.gc(grace=0)["files_removed"] >= 1
    assert "artifacts/acme/moved/1.0.0/moved-1.0.0.capsule" not in blob_keys(store)
    body = client.post("/v1/chunks/fetch", json={"chunks": hexes}).content
    prefix = base64.b64decode(skel["prefix"])
    assert prefix + body + base64.b64decode(skel["suffix"]) == arts[1]
    for h in hexes[:3]:
        assert client.get(f"/v1/chunks/{h}").status_code == 200


def test_a_sweep_waits_for_upload_sessions_older_than_its_marks(client: TestClient, store: RegistryStore,
                                                                tmp_path: Path) -> None:
    """A session negotiated before a delete may have been told the registry holds a chunk: the
    artifact holding it outlives that session, whatever the grace period."""
    data = forged(tmp_path, "held", "1.0.0", 100_000)
    assert upload(client, data, "acme", "held", "1.0.0").status_code == 201
    nego = client.post("/v1/sync/negotiate", headers=AUTH,
                       json={"chunks": [{"raw_hash": "blake3:" + "ab" * 32, "raw_size": 10}]}).json()
    assert nego["missing_chunks"]  # something to upload: the session is open from now on
    blobs = blob_keys(store)
    client.delete("/v1/local/capsules/by/acme/held?confirmed=true", headers=AUTH)
    assert store.gc(grace=0)["files_removed"] == 0 and blob_keys(store) == blobs
    store.drop_session(nego["session_id"])
    assert store.gc(grace=0)["files_removed"] > 0 and blob_keys(store) == set()


def test_failed_commit_leaves_the_data_dir_as_it_was(store: RegistryStore, client: TestClient, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert upload(client, forged(tmp_path, "base", "1.0.0", 100_000), "acme", "base", "1.0.0").status_code == 201
    before = snapshot(store)

    def boom(*_a, **_k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(RegistryStore, "_upsert_package", boom)
    data = forged(tmp_path, "fresh", "1.0.0", 300_000)
    with TestClient(create_app(store, TOKEN, "http://x"), raise_server_exceptions=False) as c:
        r = upload(c, data, "acme", "fresh", "1.0.0")
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert snapshot(store) == before
    assert store.release("acme/fresh", "1.0.0") is None


def test_api_errors_are_json_and_the_ui_is_served(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "message": "API route not found"}
    r = client.delete("/v1/capsules")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert client.get("/v1/chunks/xyz").json()["error"] == "invalid_chunk_hash"
    index = client.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "Ato Local Registry" in index.text and index.headers["cache-control"] == "no-cache"
    assert "textContent" in client.get("/ui/app.js").text
    assert "text/css" in client.get("/ui/style.css").headers["content-type"]
    assert "Ato Local Registry" in client.get("/some/spa/path").text
    assert client.get("/ui/..%2f..%2fregistry.sqlite3").status_code == 404


def test_names_and_helpers() -> None:
    assert names.valid_segment("a") and names.valid_segment("team-x1") and not names.valid_segment("a--b")
    assert not names.valid_segment("-a") and not names.valid_segment("a-") and not names.valid_segment("A")
    assert not names.valid_segment("a" * 64) and names.valid_segment("a" * 63)
    assert names.parse_scoped_id("@acme/app") == ("acme", "app") and names.parse_scoped_id("acme") is None
    assert names.latest(["1.2.0", "1.10.0", "1.10.0-rc.1", "0.9"]) == "1.10.0"
    assert names.version_key("1.0.0-alpha") < names.version_key("1.0.0-alpha.1") < names.version_key("1.0.0-beta") \
        < names.version_key("1.0.0")
    assert not names.valid_version("../1") and not names.valid_version("1/2") and names.valid_version("1.0.0+b.1")
    assert names.normalize_registry_url("127.0.0.1:18787/") == "http://127.0.0.1:18787"
    with pytest.raises(names.RegistryUrlError):
        names.normalize_registry_url("ftp://x")
    assert names.is_official("https://API.ato.run") and names.is_official("https://staging.api.ato.run/")
    assert not names.is_official("http://127.0.0.1:18787")
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    with pytest.raises(RegistryError):
        normalize_runtime_config({"targets": {"x": "y"}})
