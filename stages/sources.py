"""The source set: which project files go into a payload.

``[pack].include`` is a strict allowlist when given; the default excludes (VCS
dirs, dependency trees, virtualenvs, caches, secrets, reserved artifact names,
``.ato/``) always apply and ``include`` cannot re-admit them. Paths are relative,
``/``-joined and never absolute or ``..``; a symlink must stay inside the project.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cas.digest import blake3_bytes
from cas.tempfiles import GLOB
from cas.tempfiles import SUFFIX as TEMP_SUFFIX
from pipeline.errors import E_LOCKFILE, E_NAME_TOO_LONG, AtoError
from stages.capsule.entries import MAX_DEPTH, MAX_PATH

DEFAULT_EXCLUDES: tuple[str, ...] = (
    "**/.git/**", "**/.svn/**", "**/.hg/**", ".capsule/**", "target/**",
    "**/node_modules/**", "**/bower_components/**", "**/.venv/**", "**/venv/**",
    "**/__pycache__/**", "**/.pytest_cache/**", "**/.mypy_cache/**", "**/.ruff_cache/**",
    "**/.next/cache/**", "**/.turbo/**", "**/.wrangler/**", "**/.DS_Store", "**/Thumbs.db",
    "**/*.capsule", "**/*.sig", "**/.ato/**", "**/.tmp/**",
    # ato's own temp files and dirs (cas.tempfiles), and the temp artifacts of builds before them
    f"**/{GLOB}", f"**/{GLOB}/**", "**/.*.capsule.*.tmp",
    "ato.lock.json", "capsule.toml", "capsule.lock.json", "ato.delivery.toml",
    "**/.env", "**/.env.*", "**/.envrc",
    "**/*.pem", "**/*.key", "**/*.p12", "**/*.pfx", "**/id_rsa", "**/id_ed25519", "**/id_ecdsa",
    "**/credentials.json", "**/service-account*.json", "**/.netrc", "**/.npmrc", "**/.pypirc",
)
# Env-file templates hold no secrets and are kept despite the ``.env.*`` rule.
ENV_TEMPLATES = frozenset({".env.example", ".env.template", ".env.sample", ".env.dist", ".env.default",
                           ".env.schema"})
# Names that are members of the artifact itself and can never be payload files.
RESERVED_NAMES = frozenset({"capsule.lock", "signature.json", "sbom.spdx.json", "payload.v3.manifest.json",
                            "payload.tar", "payload.tar.zst"})
# Directories never descended into, whatever the patterns say (cheap pruning).
PRUNED_DIRS = frozenset({".git", ".svn", ".hg", "node_modules", "bower_components", ".venv", "venv",
                         "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".turbo",
                         ".wrangler", ".ato", ".tmp"})


@dataclass(frozen=True)
class SourceEntry:
    """One payload member: a regular file or a symlink."""

    relpath: str
    abspath: str | Path
    kind: str  # "file" | "symlink"
    mode: int  # normalized: 0o755 / 0o644 for files, 0o777 for symlinks
    size: int
    link_target: str | None = None
    blake3: str | None = None  # hex, files only
    data: bytes | None = None  # generated content (e.g. a staged ato.delivery.toml) instead of abspath
    stat_key: tuple[int, int, int, int] | None = None  # (size, mtime_ns, ctime_ns, inode) when walked


def with_blake3(entry: SourceEntry, digest: str) -> SourceEntry:
    """``entry`` with its content digest: ``dataclasses.replace`` without its per-call walk of the fields
    (a rebuild makes one per file)."""
    return SourceEntry(entry.relpath, entry.abspath, entry.kind, entry.mode, entry.size, entry.link_target, digest,
                       entry.data, entry.stat_key)


def generated_entry(relpath: str, data: bytes) -> SourceEntry:
    """A payload file produced by the build rather than read from the project."""
    return SourceEntry(relpath, Path(relpath), "file", 0o644, len(data), blake3=blake3_bytes(data), data=data)


def glob_to_regex(pattern: str) -> str:
    """Translate one glob: ``*`` and ``?`` stay within a path segment, ``**`` spans segments.

    Written here (rather than wcmatch's general translation) because its regexes are
    simple enough to match ten thousand paths against sixty patterns in milliseconds.
    """
    out = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """All globs as one anchored regex, so each path is matched once."""
    cleaned = [p.strip().replace("\\", "/").lstrip("/") for p in patterns if p.strip()]
    if not cleaned:
        return None
    return re.compile("(?:" + "|".join(glob_to_regex(p) for p in cleaned) + r")\Z")


class PackFilter:
    """Decides membership of a relative path in the payload."""

    def __init__(self, include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> None:
        self.include = compile_patterns(include) if include else None
        self.exclude = compile_patterns(DEFAULT_EXCLUDES + tuple(exclude))

    def admits(self, relpath: str, name: str | None = None) -> bool:
        """``name``: the last segment of ``relpath``, when the caller has it."""
        name = relpath.rsplit("/", 1)[-1] if name is None else name
        if name in RESERVED_NAMES or name.endswith((".capsule", ".sig", TEMP_SUFFIX)):
            return False
        if self.include is not None and not self.include.match(relpath):
            return False
        if name.lower() in ENV_TEMPLATES:
            return True
        return not (self.exclude and self.exclude.match(relpath))


def _check_symlink(rel: str, target: str) -> None:
    if os.path.isabs(target):
        raise AtoError(E_LOCKFILE, f"symlink {rel} -> {target} points outside the project (absolute target)",
                       details={"path": rel, "target": target})
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../") or os.path.isabs(resolved):
        raise AtoError(E_LOCKFILE, f"symlink {rel} -> {target} escapes the project directory",
                       details={"path": rel, "target": target})


def _too_long(rel: str, *, below: bool = False) -> AtoError | None:
    """E108 when ``rel`` (with ``below``: any path under the directory ``rel``) is longer or deeper than
    a .capsule's payload paths may be, else None."""
    size = len(rel.encode("utf-8", "surrogateescape")) + (2 if below else 0)
    depth = rel.count("/") + (2 if below else 1)
    if size <= MAX_PATH and depth <= MAX_DEPTH:
        return None
    shown = f"{rel[:40]}...{rel[-40:]}" if len(rel) > 100 else rel
    what = f"{size} bytes, over the {MAX_PATH}" if size > MAX_PATH else f"{depth} levels deep, over the {MAX_DEPTH}"
    return AtoError(E_NAME_TOO_LONG, f"{shown}{'/...' if below else ''}: the path is {what} a .capsule holds",
                    details={"path": rel, "bytes": size, "depth": depth, "max_bytes": MAX_PATH,
                             "max_depth": MAX_DEPTH},
                    hint="flatten the tree, or exclude it in [pack] exclude")


def collect(root: Path, pack_filter: PackFilter) -> list[SourceEntry]:
    """Walk ``root`` and return the admitted entries sorted by path (bytewise UTF-8), with their stat.

    Nothing is read: which files changed is doit's decision (pipeline.graph), and the payload
    step reads each file it needs once. One ``scandir`` per directory (its entry types tell
    directories, symlinks and files apart without a stat) and one ``lstat`` per admitted file,
    whose result doit's checker reuses: no other system call per file.
    """
    entries: list[SourceEntry] = []
    root_dir = os.path.abspath(root)
    pending = [("", root_dir)]
    while pending:  # an explicit stack: no recursion, however deep the tree
        rel_dir, dirpath = pending.pop()
        try:
            with os.scandir(dirpath) as it:
                listing = list(it)
        except OSError:
            continue  # unreadable (or gone): skipped, as os.walk does
        if rel_dir:
            if any(d.name == "pyvenv.cfg" and (not d.is_symlink() or os.path.exists(d.path)) for d in listing):
                continue  # a virtualenv: never packed
            too_long = _too_long(rel_dir, below=True)
            if too_long is not None:
                # nothing below can be packed; an error only if something below would have been
                if pack_filter.admits(f"{rel_dir}/x"):
                    raise too_long
                continue
        prefix = f"{rel_dir}/" if rel_dir else ""
        for d in listing:
            name = d.name
            if d.is_dir(follow_symlinks=False):
                if name not in PRUNED_DIRS:
                    pending.append((prefix + name, d.path))
                continue
            rel = prefix + name  # a symlink to a directory is packed as a symlink
            if not rel.isascii():
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    raise AtoError(E_LOCKFILE, f"non-UTF-8 path is not supported in payload: {rel!r}") from None
            if not pack_filter.admits(rel, name):
                continue
            too_long = _too_long(rel)
            if too_long is not None:
                raise too_long
            st = d.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(d.path)
                _check_symlink(rel, target)
                entries.append(SourceEntry(rel, d.path, "symlink", 0o777, 0, link_target=target))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entries.append(SourceEntry(rel, d.path, "file", mode, st.st_size,
                                           stat_key=(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
            # sockets, fifos and devices are not project content: skipped
    entries.sort(key=lambda e: e.relpath.encode("utf-8"))
    return entries
