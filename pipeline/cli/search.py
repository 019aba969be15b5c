"""``ato search [query]``: list what a registry holds."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import emit, json_option


@click.command("search")
@click.argument("query", required=False, default="")
@click.option("--registry", help="Registry URL (default $ATO_STORE_API_URL or https://api.ato.run).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 50), help="Results per page.")
@click.option("--cursor", help="Continue from a previous page's next_cursor.")
@json_option
def search_cmd(query: str, registry: str | None, limit: int, cursor: str | None) -> None:
    """Search a registry's capsules by name, slug or description."""
    from pipeline.cli.install import default_registry
    from pipeline.registry.client import RegistryClient

    with RegistryClient(registry or default_registry(), os.environ.get("ATO_TOKEN")) as client:
        page = client.search(query, limit, cursor)
        base = client.base
    rows = []
    for item in page.get("capsules") or []:
        row = {k: item.get(k) for k in ("id", "scoped_id", "slug", "name", "description", "publisher",
                                         "latestVersion", "latestSizeBytes", "updatedAt")}
        row["scoped_id"] = row["scoped_id"] or item.get("scopedId") or ""
        row["description"] = row["description"] or ""
        row["latestSizeBytes"] = int(row["latestSizeBytes"] or 0)
        rows.append(row)
    doc = {"schema_version": "1", "registry": base, "query": query, "capsules": rows, "total": len(rows),
           "next_cursor": page.get("next_cursor")}
    if not rows:
        human = "No packages found."
    else:
        lines = [f"Found {len(rows)} package(s):"]
        for i, r in enumerate(rows, 1):
            lines.append(f"{i}. {r['name']} ({r['scoped_id']}) {r['latestVersion']}")
            if r["description"]:
                lines.append(f"   {r['description']}")
            lines.append(f"   Install: ato install {r['scoped_id']} --registry {base}")
        if doc["next_cursor"]:
            lines.append(f"Next cursor: {doc['next_cursor']} (ato search --cursor {doc['next_cursor']})")
        human = "\n".join(lines)
    emit(doc, "search", human)


def register(group: click.Group) -> None:
    group.add_command(search_cmd)
