"""Skill frontmatter parsing and discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cap.skills import find_skills, parse_frontmatter, skill_problem


def test_flat_keys_and_quotes() -> None:
    text = '---\nname: "my-tool"\ndescription: \'Repair configs: safely\'\n# comment\n---\nbody: no\n'
    assert parse_frontmatter(text) == {"name": "my-tool", "description": "Repair configs: safely"}


def test_block_scalars_fold_and_keep_lines() -> None:
    text = "---\nname: t\ndescription: >\n  Repair ExampleService\n  config files.\nnotes: |\n  a\n  b\n---\n"
    meta = parse_frontmatter(text)
    assert meta == {"name": "t", "description": "Repair ExampleService config files.", "notes": "a\nb"}


def test_nested_keys_are_ignored_and_bom_is_tolerated() -> None:
    text = "\ufeff---\nname: t\nmetadata:\n  description: nested\n---\n"
    assert parse_frontmatter(text) == {"name": "t", "metadata": ""}


@pytest.mark.parametrize("text", ["# no frontmatter\n", "---\nname: t\n", ""])
def test_missing_or_unclosed_frontmatter_is_none(text: str) -> None:
    assert parse_frontmatter(text) is None


def test_skill_problems_name_the_file(tmp_path: Path) -> None:
    assert skill_problem(tmp_path / "nope.md", "nope.md") == "Declared skill file does not exist: nope.md"
    (tmp_path / "s.md").write_text("---\ndescription: d\n---\n")
    assert skill_problem(tmp_path / "s.md", "s.md") == "Skill file s.md must have name and description frontmatter"
    (tmp_path / "ok.md").write_text("---\nname: n\ndescription: d\n---\n")
    assert skill_problem(tmp_path / "ok.md", "ok.md") is None


def test_find_skills_looks_in_the_usual_places(tmp_path: Path) -> None:
    for rel in ("SKILL.md", "skills/b/SKILL.md", "skills/a/SKILL.md", ".claude/skills/c/SKILL.md",
                "deep/x/skills/d/SKILL.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("---\nname: n\ndescription: d\n---\n")
    assert find_skills(tmp_path) == [".claude/skills/c/SKILL.md", "SKILL.md", "skills/a/SKILL.md",
                                     "skills/b/SKILL.md"]
