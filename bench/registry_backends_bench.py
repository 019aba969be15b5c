"""Benchmark the registry's backends (issue 18): SQLite + disk next to PostgreSQL + S3.

On one machine, against real ``ato registry serve`` processes on loopback, interleaved (A, B, A,
B, ...) so a slow moment of a shared machine hits both:
  * ``ato publish --artifact`` of a ~50 MB artifact into an empty registry, and ``ato install`` of it
    into an empty ``ATO_HOME`` (every chunk downloaded, verified, stored), per backend;
  * requests/s of the detail route and of downloading a small artifact, under 32 concurrent
    keep-alive clients (``wrk -c32``), with 1 and with 4 worker processes, per backend.
PostgreSQL is Debian's server, started here in a temp dir (as the tests do); the S3 endpoint is
moto's server mode on loopback (the tests' own endpoint): a Python server, so the PostgreSQL + S3
figures are a floor for what a real object store gives, not a measure of one.
Results: bench/results/registry_backends.json and registry_backends.md (min/median/max).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from registry_bench import ATO, TOKEN, env_for, install_flags, load, make_project, run  # noqa: E402
from report import save, table  # noqa: E402

from tests.pg_support import PostgresServer  # noqa: E402
from tests.s3_support import S3Server  # noqa: E402

WORK = HERE / "work" / "registry_backends"
RUNS = int(os.environ.get("ATO_BENCH_RUNS", "3"))  # fewer on a busy machine
ARTIFACT_BYTES = 50 * 1000 * 1000
WORKERS = (1, 4)
S3_ENV: dict[str, str] = {}


class Server:
    """``ato registry serve`` on a fresh data dir, with ``database`` (None: SQLite) and ``workers``."""

    def __init__(self, data: Path, backend: dict[str, str] | None, workers: int = 1) -> None:
        shutil.rmtree(data, ignore_errors=True)
        args = [ATO, "registry", "serve", "--port", "0", "--data-dir", str(data), "--auth-token", TOKEN,
                "--workers", str(workers), "--json"]
        extra_env: dict[str, str] = {}
        if backend:
            args += ["--database", backend["database"], "--blob-store", backend["blob_store"]]
            extra_env = S3_ENV
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**env_for(WORK / "srv"), **extra_env})
        assert self.proc.stdout is not None
        text = ""
        while not text.rstrip().endswith("}"):
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("registry did not start")
            text += line
        self.url = json.loads(text)["url"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(s: dict[str, float], unit: str = "s", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def main() -> int:
    if not shutil.which("wrk"):
        print("wrk is missing (make system-deps installs it); load figures use a Python client", file=sys.stderr)
    WORK.mkdir(parents=True, exist_ok=True)
    builder = WORK / "builder"
    shutil.rmtree(builder, ignore_errors=True)
    project = make_project(WORK / "project", "bench-mid", ARTIFACT_BYTES, seed=3)
    _t, out = run([ATO, "build", str(project), "--json"], env_for(builder))
    artifact = Path(json.loads(out)["artifact"])
    small = make_project(WORK / "small", "bench-small", 20_000, seed=2)
    _t, out = run([ATO, "build", str(small), "--json"], env_for(builder))
    small_artifact = Path(json.loads(out)["artifact"])
    flags = install_flags()
    pg = PostgresServer()
    s3 = S3Server()
    S3_ENV.update(s3.env())
    try:
        def team() -> dict[str, str]:
            return {"database": pg.url(pg.create_database()), "blob_store": f"s3://{s3.create_bucket()}/bench"}
        backends = {"sqlite + disk": lambda: None, "postgresql + s3": team}
        publish: dict[str, list[float]] = {b: [] for b in backends}
        install: dict[str, list[float]] = {b: [] for b in backends}
        for _run in range(RUNS):
            for name, database in backends.items():
                srv = Server(WORK / f"data-{name}", database())
                try:
                    t, _ = run([ATO, "publish", "--artifact", str(artifact), "--registry", srv.url],
                               env_for(builder, ATO_TOKEN=TOKEN))
                    publish[name].append(t)
                    consumer = WORK / f"consumer-{name}"
                    shutil.rmtree(consumer, ignore_errors=True)
                    t, _ = run([ATO, "install", "local/bench-mid", "--registry", srv.url, "--json", *flags],
                               env_for(consumer))
                    install[name].append(t)
                finally:
                    srv.stop()
        loads: dict[str, dict[str, dict[str, object]]] = {}
        for name, database in backends.items():
            for workers in WORKERS:
                srv = Server(WORK / f"load-{name}-{workers}", database(), workers)
                try:
                    run([ATO, "publish", "--artifact", str(small_artifact), "--registry", srv.url],
                        env_for(builder, ATO_TOKEN=TOKEN))
                    time.sleep(1)  # every worker up
                    loads.setdefault(name, {})[f"workers_{workers}"] = {
                        "detail": load(f"{srv.url}/v1/capsules/by/local/bench-small"),
                        "download": load(f"{srv.url}/v1/artifacts/local/bench-small/1.0.0/"
                                         f"bench-small-1.0.0.capsule")}
                finally:
                    srv.stop()
    finally:
        pg.stop()
        s3.stop()
    size = artifact.stat().st_size
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
        "artifact_bytes": size, "small_artifact_bytes": small_artifact.stat().st_size, "runs": RUNS,
        "publish_s": {b: stats(v) for b, v in publish.items()}, "publish_runs_s": publish,
        "install_s": {b: stats(v) for b, v in install.items()}, "install_runs_s": install,
        "publish_mb_per_s": {b: size / 1e6 / statistics.median(v) for b, v in publish.items()},
        "install_mb_per_s": {b: size / 1e6 / statistics.median(v) for b, v in install.items()},
        "load": loads,
        "s3_endpoint": "moto_server (Python) on loopback",
    }
    rows = []
    for b in backends:
        rows.append((f"publish, {b}", f"{fmt(result['publish_s'][b])}, "
                     f"{result['publish_mb_per_s'][b]:.1f} MB/s", ""))
        rows.append((f"install, {b}", f"{fmt(result['install_s'][b])}, "
                     f"{result['install_mb_per_s'][b]:.1f} MB/s", ""))
    for b, by_workers in loads.items():
        for w, routes in by_workers.items():
            for route, doc in routes.items():
                rows.append((f"{route} route, {b}, {w.replace('_', ' ')}, 32 clients",
                             f"{doc['requests_per_s']:.0f} req/s (p99 {doc['p99_latency'] or 'n/a'})", ""))
    save("registry_backends", result, table(
        "ato registry: SQLite + disk vs PostgreSQL + S3",
        f"Artifact: {size / 1e6:.1f} MB. Machine: {os.cpu_count()} CPUs (shared with other work: load average "
        f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}. Loopback; publish and install "
        f"interleaved per backend, {RUNS} runs, median (min–max); `ato` timings include process start-up. "
        "S3 is moto's server mode on loopback (a Python server: a floor, not a real object store).", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
