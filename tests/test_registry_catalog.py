"""The registry's catalog routes in-process: true totals and opaque cursors over 53 capsules,
signature status per release, yank (hidden from search, never "latest", still downloadable by
exact version) and its restore, and an index written before those columns existed."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from pipeline.registry.server import create_app
from pipeline.registry.storage import RegistryStore
from stages.capsule.keys import generate_key, short_fingerprint
from stages.sign import sign_artifact
from tests.e2e.registry_support import forge_capsule
from tests.test_registry_server import AUTH, TOKEN, upload


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


def put(client: TestClient, path: Path, p: str, s: str, v: str) -> None:
    r = upload(client, path.read_bytes(), p, s, v)
    assert r.status_code == 201, r.text


def publish(client: TestClient, tmp_path: Path, name: str, version: str, key=None) -> Path:
    path = forge_capsule(tmp_path / f"{name}-{version}.capsule", name, version,
                         members=[("main.py", f"print('{name} {version}')\n".encode())])
    if key is not None:
        sign_artifact(path, key)
    put(client, path, "acme", name, version)
    return path


def test_search_reports_the_true_total_and_pages_past_fifty(client: TestClient, tmp_path: Path) -> None:
    for i in range(53):
        publish(client, tmp_path, f"cap-{i:02d}", "1.0.0")
    first = client.get("/v1/capsules", params={"limit": 50}).json()
    assert first["total"] == 53 and len(first["capsules"]) == 50 and first["next_cursor"]
    assert not first["next_cursor"].isdigit()  # opaque, not an offset
    second = client.get("/v1/capsules", params={"limit": 50, "cursor": first["next_cursor"]}).json()
    assert second["total"] == 53 and len(second["capsules"]) == 3 and second["next_cursor"] is None
    seen = [c["scoped_id"] for c in first["capsules"] + second["capsules"]]
    assert sorted(seen) == [f"acme/cap-{i:02d}" for i in range(53)]  # every row once
    # a limit above 50 is clamped, the default page is 20, and the total never depends on the page
    assert len(client.get("/v1/capsules", params={"limit": 500}).json()["capsules"]) == 50
    default = client.get("/v1/capsules").json()
    assert len(default["capsules"]) == 20 and default["total"] == 53
    assert client.get("/v1/capsules", params={"q": "cap-0"}).json()["total"] == 10
    # a publish between two pages neither repeats nor skips a row of the next page
    page = client.get("/v1/capsules", params={"limit": 10}).json()
    publish(client, tmp_path, "late-comer", "1.0.0")
    rest = []
    cursor = page["next_cursor"]
    while cursor:
        nxt = client.get("/v1/capsules", params={"limit": 10, "cursor": cursor}).json()
        rest += [c["scoped_id"] for c in nxt["capsules"]]
        cursor = nxt["next_cursor"]
    assert len(rest) == 43 and not set(rest) & {c["scoped_id"] for c in page["capsules"]}
    # rows: snake_case, plus the reference's camelCase aliases with the same values
    row = first["capsules"][0]
    assert row["latest_version"] == row["latestVersion"] == "1.0.0"
    assert row["updated_at"] == row["updatedAt"] and row["latest_size_bytes"] == row["latestSizeBytes"] > 0


def test_signature_status_and_signer_fingerprint(client: TestClient, tmp_path: Path) -> None:
    key = generate_key()
    publish(client, tmp_path, "signed-app", "1.0.0", key)
    publish(client, tmp_path, "plain-app", "1.0.0")
    signed = client.get("/v1/capsules/by/acme/signed-app").json()
    rel = signed["releases"][0]
    assert rel["signature_status"] == "verified" and signed["signature_status"] == "verified"
    assert rel["signer"]["key_id"] == key.did and rel["signer"]["fingerprint"] == key.fingerprint
    assert rel["signer"]["short_fingerprint"] == short_fingerprint(key.fingerprint)
    plain = client.get("/v1/capsules/by/acme/plain-app").json()
    assert plain["releases"][0]["signature_status"] == "unsigned" and plain["releases"][0]["signer"] is None
    rows = {c["slug"]: c for c in client.get("/v1/capsules").json()["capsules"]}
    assert rows["signed-app"]["signature_status"] == "verified" and rows["plain-app"]["signature_status"] == "unsigned"
    dist = client.get("/v1/capsules/by/acme/plain-app/distributions").json()
    assert dist["signature_status"] == "unsigned" and dist["yanked"] is False


def test_yank_hides_from_search_and_latest_but_keeps_exact_downloads(client: TestClient, tmp_path: Path) -> None:
    v1 = publish(client, tmp_path, "yanky", "1.0.0")
    v2 = publish(client, tmp_path, "yanky", "2.0.0")
    assert client.post("/v1/local/capsules/by/acme/yanky/yank", json={"version": "2.0.0"}).status_code == 401
    r = client.post("/v1/local/capsules/by/acme/yanky/yank", json={"version": "2.0.0"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["yanked"] is True and r.json()["latest_version"] == "1.0.0"
    detail = client.get("/v1/capsules/by/acme/yanky").json()
    assert detail["latest_version"] == "1.0.0"
    assert {x["version"]: x["yanked"] for x in detail["releases"]} == {"2.0.0": True, "1.0.0": False}
    assert client.get("/v1/capsules/by/acme/yanky/distributions").json()["version"] == "1.0.0"
    exact = client.get("/v1/capsules/by/acme/yanky/distributions", params={"version": "2.0.0"}).json()
    assert exact["yanked"] is True
    assert client.get(exact["artifact_url"]).content == v2.read_bytes()
    # every version yanked: gone from search, no "latest", exact versions still served
    client.post("/v1/local/capsules/by/acme/yanky/yank", json={"version": "1.0.0"}, headers=AUTH)
    assert client.get("/v1/capsules", params={"q": "yanky"}).json() == {"capsules": [], "total": 0,
                                                                        "next_cursor": None}
    gone = client.get("/v1/capsules/by/acme/yanky/distributions")
    assert gone.status_code == 410 and gone.json()["error"] == "version_yanked"
    dl = client.get("/v1/capsules/by/acme/yanky/download", params={"version": "1.0.0"}, follow_redirects=False)
    assert dl.status_code == 302 and client.get(dl.headers["location"]).content == v1.read_bytes()
    # restore (cargo yank --undo)
    r = client.post("/v1/local/capsules/by/acme/yanky/yank", json={"version": "2.0.0", "yanked": False},
                    headers=AUTH)
    assert r.json()["latest_version"] == "2.0.0"
    assert client.get("/v1/capsules", params={"q": "yanky"}).json()["total"] == 1
    for bad in ({"version": "9.9.9"}, {"version": 1}, {"version": "1.0.0", "yanked": "yes"}):
        r = client.post("/v1/local/capsules/by/acme/yanky/yank", json=bad, headers=AUTH)
        assert r.status_code in (400, 404), bad


@pytest.mark.parametrize("chunk_rows", ["kept", "elsewhere"])
def test_an_index_from_before_signer_and_yank_columns_is_brought_up_to_date(tmp_path: Path, chunk_rows: str) -> None:
    """``elsewhere``: an index written while the registry kept its chunk rows in cas/index.sqlite."""
    first = RegistryStore(tmp_path / "data")
    first.initialize()
    with TestClient(create_app(first, TOKEN, "http://127.0.0.1:1")) as c:
        publish(c, tmp_path, "old-signed", "1.0.0", generate_key())
        publish(c, tmp_path, "old-plain", "1.0.0")
    first.close()
    # the shape of an index written before migrations and before signer/yank columns existed
    db = sqlite3.connect(first.db_path)
    objects = {r[0] for r in db.execute("SELECT raw_hash FROM chunks")}
    for col in ("signed", "signer_key_id", "signed_at", "yanked_at", "metadata_json", "artifact_key"):
        db.execute(f"ALTER TABLE releases DROP COLUMN {col}")
    for table in ("schema_migrations", "release_chunks", "session_chunks", "upload_sessions", "gc_marks",
                  "sources", "source_runs"):
        db.execute(f"DROP TABLE {table}")
    if chunk_rows == "elsewhere":
        db.execute("DELETE FROM chunks")
    db.execute("DROP INDEX chunks_by_blob")
    for col in ("blob_key", "blob_offset"):
        db.execute(f"ALTER TABLE chunks DROP COLUMN {col}")
    db.execute("UPDATE meta SET value='ato-local-registry-2' WHERE key='schema_version'")
    db.commit()
    db.close()
    again = RegistryStore(tmp_path / "data")
    again.initialize()
    with TestClient(create_app(again, TOKEN, "http://127.0.0.1:1")) as c:
        rows = {r["slug"]: r for r in c.get("/v1/capsules").json()["capsules"]}
        assert rows["old-signed"]["signature_status"] == "verified"
        assert rows["old-plain"]["signature_status"] == "unsigned"
        with again.index.read() as conn:
            assert [r["version"] for r in again.index.all(conn, "SELECT version FROM schema_migrations")] == [1, 2, 3]
        # the adopted index knows which chunks each release uses: deleting one frees only its own
        r = c.delete("/v1/local/capsules/by/acme/old-plain?confirmed=true", headers=AUTH).json()
        assert 0 < r["removed_chunks"] < len(objects)
        again.gc(grace=0)
        assert [k for k in again.blobs.keys("artifacts/")] == ["artifacts/acme/old-signed/1.0.0/old-signed-1.0.0.capsule"]
        skel = c.get("/v1/releases/acme/old-signed/1.0.0/skeleton").json()
        got = c.post("/v1/chunks/fetch", json={"chunks": [f["raw_hash"] for f in skel["frames"]]})
        assert got.status_code == 200 and len(got.content) == sum(f["frame_size"] for f in skel["frames"])
        assert c.get("/v1/capsules/by/acme/old-signed").status_code == 200
