"""The registry's blob stores, against a real directory and a real S3-compatible endpoint (the
tests' own moto server): one contract, multipart uploads of large packs, byte ranges, presigned
URLs, and one-line refusals of a bad ``--blob-store``."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from pipeline.errors import AtoError
from pipeline.registry.blobs import BlobStore, LocalBlobStore, S3BlobStore, open_blob_store


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    bucket = request.getfixturevalue("s3_bucket")
    store = S3BlobStore(f"s3://{bucket}/some/prefix")
    store.check()
    return store


def test_one_contract_for_a_directory_and_a_bucket(blobs: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "pack.bin"
    src.write_bytes(data)
    blobs.put_file("artifacts/acme/app/1.0.0/app-1.0.0.capsule", src)
    blobs.put_bytes("manifests/abc.json", b"{}")
    assert blobs.size("artifacts/acme/app/1.0.0/app-1.0.0.capsule") == len(data)
    assert blobs.size("artifacts/acme/app/9.9.9/none.capsule") is None
    assert blobs.read_range("artifacts/acme/app/1.0.0/app-1.0.0.capsule", 1000, 5000) == data[1000:6000]
    assert b"".join(blobs.iter_range("artifacts/acme/app/1.0.0/app-1.0.0.capsule", 7, len(data) - 7)) == data[7:]
    assert list(blobs.keys()) == ["artifacts/acme/app/1.0.0/app-1.0.0.capsule", "manifests/abc.json"]
    assert list(blobs.keys("manifests/")) == ["manifests/abc.json"]
    assert blobs.delete("manifests/abc.json") == 2 and blobs.delete("manifests/abc.json") == 0
    with pytest.raises(FileNotFoundError):
        blobs.read("manifests/abc.json")
    for bad in ("", "/abs", "a/../b", "a//b", "./a"):
        with pytest.raises(ValueError):
            blobs.size(bad)


def test_a_large_pack_goes_up_in_parts_and_ranges_come_back(s3_bucket: str, s3_server, tmp_path: Path) -> None:
    """Above the multipart threshold boto3 uploads in parts (the object's ETag then ends in -<parts>);
    a presigned URL serves the object, and a Range request on it a part of it, with no credentials."""
    store = S3BlobStore(f"s3://{s3_bucket}/p", multipart_threshold=5 << 20, multipart_part=5 << 20)
    data = os.urandom(12 << 20)
    src = tmp_path / "big.capsule"
    src.write_bytes(data)
    store.put_file("artifacts/big.capsule", src)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="p/artifacts/big.capsule")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")
    assert store.read_range("artifacts/big.capsule", (5 << 20) - 10, 20) == data[(5 << 20) - 10:(5 << 20) + 10]
    url = store.presign("artifacts/big.capsule")
    assert url is not None and "Signature" in url
    assert httpx.get(url, timeout=60).content == data
    part = httpx.get(url, headers={"range": "bytes=100-199"}, timeout=60)
    assert part.status_code == 206 and part.content == data[100:200]


def test_a_bad_blob_store_is_refused_in_one_line(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AtoError) as bad:
        open_blob_store("ftp://host/x", tmp_path)
    assert bad.value.code == "E100" and "s3://bucket/prefix" in bad.value.message
    with pytest.raises(AtoError) as nobucket:
        open_blob_store("s3://", tmp_path)
    assert nobucket.value.code == "E100"
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AtoError) as missing:
        open_blob_store("s3://no-such-bucket-here/x", tmp_path).check()
    assert missing.value.code == "E100" and "no-such-bucket-here" in missing.value.message
    assert "\n" not in missing.value.message
    assert open_blob_store(str(tmp_path / "elsewhere"), tmp_path).local_path("artifacts/x") == \
        tmp_path / "elsewhere" / "artifacts" / "x"
