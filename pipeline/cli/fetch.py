"""``ato fetch <ref>``: a native artifact into the fetch cache (advanced surface; see stages.fetch)."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import emit, json_mode, json_option, registry_option, resolve_registry
from pipeline.cli.help import examples
from pipeline.cli.progress import reporter
from pipeline.cli.trust import artifact_trust, artifact_trust_options


@click.command("fetch", epilog=examples("ato fetch acme/native-app --registry http://127.0.0.1:18787",
                                       "ato fetch ./native-app.capsule --json"))
@click.argument("ref", metavar="REF")
@registry_option()
@click.option("--version", "version", metavar="VERSION", help="Version to fetch (default: the latest).")
@artifact_trust_options
@json_option
def fetch_cmd(ref: str, registry: str | None, version: str | None, allow_unsigned: bool, yes: bool,
              force_large_payload: bool) -> None:
    """Fetch a native artifact into the fetch cache and print where.

    The cache dir is $ATO_HOME/fetches/<parent-digest>/. REF is a .capsule file, publisher/slug[@version], or registry-host/[publisher/]slug:version.
    The artifact is verified and its signer trust-checked first, as install and run do.
    """
    from pipeline import native_delivery
    from stages.fetch import parse_ref

    trust = artifact_trust(allow_unsigned=allow_unsigned, yes=yes, force_large_payload=force_large_payload)
    parsed = parse_ref(ref, registry, version)
    if parsed.path is not None:
        doc = native_delivery.fetch_local(parsed.path, trust=trust)
    else:
        from pipeline.registry.client import RegistryClient

        with RegistryClient(resolve_registry(parsed.registry), os.environ.get("ATO_TOKEN")) as client, \
                reporter(json=json_mode()) as progress:
            doc = native_delivery.fetch_registry(parsed, client, trust=trust, reporter=progress)
    human = "\n".join([f"Fetched to: {doc['cache_dir']}", f"   Scoped ID: {doc['scoped_id']}",
                       f"   Version:   {doc['version']}", f"   Digest:    {doc['parent_digest']}"])
    emit(doc, "fetch", human)


def register(group: click.Group) -> None:
    group.add_command(fetch_cmd)
