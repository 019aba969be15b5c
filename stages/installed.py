"""The installed set: what ``ato install`` put in ``$ATO_HOME/store``, listed, and taken back out safely.

Layout: ``store/<publisher>/<slug>/<version>/{<slug>-<version>.capsule, install.json}``. The
``.capsule`` is what makes a version installed (``ato run publisher/slug`` looks for it);
``install.json`` is the ownership record written when it was stored: where it came from,
its digest and signer, and every launcher ato created for it outside ``ATO_HOME`` (the
``~/.local/bin`` shims of ``ato install --bin``). Native apps add their derived app and
fetch (their projections keep their own records, see :mod:`stages.project`).

Removal (uninstall, upgrade's pruning, ``ato gc``) is planned first and applied second:

- the plan holds only what ato created: the stored file and record, launchers whose
  bytes are still exactly what ato wrote, projections through ``unproject`` (which
  checks the same), and caches under ``ATO_HOME`` found by their own records; anything
  else in those places is left and reported, and a launcher that changed since ato
  wrote it refuses the whole plan before anything is removed;
- nothing is followed through a symlink: the store is walked with lstat, a symlink
  where a directory is expected is skipped, and every removed path's real parent must
  be inside ``ATO_HOME`` (launchers: exactly the recorded path);
- the order keeps the store consistent after a crash at any point: launchers first,
  then caches (each directory moved into ``ATO_HOME/.trash`` before it is deleted, what
  is left there is swept by the next ``ato gc``), then the ``.capsule`` (the version is gone from here on),
  then its record, then the empty directories. Every step is idempotent, so running
  the command again finishes what a crash interrupted.

Bytes are counted as disk usage (``st_blocks``, what ``du`` reports), each inode once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cas.atomic import fsync_dir, write_bytes_atomic
from cas.digest import blake3_bytes, label
from cas.filelock import flocked
from cas.tempfiles import is_temp
from pipeline import names, paths
from pipeline.envelope import validate, validation_errors
from pipeline.errors import E_POLICY, E_USAGE, AtoError, Problem

RECORD = "install.json"
RECORD_SCHEMA = "install-record"
SCHEMA_VERSION = "1"
_LEGACY_TEMP = re.compile(r"^\..+\.tmp$")  # temp names of ato versions before cas.tempfiles


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def locked() -> contextlib.AbstractContextManager[None]:
    """Serializes record writes and removals (two uninstalls, an install beside an upgrade)."""
    return flocked(paths.state_dir() / "installed.lock")


# ---------------------------------------------------------------- records


def version_dir(publisher: str, slug: str, version: str) -> Path:
    return paths.store_dir() / publisher / slug / version


def read_record(directory: Path) -> dict[str, Any] | None:
    """The ownership record of a version dir; None when absent or unreadable (treated as legacy)."""
    path = directory / RECORD
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        return None
    # a record that is not what ato writes (edited, truncated) names nothing outside ATO_HOME to remove
    return None if validation_errors(doc, RECORD_SCHEMA) else doc


def write_record(doc: dict[str, Any], *, launchers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write (or refresh) ``install.json`` from an install envelope; launchers and the first install time
    of an existing record are kept unless ``launchers`` replaces them."""
    publisher, slug, version = doc["publisher"], doc["slug"], doc["version"]
    directory = version_dir(publisher, slug, version)
    capsule = Path(doc["path"])
    with locked():
        old = read_record(directory) or {}
        native = None
        if doc.get("install_kind") == "NativeRequiresLocalDerivation" and doc.get("local_derivation"):
            ld = doc["local_derivation"]
            native = {"parent_digest": ld["parent_digest"], "derived_app_path": ld["derived_app_path"],
                      "fetched_dir": ld["fetched_dir"]}
        elif old.get("native") and old.get("content_hash") == doc["content_hash"]:
            native = old["native"]
        trust = doc.get("trust") if isinstance(doc.get("trust"), dict) else {}
        signer = doc.get("signer") if isinstance(doc.get("signer"), dict) else None
        record = {
            "schema_version": SCHEMA_VERSION, "scoped_id": f"{publisher}/{slug}", "publisher": publisher,
            "slug": slug, "version": version, "file": capsule.name, "content_hash": doc["content_hash"],
            "size_bytes": int(doc.get("size_bytes") or capsule.stat().st_size),
            "type": doc.get("capsule_type") or old.get("type"),
            "registry": doc.get("registry"), "installed_at": old.get("installed_at") or now_rfc3339(),
            "updated_at": now_rfc3339(), "install_kind": doc.get("install_kind") or "Standard",
            "signed": bool(doc.get("signed")),
            "signer": {"key_id": signer.get("key_id"), "short_fingerprint": signer.get("short_fingerprint")}
            if signer else None,
            "trust_status": trust.get("status"), "native": native,
            "manifest_hash": doc.get("manifest_hash") or old.get("manifest_hash"),
            "launchers": list(old.get("launchers") or []) if launchers is None else launchers,
        }
        write_bytes_atomic(directory / RECORD, (json.dumps(validate(record, RECORD_SCHEMA), indent=2,
                                                           sort_keys=True) + "\n").encode("utf-8"))
    return record


