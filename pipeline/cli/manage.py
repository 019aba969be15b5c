"""``ato list``, ``ato uninstall``, ``ato upgrade``, ``ato gc``: manage what is installed (see :mod:`stages.installed`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import emit, info, json_mode, json_option, registry_option
from pipeline.cli.help import examples
from pipeline.errors import E_USAGE, AtoError
from pipeline.progress import human_bytes
from stages import installed
from stages.installed import Entry, Plan


def _home(path: str) -> str:
    home = str(Path(os.environ.get("HOME") or Path.home()))
    return "~" + path[len(home):] if path == home or path.startswith(home + os.sep) else path


def live_dirs() -> list[str]:
    """Project dirs of the capsules running now: their unpacked copies are never removed under them."""
    from pipeline.runtime import table

    return [str(r["project_dir"]) for r in table.all_records()
            if r.get("status") in table.ACTIVE and r.get("project_dir")]


def collect_cas(plan: Plan, dry_run: bool) -> dict[str, Any]:
    """The CAS part of a removal: payload manifests and chunks no remaining root names."""
    from cas.gc import collect_garbage
    from cas.store import CasStore
    from pipeline import paths
    from pipeline.cas_roots import live_payloads

    gone = [i.path for i in plan.remove] if dry_run else []
    report = collect_garbage(CasStore(paths.cas_root()), live_payloads(gone), dry_run=dry_run, leaving=gone)
    return {"manifests_removed": report.manifests_removed, "objects_removed": report.objects_removed,
            "objects_kept": report.objects_kept, "bytes": report.disk_bytes_freed}


def _removal_doc(plan: Plan, cas: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "bytes_freed": plan.bytes + cas["bytes"],
            "removed": [i.to_json() for i in plan.remove], "kept": [i.to_json() for i in plan.kept], "cas": cas}


def _removal_lines(plan: Plan, cas: dict[str, Any], dry_run: bool) -> list[str]:
    verb = "Would remove" if dry_run else "Removed"
    lines = []
    for item in plan.remove:
        if item.kind == "directory":
            continue
        what = f" ({item.scoped_id} {item.version})" if item.scoped_id else ""
        lines.append(f"  {verb.lower():<12} {item.kind:<11} {_home(item.path)}{what}")
    for item in plan.kept:
        lines.append(f"  {'kept':<12} {item.kind:<11} {_home(item.path)}: {item.reason}")
    if cas["objects_removed"] or cas["manifests_removed"]:
        lines.append(f"  {verb.lower():<12} {'cas':<11} {cas['objects_removed']} chunks, "
                     f"{cas['manifests_removed']} payload manifests no longer used")
    lines.append(f"{verb} {human_bytes(plan.bytes + cas['bytes'])}" + (" (nothing was changed)" if dry_run else ""))
    return lines


# ---------------------------------------------------------------- list


def _signature(entry: Entry) -> tuple[bool, dict[str, Any] | None]:
    record = entry.record
    if record is not None:
        return bool(record.get("signed")), record.get("signer")
    from stages.capsule import read_capsule
    from stages.capsule.keys import did_fingerprint, short_fingerprint

    try:
        sig = read_capsule(entry.capsule).signature_doc if entry.capsule else {}
    except AtoError:
        return False, None
    key = sig.get("key_id") if sig.get("signed", True) else None
    if not isinstance(key, str):
        return False, None
    try:
        return True, {"key_id": key, "short_fingerprint": short_fingerprint(did_fingerprint(key))}
    except (ValueError, AtoError):
        return True, {"key_id": key, "short_fingerprint": None}


def _trust(entry: Entry, signed: bool, signer: dict[str, Any] | None, store: Any) -> str:
    """The trust standing now: pinned, previous-key, not-pinned, other-key, revoked, local-build or unsigned."""
    from pipeline.trust import policy
    from stages.provenance import built_here

    if not signed or not signer or not signer.get("key_id"):
        content = str((entry.record or {}).get("content_hash") or "").removeprefix("blake3:")
        if not content and entry.capsule is not None:
            from cas.digest import blake3_file

            content = blake3_file(entry.capsule)
        return "local-build" if content and built_here(content) else "unsigned"
    key = signer["key_id"]
    if store.revocation(key):
        return "revoked"
    try:
        identity = policy.identity_for(scoped_id=entry.scoped_id)
    except AtoError:
        return "not-pinned"
    rec = store.pinned(identity) if identity else None
    if rec is None:
        return "not-pinned"
    if rec.get("key_id") == key:
        return "pinned"
    previous = rec.get("previous") or {}
    return "previous-key" if previous.get("key_id") == key else "other-key"


def _launchers(entry: Entry, projections: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = [{"kind": "bin", "path": lau["path"], "state": installed.launcher_state(lau)}
           for lau in (entry.record or {}).get("launchers") or []]
    for _meta, proj in projections:
        if proj.get("scoped_id") == entry.scoped_id and proj.get("version") == entry.version:
            from stages import project as project_stage

            out.append({"kind": "desktop", "path": proj["projected_path"],
                        "state": "broken" if project_stage.inspect(proj) else "ok"})
    return out


def _footprint(entry: Entry, ctx: installed.Context) -> int:
    """Disk bytes this version holds: its store dir, its unpacked copies, its native derived app and fetch."""
    seen: set[tuple[int, int]] = set()
    total = installed.disk_usage(entry.dir, seen)
    key = installed.manifest_key(entry)
    for directory in ctx.unpacked:
        if directory.name == key:
            total += installed.disk_usage(directory, seen)
    native = (entry.record or {}).get("native") or {}
    if native.get("derived_app_path"):
        total += installed.disk_usage(Path(native["derived_app_path"]).parent, seen)
    if native.get("fetched_dir"):
        total += installed.disk_usage(Path(native["fetched_dir"]), seen)
    return total


@click.command("list", epilog=examples('ato list', "ato list --json | jq '.capsules[].scoped_id'"))
@json_option
def list_cmd() -> None:
    """List installed capsules: versions, size, signer and trust, launchers."""
    from pipeline.trust import store as trust_store
    from stages import project as project_stage

    entries = [e for e in installed.scan() if e.installed]
    store = trust_store.load()
    ctx = installed.Context.load()
    projections = project_stage.load_records()
    capsules: dict[str, dict[str, Any]] = {}
    for e in entries:
        record = e.record or {}
        signed, signer = _signature(e)
        version = {
            "version": e.version, "path": str(e.capsule), "size_bytes": e.capsule.stat().st_size,  # type: ignore[union-attr]
            "disk_bytes": _footprint(e, ctx), "content_hash": record.get("content_hash"),
            "type": record.get("type"), "registry": record.get("registry"),
            "installed_at": record.get("installed_at"), "install_kind": record.get("install_kind") or "Standard",
            "signed": signed, "signer": signer, "trust": _trust(e, signed, signer, store),
            "launchers": _launchers(e, projections), "recorded": e.record is not None,
        }
        cap = capsules.setdefault(e.scoped_id, {"scoped_id": e.scoped_id, "publisher": e.publisher, "slug": e.slug,
                                                "latest": e.version, "versions": []})
        cap["versions"].append(version)
    items = list(capsules.values())
    for cap in items:
        cap["disk_bytes"] = sum(v["disk_bytes"] for v in cap["versions"])
    doc = {"schema_version": "1", "capsules": items, "total": len(items),
           "versions": sum(len(c["versions"]) for c in items), "disk_bytes": sum(c["disk_bytes"] for c in items)}
    emit(doc, "list", _list_human(doc))


def _list_human(doc: dict[str, Any]) -> str:
    if not doc["capsules"]:
        return "Nothing is installed (ato install <publisher>/<slug>)."
    rows = [("CAPSULE", "VERSION", "TYPE", "SIZE", "TRUST", "LAUNCHER")]
    for cap in doc["capsules"]:
        for v in cap["versions"]:
            trust = v["trust"]
            if v["signer"] and v["signer"].get("short_fingerprint"):
                trust += f" {v['signer']['short_fingerprint']}"
            launcher = ", ".join(_home(lau["path"]) + ("" if lau["state"] == "ok" else f" ({lau['state']})")
                                 for lau in v["launchers"]) or "-"
            rows.append((cap["scoped_id"], v["version"], v["type"] or "-", human_bytes(v["disk_bytes"]), trust,
                         launcher))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    lines.append(f"{doc['total']} capsule(s), {doc['versions']} version(s), {human_bytes(doc['disk_bytes'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- uninstall


@click.command("uninstall", epilog=examples('ato uninstall acme/tool            # every installed version', 'ato uninstall acme/tool@1.0.0 --dry-run'))
@click.argument("ref", metavar="PUBLISHER/SLUG[@VERSION]")
@click.option("--purge", is_flag=True,
              help="Also remove the capsule's saved state, its run logs and its consent approvals.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@json_option
def uninstall_cmd(ref: str, purge: bool, dry_run: bool) -> None:
    """Remove an installed capsule and everything ato created for it.

    Every version, or the one named: the stored files, the launchers and projections ato created,
    the caches, and the CAS chunks nothing else uses.
    """
    scoped, version = installed.parse_ref(ref)
    entries = installed.scan(scoped)
    targets = [e for e in entries if version is None or e.version == version]
    if not targets:
        raise AtoError(E_USAGE, f"{scoped}{'@' + version if version else ''} is not installed",
                       hint="see `ato list`")
    remaining = [e for e in entries if e not in targets and e.installed]
    ctx = installed.Context.load(live_dirs())
    plan = Plan()
    for e in targets:
        installed.plan_entry(plan, e, ctx, remaining)
    if purge:
        if remaining:
            raise AtoError(E_USAGE, f"--purge removes {scoped}'s data, but versions "
                                    f"{', '.join(e.version for e in remaining)} stay installed",
                           hint=f"uninstall every version: ato uninstall {scoped} --purge")
        installed.plan_purge(plan, scoped, [e for e in installed.scan() if e.installed and e.scoped_id != scoped])
    plan.settle()
    if not dry_run:
        plan.apply()
    cas = collect_cas(plan, dry_run)
    doc = {"schema_version": "1", "scoped_id": scoped, "versions": [e.version for e in targets],
           "purge": purge, **_removal_doc(plan, cas, dry_run)}
    head = f"{'Would uninstall' if dry_run else 'Uninstalled'} {scoped} " + ", ".join(e.version for e in targets)
    emit(doc, "uninstall", "\n".join([head, *_removal_lines(plan, cas, dry_run)]))


# ---------------------------------------------------------------- gc


@click.command("gc", epilog=examples('ato gc --dry-run', 'ato gc --keep-last 1     # also keep only the newest installed version of each capsule'))
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N",
              help="Also remove installed versions older than the newest N of each capsule.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed and the bytes it would free.")
@json_option
def gc_cmd(keep_last: int | None, dry_run: bool) -> None:
    """Free the disk space that nothing installed or built still uses.

    Caches nothing uses (unpacked payloads, fetches, derived apps, the build state of projects
    that are gone), leftovers of interrupted commands, then CAS chunks no one references.
    """
    from stages.home_gc import plan_gc

    plan, _remaining = plan_gc(keep_last=keep_last, live_dirs=live_dirs())
    plan.settle()
    if not dry_run:
        plan.apply()
    cas = collect_cas(plan, dry_run)
    doc = {"schema_version": "1", "keep_last": keep_last, **_removal_doc(plan, cas, dry_run)}
    emit(doc, "gc", "\n".join(_removal_lines(plan, cas, dry_run)))


# ---------------------------------------------------------------- upgrade


@click.command("upgrade", epilog=examples('ato upgrade acme/tool', 'ato upgrade --all --dry-run'))
@click.argument("ref", required=False, metavar="[PUBLISHER/SLUG]")
@click.option("--all", "all_", is_flag=True, help="Upgrade every installed capsule.")
@click.option("--dry-run", is_flag=True, help="Ask the registries what is newer; download and change nothing.")
@click.option("--keep", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Previous versions to keep after an upgrade (the old one always stays until the new one "
                   "is verified).")
@registry_option("Ask this registry instead of the one each capsule came from.")
@click.option("--allow-unsigned", is_flag=True, help="Accept an unsigned new version (reported as unsigned).")
@click.option("--yes", "-y", is_flag=True, help="Approve without asking (first-seen publisher key, native finalize).")
@json_option
def upgrade_cmd(ref: str | None, all_: bool, dry_run: bool, keep: int, registry: str | None,
                allow_unsigned: bool, yes: bool) -> None:
    """Install the newest published version and remove the previous ones.

    Only the chunks that changed are downloaded; the previous versions beyond --keep are removed
    once the new one is verified and stored.
    """
    if bool(ref) == all_:
        raise click.UsageError("name one capsule (publisher/slug) or pass --all")
    scoped = installed.parse_ref(ref)[0] if ref else None
    groups: dict[str, list[Entry]] = {}
    for e in installed.scan(scoped):
        if e.installed:
            groups.setdefault(e.scoped_id, []).append(e)
    if scoped and scoped not in groups:
        raise AtoError(E_USAGE, f"{scoped} is not installed", hint=f"install it: ato install {scoped}")
    results = []
    first_error: AtoError | None = None
    for sid, versions in groups.items():
        target: dict[str, str] = {}  # the version it was upgrading to, once known: a failure still says which
        try:
            results.append(_upgrade_one(sid, versions, dry_run=dry_run, keep=keep, registry=registry,
                                        allow_unsigned=allow_unsigned, yes=yes, target=target))
        except AtoError as exc:
            first_error = first_error or exc
            results.append({"scoped_id": sid, "registry": registry or (versions[0].record or {}).get("registry"),
                            "from": versions[0].version, "to": target.get("to"), "status": "failed",
                            "reason": exc.message,
                            "removed_versions": [], "transfer": None, "bytes_freed": 0,
                            "error": {"code": exc.code, "message": exc.message}})
    doc = {"schema_version": "1", "dry_run": dry_run, "results": results,
           "upgraded": sum(1 for r in results if r["status"] == "upgraded"),
           "failed": sum(1 for r in results if r["status"] == "failed")}
    emit(doc, "upgrade", "\n".join(_upgrade_line(r, dry_run) for r in results) or "Nothing is installed.")
    if first_error is not None:
        if json_mode():
            raise first_error
        raise AtoError(first_error.code, f"{doc['failed']} capsule(s) could not be upgraded; first: "
                                         f"{first_error.message}", details=first_error.details)


def _upgrade_line(r: dict[str, Any], dry: bool) -> str:
    sid, status = r["scoped_id"], r["status"]
    if status == "upgraded":
        removed = f"; removed {', '.join(r['removed_versions'])}" if r["removed_versions"] else ""
        return f"{sid}: {r['from']} -> {r['to']}{removed}"
    if status == "would-upgrade":
        removed = f"; would remove {', '.join(r['removed_versions'])}" if r["removed_versions"] else ""
        return f"{sid}: {r['from']} -> {r['to']}{removed} (dry run)"
    if status == "up-to-date":
        removed = r["removed_versions"]
        return f"{sid}: {r['from']} is the newest" + (f"; {'would remove' if dry else 'removed'} "
                                                      f"{', '.join(removed)}" if removed else "")
    return f"{sid}: {status}: {r['reason']}"


def _upgrade_one(sid: str, versions: list[Entry], *, dry_run: bool, keep: int, registry: str | None,
                 allow_unsigned: bool, yes: bool, target: dict[str, str]) -> dict[str, Any]:
    from pipeline.names import version_key
    from pipeline.registry.client import RegistryClient
    from stages.install import latest_release

    newest = versions[0]
    source = registry or (newest.record or {}).get("registry")
    base = {"scoped_id": sid, "registry": source, "from": newest.version, "to": None, "removed_versions": [],
            "transfer": None, "bytes_freed": 0, "error": None, "reason": None}
    if not source:
        return {**base, "status": "skipped", "reason": "no install record says where it came from; pass --registry"}
    if source.startswith("github:"):
        return {**base, "status": "skipped",
                "reason": f"installed from GitHub; reinstall with `ato install --from-gh-repo {source[7:]}`"}
    publisher, slug = sid.split("/", 1)
    with RegistryClient(source, os.environ.get("ATO_TOKEN")) as client:
        _detail, latest = latest_release(client, publisher, slug)
    if not latest:
        raise AtoError(E_USAGE, f"{client.base} has no installable version of {sid}")
    target["to"] = latest
    # the command on PATH, whichever installed version holds it now (an explicit older install --bin)
    shims = [lau for e in versions for lau in (e.record or {}).get("launchers") or [] if lau.get("kind") == "bin"]
    flags = sorted({f for lau in shims for f in lau.get("flags") or []}) if shims else None
    if version_key(latest) <= version_key(newest.version):
        # nothing newer to download; still the upgraded state: the command on the newest, older versions gone
        moving = [] if flags is None or _has_shim(newest) else [str(lau.get("path")) for lau in shims]
        if moving and not dry_run:
            from pipeline.cli.install import command_flags, expose_command

            expose_command({"scoped_id": sid, "version": newest.version, "slug": slug},
                           command_flags(flags, signed=bool((newest.record or {}).get("signed"))))
        removed, freed = _drop_older(sid, newest.version, keep, dry_run, moving=moving)
        return {**base, "to": newest.version, "status": "up-to-date", "removed_versions": removed,
                "bytes_freed": freed}
    if dry_run:
        return {**base, "to": latest, "status": "would-upgrade",
                "removed_versions": [e.version for e in _older(versions, latest)[keep:]]}
    from pipeline.cli.install import install_one

    info(f"Upgrading {sid} {newest.version} -> {latest}")
    doc = install_one(f"{sid}@{latest}", source, None, allow_unsigned=allow_unsigned, yes=yes, project=None,
                      bin_=False, shim_flags=flags)
    removed, freed = _drop_older(sid, latest, keep, dry_run)
    return {**base, "to": latest, "status": "upgraded", "transfer": doc.get("transfer"),
            "removed_versions": removed, "bytes_freed": freed}


def _has_shim(entry: Entry) -> bool:
    return any(lau.get("kind") == "bin" for lau in (entry.record or {}).get("launchers") or [])


def _older(entries: list[Entry], version: str) -> list[Entry]:
    """Installed versions older than ``version``, newest first."""
    from pipeline.names import version_key

    return [e for e in entries if e.installed and version_key(e.version) < version_key(version)]


def _drop_older(sid: str, version: str, keep: int, dry_run: bool, *, moving: list[str] | None = None) \
        -> tuple[list[str], int]:
    """Remove the installed versions of ``sid`` older than ``version`` beyond the newest ``keep`` of them
    (only called once ``version`` is installed and verified). Returns (versions, bytes freed). ``moving``:
    the commands a real run moves to ``version`` first, so a dry run must not count them as removed."""
    entries = [e for e in installed.scan(sid) if e.installed]
    doomed = _older(entries, version)[keep:]
    if not doomed:
        return [], 0
    ctx = installed.Context.load(live_dirs())
    remaining = [e for e in entries if e not in doomed]
    plan = Plan()
    for e in doomed:
        installed.plan_entry(plan, e, ctx, remaining)
    if dry_run and moving:
        plan.remove = [i for i in plan.remove if not (i.kind == "launcher" and i.path in moving)]
        plan.paths -= set(moving)
    plan.settle()
    if not dry_run:
        plan.apply()
    return [e.version for e in doomed], plan.bytes + collect_cas(plan, dry_run)["bytes"]


def register(group: click.Group) -> None:
    for command in (list_cmd, uninstall_cmd, gc_cmd, upgrade_cmd):
        group.add_command(command)
