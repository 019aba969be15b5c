"""``ato gc``: give back the disk space ``ATO_HOME`` holds for nothing.

What is removed (everything else stays, and everything is found by ato's own records):

- with ``--keep-last N``: installed versions beyond the newest N of each capsule, through the
  same plan as ``ato uninstall`` (launchers, projections, native caches, the stored file);
- what a crash left: a record without its ``.capsule``, what is in ``.trash/``, and temp files
  and dirs whose owner process is gone (:mod:`cas.tempfiles`);
- ``unpacked/<hash>``: kept while the artifact it came from is still installed or a
  capsule runs from it (anything else is unpacked again on demand);
- ``fetches/<parent>`` and ``apps/.../derived-*``: kept while an installed native version
  or a projection uses them;
- ``state/builds/<key>``: kept while the project it was built from still has a capsule.toml.

Such a cache that no record explains is left alone for its first hour: it may belong to a
command still running (an install between its finalize and its record, a run starting up).

Then the CAS drops every payload manifest and chunk no remaining root names (the caller runs
:func:`cas.gc.collect_garbage` with :func:`pipeline.cas_roots.live_payloads`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import blake3

from cas import tempfiles
from pipeline import paths
from stages import installed
from stages.installed import (
    Context,
    Entry,
    Plan,
    _real_dirs,
    plan_entry,
    remove_file,
    remove_tree,
    scan,
    trash_dir,
)

STALE_SECONDS = 3600
BUILD_PROJECT = "project.json"  # written by the build: which project a state/builds/<key> dir belongs to


def _old(path: Path, now: float) -> bool:
    try:
        return os.lstat(path).st_mtime < now - STALE_SECONDS
    except OSError:
        return False


def _remove_temp(path: Path) -> None:
    """A temp entry outside ATO_HOME (a launcher dir) is removed in place; inside, like any owned tree."""
    if installed.inside_home(path):
        remove_tree(path)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _leftover(plan: Plan, path: Path) -> None:
    plan.add("leftover", path, (lambda p=path: remove_tree(p)) if path.is_dir() and not path.is_symlink()
             else (lambda p=path: remove_file(p)))


def _project_gone(directory: Path) -> bool:
    """The build state dir names its project, and that project no longer has a capsule.toml."""
    try:
        project = Path(json.loads((directory / BUILD_PROJECT).read_bytes())["project_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not (project / "capsule.toml").is_file()


def build_project(directory: Path) -> Path | None:
    """The project a build state dir belongs to, when it still exists and its key still names it."""
    try:
        doc = json.loads((directory / BUILD_PROJECT).read_bytes())
        project = Path(doc["project_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    key = blake3.blake3(str(project).encode()).hexdigest()[:16]
    return project if key == directory.name and (project / "capsule.toml").is_file() else None


def plan_gc(*, keep_last: int | None = None, live_dirs: Iterable[str] = ()) -> tuple[Plan, list[Entry]]:
    """The gc plan and the installed versions that remain after it."""
    now = time.time()
    plan = Plan()
    entries = scan()
    ctx = Context.load(live_dirs)
    remaining: list[Entry] = []
    doomed: list[Entry] = []
    by_capsule: dict[str, list[Entry]] = {}
    for e in entries:
        if e.installed:
            by_capsule.setdefault(e.scoped_id, []).append(e)  # newest first (scan's order)
        else:
            doomed.append(e)  # a record whose .capsule is gone: an interrupted removal
    for versions in by_capsule.values():
        keep = versions if keep_last is None else versions[:keep_last]
        remaining += keep
        doomed += [e for e in versions if e not in keep]
    for e in doomed:
        plan_entry(plan, e, ctx, remaining)
    for e in scan(include_empty=True):
        if not e.installed and e.record is None:
            plan.prune.append(e.dir)  # emptied by an interrupted removal (temp files go below)

    # caches no remaining version or projection uses; one made in the last hour may belong to a command
    # still running (an install between its finalize and its record, a run starting), so it waits
    installed_keys = {installed.manifest_key(e) for e in remaining}
    for directory in ctx.unpacked:
        if plan.removes(directory):
            continue
        if os.path.realpath(directory) in ctx.live_dirs:
            plan.keep("unpacked", directory, "a running capsule uses it")
        elif directory.name not in installed_keys and _old(directory, now):
            plan.add("unpacked", directory, lambda d=directory: remove_tree(d))
    natives = [(e.record or {}).get("native") or {} for e in remaining]
    used_parents = {str(n.get("parent_digest") or "").removeprefix("blake3:") for n in natives}
    used_apps = {os.path.realpath(str(n["derived_app_path"])) for n in natives if n.get("derived_app_path")}
    for _meta, proj in ctx.projections:
        used_parents.add(str(proj.get("parent_digest") or "").removeprefix("blake3:"))
        used_apps.add(os.path.realpath(str(proj.get("derived_app_path") or "-")))
    for directory, _doc in ctx.fetches:
        if not plan.removes(directory) and directory.name not in used_parents and _old(directory, now):
            plan.add("fetch", directory, lambda d=directory: remove_tree(d))
    for directory, _provenance in ctx.derived:
        real = os.path.realpath(directory)
        if plan.removes(directory) or any(a == real or a.startswith(real + os.sep) for a in used_apps):
            continue
        if _old(directory, now):
            plan.add("derived_app", directory, lambda d=directory: remove_tree(d))
            plan.prune.append(directory.parent)
    for directory in _real_dirs(paths.build_cache_dir(), lambda _n: True):
        project = build_project(directory)
        if project is None and (_project_gone(directory) or _old(directory, now)):
            plan.add("build", directory, lambda d=directory: remove_tree(d))

    # what interrupted operations left behind: .trash, and temp entries whose owner process is gone
    # (cas.tempfiles names them; the CAS's own are swept by collect_garbage under the store's lock)
    trash = trash_dir()
    for item in sorted(trash.iterdir()) if trash.is_dir() and not trash.is_symlink() else []:
        _leftover(plan, item)
    for site, recursive in paths.temp_sites():
        if site == paths.cas_root():
            continue
        for item in tempfiles.find(site, recursive=recursive):
            if not tempfiles.owner_alive(item.name) and not plan.removes(item):
                plan.add("leftover", item, (lambda p=item: _remove_temp(p)))
    return plan, remaining