# ---------------------------------------------------------------- the installed set


@dataclass
class Entry:
    """One installed version (or what is left of one)."""

    publisher: str
    slug: str
    version: str
    dir: Path
    capsule: Path | None
    record: dict[str, Any] | None
    foreign: list[str] = field(default_factory=list)  # names in the dir that ato did not create

    @property
    def scoped_id(self) -> str:
        return f"{self.publisher}/{self.slug}"

    @property
    def installed(self) -> bool:
        return self.capsule is not None


def _real_dirs(root: Path, valid: Callable[[str], bool]) -> list[Path]:
    """Subdirectories (never through a symlink) with a valid name, sorted."""
    try:
        items = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in items
                  if not e.name.startswith(".") and e.is_dir(follow_symlinks=False) and valid(e.name))


def _entry(publisher: str, slug: str, directory: Path) -> Entry:
    version = directory.name
    record = read_record(directory)
    wanted = {f"{slug}-{version}.capsule"}
    if record and isinstance(record.get("file"), str) and names.valid_file_name(record["file"]):
        wanted.add(record["file"])
    capsule = None
    foreign = []
    for item in sorted(os.scandir(directory), key=lambda e: e.name):
        if item.name in wanted and item.is_file(follow_symlinks=False) and capsule is None:
            capsule = Path(item.path)
        elif item.name == RECORD or is_temp(item.name) or _LEGACY_TEMP.match(item.name):
            continue
        else:
            foreign.append(item.name)
    return Entry(publisher, slug, version, directory, capsule, record, foreign)


def scan(scoped_id: str | None = None, *, include_empty: bool = False) -> list[Entry]:
    """Every version dir in the store (optionally of one capsule), newest version first per capsule.

    A dir with neither a ``.capsule`` nor a record (what a removal interrupted at its very end leaves)
    is listed only with ``include_empty``."""
    out: list[Entry] = []
    wanted = names.parse_scoped_id(scoped_id) if scoped_id else None
    for pub in _real_dirs(paths.store_dir(), names.valid_segment):
        if wanted and pub.name != wanted[0]:
            continue
        for slug in _real_dirs(pub, names.valid_segment):
            if wanted and slug.name != wanted[1]:
                continue
            versions = _real_dirs(slug, names.valid_version)
            versions.sort(key=lambda d: names.version_key(d.name), reverse=True)
            out.extend(_entry(pub.name, slug.name, d) for d in versions)
    return [e for e in out if include_empty or e.installed or e.record is not None]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``publisher/slug[@version]`` -> (scoped id, version or None)."""
    text = ref.strip().lstrip("@")
    scoped, at, version = text.partition("@")
    parsed = names.parse_scoped_id(scoped)
    if parsed is None or (at and not names.valid_version(version)):
        raise AtoError(E_USAGE, f"invalid capsule reference {ref!r}: expected publisher/slug[@version]")
    return f"{parsed[0]}/{parsed[1]}", version or None


# ---------------------------------------------------------------- disk usage and safe removal


def disk_usage(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes ``du`` counts for ``path`` (a file, a symlink or a tree), without following symlinks.

    An inode is counted once; a non-directory with other hard links elsewhere frees nothing.
    """
    seen = set() if seen is None else seen
    total = 0
    stack = [str(path)]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        if stat.S_ISDIR(st.st_mode):
            total += st.st_blocks * 512
            with contextlib.suppress(OSError):
                stack.extend(e.path for e in os.scandir(current))
        elif st.st_nlink <= 1:
            total += st.st_blocks * 512
    return total


