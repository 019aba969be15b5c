"""Hostile artifacts through `ato verify` and `ato fetch` (a file): every class of issue 12 is refused
with its one code, exit 1, one readable line, no traceback; nothing outside ATO_HOME changes and
nothing is unpacked. The other entry points: test_hostile_derive_run.py, test_hostile_publish.py,
test_hostile_registry.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.hostile_cases import CASES, MAX_RSS, check_local_refusal, run_ato


@pytest.mark.parametrize("point", ["verify", "fetch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_and_fetch_refuse_every_class(case: str, point: str, hostile_artifacts: dict[str, Path],
                                             hostile_sentinel: Path, tmp_path: Path) -> None:
    check_local_refusal(case, point, hostile_artifacts[case], hostile_sentinel, tmp_path)


def test_verify_json_names_the_failed_check(hostile_artifacts: dict[str, Path]) -> None:
    """--json: the report on stdout says which check failed; the rest are skipped, not guessed."""
    res, _ = run_ato(["verify", str(hostile_artifacts["symlink-chain"]), "--json"])
    assert res.code == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["error"]["code"] == "E208"
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {"archive": "ok", "members": "ok", "signature": "ok", "digests": "failed", "trust": "skipped"}


def test_many_chunk_bomb_passes_with_the_ceiling_lifted_and_memory_stays_flat(
        hostile_artifacts: dict[str, Path]) -> None:
    """With --force-large-payload the 1 GiB payload is a legitimate (if large) one: verify decodes all of
    it, one chunk at a time, and only then says yes."""
    res, rss = run_ato(["verify", str(hostile_artifacts["many-chunk-bomb"]), "--allow-unsigned",
                        "--force-large-payload"])
    assert res.code == 0, res.stderr
    assert rss < MAX_RSS, f"peak RSS {rss / 1e6:.0f} MB"


def test_the_ceiling_can_be_raised_in_config(hostile_artifacts: dict[str, Path]) -> None:
    art = str(hostile_artifacts["many-chunk-bomb"])
    res, _ = run_ato(["verify", art, "--allow-unsigned"], env={"ATO_MAX_PAYLOAD_BYTES": str(2 << 30)})
    assert res.code == 0, res.stderr
    assert run_ato(["config", "set", "payload.max_bytes", str(2 << 30)])[0].code == 0
    res, _ = run_ato(["verify", art, "--allow-unsigned"])
    assert res.code == 0, res.stderr
    res, _ = run_ato(["verify", art, "--allow-unsigned"], env={"ATO_MAX_PAYLOAD_BYTES": "many"})
    assert res.code == 1 and "payload.max_bytes" in res.stderr
