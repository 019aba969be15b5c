"""The hostile artifact classes of issue 12, each built once, and how a refusal must look.

Every class is pushed through every entry point (tests/e2e/test_hostile_*.py) and must be refused
with the same code, exit status 1, one readable line on stderr and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cas.canonical import canonical_json
from stages.capsule import keys
from tests.conftest import Result, cli_path
from tests.hostile_support import (
    Entry,
    capsule,
    many_chunk_bomb,
    single_chunk_bomb,
    tar_bytes,
    with_signature,
)

VERSION = "1.0.0"
MAIN = Entry("main.py", b"print('hostile')\n")


@dataclass(frozen=True)
class Case:
    code: str  # the one code every entry point refuses it with
    build: Callable[[Path, str, Path], Path]  # (dir, capsule name, sentinel dir) -> artifact


def _entries(*entries: Entry) -> Callable[[Path, str, Path], Path]:
    return lambda d, name, _s: capsule(d / f"{name}-{VERSION}.capsule", name, VERSION, [MAIN, *entries])


def _sentinel_entries(make: Callable[[Path], list[Entry]]) -> Callable[[Path, str, Path], Path]:
    return lambda d, name, s: capsule(d / f"{name}-{VERSION}.capsule", name, VERSION, [MAIN, *make(s)])


def _raw(raw: bytes) -> Callable[[Path, str, Path], Path]:
    return lambda d, name, _s: capsule(d / f"{name}-{VERSION}.capsule", name, VERSION, raw_tar=raw)


def _truncated_outer(d: Path, name: str, _s: Path) -> Path:
    art = capsule(d / f"{name}-{VERSION}.capsule", name, VERSION, [MAIN])
    data = art.read_bytes()
    art.write_bytes(data[:-300])  # cut inside the trailing record padding: every member is still whole
    return art


def _signed(edit: Callable[[dict], bytes]) -> Callable[[Path, str, Path], Path]:
    return lambda d, name, _s: with_signature(d / f"{name}-{VERSION}.capsule", name, VERSION, [MAIN],
                                              keys.generate_key(), edit)


def _tampered(doc: dict) -> bytes:
    sig = doc["signature"]
    doc["signature"] = ("B" if sig[10] != "B" else "C").join([sig[:10], sig[11:]])
    return canonical_json(doc)


def _forged_key_id(doc: dict) -> bytes:
    doc["key_id"] = keys.generate_key().did  # claims another signer, keeps the old signature
    return canonical_json(doc)


def _malformed(doc: dict) -> bytes:
    return canonical_json({"signed": True, "version": 1, "key_id": doc["key_id"]})


def _unknown_signer(d: Path, name: str, _s: Path) -> Path:
    return with_signature(d / f"{name}-{VERSION}.capsule", name, VERSION, [MAIN], keys.generate_key(),
                          canonical_json)


CASES: dict[str, Case] = {
    "symlink-chain": Case("E208", _entries(Entry("a/b/l", kind="symlink", link="../.."),
                                           Entry("esc", kind="symlink", link="a/b/l/../../../x"))),
    "symlink-chain-write": Case("E208", _entries(Entry("a/b/l", kind="symlink", link="../.."),
                                                 Entry("esc", kind="symlink", link="a/b/l/../../.."),
                                                 Entry("esc/pwned", b"owned\n"))),
    "marker-symlink": Case("E208", _sentinel_entries(lambda s: [Entry(".ato-unpacked", kind="symlink",
                                                                      link=str(s / "pwned"))])),
    "dotdot": Case("E208", _entries(Entry("../../escape.txt", b"owned\n"))),
    "absolute": Case("E208", _sentinel_entries(lambda s: [Entry(str(s / "abs.txt"), b"owned\n")])),
    "hardlink-absolute": Case("E208", _entries(Entry("h", kind="hardlink", link="/etc/passwd"))),
    "hardlink-dangling": Case("E208", _entries(Entry("h", kind="hardlink", link="later.txt"),
                                               Entry("later.txt", b"x\n"))),
    "device": Case("E208", _entries(Entry("dev", kind="chardev"))),
    "fifo": Case("E208", _entries(Entry("pipe", kind="fifo"))),
    "duplicate": Case("E208", _entries(Entry("a.txt", b"first\n"), Entry("a.txt", b"second\n"))),
    "long-name": Case("E108", _entries(Entry("d/" + "n" * 300, b"x\n"))),
    "truncated-payload": Case("E208", _raw(tar_bytes([MAIN, Entry("big.bin", os.urandom(3000))],
                                                     end=False)[:2000])),
    "non-tar-payload": Case("E208", _raw(os.urandom(5000))),
    "truncated-outer-tar": Case("E213", _truncated_outer),
    "tampered-signature": Case("E208", _signed(_tampered)),
    "forged-key-id": Case("E208", _signed(_forged_key_id)),
    "malformed-signature": Case("E208", _signed(_malformed)),
    "unknown-signer": Case("E301", _unknown_signer),
    "single-chunk-bomb": Case("E208", lambda d, name, _s: single_chunk_bomb(d / f"{name}-{VERSION}.capsule", name,
                                                                            VERSION)),
    "many-chunk-bomb": Case("E212", lambda d, name, _s: many_chunk_bomb(d / f"{name}-{VERSION}.capsule", name,
                                                                        VERSION)),
}
BOMBS = ("single-chunk-bomb", "many-chunk-bomb")
# Refusals decided by this machine's trust store: a registry holds signed artifacts of any signer.
TRUST_ONLY = ("unknown-signer",)


def slug(case: str) -> str:
    return f"h-{case}"


def build_all(root: Path, sentinel: Path) -> dict[str, Path]:
    return {case: CASES[case].build(root, slug(case), sentinel) for case in CASES}


# A launcher that forks and execs ato and reports the grandchild's own peak RSS on a pipe. Linux
# copies the spawning process's high-water RSS into a vforked (or forked) child at exec, so wait4 on
# a child of this (large) pytest worker reports the worker's peak, not ato's: the small launcher's
# fork starts ato from a ~10 MB image instead.
_PEAK_RSS_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())
os._exit(os.waitstatus_to_exitcode(status))
"""