def inside_home(path: Path) -> bool:
    """Whether ``path`` itself (not what it points to) lies in ATO_HOME: its real parent is inside."""
    home = os.path.realpath(paths.ato_home())
    parent = os.path.realpath(path.parent)
    return parent == home or parent.startswith(home + os.sep)


def trash_dir() -> Path:
    """Where directories go between "no longer visible" and "deleted" (swept by the next ``ato gc``)."""
    return paths.ato_home() / ".trash"


def remove_tree(path: Path) -> None:
    """Delete a directory ato owns: renamed into ``.trash`` first (readers stop seeing it at once), then
    deleted; a crash between the two leaves it in ``.trash``. Symlinks are never followed."""
    if not inside_home(path):
        raise AtoError(E_POLICY, f"refusing to remove {path}: it is not inside ATO_HOME ({paths.ato_home()})")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        remove_file(path)
        return
    if path.parent != trash_dir():
        trash_dir().mkdir(parents=True, exist_ok=True)
        aside = trash_dir() / f"{secrets.token_hex(6)}-{path.name}"[:200]
        try:
            os.rename(path, aside)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            aside = path  # another file system inside ATO_HOME: delete in place
        else:
            fsync_dir(path.parent)
        path = aside
    shutil.rmtree(path)


def remove_file(path: Path) -> None:
    if not inside_home(path):
        raise AtoError(E_POLICY, f"refusing to remove {path}: it is not inside ATO_HOME ({paths.ato_home()})")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)


def prune_empty(directory: Path, stop: Path) -> None:
    """rmdir ``directory`` and its parents up to (not including) ``stop``, while they are empty."""
    current = directory
    while current != stop and stop in current.parents:
        try:
            os.rmdir(current)
        except OSError:
            return
        fsync_dir(current.parent)
        current = current.parent


# ---------------------------------------------------------------- launchers (install --bin)


def shim_text(*, scoped_id: str, version: str, python: str, ato_home: str, flags: list[str]) -> bytes:
    """The ``~/.local/bin`` command of a tool capsule: runs exactly this installed version."""
    import shlex

    args = " ".join(shlex.quote(a) for a in ["run", f"{scoped_id}@{version}", *flags])
    return (f"#!/bin/sh\n"
            f"# ato shim for {scoped_id} {version}: created by `ato install --bin`; "
            f"`ato uninstall {scoped_id}` removes it\n"
            f"ATO_HOME={shlex.quote(ato_home)}\nexport ATO_HOME\n"
            f"exec {shlex.quote(python)} -m pipeline.cli.main {args} -- \"$@\"\n").encode()


def launcher_state(launcher: dict[str, Any], known: set[str] | None = None) -> str:
    """``ok`` (bytes ato wrote: the recorded digest, or with ``known`` any digest recorded for this path by
    another version of the same capsule, as during a move), ``missing``, or ``changed`` (never removed)."""
    path = Path(launcher["path"])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "changed"
    try:
        data = path.read_bytes()
    except OSError:
        return "changed"
    return "ok" if label(blake3_bytes(data)) in ({launcher.get("blake3")} | (known or set())) else "changed"


