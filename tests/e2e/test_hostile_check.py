"""Hostile artifacts through `ato verify` and `ato fetch` (a file): every class of issue 12 is refused
with its one code, exit 1, one readable line, no traceback; nothing outside ATO_HOME changes and
nothing is unpacked. The other entry points: test_hostile_derive_run.py, test_hostile_publish.py,
test_hostile_registry.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.hostile_cases import CASES, MAX_RSS, TRUST_ONLY, assert_refused, check_local_refusal, run_ato
from tests.hostile_support import tree_snapshot


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


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "k.json"
    assert run_ato(["key", "gen", "--out", str(key)])[0].code == 0
    return key


@pytest.mark.parametrize("case", sorted(CASES))
def test_sign_and_inspect_refuse_every_broken_artifact(case: str, hostile_artifacts: dict[str, Path],
                                                       hostile_sentinel: Path, signing_key: Path,
                                                       tmp_path: Path) -> None:
    """`ato sign` and `ato inspect requirements` read an artifact too: the verifier's code, one line,
    no signed copy. Neither decides trust (signing someone's valid artifact with your own key, or reading
    its requirements, is not running it), and sign, a producer's act, has no payload ceiling."""
    art, before = hostile_artifacts[case], tree_snapshot(hostile_sentinel)
    out = tmp_path / "signed.capsule"
    signed, rss = run_ato(["sign", str(art), "--key", str(signing_key), "--out", str(out)], cwd=tmp_path)
    if case in (*TRUST_ONLY, "many-chunk-bomb"):
        assert signed.code == 0 and out.is_file(), signed.stderr
    else:
        assert_refused(signed, CASES[case].code, f"sign of {case}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "sign left a file behind"
    inspected, rss2 = run_ato(["inspect", "requirements", str(art)], cwd=tmp_path)
    if case in TRUST_ONLY:
        assert inspected.code == 0, inspected.stderr
    else:
        assert_refused(inspected, CASES[case].code, f"inspect of {case}")
    assert tree_snapshot(hostile_sentinel) == before
    assert max(rss, rss2) < MAX_RSS
