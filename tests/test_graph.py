"""The doit adapter: file_dep checked by stat then BLAKE3, `changed`, results passed between steps, reentrancy."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import pipeline.graph as graph
from pipeline.graph import DigestMemo, Step, run_chain


def _old(path: Path, seconds: int = 600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        p = tmp_path / "src" / f"f{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"file {i}\n")
        _old(p)
        out.append(p)
    return out


def chain(files: list[Path], log: list[Any], config: str = "c1") -> list[Step]:
    def read(changed: list[str]) -> dict[str, Any]:
        log.append(("read", sorted(Path(p).name for p in changed)))
        return {"total": sum(len(p.read_bytes()) for p in files)}

    def use(changed: list[str], read: dict[str, Any]) -> dict[str, Any]:
        log.append(("use", read["total"]))
        return {"doubled": read["total"] * 2}

    return [Step("read", read, {"config": config}, file_dep=[str(p) for p in files]),
            Step("use", use, {"config": config}, after=["read"])]


def test_changed_files_results_between_steps_and_touched_files(tmp_path: Path, files: list[Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "RACY_SECONDS", 0)  # the files' ctimes are fresh; racy stats are tested below
    state = tmp_path / "state"
    log: list[Any] = []
    first = run_chain(chain(files, log), state)
    assert [r.status for r in first] == ["ran", "ran"] and first[1].values == {"doubled": 42}
    # doit reports changed files only when every other input is unchanged; the first run has none to compare
    assert log == [("read", []), ("use", 21)]
    log.clear()
    assert [r.status for r in run_chain(chain(files, log), state)] == ["up-to-date", "up-to-date"] and log == []
    # one file changes: only it is reported, and the next step runs because the result changed
    files[1].write_text("file one, longer\n")
    _old(files[1], 300)
    assert [r.status for r in run_chain(chain(files, log), state)] == ["ran", "ran"]
    assert log == [("read", ["f1.txt"]), ("use", 31)]
    log.clear()
    # touched, same bytes: up to date, hashed once, then known by its new stat
    _old(files[0], 100)
    hashed: list[str] = []
    real = graph.blake3_file
    monkeypatch.setattr(graph, "blake3_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert [r.status for r in run_chain(chain(files, log), state)] == ["up-to-date", "up-to-date"]
    assert hashed == ["f0.txt"] and log == []
    assert [r.status for r in run_chain(chain(files, log), state)] == ["up-to-date", "up-to-date"]
    assert hashed == ["f0.txt"]
    # a config change re-runs the step; the same result keeps the next one up to date
    reports = run_chain(chain(files, log, config="c2"), state, explain=True)
    assert [r.status for r in reports] == ["ran", "ran"]  # "use" has a new config too
    assert "uptodate_false" in reports[0].reasons


def test_the_digest_saved_is_the_one_the_step_used(tmp_path: Path, files: list[Path]) -> None:
    """A file changed while the step ran is not recorded as packed: the next run sees it changed."""
    state = tmp_path / "state"
    memo = DigestMemo(reported=True)

    def read(changed: list[str]) -> dict[str, Any]:
        for p in files:  # what the step read, as a build's payload step reports it
            memo.record(str(p), graph.stat_key(p.stat()), graph.blake3_file(p))
        files[2].write_text("changed behind the step's back\n")
        _old(files[2], 200)
        return {"n": 3}

    run_chain([Step("read", read, "c", file_dep=[str(p) for p in files])], state, memo=memo)
    log: list[Any] = []
    reports = run_chain([Step("read", chain(files, log)[0].action, "c", file_dep=[str(p) for p in files])], state)
    assert reports[0].status == "ran" and log == [("read", ["f2.txt"])]


def test_chains_run_nested_and_one_after_another(tmp_path: Path, files: list[Path]) -> None:
    """No state is kept between runs: a chain can run inside a step of another chain."""
    inner_log: list[Any] = []

    def outer(changed: list[str]) -> dict[str, Any]:
        reports = run_chain(chain(files, inner_log), tmp_path / "inner")
        return {"inner": [r.status for r in reports]}

    reports = run_chain([Step("outer", outer, "o", file_dep=[str(files[0])])], tmp_path / "outer")
    assert reports[0].values == {"inner": ["ran", "ran"]}
    again = run_chain(chain(files, inner_log), tmp_path / "inner")
    assert [r.status for r in again] == ["up-to-date", "up-to-date"]


def test_a_file_written_just_now_is_hashed_again_next_time(tmp_path: Path, files: list[Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Its stat could stay the same through another write within one timestamp tick: never trusted."""
    state = tmp_path / "state"
    files[0].write_text("fresh\n")  # ctime now: within RACY_SECONDS
    log: list[Any] = []
    run_chain(chain(files, log), state)
    hashed: list[str] = []
    real = graph.blake3_file
    monkeypatch.setattr(graph, "blake3_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert [r.status for r in run_chain(chain(files, log), state)] == ["up-to-date", "up-to-date"]
    assert "f0.txt" in hashed


def test_the_checker_takes_the_walks_stat_instead_of_a_stat_of_its_own(tmp_path: Path, files: list[Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A walked file is not stat'ed again: the stat key the walk saw decides (one stat per file per build)."""
    monkeypatch.setattr(graph, "RACY_SECONDS", -3600)  # the fixture's ctimes are recent: save full stat keys
    log: list[Any] = []
    state = tmp_path / "state"
    run_chain(chain(files, log), state)
    walked = {str(p): graph.stat_key(p.stat()) for p in files}
    files[0].write_text("changed, and the walk saw it\n")
    walked_after = dict(walked, **{str(files[0]): graph.stat_key(files[0].stat())})
    log.clear()
    # the walk (as the memo gives it) says nothing changed: doit believes it, without looking again
    run_chain(chain(files, log), state, memo=DigestMemo(stats=walked))
    assert log == []
    # the walk saw the change: the step runs for that file
    run_chain(chain(files, log), state, memo=DigestMemo(stats=walked_after))
    assert log[0] == ("read", ["f0.txt"])


def test_a_file_the_step_did_not_read_keeps_its_state_and_a_later_change_still_shows(
        tmp_path: Path, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental step reads only what changed; the others keep their saved state without a stat after
    the step, and one changed after the walk is found changed by the next run's walk."""
    monkeypatch.setattr(graph, "RACY_SECONDS", -3600)
    state = tmp_path / "state"
    log: list[Any] = []
    run_chain(chain(files, log), state)
    files[0].write_text("edited before the walk\n")
    walked = {str(p): graph.stat_key(p.stat()) for p in files}
    memo = DigestMemo(reported=True, stats=walked)

    def read(changed: list[str]) -> dict[str, Any]:
        for p in map(Path, changed):  # reads only the changed file, as an incremental payload step does
            memo.record(str(p), walked[str(p)], graph.blake3_file(p))
        files[1].write_text("edited while the step ran, not read by it\n")
        return {"n": len(changed)}

    reports = run_chain([Step("read", read, {"config": "c1"}, file_dep=[str(p) for p in files])], state, memo=memo)
    assert reports[0].status == "ran"
    log.clear()
    walked_now = {str(p): graph.stat_key(p.stat()) for p in files}
    run_chain(chain(files, log), state, memo=DigestMemo(stats=walked_now))
    assert log[0] == ("read", ["f1.txt"])


def test_the_collector_is_restored_after_a_build() -> None:
    import gc

    before = (gc.get_threshold(), gc.get_freeze_count())
    with graph.few_collections(gen0=12_345):
        assert gc.get_threshold()[0] == 12_345 and gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