def recorded_hashes(path: str, entries: Iterable[Entry]) -> set[str]:
    """Every digest ``entries`` recorded for the launcher at ``path``."""
    return {str(lau.get("blake3")) for e in entries for lau in (e.record or {}).get("launchers") or []
            if lau.get("path") == path}


def owner_of(path: Path, entries: list[Entry]) -> Entry | None:
    for e in entries:
        for launcher in (e.record or {}).get("launchers") or []:
            if launcher.get("path") == str(path):
                return e
    return None


def _write_launchers(entry: Entry, launchers: list[dict[str, Any]]) -> None:
    record = read_record(entry.dir)
    if record is None:
        return
    record["launchers"] = launchers
    record["updated_at"] = now_rfc3339()
    write_bytes_atomic(entry.dir / RECORD, (json.dumps(validate(record, RECORD_SCHEMA), indent=2,
                                                       sort_keys=True) + "\n").encode("utf-8"))


def place_shim(entry: Entry, data: bytes, command: str, flags: list[str]) -> dict[str, Any]:
    """Write ``~/.local/bin/<command>`` for ``entry``; refused when that path exists and is not a shim ato
    wrote for this same capsule. The command moves here from another version of the capsule in three
    recorded steps (this record, the file, the other records), so a crash between any two leaves a file
    whose bytes some record names. Returns the launcher record."""
    target = paths.user_bin_dir().absolute() / command
    launcher = {"kind": "bin", "path": str(target), "command": command, "blake3": label(blake3_bytes(data)),
                "flags": list(flags)}
    with locked():
        everything = scan()
        same = [e for e in everything if e.scoped_id == entry.scoped_id]
        owner = owner_of(target, [e for e in everything if e.scoped_id != entry.scoped_id])
        if owner is not None:
            raise _conflict(f"{target} is already the command of {owner.scoped_id} {owner.version}",
                            path=str(target), owner=owner.scoped_id)
        if os.path.lexists(target) and launcher_state({"path": str(target)}, recorded_hashes(str(target), same)) \
                != "ok":
            raise _conflict(f"{target} already exists and was not created by ato for {entry.scoped_id}",
                            hint="move it away (nothing was changed)", path=str(target))
        current = read_record(entry.dir) or {}
        _write_launchers(entry, [x for x in current.get("launchers") or [] if x.get("path") != str(target)]
                         + [launcher])
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data, mode=0o755)
        for other in same:
            if other.dir != entry.dir:
                mine = [x for x in (other.record or {}).get("launchers") or [] if x.get("path") != str(target)]
                if mine != ((other.record or {}).get("launchers") or []):
                    _write_launchers(other, mine)
    return launcher


def _conflict(message: str, hint: str | None = None, **details: Any) -> AtoError:
    return AtoError(E_POLICY, message, details=details, hint=hint,
                    problems=[Problem("ATO_ERR_POLICY_VIOLATION", message, dict(details))])


# ---------------------------------------------------------------- removal plans

# The order a plan is applied in: a crash at any point leaves a consistent store (see the module doc).
PHASES = ("launcher", "projection", "purge", "derived_app", "fetch", "unpacked", "build", "leftover", "capsule",
          "record")


@dataclass
class Item:
    """One thing a plan removes, or leaves (with the reason)."""

    kind: str
    path: str
    bytes: int = 0
    scoped_id: str | None = None
    version: str | None = None
    reason: str | None = None  # kept items: why they stay
    run: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "bytes": self.bytes, "scoped_id": self.scoped_id,
                "version": self.version, "reason": self.reason}


