"""What every benchmark script shares: timing a command (wall and CPU), ``du -sb``, a registry server."""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ATO = str(Path(sys.executable).parent / "ato")
TOKEN = "bench-token"


@dataclass
class Sample:
    wall: float
    cpu: float  # user + system seconds of the command and everything it waited for
    stdout: str


def timed(cmd: list[str] | str, env: dict[str, str] | None = None, *, shell: bool = False,
          cwd: Path | None = None) -> Sample:
    """Run ``cmd`` to completion; a failure stops the benchmark with the command's stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, shell=shell, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {cmd}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(wall, cpu, proc.stdout)


def with_server_cpu(servers: list[Server], fn: Callable[[], Sample]) -> Sample:
    """Run ``fn`` and add what the registry servers spent meanwhile to its CPU time."""
    before = sum(s.cpu() for s in servers)
    sample = fn()
    sample.cpu += sum(s.cpu() for s in servers) - before
    return sample


def du(path: Path) -> int:
    """``du -sb``: apparent bytes, each hard-linked inode counted once."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """An isolated user: HOME and ATO_HOME under ``home``."""
    return dict(os.environ, HOME=str(home), ATO_HOME=str(home / ".ato"), **extra)


class Server:
    """A real ``ato registry serve`` on a free loopback port."""

    def __init__(self, data: Path, env: dict[str, str], fresh: bool = True) -> None:
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        self.proc = subprocess.Popen([ATO, "registry", "serve", "--port", "0", "--data-dir", str(data),
                                      "--auth-token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"(http://\S+)", line)
        if not m:
            raise SystemExit(f"registry did not start: {line!r}")
        self.url = m.group(1)
        import httpx
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/.well-known/capsule.json", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("registry did not answer within 30 s") from None
                time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
