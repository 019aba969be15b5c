"""Review: every blocking check and every warning, each triggered alone by its defect."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_cap_sample import base_manifest, make_package, url_manifest, write_exe, write_manifest

from pipeline.cap.manifest import read_manifest
from pipeline.cap.review import BLOCKING, WARNINGS, Review, review_document


def run_review(tmp_path: Path, doc: dict[str, Any], trial_timeout: float | None = None,
               **package_kw: Any) -> Review:
    pkg = tmp_path / "pkg"
    if not pkg.exists():
        make_package(pkg, **package_kw)
    path = write_manifest(pkg, doc)
    return review_document(path, read_manifest(path), trial_timeout)[0]


def failed(rv: Review) -> set[str]:
    return {c.id for c in rv.failures}


def check(rv: Review, check_id: str) -> Any:
    return next(c for c in rv.checks if c.id == check_id)


def without(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


def test_check_ids_are_stable_and_reported_in_order(tmp_path: Path) -> None:
    rv = run_review(tmp_path, base_manifest())
    assert [c.id for c in rv.checks] == list(BLOCKING)
    assert check(rv, "trials.run").status == "skip"


# --- blocking checks: (defect, the one check it fails, a phrase of the message) -------------------

BIN = "bin/my-tool"
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "manifest.shape": (base_manifest(commands="my-tool"), "Manifest shape is invalid"),
    "package.id": (base_manifest(id="my-tool"), 'Package id must look like "namespace/name"'),
    "package.version": (base_manifest(version="1.0"), "Package version must be a semantic version like 1.0.0"),
    "package.summary": (base_manifest(summary="  "), "Package summary must be a short one-line description"),
    "package.tasks": (base_manifest(tasks=[]), "Capability card must declare at least one task"),
    "install.backend": (base_manifest(install={"backend": "docker", "bins": {"my-tool": BIN}}),
                        'Install backend must be "local-bin" or "single-file-url"'),
    "install.bins": (without(base_manifest(install={"backend": "local-bin"}), "commands"),
                     "Package must declare at least one command or bin"),
    "trials.present": (base_manifest(safeTrials=[]), "Package must declare at least one safe trial"),
    "trials.bins": (base_manifest(safeTrials=[{"command": "rm -rf / --help"}]),
                    "Safe trial \"rm -rf / --help\" must start with one of this package's declared bins: my-tool"),
    "bins.paths": (base_manifest(commands=[{"name": "my-tool", "path": "bin/missing"}],
                                 install={"backend": "local-bin", "bins": {"my-tool": "bin/missing"}}),
                   "Declared bin path does not exist: bin/missing"),
    "source.pin": (url_manifest(source={"url": "https://example.com/downloaded-tool",
                                        "sha256": "replace-with-artifact-sha256"}),
                   "single-file-url packages must pin install.source.sha256"),
    "mcp.tools": (base_manifest(mcp={"tools": ["my_tool_report", "MyTool-Repair"]}),
                  'MCP tool names must use lower snake case: "MyTool-Repair"'),
    "skill.files": (base_manifest(skill="skills/other/SKILL.md"),
                    "Declared skill file does not exist: skills/other/SKILL.md"),
}


@pytest.mark.parametrize("check_id", list(CASES))
def test_each_blocking_check_is_triggered_alone(tmp_path: Path, check_id: str) -> None:
    doc, phrase = CASES[check_id]
    rv = run_review(tmp_path, doc)
    assert failed(rv) == {check_id}
    assert phrase in check(rv, check_id).message
    assert rv.warnings == []
    assert not rv.passed


def test_every_blocking_check_has_a_trigger_test() -> None:
    covered = set(CASES) | {"package.digest", "trials.run"}
    assert covered == set(BLOCKING)


def test_package_digest_fails_alone_when_a_bin_is_not_a_regular_file(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    (pkg / "bin" / "dir-tool").mkdir()
    doc = base_manifest(commands=[{"name": "my-tool", "path": "bin/dir-tool"}],
                        install={"backend": "local-bin", "bins": {"my-tool": "bin/dir-tool"}})
    rv = run_review(tmp_path, doc)
    assert failed(rv) == {"package.digest"}
    assert check(rv, "package.digest").message.startswith("Executable packages must have a digest")


def test_trials_run_fails_alone_when_a_trial_exits_non_zero(tmp_path: Path) -> None:
    rv = run_review(tmp_path, base_manifest(), trial_timeout=10, script="#!/bin/sh\necho boom >&2\nexit 3\n")
    assert failed(rv) == {"trials.run"}
    assert check(rv, "trials.run").message == 'Safe trial "my-tool --help" failed: exited with code 3'
    assert rv.trials is not None and rv.trials[0].exit_code == 3 and "boom" in rv.trials[0].stderr


def test_trials_run_passes_when_trials_exit_zero(tmp_path: Path) -> None:
    rv = run_review(tmp_path, base_manifest(), trial_timeout=10)
    assert rv.passed and check(rv, "trials.run").status == "pass"
    assert rv.trials is not None and "usage: my-tool" in rv.trials[0].stdout


# --- variants of the same checks ------------------------------------------------------------------

def test_bin_path_escaping_the_package_fails_bins_paths(tmp_path: Path) -> None:
    write_exe(tmp_path / "outside", "#!/bin/sh\n")
    doc = base_manifest(commands=[{"name": "my-tool", "path": "../outside"}],
                        install={"backend": "local-bin", "bins": {"my-tool": "../outside"}})
    rv = run_review(tmp_path, doc)
    assert failed(rv) == {"bins.paths"}
    assert "must stay inside the package source" in check(rv, "bins.paths").message


def test_conflicting_bin_paths_fail_install_bins(tmp_path: Path) -> None:
    doc = base_manifest(install={"backend": "local-bin", "bins": {"my-tool": "bin/other"}})
    rv = run_review(tmp_path, doc)
    assert failed(rv) == {"install.bins"}
    assert check(rv, "install.bins").message == 'Bin "my-tool" is declared with two different paths'


def test_skill_without_description_frontmatter_fails_skill_files(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    (pkg / "skills" / "my-tool" / "SKILL.md").write_text("---\nname: my-tool\n---\nbody\n")
    rv = run_review(tmp_path, base_manifest())
    assert failed(rv) == {"skill.files"}
    assert check(rv, "skill.files").message == \
        "Skill file skills/my-tool/SKILL.md must have name and description frontmatter"


def test_single_file_url_without_url_fails_source_pin(tmp_path: Path) -> None:
    rv = run_review(tmp_path, url_manifest(source={"url": "https://x.example/t", "sha256": "ab" * 32},
                                           install={"backend": "single-file-url", "source": {"url": ""}}))
    assert failed(rv) == {"source.pin"}
    assert check(rv, "source.pin").message == "single-file-url packages must pin an https install.source.url"


def test_install_source_pin_overrides_top_level_source(tmp_path: Path) -> None:
    doc = url_manifest(install={"backend": "single-file-url",
                                "source": {"url": "https://example.com/t", "sha256": "CD" * 32}})
    rv = run_review(tmp_path, doc)
    assert rv.passed


@pytest.mark.parametrize("field", ["bestFor", "capabilityCard"])
def test_tasks_may_come_from_best_for_or_the_card(tmp_path: Path, field: str) -> None:
    value: Any = ["repair config"] if field == "bestFor" else {"bestFor": ["repair config"]}
    rv = run_review(tmp_path, base_manifest(tasks=[], **{field: value}))
    assert rv.passed


def test_several_defects_fail_several_checks(tmp_path: Path) -> None:
    rv = run_review(tmp_path, base_manifest(id="bad", tasks=[], mcp={"tools": ["Bad"]}))
    assert failed(rv) == {"package.id", "package.tasks", "mcp.tools"}
    err = rv.error()
    assert err.message == 'Package id must look like "namespace/name"'
    assert err.details["failed"] == ["package.id", "package.tasks", "mcp.tools"]


def test_non_executable_bin_fails_its_trial_with_a_hint(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    os.chmod(pkg / "bin" / "my-tool", 0o644)
    rv = run_review(tmp_path, base_manifest(), trial_timeout=10)
    assert failed(rv) == {"trials.run"}
    assert "is the bin executable" in check(rv, "trials.run").message


# --- warnings -------------------------------------------------------------------------------------

WARNING_CASES: dict[str, dict[str, Any]] = {
    "skill.missing": without(base_manifest(), "skill"),
    "mcp.missing": without(base_manifest(), "mcp"),
    "output.structured": without(base_manifest(), "structuredOutput"),
    "pricing.unenforced": base_manifest(pricing={"model": "per-call", "usd": 0.01}),
}


@pytest.mark.parametrize("warning_id", list(WARNING_CASES))
def test_each_warning_is_triggered_alone_and_does_not_block(tmp_path: Path, warning_id: str) -> None:
    rv = run_review(tmp_path, WARNING_CASES[warning_id])
    assert rv.passed
    assert rv.warnings == [warning_id]
    assert rv.warnings_json()[0]["message"] == WARNINGS[warning_id]


def test_structured_output_false_still_warns(tmp_path: Path) -> None:
    assert run_review(tmp_path, base_manifest(structuredOutput=False)).warnings == ["output.structured"]