@dataclass
class Plan:
    remove: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)
    prune: list[Path] = field(default_factory=list)  # directories removed afterwards when empty
    seen: set[tuple[int, int]] = field(default_factory=set)  # inodes already counted
    paths: set[str] = field(default_factory=set)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.remove)

    def add(self, kind: str, path: Path, run: Callable[[], None], entry: Entry | None = None,
            count: bool = True) -> None:
        if str(path) in self.paths:
            return
        self.paths.add(str(path))
        size = 0
        if kind == "directory":  # only the directory itself: what it holds is counted by its own items
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                size = st.st_blocks * 512 if (st.st_dev, st.st_ino) not in self.seen else 0
                self.seen.add((st.st_dev, st.st_ino))
        else:
            size = disk_usage(path, self.seen) if count else 0
        self.remove.append(Item(kind, str(path), size, entry.scoped_id if entry else None,
                                entry.version if entry else None, run=run))

    def keep(self, kind: str, path: Path | str, reason: str, entry: Entry | None = None) -> None:
        self.kept.append(Item(kind, str(path), 0, entry.scoped_id if entry else None,
                              entry.version if entry else None, reason))

    def removes(self, path: Path | str) -> bool:
        return str(path) in self.paths

    def settle(self) -> Plan:
        """Count the directories the removals leave empty (they are removed too): ``directory`` items."""
        gone = set(self.paths)
        home = paths.ato_home()
        for directory in sorted(set(self.prune), key=lambda d: len(d.parts), reverse=True):
            stop = paths.store_dir() if paths.store_dir() in directory.parents else home
            current = directory
            while current != stop and stop in current.parents and str(current) not in gone:
                try:
                    left = [p for p in os.listdir(current) if str(current / p) not in gone]
                except OSError:
                    break
                if left:
                    break
                gone.add(str(current))
                self.add("directory", current, lambda: None)
                current = current.parent
        return self

    def apply(self) -> None:
        """Run every removal in phase order, then drop the directories left empty."""
        with locked():
            for phase in PHASES:
                for item in self.remove:
                    if item.kind == phase and item.run is not None:
                        item.run()
            store = paths.store_dir()
            for directory in sorted(set(self.prune), key=lambda d: len(d.parts), reverse=True):
                prune_empty(directory, store if store in directory.parents else paths.ato_home())
            with contextlib.suppress(OSError):
                trash_dir().rmdir()  # only when empty: a crash leaves the rest for `ato gc`


def _remove_launcher(launcher: dict[str, Any], known: set[str]) -> Callable[[], None]:
    def run() -> None:
        if launcher_state(launcher, known) == "ok":  # checked again right before: never someone else's file
            path = Path(launcher["path"])
            os.unlink(path)
            fsync_dir(path.parent)
    return run


def manifest_key(entry: Entry) -> str | None:
    """The name of the ``unpacked/<hash>`` copy ``ato run`` makes of this version: its manifest hash
    (from the record, else read from the stored artifact); None when the artifact cannot be read."""
    recorded = str((entry.record or {}).get("manifest_hash") or "")
    if recorded:
        return recorded.removeprefix("blake3:")
    if entry.capsule is None:
        return None
    try:
        return artifact_manifest_hash(entry.capsule).removeprefix("blake3:")
    except AtoError:
        return None


