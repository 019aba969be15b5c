"""The tests' own S3-compatible endpoint: moto's server mode (``moto_server``, from PyPI's
``moto[server]``) on 127.0.0.1 on a free port, as a child process.

The registry talks to it exactly as to AWS S3, MinIO, Ceph RGW or R2: through boto3 and the
standard ``AWS_*`` environment variables (:meth:`S3Server.env`), with nothing endpoint-specific.
One server serves a test session (one per xdist worker); every test gets a bucket of its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.pg_support import free_port


def moto_server_bin() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else shutil.which("moto_server")


class S3Server:
    def __init__(self) -> None:
        binary = moto_server_bin()
        if binary is None:
            raise RuntimeError("moto_server is missing: run `make install` (the test extra moto[server])")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="ato-moto-", suffix=".log")[1])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, **self.env()})
        deadline = time.monotonic() + 120  # generous: the machine may be shared with other test runs
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.endpoint + "/", timeout=2)
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start within 120 s")

    def env(self) -> dict[str, str]:
        """What any AWS client reads: endpoint, region and (test) credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def create_bucket(self) -> str:
        name = "ato-test-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.unlink(missing_ok=True)
