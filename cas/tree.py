"""Tree digest (CONTRACTS.md §2): one streaming BLAKE3 over an lstat walk.

Used for ``parent_digest`` of a fetched artifact dir and ``derived_digest`` of a
derived app. Depth-first, children sorted by raw name bytes, symlinks never
followed, mtime/uid/gid ignored, permission bits hashed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3

_NUL = b"\0"


class TreeDigestError(ValueError):
    """The tree holds something that cannot be hashed (a socket, a device...)."""


def _node(hasher: blake3.blake3, path: bytes, rel: bytes) -> None:
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        if rel:
            hasher.update(b"dir" + _NUL + rel + _NUL + format(mode, "o").encode() + _NUL)
        for name in sorted(os.listdir(path)):
            _node(hasher, path + b"/" + name, rel + b"/" + name if rel else name)
    elif stat.S_ISLNK(mode):
        hasher.update(b"symlink" + _NUL + rel + _NUL + b"0" + _NUL)
        hasher.update(os.readlink(path) + _NUL)
    elif stat.S_ISREG(mode):
        hasher.update(b"file" + _NUL + rel + _NUL + format(mode, "o").encode() + _NUL)
        hasher.update(str(st.st_size).encode() + _NUL)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                hasher.update(chunk)
        hasher.update(_NUL)
    else:
        shown = os.fsdecode(rel) or os.fsdecode(path)
        raise TreeDigestError(f"unsupported file type in tree: {shown}")


def tree_digest(root: Path) -> str:
    """Hex tree digest of ``root``: a directory, or a single file hashed with relpath ""."""
    hasher = blake3.blake3()
    _node(hasher, os.fsencode(root), b"")
    return hasher.hexdigest()
