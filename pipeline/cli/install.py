"""``ato install <publisher>/<slug>``: standard artifacts from a registry (see :mod:`stages.install`)."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import emit, info, json_mode, json_option, registry_option, resolve_registry
from pipeline.cli.help import examples
from pipeline.cli.progress import reporter
from pipeline.errors import E_USAGE, AtoError
from pipeline.progress import human_bytes


def _trust_line(doc: dict) -> str:
    """issue 6: who signed it and why it is trusted (or that it is unsigned)."""
    if not doc.get("signed"):
        return f"  Signed: NO ({(doc.get('trust') or {}).get('message') or 'unsigned'})"
    return f"  Signed: {doc['signer']['key_id']} ({doc['signer']['short_fingerprint']}); {doc['trust']['message']}"


@click.command("install", epilog=examples("ato install acme/hello --registry http://127.0.0.1:18787",
                                         "ato install acme/tool@1.2.0 --bin --yes   # and put its command on PATH"))
@click.argument("ref", required=False, metavar="PUBLISHER/SLUG[@VERSION]")
@click.option("--from-gh-repo", "gh_repo", metavar="OWNER/REPO",
              help="Download the GitHub repository archive ($ATO_GITHUB_API_URL), build it and install it.")
@registry_option()
@click.option("--version", "version", metavar="VERSION", help="Version to install (default: the latest).")
@click.option("--allow-unsigned", is_flag=True, help="Accept an unsigned artifact (reported as unsigned).")
@click.option("--yes", "-y", is_flag=True,
              help="Approve without asking: pin a first-seen publisher key (TOFU); for a native app, run the local "
                   "finalize (and project it unless --no-project).")
@click.option("--project/--no-project", "project", default=None,
              help="Native apps: add (or do not add) a launcher projection (default: with --yes, or ask on a TTY).")
@click.option("--force-large-payload", is_flag=True,
              help="Accept a payload that decodes to more than the ceiling (200 MiB unless configured).")
@click.option("--bin", "bin_", is_flag=True,
              help="A tool capsule (type = \"tool\"): put its command on PATH as ~/.local/bin/<slug> (removed by "
                   "ato uninstall).")
@json_option
def install_cmd(ref: str | None, gh_repo: str | None, registry: str | None, version: str | None,
                allow_unsigned: bool, yes: bool, project: bool | None, force_large_payload: bool,
                bin_: bool) -> None:
    """Install a capsule from a registry, downloading only missing chunks.

    The artifact is verified (size, SHA-256, BLAKE3, signature, trust) before it is stored
    under $ATO_HOME/store.
    """
    if gh_repo is not None:
        if ref or registry or version or bin_:
            raise click.UsageError("--from-gh-repo cannot be combined with a REF, --registry, --version or --bin")
        return _install_gh(gh_repo, allow_unsigned, yes, force_large_payload)
    if not ref:
        raise click.UsageError("missing REF (publisher/slug) or --from-gh-repo owner/repo")
    doc = install_one(ref, resolve_registry(registry), version, allow_unsigned=allow_unsigned, yes=yes,
                      project=project, bin_=bin_, force_large_payload=force_large_payload)
    t = doc["transfer"]
    if doc["up_to_date"]:
        how = "already installed (nothing downloaded)"
    elif t["mode"] == "delta":
        how = (f"downloaded {t['chunks_downloaded']} of {t['chunks_total']} chunks "
               f"({human_bytes(t['bytes_downloaded'])}), reused {t['chunks_reused']} from the local CAS")
    else:
        how = f"downloaded the whole artifact ({human_bytes(t['bytes_downloaded'])})"
    human = "\n".join([
        f"Installed {doc['scoped_id']} {doc['version']}",
        f"  Path: {doc['path']}",
        f"  Hash: {doc['content_hash']}",
        f"  Transfer: {how}",
        _trust_line(doc),
        f"  Run:  ato run {doc['scoped_id']} --registry {doc['registry']}" if doc["install_kind"] == "Standard"
        else f"  App:  {doc['launchable']['DerivedApp']['path']} (locally finalized; projection "
             f"{doc['projection']['state']})",
        *[f"  Command: {launcher['path']}" for launcher in doc.get("launchers") or []],
        *_path_note(doc.get("launchers") or []),
    ])
    emit(doc, "install", human)


def _path_note(launchers: list[dict]) -> list[str]:
    """pipx's hint: a command put where the shell does not look is not on PATH yet."""
    on_path = {os.path.realpath(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p}
    dirs = sorted({os.path.dirname(str(lau["path"])) for lau in launchers if lau.get("kind") == "bin"})
    return [f"  Note: {d} is not on your PATH; add it to run the command by name "
            f'(export PATH="{d}:$PATH")' for d in dirs if os.path.realpath(d) not in on_path]


def install_one(ref: str, registry: str, version: str | None, *, allow_unsigned: bool, yes: bool,
                project: bool | None, bin_: bool, force_large_payload: bool = False,
                shim_flags: list[str] | None = None) -> dict:
    """One verified install (standard or native), its ownership record, and with ``bin_`` its PATH shim
    (``shim_flags``: an upgrade keeps the flags the previous version's shim had)."""
    from pipeline.cli.trust import artifact_trust, tty_consent
    from pipeline.native_delivery import NativeInstall
    from pipeline.registry.client import RegistryClient
    from stages import installed
    from stages.install import install

    # issue 4: a native artifact (payload ato.delivery.toml) needs consent before it is stored, then
    # fetch -> finalize -> project after the standard install
    native = NativeInstall(yes=yes, project=project, interactive=not json_mode(), ask=tty_consent, notify=info)
    # issues 6 and 12: the format's verifier, the signature and the trust decision, judged on the
    # skeleton before any chunk is downloaded and on the whole artifact before it enters the store
    trust = artifact_trust(allow_unsigned=allow_unsigned, yes=yes, force_large_payload=force_large_payload)
    with reporter(json=json_mode()) as progress:
        doc = install(ref, registry, version, connect=RegistryClient,
                      token=os.environ.get("ATO_TOKEN"), progress=info, trust=native.wrap(trust), reporter=progress)
    doc = native.complete(doc)
    if doc["install_kind"] != "Standard":
        installed.write_record(doc)  # the derived app and fetch belong to this version now
    if bin_ or shim_flags is not None:
        wanted = shim_flags if shim_flags is not None else (["--yes"] if yes else [])
        doc["launchers"] = [expose_command(doc, command_flags(wanted, signed=bool(doc.get("signed"))))]
    return doc


def command_flags(wanted: list[str], *, signed: bool) -> list[str]:
    """The flags a PATH shim passes to ``ato run``: ``--yes`` as the install (or the shim it replaces) had it,
    ``--allow-unsigned`` only when the version it runs is unsigned (its install was allowed explicitly), so
    a signed upgrade of an unsigned tool runs fail-closed again."""
    return sorted({f for f in wanted if f != "--allow-unsigned"} | (set() if signed else {"--allow-unsigned"}))


def expose_command(doc: dict, flags: list[str]) -> dict:
    """``~/.local/bin/<slug>``: a shim that runs exactly this installed version (pipx-style)."""
    import sys

    from pipeline import paths
    from stages import installed

    entry = next(e for e in installed.scan(doc["scoped_id"]) if e.version == doc["version"])
    kind = (entry.record or {}).get("type")
    if kind != "tool":
        raise AtoError(E_USAGE, f"{doc['scoped_id']} {doc['version']} was installed, but it is type "
                                f"{kind or 'unknown'!r}: only type = \"tool\" capsules are put on PATH",
                       hint=f"run it with `ato run {doc['scoped_id']}`")
    data = installed.shim_text(scoped_id=doc["scoped_id"], version=doc["version"], python=sys.executable,
                               ato_home=str(paths.ato_home().absolute()), flags=flags)
    return installed.place_shim(entry, data, doc["slug"], flags)


def _install_gh(repo: str, allow_unsigned: bool, yes: bool, force_large_payload: bool) -> None:
    from pipeline.cli.publish import _build
    from pipeline.cli.trust import artifact_trust
    from stages.gh_install import install_from_gh_repo

    trust = artifact_trust(allow_unsigned=allow_unsigned, yes=yes, force_large_payload=force_large_payload)
    with reporter(json=json_mode()) as progress:
        doc = install_from_gh_repo(repo, build_fn=lambda d: _build(d, force_large_payload, None, progress, yes=yes),
                                   trust=trust, progress=info, reporter=progress)
    emit(doc, "install", "\n".join([
        f"Installed {doc['scoped_id']} {doc['version']} (built from github.com/{repo})",
        f"  Path: {doc['path']}",
        f"  Hash: {doc['content_hash']}",
        _trust_line(doc),
        f"  Run:  ato run {doc['path']}",
    ]))


def register(group: click.Group) -> None:
    group.add_command(install_cmd)
