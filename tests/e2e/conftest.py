"""Fixtures shared by the e2e modules: the hostile artifacts of issue 12, built once per test worker."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hostile_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside every ATO_HOME that the hostile payloads aim at; it must never change."""
    root = tmp_path_factory.mktemp("sentinel")
    (root / "keep.txt").write_text("do not touch\n")
    (root / "x").write_text("the symlink chains aim here\n")
    return root


@pytest.fixture(scope="session")
def hostile_artifacts(tmp_path_factory: pytest.TempPathFactory, hostile_sentinel: Path) -> dict[str, Path]:
    from tests.e2e.hostile_cases import build_all

    return build_all(tmp_path_factory.mktemp("hostile"), hostile_sentinel)
