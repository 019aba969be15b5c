"""Start-up stays fast: the commands people run most and every error path import no heavy library.

Import *time* is too noisy to assert on a shared machine; which modules a command imports is
not. The heavy ones (schema validation, the task engine, the HTTP stack, crypto, compression)
are imported only by the commands that use them, after the arguments are known to be good.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("jsonschema", "referencing", "doit", "httpx", "trio", "anyio", "cryptography", "zstandard",
         "starlette", "uvicorn", "pipeline.native_delivery", "importlib.metadata")


def imported(args: list[str], cwd: Path) -> tuple[int, set[str]]:
    """Exit code and the modules ``ato ARGS`` imported (``python -X importtime`` lists each once)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"))
    mods = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return proc.returncode, mods


@pytest.mark.parametrize("args, code, allowed", [
    (["--version"], 0, {"importlib.metadata"}),  # where the version is read from
    (["ps"], 0, set()),
    (["build", "does-not-exist"], 1, set()),
    (["install"], 1, set()),
])
def test_fast_paths_import_no_heavy_library(args: list[str], code: int, allowed: set[str], tmp_path: Path) -> None:
    rc, mods = imported(args, tmp_path)
    assert rc == code
    heavy = sorted(m for m in mods if (m.split(".")[0] in HEAVY or m in HEAVY) and m not in allowed)
    assert not heavy, f"ato {' '.join(args)} imported {heavy}"


def test_an_install_from_a_registry_loads_neither_the_task_engine_nor_trio(tmp_path: Path) -> None:
    """A standard install needs the HTTP client and schema validation, but not doit or the build stage
    (native delivery loads them only for a native chain), nor trio (httpcore would import it when
    installed, only to run under trio's event loop)."""
    from tests.e2e.hostile_cases import MAIN
    from tests.e2e.registry_support import Registry
    from tests.hostile_support import capsule, plant_release

    art = capsule(tmp_path / "quick.capsule", "quick", "1.0.0", [MAIN])
    plant_release(tmp_path / "data", art, "local", "quick", "1.0.0", spliced=True)
    reg = Registry(tmp_path / "data", home=tmp_path / "srv")
    try:
        rc, mods = imported(["install", "local/quick", "--registry", reg.url, "--allow-unsigned"], tmp_path)
    finally:
        reg.stop()
    assert rc == 0
    assert "httpx" in mods and "stages.capsule.verifier" in mods  # it did install
    # (a refused import of trio is listed too, as "trio" alone: loading it would list its submodules)
    loaded = sorted(m for m in mods if m.split(".")[0] == "doit" or m.startswith("trio.")
                    or m in ("pipeline.graph", "stages.build"))
    assert not loaded, loaded
