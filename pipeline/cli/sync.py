"""``ato sync build|verify|open|refresh``: ``.sync`` packages (one payload that keeps itself fresh).

``ato run x.sync`` and ``ato open x.sync`` are ``ato sync open x.sync``.
"""

from __future__ import annotations

import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, info, json_mode, json_option, warn
from pipeline.cli.help import AtoGroup, examples
from pipeline.errors import E_USAGE, AtoError

_TEXTUAL = ("text/", "application/json", "application/xml", "application/toml", "application/yaml",
            "application/x-yaml", "application/csv", "application/javascript")


def _textual(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip()
    return base.startswith(_TEXTUAL) or base.endswith(("+json", "+xml"))


def _show(pkg: Any) -> None:
    """The payload, at once: its bytes on stdout (a binary payload is not dumped on a terminal)."""
    if json_mode():
        return
    if sys.stdout.isatty() and not _textual(pkg.manifest.content_type):
        info(f"{pkg.display_name()} is {pkg.manifest.content_type} ({pkg.payload_size} bytes); not shown on a "
             f"terminal: save it with `ato open {pkg.path.name} > {pkg.display_name()}`")
        return
    sys.stdout.flush()
    out = sys.stdout.buffer
    for chunk in pkg.payload_chunks():
        out.write(chunk)
    out.flush()


def _short(digest: str) -> str:
    return digest[:len("blake3:") + 12]


def _report(doc: dict[str, Any], opened: Any) -> None:
    refresh = opened.refresh
    name = doc["display_name"]
    if refresh.status == "updated":
        info(f"{name}: updated from {refresh.source} ({_short(doc['payload']['digest'])}, created "
             f"{doc['created_at']}); open it again to show the new payload")
    elif refresh.status == "failed" and refresh.error is not None:
        warn(f"{name}: refresh from {refresh.source} failed: {refresh.error.message}; kept the last good payload "
             f"({_short(doc['payload']['digest'])}, created {doc['created_at']})")


def open_sync_file(path: str, *, refresh: str = "auto", yes: bool = False, allow_unsigned: bool = False,
                   show: bool = True, raise_failed_refresh: bool = False) -> None:
    """Open a ``.sync`` (the payload on stdout, or the envelope under --json), refreshing it when due."""
    from pipeline.cli.trust import tty_consent
    from pipeline.runtime.sync_package import envelope, open_sync
    from pipeline.trust import gate

    gate.configure(allow_unsigned=allow_unsigned, assume_yes=yes, consent=tty_consent,
                   notify=lambda m: info(f"ato: {m}"))
    opened = open_sync(Path(path), refresh=refresh, show=_show if show else None)
    try:
        doc = envelope(opened, time.time())
    finally:
        opened.package.close()
    if json_mode():
        emit(doc, "sync-open")
    else:
        _report(doc, opened)
    if raise_failed_refresh and opened.refresh.status == "no-source":
        raise AtoError(E_USAGE, f"{path} has no [source] url: there is nothing to refresh it from")
    if raise_failed_refresh and opened.refresh.error is not None:
        raise opened.refresh.error


@click.group("sync", cls=AtoGroup, epilog=examples(
    "ato sync build q3.csv --ttl 1h --source https://data.example.org/q3.sync --key signing-key.json",
    "ato open q3.sync"))
def sync_group() -> None:
    """Build, verify and open .sync packages: data that refreshes itself.

    A package shows its local copy at once and fetches a newer one from its `[source] url` when
    its TTL has passed; the update replaces the local copy only once its digests and signature
    hold, so a bad update keeps the last good payload.
    """


def _created_at(text: str | None) -> float:
    from stages.sync.manifest import parse_time

    if text:
        try:
            return parse_time(text)
        except ValueError:
            raise AtoError(E_USAGE, f"--created-at {text!r} is not an RFC 3339 time with a zone") from None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        if not epoch.isdigit():
            raise AtoError(E_USAGE, f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds")
        return float(epoch)
    return float(int(time.time()))


@sync_group.command("build", epilog=examples(
    "ato sync build q3.csv", "ato sync build q3.csv --ttl 1h --source https://data.example.org/q3.sync --key k.json"))
@click.argument("payload", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the package (default: <payload stem>.sync beside the payload).")
@click.option("--ttl", default="1h", show_default=True, metavar="DURATION",
              help="How long the payload stays fresh (3600, 30m, 1h, 7d).")
@click.option("--source", "source_url", metavar="URL",
              help="Where the next version of this package is published (https, or http on loopback).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Sign the package with this Ed25519 key file (ato key gen); updates must be signed.")
@click.option("--content-type", metavar="MIME", help="The payload's MIME type (default: guessed from its name).")
@click.option("--ext", "display_ext", metavar="EXT", help="Extension the payload is shown with (default: its own).")
@click.option("--context", "context_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="A JSON file stored as context.json (no secrets: it is not encrypted).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST",
              help="Another host the package may contact (the source's host is always allowed).")
@click.option("--timeout", default="30", show_default=True, metavar="SECONDS",
              help="How long a refresh may take (30, 30s, 2m).")
@click.option("--created-at", metavar="RFC3339", help="The payload's time (default SOURCE_DATE_EPOCH, else now).")
@json_option
def build_cmd(payload: Path, out: Path | None, ttl: str, source_url: str | None, key_file: Path | None,
              content_type: str | None, display_ext: str | None, context_file: Path | None,
              allow_hosts: tuple[str, ...], timeout: str, created_at: str | None) -> None:
    """Build a .sync package from one payload file.

    The same payload, options, time and key give the same bytes on any machine.
    """
    import json

    from pipeline.trust.keys import parse_duration
    from stages.capsule.keys import load_signing_key
    from stages.sync import build_sync
    from stages.sync.manifest import MAX_TIMEOUT, MAX_TTL

    ttl_s = parse_duration(ttl, maximum=MAX_TTL, what="--ttl", why="use a shorter TTL")
    timeout_s = parse_duration(timeout, maximum=MAX_TIMEOUT, what="--timeout", why="a refresh must end")
    if timeout_s < 1:
        raise AtoError(E_USAGE, "--timeout must be at least 1 second")
    ext = display_ext or payload.suffix.lstrip(".") or "bin"
    mime = content_type or mimetypes.guess_type(payload.name)[0] or "application/octet-stream"
    context = None
    if context_file is not None:
        try:
            context = json.loads(context_file.read_text("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise AtoError(E_USAGE, f"--context {context_file}: not a readable JSON file ({exc})") from None
    target = out or payload.with_name((payload.stem if payload.suffix else payload.name) + ".sync")
    doc = build_sync(payload, target, content_type=mime, display_ext=ext, ttl=ttl_s, timeout=timeout_s,
                     created_at=_created_at(created_at), source_url=source_url,
                     key=load_signing_key(key_file) if key_file else None, context=context,
                     allow_hosts=tuple(allow_hosts))
    emit(doc, "sync-build", human=doc["path"])


@sync_group.command("verify", epilog=examples("ato sync verify q3.sync", "ato sync verify q3.sync --json"))
@click.argument("package", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def verify_cmd(package: Path) -> None:
    """Check a .sync: its container, manifest, every digest and its signature.

    Exit 0 only when all hold (E208 names what broke). Whether the signer is trusted is decided
    when the package is opened.
    """
    from stages.sync import read_sync

    with read_sync(package) as pkg:
        doc = {"schema_version": "1", "ok": True, "path": str(pkg.path), "file_digest": pkg.file_digest,
               "size": pkg.size, "manifest_hash": pkg.digests.manifest_hash,
               "payload": {"digest": pkg.payload_digest, "size": pkg.payload_size},
               "content_type": pkg.manifest.content_type, "created_at": pkg.manifest.created_at,
               "ttl_seconds": pkg.manifest.ttl, "source": pkg.manifest.source_url,
               "signed": pkg.signature.signed, "signer": pkg.signature.to_json()}
    who = f"signed by {doc['signer']['key_id']}" if doc["signed"] else "unsigned"
    emit(doc, "sync-verify", human=f"{package}: ok ({who}; payload {doc['payload']['digest']})")


def _refresh_option(fn: Any) -> Any:
    return click.option("--refresh", type=click.Choice(["auto", "always", "never"]), default="auto",
                        show_default=True, help="auto: when the TTL has passed; always: now; never: offline.")(fn)


@sync_group.command("open", epilog=examples("ato sync open q3.sync", "ato sync open q3.sync --refresh never --json"))
@click.argument("package", type=click.Path(dir_okay=False))
@_refresh_option
@click.option("-y", "--yes", is_flag=True, help="Trust the signer on first sight (non-interactive runs).")
@click.option("--allow-unsigned", is_flag=True, help="Open an unsigned package (reported as unsigned).")
@json_option
def open_cmd(package: str, refresh: str, yes: bool, allow_unsigned: bool) -> None:
    """Show a .sync's payload at once, then refresh it if its TTL has passed.

    The payload goes to stdout; with --json the envelope (digest, age, next refresh, what the
    refresh did) is printed instead.
    """
    open_sync_file(package, refresh=refresh, yes=yes, allow_unsigned=allow_unsigned)


@sync_group.command("refresh", epilog=examples("ato sync refresh q3.sync --yes"))
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("-y", "--yes", is_flag=True, help="Trust the signer on first sight (non-interactive runs).")
@click.option("--allow-unsigned", is_flag=True, help="Accept an unsigned local copy (its update must be signed).")
@json_option
def refresh_cmd(package: str, yes: bool, allow_unsigned: bool) -> None:
    """Fetch the newest version of a .sync from its source now.

    Unlike `ato open`, a failed refresh exits non-zero (E208 for a tampered update); the local copy
    is kept either way.
    """
    open_sync_file(package, refresh="always", yes=yes, allow_unsigned=allow_unsigned, show=False,
                   raise_failed_refresh=True)


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(sync_group)
