"""Declared bin files of a package: where they are, whether they are usable, their digests.

Review, trials and compile all need "the file behind bin X"; resolving it here
once keeps the containment rule (a bin never points outside the package source)
in one place. Digests are SHA-256 because that is what the CAP registry and
single-file-url pins speak.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cas.canonical import canonical_json
from cas.digest import sha256_file
from pipeline.cap.manifest import BACKEND_LOCAL, BACKEND_URL, CapManifest

SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def bin_file(m: CapManifest, name: str, root: Path | None = None) -> Path:
    """The file behind bin ``name``, under ``root`` (default: the package source)."""
    return (root or m.source_dir) / m.bins[name]


def path_problem(m: CapManifest, name: str) -> str | None:
    """Why bin ``name`` cannot be used from a local-bin package, or None."""
    rel = m.bins[name]
    path = bin_file(m, name)
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(m.source_dir):
        return f"Declared bin path must stay inside the package source: {rel}"
    if not path.exists():
        return f"Declared bin path does not exist: {rel}"
    return None


def file_digests(m: CapManifest) -> dict[str, str] | None:
    """``{bin path: sha256:<hex>}`` for a local-bin package, or None when a bin is not a readable file."""
    if m.backend != BACKEND_LOCAL or not m.bins:
        return None
    out: dict[str, str] = {}
    for name in m.bins:
        path = bin_file(m, name)
        if path_problem(m, name) or not path.is_file():
            return None
        try:
            out[m.bins[name]] = "sha256:" + sha256_file(path)
        except OSError:
            return None
    return dict(sorted(out.items()))


def package_digest(m: CapManifest, files: dict[str, str] | None = None) -> str | None:
    """The package digest: the pinned artifact hash, or a hash over the bin names and file hashes.

    For local-bin it is SHA-256 of the JCS canonical JSON ``{"bins": {...}, "files": {...}}``,
    so renaming a bin or changing one byte of a bin file changes the digest. Pass ``files``
    (from :func:`file_digests`) when already computed, to hash the bin files once.
    """
    if m.backend == BACKEND_URL:
        sha = m.source_sha256 or ""
        return "sha256:" + sha.lower() if SHA256_HEX.match(sha) else None
    files = files if files is not None else file_digests(m)
    if files is None:
        return None
    return "sha256:" + hashlib.sha256(canonical_json({"bins": m.bins, "files": files})).hexdigest()
