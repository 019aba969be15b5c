"""Benchmark `ato build` on a ~10,000-file, ~150 MB tree (issue 2).

Measures, on the same tree and machine, in one run:
  * cold build (empty ATO_HOME) next to
    `tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - DIR | zstd -T0 -3`
  * no-op rebuild
  * bytes added to the CAS after changing one file
Each timing is the median of several runs. Results: bench/results/build.json and build.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from report import save, table

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
ATO = str(Path(sys.executable).parent / "ato")
TARGET_FILES = 10_000
TARGET_BYTES = 150 * 1024 * 1024
RUNS = 3
ZSTD_LEVEL = 3  # the level ato uses for its chunk frames
MAX_FILE = 1024 * 1024  # leave out static libraries and other blobs: this is a source tree

MANIFEST = """\
schema_version = "0.2"
name = "bench-tree"
version = "1.0.0"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "src/os.py"
"""


def _source_files() -> list[tuple[Path, Path]]:
    """(path, relpath) of Python's standard library then the installed packages, in a fixed order."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    out: list[tuple[Path, Path]] = []
    for n, root in enumerate(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages"))
            for name in sorted(filenames):
                p = Path(dirpath, name)
                if p.is_file() and not p.is_symlink() and p.stat().st_size < MAX_FILE:
                    out.append((p, Path(f"root{n}") / p.relative_to(root)))
    return out


def make_tree(dest: Path) -> tuple[int, int]:
    """Copy real source files into dest/src until there are TARGET_FILES; returns (files, bytes)."""
    if dest.exists():
        shutil.rmtree(dest)
    sources = _source_files()
    files = total = 0
    rounds = 0
    while files < TARGET_FILES:
        for src, rel in sources:
            if files >= TARGET_FILES:
                break
            out = dest / "src" / f"copy{rounds}" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
            files += 1
            total += out.stat().st_size
        rounds += 1
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "os.py", dest / "src" / "os.py")
    (dest / "capsule.toml").write_text(MANIFEST)
    return files + 1, total


def _time(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, shell=shell, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {cmd}\n{proc.stderr}")
    return elapsed, proc.stdout


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    tree = WORK / "tree"
    files, size = make_tree(tree)
    env = dict(os.environ, SOURCE_DATE_EPOCH="0")
    out_capsule = WORK / "bench-tree.capsule"

    cold, noop = [], []
    doc = {}
    for run in range(RUNS):
        home = WORK / f"home-{run}"
        shutil.rmtree(home, ignore_errors=True)
        run_env = dict(env, ATO_HOME=str(home), HOME=str(WORK))
        t, out = _time([ATO, "build", str(tree), "--out", str(out_capsule), "--json"], run_env)
        cold.append(t)
        doc = json.loads(out)
        t, _ = _time([ATO, "build", str(tree), "--out", str(out_capsule), "--json"], run_env)
        noop.append(t)

    tar_cmd = (f"tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C {tree} . "
               f"| zstd -T0 -{ZSTD_LEVEL} -q -c > {WORK / 'ref.tar.zst'}")
    ref = [_time(tar_cmd, env, shell=True)[0] for _ in range(RUNS)]

    # One changed file: how much does the CAS grow?
    home = WORK / "home-0"
    run_env = dict(env, ATO_HOME=str(home), HOME=str(WORK))
    cas_before = _du(home / "cas")
    candidates = sorted((tree / "src").rglob("*.py"))
    victim = candidates[len(candidates) // 2]
    with open(victim, "a") as fh:
        fh.write("\n# benchmark edit\n")
    _t, out = _time([ATO, "build", str(tree), "--out", str(out_capsule), "--json"], run_env)
    changed = json.loads(out)
    cas_added = _du(home / "cas") - cas_before

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "tree": {"files": files, "bytes": size},
        "artifact_bytes": doc["size"],
        "payload_chunks": doc["payload"]["chunks"],
        "cold_build_s": statistics.median(cold),
        "cold_build_runs_s": cold,
        "tar_zstd_s": statistics.median(ref),
        "tar_zstd_runs_s": ref,
        "tar_zstd_bytes": (WORK / "ref.tar.zst").stat().st_size,
        "cold_vs_tar_zstd": statistics.median(cold) / statistics.median(ref),
        "noop_rebuild_s": statistics.median(noop),
        "noop_rebuild_runs_s": noop,
        "one_file_change": {"file": str(victim.relative_to(tree)), "cas_bytes_added": cas_added,
                            "chunks_inserted": changed["payload"]["chunks_inserted"],
                            "fraction_of_artifact": cas_added / changed["size"]},
        "targets": {"cold_vs_tar_zstd": 1.5, "noop_rebuild_s": 1.0, "one_file_fraction": 0.01},
    }
    save("build", result, table(
        "ato build benchmark",
        f"Tree: {files} files, {size / 1e6:.1f} MB (stdlib + site-packages copy). "
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}. Median of {RUNS} runs.",
        [("cold `ato build`", f"{result['cold_build_s']:.2f} s", ""),
         (f"`tar … \\| zstd -T0 -{ZSTD_LEVEL}`", f"{result['tar_zstd_s']:.2f} s", ""),
         ("cold build / tar+zstd", f"{result['cold_vs_tar_zstd']:.2f}x", "≤ 1.5x"),
         ("no-op rebuild", f"{result['noop_rebuild_s']:.2f} s", "< 1 s"),
         ("CAS growth after one-file change", f"{cas_added} B = "
          f"{100 * result['one_file_change']['fraction_of_artifact']:.3f}% of {changed['size']} B", "< 1%")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
