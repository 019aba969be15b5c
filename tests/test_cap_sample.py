"""The sample CAP package the cap tests share, and the baseline that it passes review cleanly.

Other cap test modules import the builders from here (``from test_cap_sample import ...``),
so every "this defect fails exactly this check" test starts from one known-good package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.cap.manifest import load
from pipeline.cap.review import review

HELP_SCRIPT = """#!/bin/sh
echo "usage: my-tool [--help] [doctor --json]"
"""

SKILL = """---
name: my-tool
description: Inspect and repair ExampleService config files.
---
# my-tool

Run `my-tool doctor --json`.
"""


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o755)
    return path


def make_package(root: Path, *, script: str = HELP_SCRIPT, package_json: bool = True,
                 skill: bool = True, mcp: bool = True) -> Path:
    """A package dir with bin/my-tool, skills/my-tool/SKILL.md, .mcp.json and package.json."""
    root.mkdir(parents=True, exist_ok=True)
    write_exe(root / "bin" / "my-tool", script)
    if skill:
        (root / "skills" / "my-tool").mkdir(parents=True, exist_ok=True)
        (root / "skills" / "my-tool" / "SKILL.md").write_text(SKILL)
    if mcp:
        (root / ".mcp.json").write_text(json.dumps({"mcpServers": {"my-tool": {
            "command": "my-tool", "args": ["mcp"], "tools": ["my_tool_report", "my_tool_repair"]}}}))
    if package_json:
        (root / "package.json").write_text(json.dumps({
            "name": "@acme/my-tool", "version": "0.1.0",
            "description": "Inspect and repair ExampleService config files.",
            "bin": {"my-tool": "./bin/my-tool"}, "keywords": ["exampleservice", "config"],
        }))
    return root


def base_manifest(**overrides: Any) -> dict[str, Any]:
    """A manifest for :func:`make_package` that passes every check with no warnings."""
    doc: dict[str, Any] = {
        "schema": "cap-manifest.v0",
        "id": "acme/my-tool",
        "name": "My Tool",
        "version": "0.1.0",
        "kind": "local-tool",
        "summary": "Inspect and repair ExampleService config files.",
        "tasks": ["inspect ExampleService config"],
        "commands": [{"name": "my-tool", "path": "bin/my-tool", "safeArgs": ["--help"]}],
        "safeTrials": [{"command": "my-tool --help", "writes": [], "network": []}],
        "install": {"backend": "local-bin", "source": {"path": "."}, "bins": {"my-tool": "bin/my-tool"}},
        "permissions": {"filesystem": ["workspace:read"], "network": [], "secrets": [], "env": [], "spend": []},
        "skill": "skills/my-tool/SKILL.md",
        "mcp": {"tools": ["my_tool_report"]},
        "structuredOutput": True,
    }
    doc.update(overrides)
    return doc


def url_manifest(**overrides: Any) -> dict[str, Any]:
    """The seed's single-file-url example with a real-looking pin, plus skill/MCP/structured output."""
    doc = base_manifest(
        id="acme/downloaded-tool",
        commands=[{"name": "downloaded-tool", "path": "downloaded-tool", "safeArgs": ["--help"]}],
        safeTrials=[{"command": "downloaded-tool --help", "writes": [], "network": []}],
        source={"url": "https://example.com/downloaded-tool", "sha256": "ab" * 32},
    )
    del doc["install"]
    doc.update(overrides)
    return doc


def write_manifest(pkg: Path, doc: dict[str, Any], name: str = "capability.json") -> Path:
    path = pkg / name
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_base_manifest_passes_every_check_without_warnings(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    rv = review(load(write_manifest(pkg, base_manifest())))
    assert rv.passed, [c.to_json() for c in rv.failures]
    assert rv.warnings == []
    assert {c.id: c.status for c in rv.checks}["source.pin"] == "skip"


def test_url_manifest_passes_every_check_without_warnings(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    rv = review(load(write_manifest(pkg, url_manifest())))
    assert rv.passed, [c.to_json() for c in rv.failures]
    assert rv.warnings == []
    assert {c.id: c.status for c in rv.checks}["bins.paths"] == "skip"
