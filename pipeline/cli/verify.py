"""``ato verify <artifact|publisher/slug>``: every digest, the signature and the trust decision.

For CI: exit 0 only when every check holds; otherwise E208 / ATO_ERR_INTEGRITY_FAILURE naming
what broke (E212 for a payload over the ceiling, E301 for an unsigned artifact without
``--allow-unsigned`` or a first sight that needs consent). The checks are the format's one
verifier (:func:`stages.capsule.verify`), the same publish, the registry, install, fetch and run
use. ``--json`` prints the full report on stdout either way.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import names, paths
from pipeline.cli.common import emit, json_mode, json_option
from pipeline.cli.help import examples
from pipeline.cli.trust import tty_consent
from pipeline.errors import E_USAGE, AtoError
from pipeline.trust import revocation
from pipeline.trust.verify import VerifyOptions, verify_artifact
from stages.capsule import consumer_limits


def resolve_target(target: str, version: str | None) -> tuple[Path, str | None]:
    """A path to an artifact, or the installed artifact of ``publisher/slug`` (latest unless --version)."""
    path = Path(target)
    scoped = names.parse_scoped_id(target)
    if path.exists() or target.endswith(".capsule") or scoped is None:
        if not path.is_file():
            raise AtoError(E_USAGE, f"no artifact at {target}", details={"target": target},
                           hint="give a .capsule file or an installed publisher/slug")
        return path, None
    from stages.install import store_path  # lazily: it pulls in the HTTP client

    publisher, slug = scoped
    base = paths.store_dir() / publisher / slug
    versions = sorted((d.name for d in base.iterdir() if d.is_dir()), key=names.version_key) if base.is_dir() else []
    if version is not None:
        versions = [v for v in versions if v == version]
    for v in reversed(versions):
        candidate = store_path(publisher, slug, v)
        if candidate.is_file():
            return candidate, f"{publisher}/{slug}"
    what = f"{publisher}/{slug}" + (f" {version}" if version else "")
    raise AtoError(E_USAGE, f"{what} is not installed (looked in {base})", details={"target": target},
                   hint=f"install it first (ato install {publisher}/{slug}) or give the .capsule path")


def _human(report: dict) -> str:
    trust = report["trust"]
    if not report["signed"]:
        return f"verified {report['artifact']}: digests ok, UNSIGNED ({trust.get('message') or 'unsigned'})"
    signer = report["signer"]
    who = f"{signer['key_id']} ({signer['short_fingerprint']}{', ' + repr(trust['petname']) if trust['petname'] else ''})"
    return f"verified {report['artifact']}: signed by {who}; {trust['message']}"


@click.command("verify", epilog=examples("ato verify ./app.capsule", "ato verify acme/app --json"))
@click.argument("target", metavar="ARTIFACT|PUBLISHER/SLUG")
@click.option("--version", "version", metavar="VERSION", help="With publisher/slug: which installed version (default the latest).")
@click.option("--identity", metavar="IDENTITY", help="Check the signer against this identity instead of the publisher / capsule:<name>.")
@click.option("--signer", metavar="DID", help="Accept only this signing key (did:key); nothing is pinned.")
@click.option("--allow-unsigned", is_flag=True, help="Accept an artifact without a signature (reported unsigned).")
@click.option("--yes", "-y", is_flag=True, help="Pin a first-seen signer without asking (TOFU).")
@click.option("--revocations", multiple=True, metavar="FILE|URL",
              help="Also honour this revocation list for this check (repeatable); `ato trust revoke --from` keeps one.")
@click.option("--force-large-payload", is_flag=True,
              help="Accept a payload that decodes to more than the ceiling (200 MiB unless configured).")
@json_option
def verify_cmd(target: str, version: str | None, identity: str | None, signer: str | None, allow_unsigned: bool,
               yes: bool, revocations: tuple[str, ...], force_large_payload: bool) -> None:
    """Check every digest, the signature and whether the signer is trusted.

    TARGET is a .capsule file or an installed publisher/slug; exit 0 only when everything holds.
    """
    path, scoped_id = resolve_target(target, version)
    extra = tuple(e.id for src in revocations for e in revocation.load_entries(src))
    if signer is not None and not signer.startswith("did:key:"):
        raise AtoError(E_USAGE, f"--signer must be a did:key, got {signer!r}")
    options = VerifyOptions(identity=identity, expected_signer=signer, allow_unsigned=allow_unsigned,
                            assume_yes=yes, extra_revoked=extra, limits=consumer_limits(force_large_payload))
    outcome = verify_artifact(path, options=options, target=target, scoped_id=scoped_id, consent=tty_consent)
    if outcome.error is not None:
        if json_mode():
            emit(outcome.report, "verify")
        raise outcome.error
    emit(outcome.report, "verify", _human(outcome.report))


def register(group: click.Group) -> None:
    group.add_command(verify_cmd)
