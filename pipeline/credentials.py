"""Store session credentials: ``$ATO_HOME/credentials.json`` (0600, written atomically).

``ATO_TOKEN`` always wins over the stored token. Nothing here talks to the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cas.atomic import write_bytes_atomic
from pipeline import paths
from pipeline.config import resolve, store_api_url, store_site_url  # noqa: F401 - the Store URLs (flag > env > config)

if TYPE_CHECKING:
    from stages.publish import DockTarget


@dataclass
class Session:
    token: str
    source: str  # "env" (ATO_TOKEN) or "credentials"
    handle: str | None = None
    api_url: str | None = None


def load() -> dict[str, Any] | None:
    try:
        doc = json.loads(paths.credentials_path().read_text("utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable is the same as logged out
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("token"), str) and doc["token"] else None


def save(token: str, handle: str, api_url: str) -> None:
    doc = {"schema_version": "1", "token": token, "handle": handle, "api_url": api_url}
    write_bytes_atomic(paths.credentials_path(), json.dumps(doc).encode("utf-8"), mode=0o600)


def delete() -> bool:
    try:
        paths.credentials_path().unlink()
        return True
    except FileNotFoundError:
        return False


def session() -> Session | None:
    """The session token in force: ``ATO_TOKEN`` first, then stored credentials."""
    env = (os.environ.get("ATO_TOKEN") or "").strip()
    if env:
        return Session(env, "env")
    doc = load()
    if doc is None:
        return None
    return Session(doc["token"], "credentials", doc.get("handle"), doc.get("api_url"))


def identify(api_url: str, token: str) -> dict[str, Any]:
    """``GET {api}/v1/auth/whoami`` with the token → ``{handle, api_url}``; a refusal is one E201 line."""
    from pipeline.errors import E_AUTH_REQUIRED, AtoError, Problem
    from pipeline.registry.client import RegistryClient, response_json
    from stages.registry_port import RegistryHttpError

    with RegistryClient(api_url, timeout=30) as client:
        try:
            doc = response_json(client.request("GET", "/v1/auth/whoami", headers={"authorization": f"Bearer {token}"}))
        except RegistryHttpError as exc:
            if exc.status in (401, 403):
                raise AtoError(E_AUTH_REQUIRED, f"the Store at {client.base} rejected the session token",
                               hint="run `ato login` again with a valid token (or fix ATO_TOKEN)",
                               problems=[Problem("ATO_ERR_AUTH_REQUIRED", "session token rejected",
                                                 {"registry": client.base})]) from None
            raise
        base = client.base
    if not isinstance(doc, dict) or not isinstance(doc.get("handle"), str) or not doc["handle"]:
        raise AtoError("E999", f"the Store at {base} answered whoami without a handle")
    return {"handle": doc["handle"], "api_url": base}


def personal_dock(dry_run: bool) -> DockTarget:
    """The logged-in user's Personal Dock on the Store (seed 000), else a clear refusal.

    A dry run trusts the handle stored at login; a real upload re-checks the session first
    (it must still be valid, and an ``ATO_TOKEN`` says nothing about its handle).
    """
    from pipeline.errors import E_USAGE, AtoError
    from stages.publish import DockTarget

    sess = session()
    if sess is None:
        raise AtoError(E_USAGE, "No default publish target found. Run `ato login` to publish to your Personal "
                       "Dock, or pass --registry <url> (for example http://127.0.0.1:18787 for `ato registry "
                       "serve`; `ato config set registry <url>` makes it the default), or --registry "
                       "https://api.ato.run / --ci for the official Store.")
    api = session_api_url(sess)
    handle = sess.handle if sess.source == "credentials" and sess.handle else None
    if handle is None or not dry_run:
        ident = identify(api, sess.token)
        handle, api = ident["handle"], ident["api_url"]
    return DockTarget(api_url=api, token=sess.token, handle=handle, url=f"{store_site_url()}/d/{handle}")


def session_api_url(sess: Session) -> str:
    """Where a session is checked: the URL it was created against, unless ATO_STORE_API_URL or
    ``store_url`` in config.toml says otherwise."""
    if sess.source == "credentials" and sess.api_url and resolve("store_url").origin == "default":
        return sess.api_url
    return store_api_url()
