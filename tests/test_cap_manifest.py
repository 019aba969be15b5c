"""Manifest loading and normalization: one model from the manifest's several spellings."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cap_sample import base_manifest, url_manifest, write_manifest

from pipeline.cap.manifest import E_CAP_MANIFEST_NOT_FOUND, load, normalize
from pipeline.errors import E_MANIFEST, AtoError


def test_bins_merge_commands_and_install_bins(tmp_path: Path) -> None:
    doc = base_manifest(commands=[{"name": "a", "path": "./bin/a"}, {"name": "b"}],
                        install={"bins": {"b": "bin/b", "c": "bin/c"}})
    m = normalize(tmp_path / "capability.json", doc)
    assert m.bins == {"a": "bin/a", "b": "bin/b", "c": "bin/c"}
    assert m.bin_conflicts == []
    assert m.backend == "local-bin" and m.source_path == "."


def test_tasks_merge_from_three_places_without_duplicates(tmp_path: Path) -> None:
    doc = base_manifest(tasks=["a", " b "], bestFor=["b", "c"], capabilityCard={"bestFor": ["c", "d", " "]})
    assert normalize(tmp_path / "c.json", doc).tasks == ["a", "b", "c", "d"]


def test_single_file_url_is_inferred_from_a_top_level_source(tmp_path: Path) -> None:
    m = normalize(tmp_path / "c.json", url_manifest())
    assert m.backend == "single-file-url"
    assert m.source_url == "https://example.com/downloaded-tool" and m.source_sha256 == "ab" * 32
    assert m.bins == {"downloaded-tool": "downloaded-tool"}


def test_mcp_tools_accept_objects_and_skills_accept_both_spellings(tmp_path: Path) -> None:
    doc = base_manifest(mcp={"servers": ["s"], "tools": ["a_b", {"name": "c_d"}]},
                        skill="./skills/x/SKILL.md", skills=["skills/x/SKILL.md", "skills/y/SKILL.md"])
    m = normalize(tmp_path / "c.json", doc)
    assert m.mcp_tools == ["a_b", "c_d"] and m.mcp_servers == ["s"]
    assert m.skills == ["skills/x/SKILL.md", "skills/y/SKILL.md"]


def test_source_dir_is_relative_to_the_manifest(tmp_path: Path) -> None:
    doc = base_manifest(install={"backend": "local-bin", "source": {"path": "pkg"}, "bins": {"my-tool": "x"}})
    m = load(write_manifest(tmp_path, doc))
    assert m.source_dir == (tmp_path / "pkg").resolve()


def test_missing_manifest_has_its_own_code(tmp_path: Path) -> None:
    with pytest.raises(AtoError) as exc:
        load(tmp_path / "capability.json")
    assert exc.value.code == E_CAP_MANIFEST_NOT_FOUND and "Manifest not found" in exc.value.message


@pytest.mark.parametrize(("text", "phrase"), [
    ("{not json", "not valid JSON: line 1 column 2"),
    ("[1, 2]", "must be a JSON object"),
    ('{"schema": "cap-manifest.v9"}', "schema: 'cap-manifest.v0' was expected"),
    ('{"schema": "cap-manifest.v0", "safeTrials": [{"writes": []}]}', "'command' is a required property"),
])
def test_bad_manifests_are_e002_naming_the_problem(tmp_path: Path, text: str, phrase: str) -> None:
    (tmp_path / "capability.json").write_text(text)
    with pytest.raises(AtoError) as exc:
        load(tmp_path / "capability.json")
    assert exc.value.code == E_MANIFEST and phrase in exc.value.message
