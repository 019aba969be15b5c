"""ato against the tools a build engineer would otherwise use, on one fixed tree (issue 13).

One generated tree (bench/tree.py: ~10,000 files, ~150 MB, text and incompressible blobs).
Each round runs, with the order of the tools rotated from round to round (interleaved A/B
runs: a burst of load from other work on the machine hits every tool alike):

  build    ``ato build`` cold (empty ATO_HOME), no-op, and after a one-file change, next to
           ``restic backup`` and ``borg create --compression zstd,3`` into fresh repositories
           (first, unchanged second, and changed third backup) and to
           ``tar --sort=name … | zstd -T0 -3``; the bytes each store grows by with the one-file
           change (``du -sb``), and ``du -sb`` of ATO_HOME after the cold build
  publish  ``ato publish --artifact`` into a fresh registry, next to ``curl -T`` of the same file
           to the raw upload route of another fresh registry
  install  ``ato install`` into an empty ATO_HOME, next to ``curl -o`` + ``sha256sum -c`` +
           ``b3sum -c`` + ``sync`` of the same artifact; ``du -sb`` of ATO_HOME after it

Every ratio is ato's time over the peer's in the same round; the page gives min/median/max
over the rounds. Wall-clock seconds decide; CPU seconds (user+system, children included)
are recorded too (for publish and install including the registry server's), since they move
less when the machine is shared. Results:
bench/results/pipeline.json and pipeline.md. ``BENCH_ROUNDS`` (default 5) sets the rounds,
``BENCH_ONLY=build,publish,install`` a subset.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import ATO, TOKEN, Sample, Server, du, env_for, spread, timed, with_server_cpu
from report import save
from tree import make_tree, stamp, victim

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "pipeline"
TREE = HERE / "work" / "tree"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "build,publish,install").split(",")))
PASSWORD = "bench"  # restic insists on one
SLUG = "bench-tree"
VERSION = "1.0.0"

TARGETS = {  # ato / peer, from issue 13 (direction, not gates)
    "cold_vs_restic": 1.0, "cold_vs_tar_zstd": 1.6, "one_file_vs_restic": 0.5, "one_file_vs_own_noop": 1.3,
    "bytes_added_vs_restic": 2.0, "install_vs_verified_curl": 1.5, "publish_vs_curl_upload": 1.3,
    "home_after_install_vs_artifact": 1.05,
}


def tool_env() -> dict[str, str]:
    return dict(os.environ, SOURCE_DATE_EPOCH="0", RESTIC_PASSWORD=PASSWORD,
                BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                BORG_BASE_DIR=str(WORK / "borg-base"), RESTIC_CACHE_DIR=str(WORK / "restic-cache"))


class BuildRound:
    """Fresh stores for one round of build measurements."""

    def __init__(self) -> None:
        for d in ("home", "restic", "borg", "borg-base", "restic-cache", "out"):
            shutil.rmtree(WORK / d, ignore_errors=True)
        (WORK / "out").mkdir(parents=True)
        self.env = tool_env()
        self.ato_env = dict(env_for(WORK / "home"), SOURCE_DATE_EPOCH="0")
        self.out = WORK / "out" / f"{SLUG}-{VERSION}.capsule"
        subprocess.run(["restic", "init", "--repository-version", "2", "-r", str(WORK / "restic")], env=self.env,
                       check=True, capture_output=True)
        subprocess.run(["borg", "init", "--encryption=none", str(WORK / "borg")], env=self.env, check=True,
                       capture_output=True)
        self.archives = 0

    def ato(self) -> Sample:
        return timed([ATO, "build", str(TREE), "--out", str(self.out), "--json"], self.ato_env)

    def restic(self) -> Sample:
        return timed(["restic", "-r", str(WORK / "restic"), "backup", "--host", "bench", "-q", "tree"], self.env,
                     cwd=TREE.parent)

    def borg(self) -> Sample:
        self.archives += 1
        return timed(["borg", "create", "--compression", "zstd,3", f"{WORK / 'borg'}::a{self.archives}", "tree"],
                     self.env, cwd=TREE.parent)

    def tar_zstd(self) -> Sample:
        return timed(f"tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C {TREE} . "
                     f"| zstd -T0 -3 -q -c > {WORK / 'out' / 'ref.tar.zst'}", self.env, shell=True)

    def sizes(self) -> dict[str, int]:
        home = WORK / "home" / ".ato"
        return {"ato_home": du(home), "ato_cas": du(home / "cas"), "restic": du(WORK / "restic"),
                "borg": du(WORK / "borg")}


def rotate(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    return items[k:] + items[:k]


def build_round(r: int) -> dict[str, Any]:
    b = BuildRound()
    row: dict[str, Any] = {}

    def run_all(phase: str, tools: dict[str, Any]) -> None:
        for name in rotate(sorted(tools), r):
            s = tools[name]()
            row[f"{phase}.{name}"] = {"wall": s.wall, "cpu": s.cpu}
            if name == "ato":
                row[f"{phase}.ato_envelope"] = json.loads(s.stdout)

    run_all("cold", {"ato": b.ato, "restic": b.restic, "borg": b.borg, "tar_zstd": b.tar_zstd})
    row["size.after_cold"] = b.sizes()
    row["artifact_bytes"] = b.out.stat().st_size
    row["tar_zstd_bytes"] = (WORK / "out" / "ref.tar.zst").stat().st_size
    run_all("noop", {"ato": b.ato, "restic": b.restic, "borg": b.borg})
    row["size.after_noop"] = b.sizes()
    edited = victim(TREE)
    original = edited.read_bytes()
    try:
        with open(edited, "ab") as fh:
            fh.write(f"# benchmark edit, round {r}\n".encode())
        run_all("one_file", {"ato": b.ato, "restic": b.restic, "borg": b.borg})
        row["size.after_one_file"] = b.sizes()
    finally:
        edited.write_bytes(original)
    return row


def artifact_for_registry() -> tuple[Path, str, str]:
    """The artifact publish and install move: a build of the unchanged tree (built once)."""
    home = WORK / "publisher"
    out = WORK / "artifact" / f"{SLUG}-{VERSION}.capsule"
    if not out.is_file():
        shutil.rmtree(home, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        timed([ATO, "build", str(TREE), "--out", str(out), "--json"], dict(env_for(home), SOURCE_DATE_EPOCH="0"))
    import blake3
    sha, b3 = hashlib.sha256(), blake3.blake3()
    with open(out, "rb") as fh:
        while data := fh.read(1 << 20):
            sha.update(data)
            b3.update(data)
    return out, sha.hexdigest(), b3.hexdigest()


def registry_round(r: int, artifact: Path, sha: str, b3: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    srv_env = env_for(WORK / "srv")
    publisher_env = env_for(WORK / "publisher", ATO_TOKEN=TOKEN)
    raw = Server(WORK / "data-raw", srv_env)
    srv = Server(WORK / "data", srv_env)
    try:
        def publish() -> Sample:
            return timed([ATO, "publish", "--artifact", str(artifact), "--registry", srv.url, "--json"],
                         publisher_env)

        def curl_upload() -> Sample:
            return timed(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(artifact),
                          "-H", f"Authorization: Bearer {TOKEN}", "-H", f"x-ato-sha256: sha256:{sha}",
                          "-H", f"x-ato-blake3: blake3:{b3}", "-H", "content-type: application/octet-stream",
                          f"{raw.url}/v1/local/capsules/local/{SLUG}/{VERSION}?file_name={artifact.name}"])

        if "publish" in ONLY:
            for name, fn in rotate([("ato", publish), ("curl", curl_upload)], r):
                s = with_server_cpu([raw, srv], fn)
                row[f"publish.{name}"] = {"wall": s.wall, "cpu": s.cpu}
        else:
            publish()
        if "install" in ONLY:
            consumer = WORK / "consumer"
            dest = WORK / "download" / artifact.name
            url = f"{srv.url}/v1/artifacts/local/{SLUG}/{VERSION}/{artifact.name}"

            def install() -> Sample:
                shutil.rmtree(consumer, ignore_errors=True)
                return timed([ATO, "install", f"local/{SLUG}", "--registry", srv.url, "--allow-unsigned", "--json"],
                             env_for(consumer))

            def curl_download() -> Sample:
                shutil.rmtree(dest.parent, ignore_errors=True)
                dest.parent.mkdir(parents=True)
                return timed(f"curl -sS -f -o {dest} {url} && echo '{sha}  {dest}' | sha256sum -c --quiet - && "
                             f"echo '{b3}  {dest}' | b3sum -c --quiet - && sync {dest}", shell=True)

            for name, fn in rotate([("ato", install), ("curl", curl_download)], r):
                s = with_server_cpu([srv], fn)
                row[f"install.{name}"] = {"wall": s.wall, "cpu": s.cpu}
            row["size.after_install"] = {"ato_home": du(consumer / ".ato"), "artifact": artifact.stat().st_size}
    finally:
        raw.stop()
        srv.stop()
    return row


def ratios(rows: list[dict[str, Any]], a: str, b: str, key: str = "wall") -> dict[str, float] | None:
    pairs = [(row[a][key], row[b][key]) for row in rows if a in row and b in row]
    return spread([x / y for x, y in pairs]) if pairs else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"times": {}, "ratios": {}, "cpu_ratios": {}, "sizes": {}}
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, dict) and "wall" in v})
    for k in keys:
        out["times"][k] = {"wall": spread([row[k]["wall"] for row in rows if k in row]),
                           "cpu": spread([row[k]["cpu"] for row in rows if k in row])}
    pairs = {
        "cold_vs_restic": ("cold.ato", "cold.restic"), "cold_vs_borg": ("cold.ato", "cold.borg"),
        "cold_vs_tar_zstd": ("cold.ato", "cold.tar_zstd"),
        "noop_vs_restic": ("noop.ato", "noop.restic"), "noop_vs_borg": ("noop.ato", "noop.borg"),
        "one_file_vs_restic": ("one_file.ato", "one_file.restic"), "one_file_vs_borg": ("one_file.ato", "one_file.borg"),
        "one_file_vs_own_noop": ("one_file.ato", "noop.ato"),
        "publish_vs_curl_upload": ("publish.ato", "publish.curl"),
        "install_vs_verified_curl": ("install.ato", "install.curl"),
    }
    for name, (a, b) in pairs.items():
        for key, bucket in (("wall", "ratios"), ("cpu", "cpu_ratios")):
            value = ratios(rows, a, b, key)
            if value is not None:
                out[bucket][name] = value
    built = [row for row in rows if "size.after_one_file" in row]
    if built:
        def added(row: dict[str, Any], store: str) -> int:
            return row["size.after_one_file"][store] - row["size.after_noop"][store]
        out["sizes"]["one_file_bytes_added"] = {s: spread([added(row, s) for row in built])
                                                for s in ("ato_cas", "ato_home", "restic", "borg")}
        out["ratios"]["bytes_added_vs_restic"] = spread([added(row, "ato_cas") / added(row, "restic") for row in built])
        out["ratios"]["bytes_added_vs_borg"] = spread([added(row, "ato_cas") / added(row, "borg") for row in built])
        out["sizes"]["after_cold"] = {s: spread([row["size.after_cold"][s] for row in built])
                                      for s in ("ato_home", "ato_cas", "restic", "borg")}
        out["sizes"]["artifact_bytes"] = built[0]["artifact_bytes"]
        out["sizes"]["tar_zstd_bytes"] = built[0]["tar_zstd_bytes"]
        out["ratios"]["home_after_cold_build_vs_artifact"] = spread(
            [row["size.after_cold"]["ato_home"] / row["artifact_bytes"] for row in built])
    installed = [row for row in rows if "size.after_install" in row]
    if installed:
        out["ratios"]["home_after_install_vs_artifact"] = spread(
            [row["size.after_install"]["ato_home"] / row["size.after_install"]["artifact"] for row in installed])
    return out


def _fmt(v: dict[str, float] | None, unit: str = "x") -> str:
    if v is None:
        return "—"
    if unit == "x":
        return f"{v['median']:.2f}x ({v['min']:.2f}–{v['max']:.2f})"
    return f"{v['median']:.2f} s ({v['min']:.2f}–{v['max']:.2f})"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    t, ra, cr = s["times"], s["ratios"], s["cpu_ratios"]

    def secs(k: str) -> str:
        return _fmt(t[k]["wall"], "s") if k in t else "—"

    def target(name: str) -> str:
        return f"≤ {TARGETS[name]}x" if name in TARGETS else ""

    lines = [
        "# ato against restic, borg, tar|zstd and curl",
        "",
        f"Tree: {doc['tree']['files']} files, {doc['tree']['bytes'] / 1e6:.1f} MB (bench/tree.py, seed "
        f"{doc['tree']['stamp']['seed']}). {doc['rounds']} interleaved rounds, tool order rotated each round. "
        f"Machine: {doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}; load average "
        f"{doc['load']['before'][0]:.1f} before, {doc['load']['after'][0]:.1f} after (other work shares this "
        "machine). Wall-clock seconds, median (min–max); ratios are ato / peer within a round.",
        "",
        "| measure | ato | peer | ato / peer (wall) | ato / peer (CPU) | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        ("cold build vs `restic backup`", "cold.ato", "cold.restic", "cold_vs_restic"),
        ("cold build vs `borg create --compression zstd,3`", "cold.ato", "cold.borg", "cold_vs_borg"),
        ("cold build vs `tar --sort=name … \\| zstd -T0 -3`", "cold.ato", "cold.tar_zstd", "cold_vs_tar_zstd"),
        ("no-op rebuild vs restic (unchanged 2nd backup)", "noop.ato", "noop.restic", "noop_vs_restic"),
        ("no-op rebuild vs borg", "noop.ato", "noop.borg", "noop_vs_borg"),
        ("one-file change vs restic (changed backup)", "one_file.ato", "one_file.restic", "one_file_vs_restic"),
        ("one-file change vs borg", "one_file.ato", "one_file.borg", "one_file_vs_borg"),
        ("one-file change vs our own no-op", "one_file.ato", "noop.ato", "one_file_vs_own_noop"),
        ("`ato publish` vs `curl -T` (raw upload route)", "publish.ato", "publish.curl", "publish_vs_curl_upload"),
        ("`ato install` vs `curl -o` + `sha256sum -c` + `b3sum -c` + `sync`", "install.ato", "install.curl",
         "install_vs_verified_curl"),
    ]
    for label, a, b, name in rows:
        lines.append(f"| {label} | {secs(a)} | {secs(b)} | {_fmt(ra.get(name))} | {_fmt(cr.get(name))} | "
                     f"{target(name)} |")
    sizes = s["sizes"]
    if "one_file_bytes_added" in sizes:
        added = sizes["one_file_bytes_added"]
        lines.append(f"| bytes added by a one-file change (store): ato `cas/` vs restic repo | "
                     f"{added['ato_cas']['median']:.0f} B | {added['restic']['median']:.0f} B | "
                     f"{_fmt(ra.get('bytes_added_vs_restic'))} | | {target('bytes_added_vs_restic')} |")
        lines.append(f"| bytes added by a one-file change: ato `cas/` vs borg repo | "
                     f"{added['ato_cas']['median']:.0f} B | {added['borg']['median']:.0f} B | "
                     f"{_fmt(ra.get('bytes_added_vs_borg'))} | | |")
        lines.append(f"| bytes added by a one-file change: all of ATO_HOME | {added['ato_home']['median']:.0f} B | "
                     "| | | |")
        cold = sizes["after_cold"]
        lines.append(f"| `du -sb` ATO_HOME after a cold build vs the artifact | {cold['ato_home']['median']:.0f} B | "
                     f"{sizes['artifact_bytes']} B | {_fmt(ra.get('home_after_cold_build_vs_artifact'))} | | "
                     "payload stored once |")
        lines.append(f"| `du -sb` of the stores after the cold backup: restic / borg | "
                     f"| {cold['restic']['median']:.0f} B / {cold['borg']['median']:.0f} B | | | |")
    if "home_after_install_vs_artifact" in ra:
        lines.append(f"| `du -sb` ATO_HOME after an install vs the artifact | | | "
                     f"{_fmt(ra['home_after_install_vs_artifact'])} | | {target('home_after_install_vs_artifact')} |")
    return "\n".join(lines) + "\n"


def tool_version(tool: str) -> str:
    proc = subprocess.run([tool, "version" if tool == "restic" else "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else "?"


def compile_ato() -> None:
    """Byte-compile ato's own modules before timing it, as installing a wheel does.

    The checkout is installed in editable mode and the environment may set
    PYTHONDONTWRITEBYTECODE: each run would then compile every module it imports from source
    (~0.2 s), a cost no installed ato (nor Debian's borg, whose modules are compiled) pays.
    """
    root = HERE.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(root / p) for p in ("cas", "pipeline", "stages"))],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    for tool in ("restic", "borg", "zstd", "b3sum", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `make bench` (it installs the benchmark tools)")
    WORK.mkdir(parents=True, exist_ok=True)
    make_tree(TREE)
    compile_ato()
    files = [p for p in TREE.rglob("*") if p.is_file()]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    artifact = None
    for r in range(ROUNDS):
        row: dict[str, Any] = {"round": r, "load": os.getloadavg()}
        if "build" in ONLY:
            row.update(build_round(r))
        if ONLY & {"publish", "install"}:
            if artifact is None:
                artifact = artifact_for_registry()
            row.update(registry_round(r, *artifact))
        rows.append(row)
        print(f"round {r + 1}/{ROUNDS} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    doc = {
        "benchmark": "ato build/publish/install against restic, borg, tar|zstd and curl (issue 13)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "tools": {t: tool_version(t) for t in ("restic", "borg", "zstd", "curl", "tar")},
        "tree": {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "stamp": stamp()},
        "rounds": ROUNDS, "only": sorted(ONLY), "load": {"before": load_before, "after": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": TARGETS,
        "summary": summarize(rows),
        "runs": [{k: v for k, v in row.items() if not k.endswith("ato_envelope")} for row in rows],
        "ato_envelopes": {k: v for k, v in rows[-1].items() if k.endswith("ato_envelope")} if rows else {},
    }
    save(os.environ.get("BENCH_NAME", "pipeline"), doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