def artifact_manifest_hash(path: Path) -> str:
    """``distribution.manifest_hash`` of a stored artifact (what the verifier checks and unpack keys on)."""
    from stages.capsule import read_capsule

    dist = read_capsule(path).manifest.get("distribution")
    value = dist.get("manifest_hash") if isinstance(dist, dict) else None
    if not isinstance(value, str):
        raise AtoError(E_USAGE, f"{path.name} has no distribution.manifest_hash")
    return value


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class Context:
    """What removal decisions depend on, read once: projections, live runs, derived apps, fetches."""

    projections: list[tuple[Path, dict[str, Any]]]
    live_dirs: set[str]  # project dirs of capsules running now (their unpacked dirs stay)
    derived: list[tuple[Path, dict[str, Any] | None]]  # apps/<p>/<s>/<parent>/derived-*, provenance
    fetches: list[tuple[Path, dict[str, Any] | None]]  # fetches/<parent>, fetch.json
    unpacked: list[Path]  # unpacked/<manifest hash>

    @classmethod
    def load(cls, live_dirs: Iterable[str] = ()) -> Context:
        from stages import project as project_stage

        derived = []
        for pub in _real_dirs(paths.apps_dir(), lambda _n: True):
            for slug in _real_dirs(pub, lambda _n: True):
                for parent in _real_dirs(slug, lambda _n: True):
                    for d in _real_dirs(parent, lambda n: n.startswith("derived-")):
                        derived.append((d, _json_file(d / "local-derivation.json")))
        fetches = [(d, _json_file(d / "fetch.json")) for d in _real_dirs(paths.fetches_dir(), lambda _n: True)]
        unpacked = _real_dirs(paths.unpacked_dir(), lambda _n: True)
        return cls(project_stage.load_records(), {os.path.realpath(p) for p in live_dirs}, derived, fetches,
                   unpacked)


def plan_entry(plan: Plan, entry: Entry, ctx: Context, remaining: list[Entry]) -> None:
    """Add everything ato created for one installed version; refuse (raise) before anything is removed
    when a launcher is no longer what ato wrote."""
    from stages import project as project_stage

    record = entry.record or {}
    siblings = [e for e in (*remaining, entry) if e.scoped_id == entry.scoped_id]
    for launcher in record.get("launchers") or []:
        if launcher.get("kind") == "bin" and Path(launcher["path"]).parent != paths.user_bin_dir().absolute():
            plan.keep("launcher", launcher["path"], "not in ~/.local/bin, where ato puts commands", entry)
            continue
        if recorded_hashes(launcher["path"], [e for e in remaining if e.scoped_id == entry.scoped_id]):
            plan.keep("launcher", launcher["path"], "the command of a version that stays installed", entry)
            continue
        state = launcher_state(launcher, recorded_hashes(launcher["path"], siblings))
        if state == "changed":
            raise _conflict(f"{launcher['path']} changed since `ato install --bin` wrote it; refusing to remove it "
                            f"(nothing was removed)", path=launcher["path"],
                            hint="remove or restore it by hand, then run the command again")
        if state == "ok":
            plan.add("launcher", Path(launcher["path"]),
                     _remove_launcher(launcher, recorded_hashes(launcher["path"], siblings)), entry)
    native = record.get("native") or {}
    kept_parents = {((e.record or {}).get("native") or {}).get("parent_digest") for e in remaining}
    kept_apps = {os.path.realpath(((e.record or {}).get("native") or {}).get("derived_app_path") or "-")
                 for e in remaining}
    mine_apps: set[str] = set()
    for derived, provenance in ctx.derived:
        if provenance and provenance.get("scoped_id") == entry.scoped_id and \
                provenance.get("version") == entry.version:
            mine_apps.add(os.path.realpath(derived))
    if native.get("derived_app_path"):
        mine_apps.add(os.path.realpath(Path(native["derived_app_path"]).parent))
    for _meta, proj in ctx.projections:
        app = os.path.realpath(proj.get("derived_app_path") or "-")
        if (proj.get("scoped_id") == entry.scoped_id and proj.get("version") == entry.version) or \
                any(app == m or app.startswith(m + os.sep) for m in mine_apps):
            project_stage.check_unproject(proj)  # raises when the launcher is not what project created
            pid = proj["projection_id"]
            plan.add("projection", Path(proj["projected_path"]), lambda pid=pid: project_stage.unproject(pid), entry)
            if proj.get("projected_command_path"):
                plan.paths.add(proj["projected_command_path"])
    for derived, _provenance in ctx.derived:
        real = os.path.realpath(derived)
        if real in mine_apps and real not in kept_apps and not any(k.startswith(real + os.sep) for k in kept_apps):
            plan.add("derived_app", derived, lambda d=derived: remove_tree(d), entry)
            plan.prune.append(derived.parent)
    for fetch, doc in ctx.fetches:
        ours = (doc and doc.get("scoped_id") == entry.scoped_id and doc.get("version") == entry.version) or \
            fetch.name == native.get("parent_digest", "").removeprefix("blake3:")
        if ours:
            if fetch.name in {str(k or "").removeprefix("blake3:") for k in kept_parents}:
                plan.keep("fetch", fetch, "another installed version uses the same payload", entry)
            else:
                plan.add("fetch", fetch, lambda d=fetch: remove_tree(d), entry)
    if entry.capsule is not None:
        key = manifest_key(entry)
        shared = key in {manifest_key(e) for e in remaining}  # the same artifact under another scope
        for directory in ctx.unpacked:
            if directory.name != key:
                continue
            if shared:
                plan.keep("unpacked", directory, "another installed capsule is the same artifact", entry)
            elif os.path.realpath(directory) in ctx.live_dirs:
                plan.keep("unpacked", directory, "a running capsule uses it (removed by `ato gc` later)", entry)
            else:
                plan.add("unpacked", directory, lambda d=directory: remove_tree(d), entry)
        plan.add("capsule", entry.capsule, lambda p=entry.capsule: remove_file(p), entry)
    if (entry.dir / RECORD).exists():
        plan.add("record", entry.dir / RECORD, lambda p=entry.dir / RECORD: remove_file(p), entry)
    for name in entry.foreign:
        plan.keep("foreign", entry.dir / name, "not created by ato", entry)
    plan.prune.append(entry.dir)


