"""Hostile artifacts through `ato finalize`, `ato project`, `ato run` (a file, and an installed
publisher/slug) and `ato verify publisher/slug`: every class of issue 12 is refused with its one code,
exit 1, one readable line, no traceback; nothing outside ATO_HOME changes, nothing is unpacked, derived or projected.

finalize and project are pointed at a fetch dir and a derived app planted by hand (fetch itself
refuses these artifacts): they re-check the artifact the fetch or the derivation came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.hostile_cases import CASES, check_local_refusal


@pytest.mark.parametrize("point", ["finalize", "project", "run-file", "run-installed", "verify-installed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_finalize_project_and_run_refuse_every_class(case: str, point: str, hostile_artifacts: dict[str, Path],
                                                     hostile_sentinel: Path, tmp_path: Path) -> None:
    check_local_refusal(case, point, hostile_artifacts[case], hostile_sentinel, tmp_path)
