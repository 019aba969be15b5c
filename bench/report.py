"""Where every benchmark leaves its results: ``bench/results/<name>.json`` and ``<name>.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def table(title: str, intro: str, rows: list[tuple[str, str, str]]) -> str:
    """A markdown page: a title, one paragraph, then a ``measure | value | target`` table."""
    lines = [f"# {title}", "", intro, "", "| measure | value | target |", "| --- | --- | --- |"]
    lines += [f"| {measure} | {value} | {target} |" for measure, value, target in rows]
    return "\n".join(lines) + "\n"


def save(name: str, doc: dict[str, Any], markdown: str) -> None:
    """Write both result files (the JSON for machines, the page for people) and show the page."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
