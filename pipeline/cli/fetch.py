"""``ato fetch <ref>``: a native artifact into the fetch cache (advanced surface; see stages.fetch)."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import emit, json_option


@click.command("fetch")
@click.argument("ref")
@click.option("--registry", help="Registry URL (default $ATO_STORE_API_URL or https://api.ato.run).")
@click.option("--version", "version", help="Version to fetch (default: the latest).")
@json_option
def fetch_cmd(ref: str, registry: str | None, version: str | None) -> None:
    """Fetch REF (a .capsule file, <publisher>/<slug>[@version], or <registry-host>/[<publisher>/]<slug>:<version>)
    into $ATO_HOME/fetches/<parent-digest>/ and print where."""
    from pipeline import native_delivery
    from stages.fetch import parse_ref

    parsed = parse_ref(ref, registry, version)
    if parsed.path is not None:
        doc = native_delivery.fetch_local(parsed.path)
    else:
        from pipeline.cli.install import default_registry
        from pipeline.registry.client import RegistryClient

        with RegistryClient(parsed.registry or default_registry(), os.environ.get("ATO_TOKEN")) as client:
            doc = native_delivery.fetch_registry(parsed, client)
    human = "\n".join([f"Fetched to: {doc['cache_dir']}", f"   Scoped ID: {doc['scoped_id']}",
                       f"   Version:   {doc['version']}", f"   Digest:    {doc['parent_digest']}"])
    emit(doc, "fetch", human)


def register(group: click.Group) -> None:
    group.add_command(fetch_cmd)
