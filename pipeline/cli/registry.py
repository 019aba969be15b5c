"""``ato registry serve``: run the local HTTP registry (see :mod:`pipeline.registry.server`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline import paths
from pipeline.cli.common import emit, json_mode, json_option
from pipeline.cli.help import examples, group
from pipeline.envelope import render

DEFAULT_PORT = 18787


@group("registry", epilog=examples("ato registry serve --port 18787 --auth-token pwd"))
def registry_group() -> None:
    """Run the embedded HTTP registry (API, web UI and Store routes)."""


@registry_group.command("serve", epilog=examples("ato registry serve --host 127.0.0.1 --port 18787 --auth-token pwd",
                                                 "ato registry serve --port 0 --data-dir ./registry --json"))
@click.option("--host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="Address to bind; anything but loopback needs --auth-token.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, metavar="PORT",
              help="Port to listen on (0 picks a free one and prints it).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="The SQLite index, temp files and (without --blob-store) artifacts "
                   "(default $ATO_HOME/local-registry).")
@click.option("--auth-token", default=None, metavar="TOKEN",
              help="Require `Authorization: Bearer <token>` for writes (publish, runtime config, delete).")
@click.option("--store-user", "store_users", multiple=True, metavar="HANDLE=TOKEN",
              help="Act as a Store: accept TOKEN as the session of HANDLE (ato login, Personal Dock uploads "
                   "under HANDLE). Repeatable.")
@click.option("--ci-oidc-token", "oidc_tokens", multiple=True, metavar="TOKEN=OWNER/REPO",
              help="Act as a Store for `ato publish --ci`: trust TOKEN as a CI identity of OWNER/REPO. Repeatable.")
@click.option("--database", envvar="ATO_REGISTRY_DATABASE_URL", default=None, metavar="URL",
              help="The index: postgresql://user:password@host:port/dbname, or sqlite:///path "
                   "(default: SQLite in the data dir). Env: ATO_REGISTRY_DATABASE_URL.")
@click.option("--blob-store", envvar="ATO_REGISTRY_BLOB_STORE", default=None, metavar="DIR|s3://BUCKET/PREFIX",
              help="Where artifacts and staged uploads are kept: a directory (default: the data dir) or an "
                   "S3-compatible bucket (endpoint, region, credentials from the AWS environment variables "
                   "and config). Env: ATO_REGISTRY_BLOB_STORE.")
@click.option("--redirect-downloads", is_flag=True,
              help="Answer artifact downloads with a redirect to a short-lived presigned URL of the bucket "
                   "(clients fetch from the object store directly; needs an s3:// --blob-store).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Worker processes serving the one socket (any worker answers any request).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Server log level (stderr).")
@click.option("--max-payload-bytes", type=click.IntRange(min=1), default=None, metavar="BYTES",
              help="Refuse uploads whose payload decodes to more bytes (default: the payload.max_bytes setting, "
                   "else 200 MiB).")
@json_option
def serve_cmd(host: str, port: int, data_dir: Path | None, auth_token: str | None, store_users: tuple[str, ...],
              oidc_tokens: tuple[str, ...], database: str | None, blob_store: str | None,
              redirect_downloads: bool, workers: int, log_level: str, max_payload_bytes: int | None) -> None:
    """Serve the registry API and web UI until interrupted (Ctrl-C)."""
    from pipeline.names import parse_scoped_id
    from pipeline.registry.server import serve

    users: dict[str, str] = {}
    for spec in store_users:
        handle, sep, tok = spec.partition("=")
        if not sep or not tok.strip() or parse_scoped_id(f"{handle}/x") is None:
            raise click.BadParameter(f"expected HANDLE=TOKEN with a lowercase handle, got {spec!r}",
                                     param_hint="--store-user")
        users[tok.strip()] = handle
    ci: dict[str, str] = {}
    for spec in oidc_tokens:
        tok, sep, repo = spec.partition("=")
        if not sep or not tok.strip() or repo.count("/") != 1:
            raise click.BadParameter(f"expected TOKEN=OWNER/REPO, got {spec!r}", param_hint="--ci-oidc-token")
        ci[tok.strip()] = repo

    root = (data_dir.expanduser() if data_dir else paths.local_registry_dir()).absolute()

    as_json = json_mode()  # decided here: with --workers, ready() runs on another thread

    def ready(doc: dict) -> None:
        doc = {"schema_version": "1", **doc}
        text = render(doc, "registry-serve")
        if as_json:
            sys.stdout.write(text)
        else:
            sys.stdout.write(f"Local registry serving at {doc['url']}\n"
                             f"API: {doc['api']}\n"
                             f"Web UI: {doc['web_ui']}\n"
                             f"Data dir: {doc['data_dir']}\n"
                             f"Index: {doc['database']}\n"
                             f"Blob store: {doc['blob_store']}\n"
                             f"Workers: {doc['workers']}\n"
                             f"Write auth: {'required (Bearer token)' if doc['write_auth_required'] else 'off'}\n")
        sys.stdout.flush()

    from stages.capsule import Limits, consumer_limits

    limits = Limits(max_payload_bytes) if max_payload_bytes else consumer_limits()
    serve(host, port, root, auth_token, on_ready=ready, log_level=log_level, store_users=users, oidc_tokens=ci,
          limits=limits, database=database, workers=workers, blob_store=blob_store,
          redirect_downloads=redirect_downloads)


@registry_group.command("gc", epilog=examples("ato registry gc --data-dir ./registry",
                                              "ato registry gc --database postgresql://ato@db/registry --grace 0"))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="The registry's data dir (default $ATO_HOME/local-registry).")
@click.option("--database", envvar="ATO_REGISTRY_DATABASE_URL", default=None, metavar="URL",
              help="The index, as for serve. Env: ATO_REGISTRY_DATABASE_URL.")
@click.option("--blob-store", envvar="ATO_REGISTRY_BLOB_STORE", default=None, metavar="DIR|s3://BUCKET/PREFIX",
              help="The blob store, as for serve. Env: ATO_REGISTRY_BLOB_STORE.")
@click.option("--grace", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Remove only what was unreferenced at least this long ago (default 900).")
@json_option
def gc_cmd(data_dir: Path | None, database: str | None, blob_store: str | None, grace: float | None) -> None:
    """Sweep expired upload sessions and blobs nothing references.

    A running server does this by itself every minute; this runs one sweep by hand."""
    from pipeline.registry.storage import GC_GRACE_SECONDS, RegistryStore

    root = (data_dir.expanduser() if data_dir else paths.local_registry_dir()).absolute()
    store = RegistryStore(root, database, blob_store=blob_store)
    try:
        store.initialize()
        report = store.gc(GC_GRACE_SECONDS if grace is None else grace)
    finally:
        store.close()
    doc = {"schema_version": "1", "data_dir": str(root), "database": store.index.describe(),
           "blob_store": store.blobs.url, **report}
    emit(doc, "registry-gc", f"Removed {report['files_removed']} unreferenced file(s) ({report['bytes_freed']} "
                             f"bytes) and {report['sessions_expired']} expired upload session(s); "
                             f"{report['marks_kept']} file(s) were in use again.")


def register(group: click.Group) -> None:
    group.add_command(registry_group)
