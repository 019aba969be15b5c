"""`cap init`: inference from package.json, bin/, skills and .mcp.json; never a silent overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_schema
from test_cap_sample import make_package, write_exe

from cas import tempfiles
from pipeline.cap.infer import infer_manifest
from pipeline.cap.manifest import normalize
from pipeline.cap.review import review
from pipeline.envelope import validation_errors
from pipeline.errors import E_MANIFEST, AtoError


def write_package_json(pkg: Path, **fields: object) -> None:
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "package.json").write_text(json.dumps(fields))


def test_sample_package_infers_everything_review_needs(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    doc, info = infer_manifest(pkg, "acme/my-tool")
    assert validation_errors(doc, "cap-manifest") == []
    assert doc["schema"] == "cap-manifest.v0" and doc["name"] == "My Tool" and doc["version"] == "0.1.0"
    assert doc["summary"] == "Inspect and repair ExampleService config files."
    assert doc["install"] == {"backend": "local-bin", "source": {"path": "."}, "bins": {"my-tool": "bin/my-tool"}}
    assert doc["safeTrials"] == [{"command": "my-tool --help", "writes": [], "network": [],
                                  "description": "Print help without reading credentials or changing state."}]
    assert doc["skill"] == "skills/my-tool/SKILL.md"
    assert doc["mcp"] == {"servers": ["my-tool"], "tools": ["my_tool_report", "my_tool_repair"]}
    assert doc["keywords"] == ["exampleservice", "config"]
    assert info.package_json and info.bins == {"my-tool": "bin/my-tool"}
    rv = review(normalize(pkg / "capability.json", doc))
    assert rv.passed and rv.warnings == ["output.structured"]


def test_string_form_bin_is_named_after_the_package(tmp_path: Path) -> None:
    write_package_json(tmp_path, name="@acme/fancy-cli", version="2.0.0", bin="./cli.js")
    doc, _ = infer_manifest(tmp_path, None)
    assert doc["id"] == "acme/fancy-cli" and doc["version"] == "2.0.0"
    assert doc["install"]["bins"] == {"fancy-cli": "cli.js"}
    assert doc["commands"] == [{"name": "fancy-cli", "path": "cli.js", "safeArgs": ["--help"]}]


def test_object_form_bins_each_get_a_help_trial(tmp_path: Path) -> None:
    write_package_json(tmp_path, name="tool", bin={"tool-a": "bin/a.js", "tool-b": "./bin/b.js", "bad name": "x"})
    doc, _ = infer_manifest(tmp_path, "acme/tool")
    assert doc["install"]["bins"] == {"tool-a": "bin/a.js", "tool-b": "bin/b.js"}
    assert [t["command"] for t in doc["safeTrials"]] == ["tool-a --help", "tool-b --help"]


def test_without_package_json_bins_come_from_bin_dir_and_summary_from_the_skill(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg", package_json=False)
    write_exe(pkg / "bin" / "helper.py", "#!/usr/bin/env python3\n")
    (pkg / "bin" / "notes.txt").write_text("not executable")
    doc, info = infer_manifest(pkg, "acme/my-tool")
    assert not info.package_json
    assert doc["install"]["bins"] == {"helper": "bin/helper.py", "my-tool": "bin/my-tool"}
    assert doc["version"] == "0.1.0"
    assert doc["summary"] == "Inspect and repair ExampleService config files."
    assert doc["tasks"] == ["Inspect and repair ExampleService config files."]


def test_several_skills_are_listed(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    (pkg / "skills" / "other").mkdir()
    (pkg / "skills" / "other" / "SKILL.md").write_text("---\nname: other\ndescription: Other job\n---\n")
    doc, _ = infer_manifest(pkg, "acme/my-tool")
    assert "skill" not in doc
    assert doc["skills"] == ["skills/my-tool/SKILL.md", "skills/other/SKILL.md"]
    assert doc["tasks"] == ["Inspect and repair ExampleService config files.", "Other job"]


def test_nothing_to_infer_leaves_gaps_for_review_to_name(tmp_path: Path) -> None:
    doc, _ = infer_manifest(tmp_path, "acme/empty")
    rv = review(normalize(tmp_path / "capability.json", doc))
    assert {c.id for c in rv.failures} == {"package.summary", "package.tasks", "install.bins", "trials.present"}


@pytest.mark.parametrize("package_id", [None, "my-tool", "Acme/Tool", "a/b/c"])
def test_bad_or_missing_id_is_refused(tmp_path: Path, package_id: str | None) -> None:
    write_package_json(tmp_path, name="unscoped")
    with pytest.raises(AtoError) as exc:
        infer_manifest(tmp_path, package_id)
    assert exc.value.message == 'Package id must look like "namespace/name"'


def test_broken_package_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{")
    with pytest.raises(AtoError) as exc:
        infer_manifest(tmp_path, "acme/x")
    assert exc.value.code == E_MANIFEST and "package.json" in exc.value.message


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    (pkg / "capability.json").write_text('{"keep": true}')
    res = cap(["init", "acme/my-tool"], cwd=pkg)
    assert res.code == 1
    assert "Manifest already exists" in res.stderr and "--force" in res.stderr
    assert (pkg / "capability.json").read_text() == '{"keep": true}'

    res = cap(["init", "acme/my-tool", "--force", "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cap-init")
    assert doc["overwritten"] is True and doc["review"]["passed"] is True
    assert json.loads((pkg / "capability.json").read_text()) == doc["capability"]


def test_init_writes_to_manifest_path_and_infers_from_its_directory(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    res = cap(["init", "--manifest", str(pkg / "capability.json"), "--json"], cwd=tmp_path)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cap-init")
    assert doc["capability"]["id"] == "acme/my-tool"
    assert list(tempfiles.find(pkg)) == []