def run_ato(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> tuple[Result, int]:
    """Run the installed ``ato`` and return its result and its own peak RSS in bytes."""
    full = dict(os.environ, **(env or {}))
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_LAUNCHER, str(write_end), cli_path("ato"), *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full, cwd=cwd,
                                    pass_fds=(write_end,), start_new_session=True)
            os.close(write_end)
            write_end = -1
            try:
                proc.wait(timeout=timeout)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            out.seek(0)
            err.seek(0)
            result = Result(proc.returncode, out.read().decode("utf-8", "replace"),
                            err.read().decode("utf-8", "replace"))
        peak_kib = os.read(read_end, 64)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert peak_kib, f"the launcher reported no peak RSS for ato {args}\n{result.stderr}"
    return result, int(peak_kib) * 1024


def assert_refused(res: Result, code: str, what: str) -> None:
    """Exit 1, the code, exactly one human-readable line (plus ATO_ERR_* JSON lines), no traceback."""
    assert res.code == 1, f"{what}: exit {res.code}, expected 1\n{res.stderr}"
    human = [line for line in res.stderr.splitlines() if line.startswith("error[")]
    others = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("error[")]
    assert len(human) == 1, f"{what}: expected one error line\n{res.stderr}"
    assert human[0].startswith(f"error[{code}]: "), f"{what}: expected {code}\n{res.stderr}"
    assert ".ato-tmp" not in human[0], f"{what}: the error names a temp file, not the artifact\n{res.stderr}"
    for line in others:
        if line.startswith("{"):
            json.loads(line)
        else:  # progress notes (e.g. "Installing ...") are allowed, but no second failure line
            assert "error" not in line.lower(), f"{what}: unexpected line {line!r}"


MAX_RSS = 200 * 1024 * 1024


def local_args(case: str, point: str, art: Path, tmp: Path) -> list[str]:
    """The command line that pushes ``art`` through a local entry point (planting what it needs)."""
    from pipeline import paths
    from pipeline.manifest.delivery import host_arch
    from tests.hostile_support import plant_derivation, plant_fetch, plant_installed

    name = slug(case)
    if point == "verify":
        return ["verify", str(art), "--allow-unsigned"]
    if point == "fetch":
        return ["fetch", str(art), "--allow-unsigned"]
    if point == "finalize":
        fetched = plant_fetch(paths.fetches_dir(), art, f"evil/{name}", VERSION)
        return ["finalize", str(fetched), "--allow-external-finalize", "--output-dir", str(tmp / "derived"),
                "--allow-unsigned"]
    if point == "project":
        fetched = plant_fetch(paths.fetches_dir(), art, f"evil/{name}", VERSION)
        app = plant_derivation(tmp / "by-hand" / "derived-20260101T000000Z-00000000", fetched, f"linux/{host_arch()}")
        return ["project", str(app), "--allow-unsigned"]
    if point == "run-file":
        return ["run", str(art), "--allow-unsigned"]
    assert point in ("run-installed", "verify-installed")
    plant_installed(paths.store_dir(), art, "evil", name, VERSION)
    return [point.split("-")[0], f"evil/{name}", "--allow-unsigned"]


def check_local_refusal(case: str, point: str, art: Path, sentinel: Path, tmp: Path) -> None:
    """``point`` refuses ``art`` with the class's code; nothing outside ATO_HOME changes, nothing is
    unpacked, fetched, derived or projected; a bomb costs under 200 MB of memory and writes nothing large."""
    from pipeline import paths
    from tests.hostile_support import du, tree_snapshot

    before = tree_snapshot(sentinel)
    args = local_args(case, point, art, tmp)
    fetched_before = tree_snapshot(paths.fetches_dir()) if paths.fetches_dir().exists() else {}
    res, rss = run_ato(args, cwd=tmp)
    assert_refused(res, CASES[case].code, f"{point} of {case}")
    assert tree_snapshot(sentinel) == before
    assert not paths.unpacked_dir().exists() or not any(paths.unpacked_dir().iterdir())
    after = tree_snapshot(paths.fetches_dir()) if paths.fetches_dir().exists() else {}
    assert after == fetched_before, f"{point} of {case} changed the fetch cache"
    assert not (tmp / "derived").exists() or not any((tmp / "derived").iterdir())
    assert not paths.applications_dir().exists() and not paths.user_bin_dir().exists()
    assert not paths.projections_dir().exists() or not any(paths.projections_dir().iterdir())
    if case in BOMBS:
        assert rss < MAX_RSS, f"{point} of {case}: peak RSS {rss / 1e6:.0f} MB"
        assert du(paths.ato_home()) < 8 << 20, f"{point} of {case} wrote {du(paths.ato_home())} bytes"


def vm_hwm(pid: int) -> int:
    """Peak resident set of a running process (bytes), from /proc: how a registry's bombs are measured."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
