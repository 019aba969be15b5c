"""The layers contract (pyproject.toml, run by `make lint`) places every part of the program.

import-linter only checks the modules a contract names, so a new ``pipeline/x.py`` that nobody
placed would be free to import anything. This test makes placing it part of adding it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layer_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    assert "ignore_imports" not in contract, "back-edges are fixed, not ignored"
    names: set[str] = set()
    for layer in contract["layers"]:
        for part in layer.replace(":", "|").split("|"):
            names.add(part.strip().strip("()"))
    return names


def test_every_top_level_module_is_in_a_layer() -> None:
    placed = _layer_modules()
    found = {"stages", "cas"}
    for entry in (ROOT / "pipeline").iterdir():
        if entry.name.startswith(("_", ".")):
            continue
        if entry.suffix == ".py" or (entry / "__init__.py").is_file():
            found.add(f"pipeline.{entry.stem}")
    assert sorted(found - placed) == [], "place these modules in the layers contract in pyproject.toml"


def test_layers_contract_is_kept() -> None:
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--contract", "layers", "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
