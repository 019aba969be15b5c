"""Which payload entries may be unpacked: the one rule set the verifier and the unpacker share.

:class:`TreeModel` replays the payload's entries on a model of the tree they would build, so a
check sees what the filesystem would see, not what a path string says:

- names are relative, ``/``-separated UTF-8 with no ``..`` component, no NUL, no backslash or
  drive letter; each component at most :data:`MAX_NAME` bytes and the whole path at most
  :data:`MAX_PATH` bytes (names every Linux filesystem can hold, however deep the unpack dir) in at
  most :data:`MAX_DEPTH` components;
- entries are regular files, directories, symlinks, or hard links to an *earlier regular file*
  of the payload; devices, FIFOs, sparse files and anything else are refused;
- no path appears twice, and no entry lies under a path that is a file or a symlink (an entry
  can never be written through a symlink another entry made);
- every symlink is resolved on the complete tree — following the other symlinks, applying
  ``..`` to where a link really points, at most :data:`MAX_LINK_HOPS` links deep — and must stay
  inside it. ``a/b/l -> ../..`` followed by ``esc -> a/b/l/../../../x`` is refused, though
  neither target leaves the tree as a string.

The unpacker (:mod:`stages.capsule.unpack`) creates symlinks only after every other entry, so
the complete tree checked here is the tree that exists when any link can first be followed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stages.capsule.payload_tar import Entry

MAX_NAME = 255  # bytes in one path component (NAME_MAX)
MAX_PATH = 2048  # bytes in a payload path; leaves room under PATH_MAX (4096) for where it is unpacked
MAX_DEPTH = 256  # components in a payload path: every tree walk (and Python's recursion limit) copes
MAX_LINK_HOPS = 40  # like the kernel's ELOOP limit
_DRIVE = re.compile(r"^[A-Za-z]:")
_IMPLICIT, _DIR, _FILE, _LINK = 0, 1, 2, 3
_WHAT = {_IMPLICIT: "a directory", _DIR: "a directory", _FILE: "a file", _LINK: "a symlink"}
FILE_MODE, EXEC_MODE, DIR_MODE = 0o644, 0o755, 0o755


class UnsafeEntry(ValueError):
    """A payload entry that must never be unpacked. ``reason`` classifies it."""

    def __init__(self, name: str, why: str, reason: str = "unsafe_entry") -> None:
        super().__init__(f"Refusing to unpack unsafe payload path: {name[:300]!r} ({why})")
        self.name = name
        self.reason = reason


class _Unresolvable(ValueError):
    """A symlink target that cannot be shown to stay inside the tree."""


@dataclass(frozen=True)
class Placed:
    """One entry as the unpacker must create it."""

    rel: str
    kind: str  # directory | file | hardlink | symlink
    mode: int
    link: str | None = None  # a symlink's target, or the rel path a hard link points at


def normalize(name: str) -> str:
    """The relative ``/``-joined path of an entry name (``""`` for the root); UnsafeEntry if unsafe."""
    if not name or "\0" in name:
        raise UnsafeEntry(name, "empty name or NUL byte")
    if name.startswith("/") or _DRIVE.match(name) or "\\" in name:
        raise UnsafeEntry(name, "absolute or non-POSIX path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(name, "'..' component")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME:
            raise UnsafeEntry(name, f"a path component is over {MAX_NAME} bytes, which no filesystem holds",
                              "name_too_long")
    rel = "/".join(parts)
    if len(rel.encode("utf-8")) > MAX_PATH:
        raise UnsafeEntry(name, f"the path is over {MAX_PATH} bytes", "name_too_long")
    if len(parts) > MAX_DEPTH:
        raise UnsafeEntry(name, f"the path is over {MAX_DEPTH} directories deep", "name_too_long")
    return rel


class TreeModel:
    """The tree a payload builds, entry by entry; :meth:`add` refuses what may not be unpacked."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.links: dict[str, str] = {}  # symlink rel -> target, in archive order

    def add(self, entry: Entry) -> Placed | None:
        """Record ``entry``; returns what to create (None for the root directory itself)."""
        rel = normalize(entry.name)
        kind = entry.kind
        if not rel:
            if kind == "directory":
                return None
            raise UnsafeEntry(entry.name, f"a {kind} in place of the payload root")
        if kind not in ("file", "directory", "symlink", "hardlink"):
            raise UnsafeEntry(entry.name, f"{kind} entries are not allowed")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            found = self.kinds.get(parent)
            if found is None:
                self.kinds[parent] = _IMPLICIT
            elif found not in (_IMPLICIT, _DIR):
                raise UnsafeEntry(entry.name, f"its parent {parent!r} is {_WHAT[found]}")
        existing = self.kinds.get(rel)
        if existing is not None:
            if existing == _IMPLICIT and kind == "directory":
                self.kinds[rel] = _DIR
                return Placed(rel, "directory", DIR_MODE)
            raise UnsafeEntry(entry.name, "duplicate entry")
        if kind == "directory":
            self.kinds[rel] = _DIR
            return Placed(rel, "directory", DIR_MODE)
        mode = EXEC_MODE if entry.mode & 0o111 else FILE_MODE
        if kind == "file":
            self.kinds[rel] = _FILE
            return Placed(rel, "file", mode)
        if kind == "hardlink":
            try:
                source = normalize(entry.linkname)
            except UnsafeEntry:
                raise UnsafeEntry(entry.name, f"hard link to {entry.linkname[:200]!r}, an absolute or climbing "
                                              "path") from None
            if self.kinds.get(source) != _FILE:
                raise UnsafeEntry(entry.name, f"hard link to {entry.linkname[:200]!r}, which is not an earlier "
                                              "regular file of the payload")
            self.kinds[rel] = _FILE
            return Placed(rel, "hardlink", mode, source)
        target = entry.linkname
        if not target or "\0" in target or target.startswith("/") or len(target.encode("utf-8")) > MAX_PATH:
            raise UnsafeEntry(entry.name, f"symlink to an absolute, empty or over-long target {target[:200]!r}")
        self.kinds[rel] = _LINK
        self.links[rel] = target
        return Placed(rel, "symlink", 0o777, target)

    def finish(self) -> None:
        """Every symlink, resolved on the complete tree, must stay inside it."""
        for rel, target in self.links.items():
            try:
                self._resolve(rel.split("/")[:-1], target, [0])
            except _Unresolvable as exc:
                raise UnsafeEntry(rel, f"symlink to {target[:200]!r} {exc}") from None

    def _resolve(self, start: list[str], target: str, hops: list[int]) -> list[str]:
        parts = list(start)
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    raise _Unresolvable("resolves outside the payload root")
                parts.pop()
                continue
            parts.append(comp)
            here = "/".join(parts)
            if self.kinds.get(here) == _LINK:
                hops[0] += 1
                if hops[0] > MAX_LINK_HOPS:
                    raise _Unresolvable(f"passes through more than {MAX_LINK_HOPS} symlinks (a loop)")
                parts.pop()
                parts = self._resolve(parts, self.links[here], hops)
        return parts
