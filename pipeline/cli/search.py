"""``ato search [query]``: list what a registry holds."""

from __future__ import annotations

import os
import shlex
from typing import Any

import click

from pipeline.cli.common import emit, json_option, registry_option, resolve_registry
from pipeline.cli.help import examples


@click.command("search", epilog=examples("ato search hello --registry http://127.0.0.1:18787", "ato search --limit 50 --json"))
@click.argument("query", required=False, default="")
@registry_option()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 50), metavar="N",
              help="Results per page (1-50).")
@click.option("--cursor", metavar="CURSOR", help="Continue from a previous page's next_cursor (opaque).")
@json_option
def search_cmd(query: str, registry: str | None, limit: int, cursor: str | None) -> None:
    """Search a registry's capsules by name, slug or description.

    Prints the total number of matches and one page; `next_cursor` continues it.
    """
    from pipeline.registry.client import RegistryClient

    with RegistryClient(resolve_registry(registry), os.environ.get("ATO_TOKEN")) as client:
        page = client.search(query, limit, cursor)
        base = client.base
    rows = [search_row(item) for item in page.get("capsules") or []]
    total = page.get("total")
    if not isinstance(total, int) or isinstance(total, bool):
        # a registry that does not count (the reference server): known only when this is the only page
        total = len(rows) if not cursor and not page.get("next_cursor") else None
    doc = {"schema_version": "1", "registry": base, "query": query, "capsules": rows, "total": total,
           "next_cursor": page.get("next_cursor")}
    emit(doc, "search", _human(doc, cursor))


def search_row(item: dict[str, Any]) -> dict[str, Any]:
    """A registry's search row in this envelope's snake_case, read from either spelling; the camelCase
    aliases of the reference's rows are kept for readers of earlier output."""
    def pick(snake: str, camel: str) -> Any:
        value = item.get(snake)
        return item.get(camel) if value is None else value
    publisher = item.get("publisher") if isinstance(item.get("publisher"), dict) else {}
    row = {
        "id": str(item.get("id") or ""),
        "scoped_id": str(pick("scoped_id", "scopedId") or ""),
        "slug": str(item.get("slug") or ""),
        "name": str(item.get("name") or ""),
        "description": str(item.get("description") or ""),
        "publisher": {"handle": str(publisher.get("handle") or "")},
        "latest_version": str(pick("latest_version", "latestVersion") or ""),
        "latest_size_bytes": int(pick("latest_size_bytes", "latestSizeBytes") or 0),
        "updated_at": str(pick("updated_at", "updatedAt") or ""),
        "signature_status": str(item.get("signature_status") or "unknown"),
        "author": item.get("author") if isinstance(item.get("author"), str) else None,
        "tags": [t for t in item.get("tags") or [] if isinstance(t, str)],
    }
    row.update(latestVersion=row["latest_version"], latestSizeBytes=row["latest_size_bytes"],
               updatedAt=row["updated_at"])
    return row


def _human(doc: dict[str, Any], cursor: str | None) -> str:
    rows, total, base = doc["capsules"], doc["total"], doc["registry"]
    if not rows:
        return "No packages found." if not cursor else "No more packages."
    count = f"{total} package(s)" if total is not None else "packages"
    lines = [f"Found {count}; showing {len(rows)}:"]
    for i, r in enumerate(rows, 1):
        unsigned = "  (unsigned)" if r["signature_status"] == "unsigned" else ""
        lines.append(f"{i}. {r['name']} ({r['scoped_id']}) {r['latest_version']}{unsigned}")
        if r["description"]:
            lines.append(f"   {r['description']}")
        flag = " --allow-unsigned" if unsigned else ""
        lines.append(f"   Install: ato install {r['scoped_id']} --registry {base}{flag}")
    if doc["next_cursor"]:
        query = f" {shlex.quote(doc['query'])}" if doc["query"] else ""
        lines.append(f"More: ato search{query} --registry {base} --cursor {doc['next_cursor']}")
    return "\n".join(lines)


def register(group: click.Group) -> None:
    group.add_command(search_cmd)
