"""``ato source sync-status`` / ``ato source rebuild``: source-backed Store workflows (seed 000).

Both talk to ``--registry`` or ``$ATO_STORE_API_URL`` with the Store session (``ATO_TOKEN`` wins over
``ato login``). ``rebuild --wait`` polls the sync run until it is no longer queued/running/awaiting
signature, or until ``--timeout``. A run that ends ``failed`` — or is still pending at the deadline — is
error ``E220`` (exit 1) with its source id, run id, status and reason on one line.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import click

from pipeline.cli.common import emit, info, json_option, registry_option
from pipeline.cli.help import examples, group
from pipeline.errors import E_AUTH_REQUIRED, E_SOURCE_RUN, E_USAGE, AtoError, Problem

PENDING = ("queued", "running", "awaiting_signature")
FIELDS = ("sync_run_id", "source_id", "status", "trigger", "ref", "target_commit", "failure_reason",
          "signature_failure_reason", "error_message", "attempt_count", "scoped_id", "version", "started_at",
          "completed_at")


@group("source", epilog=examples("ato source rebuild --source-id SRC --wait",
                                 "ato source sync-status --source-id SRC --sync-run-id RUN --json"))
def source_group() -> None:
    """Rebuild source-backed capsules and follow their sync runs."""


STORE_REGISTRY = "Store API URL (default: your session's Store, else `ato config get store_url`)."


class SourceApi:
    def __init__(self, registry: str | None) -> None:
        from pipeline import credentials
        from pipeline.registry.client import RegistryClient

        sess = credentials.session()
        if sess is None:
            raise AtoError(E_AUTH_REQUIRED, "Source operation requires authentication: run `ato login` or set "
                           "ATO_TOKEN", problems=[Problem("ATO_ERR_AUTH_REQUIRED", "no Store session token", {})])
        self.client = RegistryClient(registry or credentials.session_api_url(sess), sess.token)

    def __enter__(self) -> SourceApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def call(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        from pipeline.registry.client import response_json
        from stages.registry_port import RegistryHttpError

        try:
            return response_json(self.client.request(method, path, write=True, ok=(200, 201, 202), **kwargs))
        except RegistryHttpError as exc:
            if exc.status == 401:
                raise AtoError(E_AUTH_REQUIRED, f"the Store at {self.client.base} rejected the session token "
                               f"({what})", hint="run `ato login` again or fix ATO_TOKEN",
                               problems=[Problem("ATO_ERR_AUTH_REQUIRED", "session token rejected",
                                                 {"registry": self.client.base})]) from None
            if exc.status == 404:
                raise AtoError(E_USAGE, f"{what}: {exc.body.get('message') or 'not found'} "
                               f"(registry {self.client.base})") from None
            if exc.status == 403:
                raise AtoError(E_AUTH_REQUIRED, f"{what}: {exc.body.get('message') or 'forbidden'}") from None
            raise

    def sync_run(self, source_id: str, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/sources/{quote(source_id)}/sync-runs/{quote(run_id)}",
                         f"sync-status of {source_id}/{run_id}")


def _doc(run: dict[str, Any], registry: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": "1", "registry": registry}
    for key in FIELDS:
        doc[key] = run.get(key)
    return doc


def _line(kind: str, d: dict[str, Any]) -> str:
    return (f"{kind}: source_id={d['source_id']} sync_run_id={d['sync_run_id']} status={d['status']} "
            f"failure_reason={d['failure_reason'] or '-'} signature_failure_reason="
            f"{d['signature_failure_reason'] or '-'}")


def _failed(d: dict[str, Any]) -> AtoError:
    return AtoError(E_SOURCE_RUN, f"Rebuild failed: source_id={d['source_id']} sync_run_id={d['sync_run_id']} "
                    f"failure_reason={d['failure_reason'] or '-'}: {d['error_message'] or 'no detail'}",
                    details={"source_id": d["source_id"], "sync_run_id": d["sync_run_id"],
                             "status": d["status"], "failure_reason": d["failure_reason"]})


@source_group.command("sync-status", epilog=examples("ato source sync-status --source-id SRC --sync-run-id RUN"))
@click.option("--source-id", required=True, metavar="ID", help="Source id.")
@click.option("--sync-run-id", required=True, metavar="ID", help="Sync run id.")
@registry_option(STORE_REGISTRY)
@json_option
def sync_status_cmd(source_id: str, sync_run_id: str, registry: str | None) -> None:
    """Show one sync run of a source (read-only)."""
    with SourceApi(registry) as api:
        doc = _doc(api.sync_run(source_id, sync_run_id), api.client.base)
    emit(doc, "source-sync-run", _line("sync-status", doc))


@source_group.command("rebuild", epilog=examples("ato source rebuild --source-id SRC --ref v1.2.0 --wait",
                                                 "ato source rebuild --source-id SRC --json"))
@click.option("--source-id", required=True, metavar="ID", help="Source id.")
@click.option("--ref", metavar="REF", help="Branch, tag or commit (default: the source's default ref).")
@click.option("--wait", is_flag=True, help="Poll the resulting sync run until it finishes.")
@click.option("--timeout", "timeout_s", default=2100.0, show_default=True, type=click.FloatRange(min=0),
              metavar="SECONDS",
              help="With --wait: give up after this many seconds.")
@click.option("--poll-interval", default=5.0, show_default=True, type=click.FloatRange(min=0.05),
              metavar="SECONDS",
              help="With --wait: seconds between status checks.")
@registry_option(STORE_REGISTRY)
@json_option
def rebuild_cmd(source_id: str, ref: str | None, wait: bool, timeout_s: float, poll_interval: float,
                registry: str | None) -> None:
    """Rebuild and re-sign a source at a ref.

    With --wait, follow the sync run to its end.
    """
    with SourceApi(registry) as api:
        pre = api.call("POST", f"/v1/sources/{quote(source_id)}/preflight", f"preflight of source {source_id}",
                       json={"operation": "rebuild"})
        if pre.get("ok") is not True:
            raise AtoError(E_USAGE, f"Source preflight returned ok=false for {source_id}: "
                           f"{pre.get('message') or 'no reason given'}")
        run = api.call("POST", f"/v1/sources/{quote(source_id)}/rebuild", f"rebuild of source {source_id}",
                       json={"ref": ref})
        doc = _doc(run, api.client.base)
        info(_line("rebuild", doc))
        if wait:
            deadline = time.monotonic() + timeout_s
            while doc["status"] in PENDING and time.monotonic() < deadline:
                time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
                doc = _doc(api.sync_run(source_id, doc["sync_run_id"]), api.client.base)
            if doc["status"] in PENDING:
                raise AtoError(E_SOURCE_RUN, f"Rebuild wait timeout after {timeout_s:g}s: source_id={source_id} "
                               f"sync_run_id={doc['sync_run_id']} status={doc['status']}. Check with `ato source "
                               f"sync-status --source-id {source_id} --sync-run-id {doc['sync_run_id']}`.",
                               details={"source_id": source_id, "sync_run_id": doc["sync_run_id"],
                                        "status": doc["status"], "reason": "timeout"})
            if doc["status"] == "failed":
                raise _failed(doc)
    emit(doc, "source-sync-run", _line("rebuild", doc))


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(source_group)
