"""``ato login`` / ``ato whoami`` / ``ato logout``: the Store session (seed 000).

The token is checked against ``{ATO_STORE_API_URL}/v1/auth/whoami`` (``ato registry serve
--store-user`` implements it) and stored 0600 under ``$ATO_HOME``. ``ATO_TOKEN`` always wins.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from pipeline.cli.common import emit, info, json_option, registry_option
from pipeline.cli.help import examples
from pipeline.errors import E_AUTH_REQUIRED, AtoError, Problem


def not_logged_in() -> AtoError:
    return AtoError(E_AUTH_REQUIRED, "not logged in: run `ato login` or set ATO_TOKEN for this shell",
                    problems=[Problem("ATO_ERR_AUTH_REQUIRED", "no Store session token", {})])


def fetch_identity(api_url: str, token: str) -> dict[str, Any]:
    from pipeline.credentials import identify

    return identify(api_url, token)


@click.command("login", epilog=examples("ato login", "ato login --token \"$TOKEN\" --registry http://127.0.0.1:18787"))
@click.option("--token", metavar="TOKEN", help="Session token (headless; default: $ATO_TOKEN, else prompt on a TTY).")
@registry_option("Store API URL (default: `ato config get store_url`).", dest="api_url")
@json_option
def login_cmd(token: str | None, api_url: str | None) -> None:
    """Log in to the Store and keep the token under $ATO_HOME.

    The token is checked (GET /v1/auth/whoami) and stored with mode 0600.
    """
    from pipeline import credentials

    api = api_url or credentials.store_api_url()
    token = (token or os.environ.get("ATO_TOKEN") or "").strip()
    if not token:
        if not sys.stdin.isatty():
            raise AtoError(E_AUTH_REQUIRED, "no token given and stdin is not a terminal: pass --token <token> or "
                           "set ATO_TOKEN", problems=[Problem("ATO_ERR_AUTH_REQUIRED", "no session token", {})])
        click.echo(f"Create a token at {credentials.store_site_url()}/settings/tokens", err=True)
        token = click.prompt("Token", hide_input=True, err=True).strip()
        if not token:
            raise not_logged_in()
    ident = fetch_identity(api, token)
    credentials.save(token, ident["handle"], ident["api_url"])
    from pipeline import paths

    doc = {"schema_version": "1", "logged_in": True, "handle": ident["handle"], "api_url": ident["api_url"],
           "credentials_path": str(paths.credentials_path()),
           "dock_url": f"{credentials.store_site_url()}/d/{ident['handle']}"}
    emit(doc, "login", f"Logged in as {ident['handle']} ({ident['api_url']})\n"
                       f"  Personal Dock: {doc['dock_url']}")


@click.command("whoami", epilog=examples("ato whoami", "ato whoami --json"))
@json_option
def whoami_cmd() -> None:
    """Show whose Store session is in use.

    ATO_TOKEN wins over the session `ato login` stored.
    """
    from pipeline import credentials

    sess = credentials.session()
    if sess is None:
        raise not_logged_in()
    ident = fetch_identity(credentials.session_api_url(sess), sess.token)
    doc = {"schema_version": "1", "handle": ident["handle"], "api_url": ident["api_url"],
           "token_source": sess.source}
    emit(doc, "whoami", f"{ident['handle']} ({ident['api_url']}, token from "
                        f"{'ATO_TOKEN' if sess.source == 'env' else 'ato login'})")


@click.command("logout", epilog=examples("ato logout"))
@json_option
def logout_cmd() -> None:
    """Forget the stored Store session."""
    from pipeline import credentials

    removed = credentials.delete()
    if os.environ.get("ATO_TOKEN"):
        info("note: ATO_TOKEN is still set in this shell and still authenticates")
    doc = {"schema_version": "1", "logged_out": True, "removed": removed}
    emit(doc, "logout", "Logged out." if removed else "Not logged in (nothing to remove).")


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(login_cmd)
    group.add_command(whoami_cmd)
    group.add_command(logout_cmd)
