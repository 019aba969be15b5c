"""Garbage collection: drop payload manifests nobody uses, and the packs whose chunks no manifest needs.

The caller supplies the roots (payloads still in use); every chunk they name is live. Then:

* a pack that holds no live chunk (or only chunks another kept pack also holds) is deleted;
* a build pack that is mostly dead is repacked: its live frames are copied into one new pack
  and the old pack is deleted;
* an adopted artifact (``packs/<hash>.capsule``) that is still installed (hard-linked from
  ``store/`` or a registry's artifact directory) is always kept; once nothing links to it, it is
  treated like any other pack;
* chunks still in the one-file-per-chunk layout of earlier versions are moved into a pack when
  live and deleted either way, and that layout's manifests move into the index;
* pack files the index does not know (a writer killed between rename and commit) and temp files
  of writers that are gone (:mod:`cas.tempfiles`) are deleted.

It runs under the store's exclusive lock. Builds, installs and uploads hold the shared lock from
before they look a chunk up until the record that names it is written, so gc never removes a
chunk an operation in flight is about to reference.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cas.digest import parse
from cas.frames import ChunkError, declared_size
from cas.index import Location, PackEntry
from cas.payload_manifest import PayloadManifestError
from cas.store import CasStore
from cas.tempfiles import is_temp, sweep

REPACK_BELOW = 0.5  # repack a build pack when less than this share of its bytes is live
COMPACT_MIN_BYTES = 1 << 20  # VACUUM the index only when at least this much of it is free pages ...
COMPACT_SHARE = 0.25  # ... and they are this share of it
STALE_TEMP_SECONDS = 3600


@dataclass
class GcReport:
    dry_run: bool
    roots: int
    manifests_removed: int = 0
    objects_removed: int = 0  # chunks dropped (from packs and from the old layout)
    objects_kept: int = 0
    bytes_freed: int = 0
    packs_removed: int = 0
    packs_repacked: int = 0
    packs_kept: int = 0
    legacy_objects_migrated: int = 0
    temps_removed: int = 0
    temp_bytes_freed: int = 0
    disk_bytes_freed: int = 0  # disk usage given back (blocks, what `du` counts), manifests included

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_garbage(store: CasStore, roots: Iterable[str], *, dry_run: bool = False,
                    leaving: Iterable[os.PathLike[str] | str] = ()) -> GcReport:
    """Drop what ``roots`` do not need. ``leaving``: files the caller's dry run would remove first (an
    installed ``.capsule``): their hard links neither pin a pack nor keep its blocks on disk."""
    root_set = {parse(r) for r in roots}
    report = GcReport(dry_run, len(root_set))
    links = _leaving_links(leaving) if dry_run else Counter()
    with store.exclusive():
        live = _live_chunks(store, root_set, report, dry_run)
        _packs(store, live, report, dry_run, links)
        temps = sweep([store.root], recursive=True, dry_run=dry_run)
        report.temps_removed, report.temp_bytes_freed = len(temps.removed), temps.bytes_freed
        if not dry_run:
            _remove_legacy_temps(store)
        _compact_index(store, report, dry_run)
    return report


def _compact_index(store: CasStore, report: GcReport, dry_run: bool) -> None:
    """VACUUM the index once deleted rows hold a good share of it (below that, its free pages are reused
    by the next writes); the disk it gives back is counted (in a dry run: its free pages)."""
    index = store.packs.index
    free, total = index.free_bytes()
    if free < COMPACT_MIN_BYTES or free < COMPACT_SHARE * total:
        return
    if dry_run:
        report.disk_bytes_freed += free
        return
    before = index.disk_usage()
    index.compact()
    report.disk_bytes_freed += max(0, before - index.disk_usage())


def _live_chunks(store: CasStore, root_set: set[str], report: GcReport, dry_run: bool) -> set[str]:
    live: set[str] = set()
    dead: list[str] = []
    for artifact_hash in list(store.iter_manifest_hashes()):
        if artifact_hash not in root_set:
            dead.append(artifact_hash)
            continue
        try:
            live.update(c.raw_hash for c in store.get_manifest(artifact_hash).chunks)
        except (PayloadManifestError, ChunkError):
            pass  # a broken manifest keeps nothing alive; verify reports it
    report.manifests_removed = len(dead)
    files = set(store.legacy_manifest_hashes())  # what leaves disk: dead ones, and live ones now in the index
    report.disk_bytes_freed += sum(_blocks(store.manifest_path(h)) for h in files
                                   if h in dead or not store.manifests_as_files)
    if not dry_run:
        store.remove_manifests(dead)
        if not store.manifests_as_files:  # live ones were copied into the index by get_manifest
            for h in store.legacy_manifest_hashes():
                store.manifest_path(h).unlink(missing_ok=True)
    return live


def _packs(store: CasStore, live: set[str], report: GcReport, dry_run: bool, leaving: Counter[tuple[int, int]]) -> None:
    packs = store.packs
    provided: set[str] = set()
    rows = packs.index.packs()
    pinned = [r for r in rows if r.kind == "capsule" and _other_links(packs.directory / r.name, leaving) > 0]
    for r in pinned:
        provided.update(e.hash for e in packs.index.pack_entries(r.name))
        report.packs_kept += 1
    to_copy: list[tuple[PackEntry, str]] = []
    doomed: list[str] = []
    for r in rows:
        if r in pinned:
            continue
        entries = packs.index.pack_entries(r.name)
        needed = [e for e in entries if e.hash in live and e.hash not in provided]
        dropped = len(entries) - len(needed)
        if not needed:
            doomed.append(r.name)
            report.objects_removed += len(entries)
            continue
        provided.update(e.hash for e in needed)
        if r.kind == "pack" and sum(e.length for e in needed) >= REPACK_BELOW * r.size:
            report.packs_kept += 1
            continue
        to_copy.extend((e, r.name) for e in needed)
        doomed.append(r.name)
        report.objects_removed += dropped
        report.packs_repacked += 1
    legacy = list(store.objects.iter_hexes())
    legacy_live = [h for h in legacy if h in live and h not in provided]
    report.objects_removed += len(legacy) - len(legacy_live)
    report.legacy_objects_migrated = len(legacy_live)
    report.objects_kept = len(provided) + len(legacy_live)
    known = {r.name for r in rows}
    orphans = [name for name in packs.files() if name not in known]
    # disk given back: a pack still linked from elsewhere frees nothing; the pack a repack writes costs
    report.disk_bytes_freed += sum(_blocks(packs.directory / n) for n in doomed + orphans
                                   if _other_links(packs.directory / n, leaving) <= 0)
    report.disk_bytes_freed += sum(_blocks(store.objects.path(h)) for h in legacy)
    copied = sum(e.length for e, _pack in to_copy) + sum(_size(store.objects.path(h)) for h in legacy_live)
    if dry_run:
        report.disk_bytes_freed = max(0, report.disk_bytes_freed - -(-copied // 4096) * 4096)
        report.bytes_freed = sum(_size(packs.directory / n) for n in doomed + orphans) + \
            sum(_size(store.objects.path(h)) for h in legacy)
        report.packs_removed = len(doomed) + len(orphans) - report.packs_repacked
        return
    if to_copy or legacy_live:
        with packs.writer() as writer:
            for entry, pack in to_copy:
                try:
                    frame = packs.frame_view(entry.hash, Location(pack, entry.offset, entry.length, entry.raw_size,
                                                                  entry.frame_hash))
                except ChunkError:
                    continue  # damaged: dropped (verify reported it; the next build or install stores it again)
                writer.add(entry.hash, frame, entry.raw_size, entry.frame_hash)
            for h in legacy_live:
                try:
                    frame = store.objects.read_frame(h)  # decoded and checked
                except ChunkError:
                    continue
                writer.add(h, frame, declared_size(frame) or 0)
            new_pack = writer.commit()
        if new_pack:
            report.disk_bytes_freed = max(0, report.disk_bytes_freed - _blocks(packs.directory / new_pack))
    for name in doomed + orphans:
        report.bytes_freed += packs.remove_pack(name)
    report.packs_removed = len(doomed) + len(orphans) - report.packs_repacked
    for h in legacy:
        report.bytes_freed += store.objects.remove(h)
    _remove_empty_dirs(store.objects.root / "objects")
    if not store.manifests_as_files:
        _remove_empty_dirs(store.manifest_dir.parent)


def _leaving_links(paths: Iterable[os.PathLike[str] | str]) -> Counter[tuple[int, int]]:
    """How many of the hard links of each inode the files under ``paths`` account for (each path once)."""
    files: set[str] = set()
    for top in paths:
        if os.path.isdir(top) and not os.path.islink(top):
            files.update(os.path.abspath(os.path.join(d, n)) for d, _dirs, names in os.walk(top) for n in names)
        else:
            files.add(os.path.abspath(top))
    links: Counter[tuple[int, int]] = Counter()
    for path in files:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] += 1
    return links


def _other_links(path: os.PathLike[str], leaving: Counter[tuple[int, int]]) -> int:
    """Hard links to ``path``'s inode besides itself that stay (an installed .capsule pins its pack)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_nlink - 1 - leaving[(st.st_dev, st.st_ino)]


def _blocks(path: os.PathLike[str]) -> int:
    """Disk usage as du counts it."""
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _remove_empty_dirs(top: os.PathLike[str]) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _remove_legacy_temps(store: CasStore) -> None:
    """``.*.tmp`` files of ato versions before cas.tempfiles named its temps: by age, they carry no owner."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for p in store.root.rglob(".*.tmp"):
        try:
            if not is_temp(p.name) and p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass
