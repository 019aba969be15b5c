"""Benchmark the local registry (issue 3): publish/install of a ~150 MB artifact, and load.

Measured on one machine, against real ``ato registry serve`` processes on loopback:
  * ``ato publish --artifact`` into an empty registry, next to a plain
    ``curl -T`` upload of the same file to the same server's raw upload route
    (``PUT /v1/local/capsules/...``, which runs the same checks and commit);
  * ``ato install`` into an empty ``ATO_HOME`` (every chunk downloaded, verified,
    stored in the CAS and spliced), next to a plain ``curl -o`` download of the
    same artifact from the raw artifact route, and next to that download followed by
    what a careful script adds (``sha256sum -c``, ``b3sum -c``, ``sync``); plus ``ato install`` of v2 (one
    file changed) on top of v1, and an install whose chunks are all local;
  * requests/s for the detail route and for downloading a small artifact under
    32 concurrent keep-alive clients (``wrk -c32``; a Python client when wrk is absent).
Timings are medians of RUNS runs. Results: bench/results/registry.json and registry.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import ATO, TOKEN, Server, env_for
from report import save, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "registry"
RUNS = 3
TARGET_BYTES = 150 * 1000 * 1000
LOAD_SECONDS = 5
CONCURRENCY = 32

sys.path.insert(0, str(ROOT))


def make_project(dest: Path, name: str, size: int, seed: int) -> Path:
    """``size`` bytes of files: mostly incompressible (media-like) blobs, some text."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "assets").mkdir(parents=True)
    rnd = __import__("random").Random(seed)
    written, i = 0, 0
    while written < size * 0.9:
        n = min(4 << 20, int(size * 0.9) - written)
        (dest / "assets" / f"blob{i:03d}.bin").write_bytes(rnd.randbytes(n))
        written += n
        i += 1
    text = "".join(f"line {k}: {rnd.random()}\n" for k in range(int(size * 0.1) // 20))
    (dest / "assets" / "data.txt").write_text(text[: int(size * 0.1)])
    (dest / "main.py").write_text("print('bench')\n")
    (dest / "capsule.toml").write_text(f"""\
schema_version = "0.2"
name = "{name}"
version = "1.0.0"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "main.py"
""")
    return dest


def run(cmd: list[str] | str, env: dict[str, str] | None = None, shell: bool = False) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, shell=shell, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {cmd}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def file_digests(path: Path) -> tuple[str, str]:
    import blake3
    sha, b3 = hashlib.sha256(), blake3.blake3()
    with open(path, "rb") as fh:
        while data := fh.read(1 << 20):
            sha.update(data)
            b3.update(data)
    return sha.hexdigest(), b3.hexdigest()


def install_flags() -> list[str]:
    out = subprocess.run([ATO, "install", "--help"], capture_output=True, text=True).stdout
    return ["--allow-unsigned"] if "--allow-unsigned" in out else []


def load(url: str) -> dict[str, float | str]:
    """Requests/s under CONCURRENCY keep-alive clients."""
    if shutil.which("wrk"):
        _t, out = run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{LOAD_SECONDS}s", "--latency", url])
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = re.search(r"99%\s+([\d.]+\w+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors:
            raise SystemExit(f"load test got errors: {out}")
        return {"tool": f"wrk -t2 -c{CONCURRENCY} -d{LOAD_SECONDS}s", "requests_per_s": rps,
                "p99_latency": p99.group(1) if p99 else ""}
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        n = 0
        while time.monotonic() < stop:
            conn.request("GET", parts.path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise SystemExit(f"load test got HTTP {resp.status}")
            n += 1
        with lock:
            count[0] += n
    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tool": f"python http.client x{CONCURRENCY}", "requests_per_s": count[0] / (time.monotonic() - start),
            "p99_latency": ""}


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    builder = WORK / "builder"
    shutil.rmtree(builder, ignore_errors=True)
    project = make_project(WORK / "project", "bench-big", TARGET_BYTES, seed=1)
    _t, out = run([ATO, "build", str(project), "--json"], env_for(builder))
    artifact = Path(json.loads(out)["artifact"])
    size = artifact.stat().st_size
    sha, b3 = file_digests(artifact)
    flags = install_flags()

    publish_s, curl_up_s, install_s, curl_down_s, warm_install_s, verified_down_s = [], [], [], [], [], []
    for i in range(RUNS):
        # plain curl upload to the raw upload route of a fresh registry
        srv = Server(WORK / f"data-curl-{i}", env_for(WORK / "srv"))
        t, _ = run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(artifact), "-H", f"Authorization: Bearer {TOKEN}",
                    "-H", f"x-ato-sha256: sha256:{sha}", "-H", f"x-ato-blake3: blake3:{b3}",
                    "-H", "content-type: application/octet-stream",
                    f"{srv.url}/v1/local/capsules/local/bench-big/1.0.0?file_name=bench-big-1.0.0.capsule"])
        curl_up_s.append(t)
        srv.stop()
        # ato publish (chunk-level: every chunk is missing in a fresh registry)
        srv = Server(WORK / f"data-{i}", env_for(WORK / "srv"))
        t, _ = run([ATO, "publish", "--artifact", str(artifact), "--registry", srv.url],
                   env_for(builder, ATO_TOKEN=TOKEN))
        publish_s.append(t)
        # plain curl download of the raw artifact route
        url = f"{srv.url}/v1/artifacts/local/bench-big/1.0.0/bench-big-1.0.0.capsule"
        dest = WORK / "curl-download.capsule"
        t, _ = run(["curl", "-sS", "-f", "-o", str(dest), url])
        curl_down_s.append(t)
        dest.unlink()
        # the same download, then what a careful script adds: both digests checked, the file made durable
        t, _ = run(f"curl -sS -f -o {dest} {url} && echo '{sha}  {dest}' | sha256sum -c --quiet - && "
                   f"echo '{b3}  {dest}' | b3sum -c --quiet - && sync {dest}", shell=True)
        verified_down_s.append(t)
        dest.unlink()
        # ato install into an empty ATO_HOME: every chunk downloaded, verified, stored, spliced
        consumer = WORK / f"consumer-{i}"
        shutil.rmtree(consumer, ignore_errors=True)
        t, out = run([ATO, "install", "local/bench-big", "--registry", srv.url, "--json", *flags],
                     env_for(consumer))
        install_s.append(t)
        transfer = json.loads(out)["transfer"]
        # install where every chunk is already in the local CAS (the publisher's own machine)
        shutil.rmtree(builder / ".ato" / "store", ignore_errors=True)
        t, _ = run([ATO, "install", "local/bench-big", "--registry", srv.url, "--json", *flags], env_for(builder))
        warm_install_s.append(t)
        srv.stop()
        if i < RUNS - 1:
            shutil.rmtree(WORK / f"data-{i}", ignore_errors=True)
            shutil.rmtree(WORK / f"data-curl-{i}", ignore_errors=True)
            shutil.rmtree(consumer, ignore_errors=True)

    # v2 with one blob changed, installed on top of v1 (last run's consumer still has v1)
    srv = Server(WORK / f"data-{RUNS - 1}", env_for(WORK / "srv"), fresh=False)
    blob = project / "assets" / "blob010.bin"
    blob.write_bytes(os.urandom(blob.stat().st_size))
    text = (project / "capsule.toml").read_text().replace('version = "1.0.0"', 'version = "2.0.0"')
    (project / "capsule.toml").write_text(text)
    _t, out = run([ATO, "build", str(project), "--json"], env_for(builder))
    v2 = Path(json.loads(out)["artifact"])
    t_pub2, out = run([ATO, "publish", "--artifact", str(v2), "--registry", srv.url, "--json"],
                      env_for(builder, ATO_TOKEN=TOKEN))
    pub2 = json.loads(out)["publish"]["transfer"]
    t_inst2, out = run([ATO, "install", "local/bench-big", "--registry", srv.url, "--json", *flags],
                       env_for(WORK / f"consumer-{RUNS - 1}"))
    inst2 = json.loads(out)["transfer"]

    # load: detail and download of a small artifact
    small = make_project(WORK / "small", "bench-small", 20_000, seed=2)
    _t, out = run([ATO, "build", str(small), "--json"], env_for(builder))
    run([ATO, "publish", "--artifact", json.loads(out)["artifact"], "--registry", srv.url],
        env_for(builder, ATO_TOKEN=TOKEN))
    detail_load = load(f"{srv.url}/v1/capsules/by/local/bench-small")
    download_load = load(f"{srv.url}/v1/artifacts/local/bench-small/1.0.0/bench-small-1.0.0.capsule")
    small_size = (WORK / "small" / "bench-small-1.0.0.capsule").stat().st_size
    srv.stop()

    med = statistics.median
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "artifact": {"bytes": size, "chunks": transfer["chunks_total"]},
        "publish_s": med(publish_s), "publish_runs_s": publish_s,
        "curl_upload_s": med(curl_up_s), "curl_upload_runs_s": curl_up_s,
        "publish_vs_curl_upload": med(publish_s) / med(curl_up_s),
        "install_s": med(install_s), "install_runs_s": install_s,
        "curl_download_s": med(curl_down_s), "curl_download_runs_s": curl_down_s,
        "install_vs_curl_download": med(install_s) / med(curl_down_s),
        "curl_verified_durable_download_s": med(verified_down_s), "curl_verified_durable_download_runs_s": verified_down_s,
        "install_vs_verified_durable_download": med(install_s) / med(verified_down_s),
        "install_all_chunks_local_s": med(warm_install_s),
        "install_transfer": transfer,
        "v2_one_blob_changed": {"publish_s": t_pub2, "publish_transfer": pub2, "install_s": t_inst2,
                                "install_transfer": inst2},
        "load": {"concurrency": CONCURRENCY, "detail": detail_load,
                 "download_small_artifact": {**download_load, "artifact_bytes": small_size}},
        "targets": {"install_vs_curl_download": 1.5},
    }
    save("registry", result, table(
        "ato registry benchmark",
        f"Artifact: {size / 1e6:.1f} MB, {transfer['chunks_total']} chunks (90% incompressible blobs, 10% text). "
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}. Loopback, median of {RUNS} runs; "
        "`ato` timings include process start-up.",
        [("`ato publish --artifact` (empty registry)", f"{med(publish_s):.2f} s", ""),
         ("`curl -T` to the raw upload route", f"{med(curl_up_s):.2f} s", ""),
         ("publish / curl upload", f"{result['publish_vs_curl_upload']:.2f}x", ""),
         ("`ato install` (empty ATO_HOME)", f"{med(install_s):.2f} s", ""),
         ("`curl -o` from the raw artifact route", f"{med(curl_down_s):.2f} s", ""),
         ("install / curl download", f"{result['install_vs_curl_download']:.2f}x", "≤ 1.5x"),
         ("`curl -o` + `sha256sum -c` + `b3sum -c` + `sync` (verified, durable)", f"{med(verified_down_s):.2f} s", ""),
         ("install / verified durable download", f"{result['install_vs_verified_durable_download']:.2f}x", ""),
         ("`ato install`, all chunks already local", f"{med(warm_install_s):.2f} s", ""),
         ("v2 (one 4 MB blob changed): publish uploads",
          f"{pub2['chunks_uploaded']} chunks, {pub2['bytes_uploaded'] / 1e6:.2f} MB in {t_pub2:.2f} s", ""),
         ("v2 on top of v1: install downloads",
          f"{inst2['chunks_downloaded']} chunks, {inst2['bytes_downloaded'] / 1e6:.2f} MB in {t_inst2:.2f} s", ""),
         (f"detail route, {CONCURRENCY} clients",
          f"{detail_load['requests_per_s']:.0f} req/s (p99 {detail_load['p99_latency'] or 'n/a'})", ""),
         (f"download {small_size / 1e3:.0f} KB artifact, {CONCURRENCY} clients",
          f"{download_load['requests_per_s']:.0f} req/s (p99 {download_load['p99_latency'] or 'n/a'})", "")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
