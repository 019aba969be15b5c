"""Where the registry keeps bytes: a directory (the default) or an S3-compatible bucket.

A *blob* is an immutable object named by a key such as ``artifacts/<p>/<s>/<v>/<file>``,
``sessions/<id>/<batch>.frames`` or ``cas/objects/blake3/<hh>/<hh>/<hex>.zst``. Which blobs exist
and which are still referenced is the index's business (:mod:`pipeline.registry.storage`); a
blob store only puts whole objects (a reader never sees half of one), reads them or a byte
range of them, and deletes them.

``--blob-store`` chooses it: a path (``/srv/ato-blobs``) or nothing (the data dir) for
:class:`LocalBlobStore`; ``s3://bucket/prefix`` for :class:`S3BlobStore`, which takes the
endpoint, region and credentials from the standard AWS environment variables and config files
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ...) through boto3, with nothing specific to one endpoint: the same code runs
against AWS S3, MinIO, Ceph RGW or R2. Large objects are uploaded in parts (multipart upload).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cas.atomic import fsync_dir
from cas.tempfiles import is_temp, temp_path
from pipeline.errors import E_NETWORK, AtoError

MULTIPART_THRESHOLD = 64 << 20  # objects larger than this are uploaded in parts
MULTIPART_PART = 16 << 20
READ_PIECE = 1 << 20
# the top-level names of blobs (in a local store, the data dir also holds the index and tmp/)
BLOB_TOPS = ("artifacts/", "manifests/", "sessions/", "chunks/", "cas/objects/", "cas/manifests/")


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a blob key: {key!r}")
    return key


class BlobStore:
    """The operations the registry needs; see the module docstring."""

    url: str

    def check(self) -> None:
        """Fail at start-up, with one line, when the store cannot be used."""

    def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def iter_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from ``offset`` in pieces (one request for an object store)."""
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        size = self.size(key)
        if size is None:
            raise FileNotFoundError(key)
        return self.read_range(key, 0, size)

    def delete(self, key: str) -> int:
        """Remove the object; returns the bytes freed (0 when it was not there)."""
        raise NotImplementedError

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every object's key under ``prefix``, sorted (for audits, backups and tests)."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The object as a local file (served with sendfile), or None for a remote store."""
        return None

    def presign(self, key: str, seconds: int = 300) -> str | None:
        """A time-limited URL a client can GET the object from directly (None: not supported)."""
        return None


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root``; an object appears by rename, so it is whole or absent."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def _place(self, key: str, write: Any) -> None:
        target = self.path(key)
        for attempt in range(3):  # a delete may remove an emptied parent between mkdir and write
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            try:
                write(tmp)
                os.replace(tmp, target)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
            finally:
                tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def put_file(self, key: str, path: Path) -> None:
        def write(tmp: Path) -> None:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(path, tmp)  # same filesystem: the upload's own bytes, now on disk
            except OSError:
                with open(path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, READ_PIECE)
                    dst.flush()
                    os.fsync(dst.fileno())
        self._place(key, write)

    def put_bytes(self, key: str, data: bytes) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        self._place(key, write)

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self.path(key), "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise OSError(f"blob {key} is shorter than {offset + length} bytes")
        return data

    def iter_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        with open(self.path(key), "rb") as fh:
            fh.seek(offset)
            left = length
            while left > 0:
                data = fh.read(min(READ_PIECE, left))
                if not data:
                    raise OSError(f"blob {key} is shorter than {offset + length} bytes")
                left -= len(data)
                yield data

    def keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(BLOB_TOPS) and not is_temp(name):
                    found.append(key)
        yield from sorted(found)

    def delete(self, key: str) -> int:
        path = self.path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        parent = path.parent
        while parent != self.root:  # empty directories a later put recreates
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return size


class S3BlobStore(BlobStore):
    """Blobs as objects in ``s3://bucket/prefix`` (boto3; configuration from the AWS environment)."""

    def __init__(self, url: str, *, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_part: int = MULTIPART_PART) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        rest = url[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise AtoError("E100", f"--blob-store {url!r} names no bucket (expected s3://bucket/prefix)")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                        max_pool_connections=64))
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_part,
                                       max_concurrency=4, use_threads=True)

    def name(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(what) from None
            raise AtoError(E_NETWORK, f"object store {self.url}: {what}: {code or exc}") from None
        except BotoCoreError as exc:
            raise AtoError(E_NETWORK, f"object store {self.url}: {what}: {exc}") from None

    def check(self) -> None:
        try:
            with self._errors(f"bucket {self.bucket}"):
                self.client.head_bucket(Bucket=self.bucket)
        except FileNotFoundError:
            raise AtoError("E100", f"--blob-store {self.url}: the bucket {self.bucket!r} does not exist at "
                                   f"{self.client.meta.endpoint_url}", hint="create it first (the registry "
                                   "never creates buckets)") from None

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(f"upload {key}"):
            self.client.upload_file(str(path), self.bucket, self.name(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"upload {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self.name(key), Body=data)

    def size(self, key: str) -> int | None:
        try:
            with self._errors(f"stat {key}"):
                return int(self.client.head_object(Bucket=self.bucket, Key=self.name(key))["ContentLength"])
        except FileNotFoundError:
            return None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        data = b"".join(self.iter_range(key, offset, length))
        if len(data) != length:
            raise OSError(f"blob {key} is shorter than {offset + length} bytes")
        return data

    def iter_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        if length == 0:
            return
        with self._errors(f"read {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.name(key),
                                          Range=f"bytes={offset}-{offset + length - 1}")["Body"]
        with contextlib.closing(body):
            yield from body.iter_chunks(READ_PIECE)

    def delete(self, key: str) -> int:
        size = self.size(key)
        if size is None:
            return 0
        with self._errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.name(key))
        return size

    def keys(self, prefix: str = "") -> Iterator[str]:
        found = []
        with self._errors("list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                             Prefix=self.prefix + prefix):
                found += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        yield from sorted(found)

    def presign(self, key: str, seconds: int = 300) -> str | None:
        with self._errors(f"presign {key}"):
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                            "Key": self.name(key)},
                                                      ExpiresIn=seconds)


def open_blob_store(spec: str | None, data_dir: Path) -> BlobStore:
    """``--blob-store``: None (the data dir), a directory, or ``s3://bucket/prefix``."""
    if not spec:
        return LocalBlobStore(data_dir)
    if spec.startswith("s3://"):
        return S3BlobStore(spec)
    if "://" in spec:
        raise AtoError("E100", f"--blob-store must be a directory or s3://bucket/prefix (got {spec!r})")
    return LocalBlobStore(Path(spec).expanduser().absolute())