def plan_purge(plan: Plan, scoped_id: str, others: list[Entry]) -> None:
    """``--purge``: the capsule's saved state (``capsule-state/<name>``), the logs and records of its finished
    runs, and its consent approvals. State shared by name with another installed capsule stays."""
    slug = scoped_id.split("/", 1)[1]
    state = paths.capsule_state_dir() / slug
    if os.path.lexists(state):
        if any(e.slug == slug for e in others):
            plan.keep("state", state, f"another installed capsule is also named {slug}")
        elif not os.path.isdir(state) or os.path.islink(state):
            plan.keep("state", state, "not a directory ato created")
        else:
            plan.add("purge", state, lambda: remove_tree(state))
    for record_path in sorted(paths.run_dir().glob("capsule-*.json")) if paths.run_dir().is_dir() else []:
        doc = _json_file(record_path)
        if not doc or doc.get("scoped_id") != scoped_id or record_path.name.endswith(".plan.json"):
            continue
        if doc.get("status") in ("starting", "ready", "running"):
            plan.keep("run", record_path, "the run is still active (ato close it first)")
            continue
        run_id = str(doc.get("id") or record_path.stem)
        for path in (record_path, paths.run_dir() / f"{run_id}.plan.json", paths.logs_dir() / f"{run_id}.log"):
            if path.is_file() and not path.is_symlink():
                plan.add("purge", path, lambda p=path: remove_file(p))
    consent = paths.consent_path()
    if consent.is_file() and not consent.is_symlink():
        lines = consent.read_text("utf-8").splitlines(keepends=True)
        if any(_consent_of(line) == scoped_id for line in lines):
            plan.add("purge", consent, lambda: _drop_consent(consent, scoped_id), count=False)
            plan.remove[-1].kind = "purge"
            plan.remove[-1].reason = f"consent approvals of {scoped_id}"


def _consent_of(line: str) -> str | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc.get("capsule") if isinstance(doc, dict) else None


def _drop_consent(path: Path, scoped_id: str) -> None:
    """Rewrite the consent log without this capsule's lines, under the same lock its writers take."""
    import fcntl

    with open(path, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        kept = [line for line in fh.read().decode("utf-8").splitlines(keepends=True)
                if _consent_of(line) != scoped_id]
        write_bytes_atomic(path, "".join(kept).encode("utf-8"), mode=0o600)
