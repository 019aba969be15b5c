"""``ato fetch <ref>``: a native artifact into the fetch cache (advanced surface; see stages.fetch)."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import emit, json_option, registry_option, resolve_registry
from pipeline.cli.help import examples


@click.command("fetch", epilog=examples("ato fetch acme/native-app --registry http://127.0.0.1:18787",
                                       "ato fetch ./native-app.capsule --json"))
@click.argument("ref", metavar="REF")
@registry_option()
@click.option("--version", "version", metavar="VERSION", help="Version to fetch (default: the latest).")
@json_option
def fetch_cmd(ref: str, registry: str | None, version: str | None) -> None:
    """Fetch a native artifact into the fetch cache and print where.

    The cache dir is $ATO_HOME/fetches/<parent-digest>/. REF is a .capsule file, publisher/slug[@version], or registry-host/[publisher/]slug:version.
    """
    from pipeline import native_delivery
    from stages.fetch import parse_ref

    parsed = parse_ref(ref, registry, version)
    if parsed.path is not None:
        doc = native_delivery.fetch_local(parsed.path)
    else:
        from pipeline.registry.client import RegistryClient

        with RegistryClient(resolve_registry(parsed.registry), os.environ.get("ATO_TOKEN")) as client:
            doc = native_delivery.fetch_registry(parsed, client)
    human = "\n".join([f"Fetched to: {doc['cache_dir']}", f"   Scoped ID: {doc['scoped_id']}",
                       f"   Version:   {doc['version']}", f"   Digest:    {doc['parent_digest']}"])
    emit(doc, "fetch", human)


def register(group: click.Group) -> None:
    group.add_command(fetch_cmd)
