"""``ato trust ls | pin | petname | revoke | forget | refresh``: the trust store by hand.

``pin`` is also the re-verification step after a refused key change: it is the only way to
accept a new key for an identity outside a rotation, and it needs ``--replace`` to overwrite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, info, json_option
from pipeline.cli.help import examples, group
from pipeline.errors import E_USAGE, AtoError, printable
from pipeline.trust import revocation
from pipeline.trust import store as trust_store
from pipeline.trust.verify import ArtifactTrust, installer_verifier
from stages.capsule import consumer_limits
from stages.capsule.keys import short_fingerprint

SCHEMA = "trust"
SCHEMA_VERSION = "1"


def tty_consent(question: str) -> bool:
    """Ask on a TTY (stderr); never on a pipe, where the caller fails closed instead."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    from pipeline.cli.progress import paused

    with paused():
        return click.confirm(printable(question), default=False, err=True)


def artifact_trust_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--allow-unsigned``, ``--yes`` and ``--force-large-payload``: how a command that takes an
    artifact (fetch, finalize, project) accepts it, with the same flags as install and run."""
    options = [
        click.option("--allow-unsigned", is_flag=True, help="Accept an unsigned artifact (reported as unsigned)."),
        click.option("--yes", "-y", is_flag=True, help="Pin a first-seen signer without asking (TOFU)."),
        click.option("--force-large-payload", is_flag=True,
                     help="Accept a payload that decodes to more than the ceiling (200 MiB unless configured)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def artifact_trust(*, allow_unsigned: bool, yes: bool, force_large_payload: bool) -> ArtifactTrust:
    """The trust port of one command (see :mod:`pipeline.trust.verify`)."""
    return installer_verifier(allow_unsigned=allow_unsigned, assume_yes=yes, consent=tty_consent, notify=info,
                              limits=consumer_limits(force_large_payload))


def _envelope(action: str, changed: bool, message: str, store: trust_store.TrustStore) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "action": action, "changed": changed, "message": message,
            **store.listing()}


def _human_listing(doc: dict[str, Any]) -> str:
    lines = []
    if not doc["identities"] and not doc["keys"] and not doc["revoked"]:
        return f"trust store {doc['path']} is empty"
    for i in doc["identities"]:
        pet = f" {i['petname']!r}" if i["petname"] else ""
        prev = f" (previous key until {i['previous']['until']})" if i.get("previous") else ""
        lines.append(f"{i['identity']:<24} {i['short_fingerprint']}{pet}  {i['via']} {i['pinned_at']}{prev}")
    for k in doc["keys"]:
        if not k["identities"]:
            pet = f" {k['petname']!r}" if k["petname"] else ""
            lines.append(f"{'(no identity)':<24} {k['short_fingerprint']}{pet}  {k['key_id']}")
    for r in doc["revoked"]:
        reason = f" ({r['reason']})" if r.get("reason") else ""
        lines.append(f"revoked {r['id']}{reason} [{r['source']}]")
    return "\n".join(lines)


@group("trust", epilog=examples("ato trust ls", "ato trust revoke did:key:z6Mk... --reason \"key leaked\""))
def trust_group() -> None:
    """Manage pinned signers (TOFU), petnames and revocations.

    The trust store is ~/.capsule/trust_store.json.
    """


@trust_group.command("ls", epilog=examples("ato trust ls", "ato trust ls --json"))
@json_option
def ls_cmd() -> None:
    """List identities with their pinned keys, keys, and revocations."""
    store = trust_store.load()
    doc = _envelope("ls", False, "", store)
    emit(doc, SCHEMA, _human_listing(doc))


@trust_group.command("pin", epilog=examples("ato trust pin acme did:key:z6Mk...", "ato trust pin acme did:key:z6Mk... --petname acme-release"))
@click.argument("identity")
@click.argument("key")
@click.option("--petname", metavar="NAME", help="Also give the key this petname.")
@click.option("--replace", is_flag=True, help="Replace a different key already pinned for IDENTITY.")
@json_option
def pin_cmd(identity: str, key: str, petname: str | None, replace: bool) -> None:
    """Pin a signing key for an identity.

    KEY is a did:key, petname or fingerprint; IDENTITY a publisher or capsule:<name>.
    """
    trust_store.check_identity(identity)
    with trust_store.transaction() as store:
        did = store.resolve_key(key)
        revoked = store.revocation(did)
        if revoked:
            raise AtoError(E_USAGE, f"{did} is revoked (source: {revoked['source']}); refusing to pin it")
        current = store.pinned(identity)
        if current and current["key_id"] != did and not replace:
            raise AtoError(E_USAGE, f"{identity} is already pinned to {current['key_id']}",
                           hint="pass --replace once you have confirmed the new key with the publisher")
        changed = not current or current["key_id"] != did
        if changed:
            store.pin(identity, did, "pin")
        if petname is not None:
            store.set_petname(did, petname)
        message = f"pinned {short_fingerprint(store.keys[did]['fingerprint'])} for {identity}" if changed \
            else f"{identity} was already pinned to that key"
        doc = _envelope("pin", store.changed, message, store)
    emit(doc, SCHEMA, message)


@trust_group.command("petname", epilog=examples("ato trust petname did:key:z6Mk... acme-release", "ato trust petname acme-release --clear"))
@click.argument("key")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the key's petname.")
@json_option
def petname_cmd(key: str, name: str | None, clear: bool) -> None:
    """Give KEY (did:key, petname or fingerprint) the petname NAME (or --clear it)."""
    if (name is None) == (not clear):
        raise AtoError(E_USAGE, "give a NAME or --clear (not both)")
    with trust_store.transaction() as store:
        did = store.resolve_key(key)
        store.set_petname(did, None if clear else name)
        message = f"{did}: petname cleared" if clear else f"{did} is now {name!r}"
        doc = _envelope("petname", store.changed, message, store)
    emit(doc, SCHEMA, message)


@trust_group.command("revoke", epilog=examples("ato trust revoke acme-release --reason \"key leaked\"", "ato trust revoke --from https://example.com/revocations.json"))
@click.argument("key", required=False)
@click.option("--reason", metavar="REASON", help="Why (kept with the revocation).")
@click.option("--from", "sources", multiple=True, metavar="FILE|URL",
              help='Merge a revocation list ({"revoked": [...]}) from a file or an http(s) URL; repeatable.')
@json_option
def revoke_cmd(key: str | None, reason: str | None, sources: tuple[str, ...]) -> None:
    """Revoke a signing key, and/or merge revocation lists.

    KEY is a did:key, petname or fingerprint; --from merges lists from files or URLs.
    """
    if key is None and not sources:
        raise AtoError(E_USAGE, "name a KEY to revoke or a list with --from")
    lists = [(_source_name(s), revocation.load_entries(s)) for s in sources]  # fetch before locking
    parts = []
    with trust_store.transaction() as store:
        if key is not None:
            ident = store.resolve_key(key, allow_unknown_fingerprint=True)
            added = store.revoke(ident, reason, "local")
            parts.append(f"revoked {ident}" if added else f"{ident} was already revoked")
        for source, entries in lists:
            added = revocation.merge(store, source, entries)
            parts.append(f"merged {source}: {added} new of {len(entries)}")
        message = "; ".join(parts)
        doc = _envelope("revoke", store.changed, message, store)
    emit(doc, SCHEMA, message)


@trust_group.command("refresh", epilog=examples("ato trust refresh", "ato trust refresh --json"))
@json_option
def refresh_cmd() -> None:
    """Re-read every revocation list merged before and merge what is new."""
    sources = [x["source"] for x in trust_store.load().data["revocation_lists"]]
    lists = [(s, revocation.load_entries(s)) for s in sources]
    with trust_store.transaction() as store:
        added = sum(revocation.merge(store, s, e) for s, e in lists)
        message = f"{len(lists)} list(s) re-read, {added} new revocation(s)"
        doc = _envelope("refresh", store.changed, message, store)
    emit(doc, SCHEMA, message)


@trust_group.command("forget", epilog=examples("ato trust forget acme", "ato trust forget acme-release"))
@click.argument("name")
@json_option
def forget_cmd(name: str) -> None:
    """Forget an identity's pin, or a key and the pins to it.

    Revocations are kept.
    """
    with trust_store.transaction() as store:
        if name in store.identities:
            store.forget_identity(name)
            message = f"forgot the pin for {name}; its next artifact is a first sight again"
        else:
            did = store.resolve_key(name)
            if did not in store.keys:
                raise AtoError(E_USAGE, f"no identity or key known as {name!r}")
            dropped = store.forget_key(did)
            message = f"forgot {did}" + (f" and the pins of {', '.join(dropped)}" if dropped else "")
        doc = _envelope("forget", store.changed, message, store)
    emit(doc, SCHEMA, message)


def _source_name(source: str) -> str:
    return source if source.startswith(("http://", "https://")) else str(Path(source).absolute())


def register(group: click.Group) -> None:
    group.add_command(trust_group)
