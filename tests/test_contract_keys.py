"""Within one JSON contract, keys use one style: snake_case or camelCase (seeds fix some as camelCase).

A property name of a single lowercase word fits either style. The only mixed contract is search's row,
which carries camelCase aliases of three snake_case keys for readers of earlier output (documented in
schemas/search.json); they must stay exact copies, never new information.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CAMEL = re.compile(r"^[a-z][a-z0-9]*[A-Z][A-Za-z0-9]*$")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")
ALIASES = {"search.json": {"latestVersion", "latestSizeBytes", "updatedAt"}}


def property_names(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("properties", "patternProperties") and isinstance(value, dict):
                out.update(k for k in value if key == "properties")
            property_names(value, out)
    elif isinstance(node, list):
        for item in node:
            property_names(item, out)
    return out


def test_every_contract_uses_one_key_style() -> None:
    mixed = {}
    for path in sorted((ROOT / "schemas").glob("*.json")):
        names = property_names(json.loads(path.read_text()), set()) - ALIASES.get(path.name, set())
        camel = sorted(n for n in names if CAMEL.match(n))
        snake = sorted(n for n in names if SNAKE.match(n))
        if camel and snake:
            mixed[path.name] = {"camel": camel, "snake": snake}
    assert mixed == {}


def test_search_aliases_are_copies_of_snake_case_keys() -> None:
    from pipeline.cli.search import search_row

    row = search_row({"scoped_id": "a/b", "latest_version": "1.0.0", "latest_size_bytes": 5, "updated_at": "t"})
    assert (row["latestVersion"], row["latestSizeBytes"], row["updatedAt"]) == \
        (row["latest_version"], row["latest_size_bytes"], row["updated_at"])
