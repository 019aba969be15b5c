"""Which S3 client the registry's blob store uses (issue 18): boto3 or obstore, measured.

Against the same S3-compatible endpoint on loopback (moto's server mode, as the tests use), in
interleaved rounds: one 64 MiB object up and down, and 200 ranged GETs of 64 KiB (what serving
chunks from packs does). It runs only where obstore is installed (``pip install obstore``; it is
not a dependency of ato), and is skipped otherwise. Results: bench/results/s3_clients.json and .md (median of 3 rounds).
Run: ``python bench/s3_client_bench.py`` (the moto server comes from the test extra).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from report import save, table  # noqa: E402

from tests.s3_support import S3Server  # noqa: E402

ROUNDS = 3
BIG = 64 << 20
RANGES = 200
PIECE = 64 << 10


def boto3_client(bucket: str, env: dict[str, str]):  # noqa: ANN201
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    c = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test",
                     config=Config(max_pool_connections=64))
    cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)

    def put(key: str, path: Path) -> None:
        c.upload_file(str(path), bucket, key, Config=cfg)

    def get(key: str) -> bytes:
        return c.get_object(Bucket=bucket, Key=key)["Body"].read()

    def ranged(key: str, start: int, length: int) -> bytes:
        return c.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"].read()
    return put, get, ranged


def obstore_client(bucket: str, env: dict[str, str]):  # noqa: ANN201
    import obstore
    from obstore.store import S3Store

    s = S3Store(bucket, endpoint=env["AWS_ENDPOINT_URL"], region="us-east-1", access_key_id="test",
                secret_access_key="test", client_options={"allow_http": True})

    def put(key: str, path: Path) -> None:
        with open(path, "rb") as fh:
            obstore.put(s, key, fh, chunk_size=16 << 20)

    def get(key: str) -> bytes:
        return bytes(obstore.get(s, key).bytes())

    def ranged(key: str, start: int, length: int) -> bytes:
        return bytes(obstore.get_range(s, key, start=start, length=length))
    return put, get, ranged


def main() -> int:
    try:
        import obstore  # noqa: F401
    except ImportError:  # keep the last comparison rather than overwrite it with one side
        print("s3_client_bench: obstore is not installed (pip install obstore to compare); skipped", file=sys.stderr)
        return 0
    clients = {"boto3": boto3_client, "obstore": obstore_client}
    server = S3Server()
    work = HERE / "work" / "s3_clients"
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big.bin"
    big.write_bytes(os.urandom(BIG))
    times: dict[str, dict[str, list[float]]] = {n: {"put": [], "get": [], "ranged": []} for n in clients}
    try:
        bucket = server.create_bucket()
        for _round in range(ROUNDS):
            for name, make in clients.items():
                put, get, ranged = make(bucket, server.env())
                key = f"{name}/big.bin"
                t = time.perf_counter()
                put(key, big)
                times[name]["put"].append(time.perf_counter() - t)
                t = time.perf_counter()
                assert len(get(key)) == BIG
                times[name]["get"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for i in range(RANGES):
                    assert len(ranged(key, (i * 7919 * PIECE) % (BIG - PIECE), PIECE)) == PIECE
                times[name]["ranged"].append(time.perf_counter() - t)
    finally:
        server.stop()
        big.unlink(missing_ok=True)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    rows = []
    for n, d in med.items():
        rows.append((f"{n}: put 64 MiB", f"{d['put']:.2f} s ({BIG / 1e6 / d['put']:.0f} MB/s)", ""))
        rows.append((f"{n}: get 64 MiB", f"{d['get']:.2f} s ({BIG / 1e6 / d['get']:.0f} MB/s)", ""))
        rows.append((f"{n}: {RANGES} ranged GETs of 64 KiB", f"{d['ranged']:.2f} s ({RANGES / d['ranged']:.0f}/s)", ""))
    save("s3_clients", {"rounds": ROUNDS, "runs_s": times, "median_s": med, "endpoint": "moto_server on loopback"},
         table("S3 clients for the registry blob store", f"moto_server on loopback, {ROUNDS} interleaved rounds, "
               "median. The endpoint is a Python server, so both clients wait on it most of the time.", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
