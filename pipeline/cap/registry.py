"""The filesystem CAP registry: one checked-in JSON file listing compiled packages.

Publishers may run concurrently (CI matrix jobs, a team's scripts), so every
read-modify-write happens under an exclusive ``fcntl`` lock on a file next to
the registry, and the new document replaces the old by atomic rename. Readers
never lock: they see either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cas.atomic import write_text_atomic
from pipeline.cap.manifest import io_error
from pipeline.envelope import dumps
from pipeline.errors import E_MANIFEST, E_USAGE, E_VERSION_CONFLICT, AtoError

REGISTRY_SCHEMA = "cap-registry.v0"
DEFAULT_REGISTRY = "registry/packages.json"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def registry_path(value: str) -> Path:
    """The registry file for local commands; URLs are refused (no remote registry yet)."""
    if _URL.match(value) or value.lower().startswith(("http:", "https:")):
        raise AtoError(E_USAGE, "Local publish commands require a filesystem registry path",
                       details={"registry": value}, hint="use a local --registry path, not an HTTP URL")
    return Path(value).absolute()


def empty() -> dict[str, Any]:
    return {"schema": REGISTRY_SCHEMA, "packages": []}


def read(path: Path) -> dict[str, Any]:
    """The registry document; a missing file is an empty registry, a malformed one an error."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return empty()
    except UnicodeDecodeError as exc:
        raise AtoError(E_MANIFEST, f"{path}: registry is not UTF-8 text: {exc.reason}",
                       details={"registry": str(path)}) from None
    except OSError as exc:
        raise io_error(path, "read the registry", exc) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AtoError(E_MANIFEST, f"{path}: registry is not valid JSON: line {exc.lineno}: {exc.msg}",
                       details={"registry": str(path)}) from None
    packages = doc.get("packages") if isinstance(doc, dict) else None
    ok = (isinstance(packages, list) and doc.get("schema", REGISTRY_SCHEMA) == REGISTRY_SCHEMA
          and all(isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("version"), str)
                  for p in packages))
    if not ok:
        raise AtoError(E_MANIFEST, f'{path}: not a {REGISTRY_SCHEMA} registry (expected {{"packages": [...]}} '
                       "with an id and version on every package)", details={"registry": str(path)})
    return doc


def find(doc: dict[str, Any], package_id: str, version: str) -> dict[str, Any] | None:
    return next((p for p in doc["packages"] if p["id"] == package_id and p["version"] == version), None)


def upsert(doc: dict[str, Any], package: dict[str, Any], *, force: bool) -> str:
    """Add ``package`` to ``doc`` (in place); returns "added" or "replaced".

    The same id@version is refused unless ``force``: a version names one set of bytes.
    """
    ref = f"{package['id']}@{package['version']}"
    existing = find(doc, package["id"], package["version"])
    if existing is not None and not force:
        raise AtoError(E_VERSION_CONFLICT, f"Same id@version already present: {ref}",
                       details={"id": package["id"], "version": package["version"]},
                       hint="bump the version for meaningful changes, or pass --force")
    others = [p for p in doc["packages"] if p is not existing]
    doc["packages"] = sorted([*others, package], key=lambda p: (p["id"], p["version"]))
    doc.setdefault("schema", REGISTRY_SCHEMA)
    return "replaced" if existing is not None else "added"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the registry's exclusive lock (``<registry>.lock``) for a read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(path: Path, package: dict[str, Any], *, force: bool, dry_run: bool) -> tuple[str, int]:
    """Write ``package`` into the registry at ``path``; returns (action, package count).

    A dry run makes the same decision (including the id@version refusal) without
    taking the lock or writing anything.
    """
    if dry_run:
        doc = read(path)
        return upsert(doc, package, force=force), len(doc["packages"])
    try:
        with locked(path):
            doc = read(path)
            action = upsert(doc, package, force=force)
            write_text_atomic(path, dumps(doc))
    except OSError as exc:
        raise io_error(path, "write the registry", exc) from None
    return action, len(doc["packages"])
