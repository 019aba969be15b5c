"""Fetch: a ``.capsule`` -> ``$ATO_HOME/fetches/<parent-hex>/{artifact/, artifact.capsule, fetch.json}``.

The artifact is accepted first exactly as install and run accept one: the format's one
verifier and the trust decision (:class:`stages.trust_port.TrustPort`: signature, pins,
revocation, consent on first sight, the payload ceiling). Its payload is then extracted by the
format's one safe unpacker (:func:`stages.capsule.unpack_payload`) into a temp dir next to the
cache, its tree digest (CONTRACTS §2) becomes ``parent_digest``, and the dir is renamed into
place: the cache is content-addressed by payload tree, and a reader never sees half a fetch.
What may be unpacked is the format's rule (:mod:`stages.capsule.entries`): absolute paths,
``..``, symlinks that resolve outside the tree, entries under a symlink, hard links to anything
but an earlier file, devices, FIFOs and duplicate paths are refused with E208.

A fetch of the same artifact under the same labels is a no-op (the doit step is
up to date while ``fetch.json`` and the tree digest of ``artifact/`` still match).
The same payload fetched under other labels (a version bump that changed only
capsule.toml) reuses the tree and rewrites ``fetch.json``, which is outside the
tree, so ``parent_digest`` never changes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas.atomic import fsync_dir
from cas.canonical import jcs_digest
from cas.digest import DigestError, label, parse
from cas.filelock import flocked
from cas.stoppoints import stop_point
from cas.tempfiles import sweep, temp_name, temp_path
from cas.tree import TreeDigestError, tree_digest
from pipeline import paths
from pipeline.errors import E_INTEGRITY, E_USAGE, AtoError, Problem
from pipeline.manifest import SIDECAR_NAME
from stages.capsule import Limits, Verdict, read_capsule, unpack_payload, verify
from stages.native import SCHEMA_VERSION, check_schema_version, now_rfc3339, read_doc, write_doc
from stages.trust_port import TrustPort

ARTIFACT_DIR = "artifact"
ARTIFACT_FILE = "artifact.capsule"
FETCH_RECORD = "fetch.json"
COPY = 1 << 20
_SEGMENT = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,126})$")
_HOSTISH = re.compile(r"^(localhost|[^/]*[.:][^/]*)$", re.IGNORECASE)


def integrity(message: str, *, hint: str | None = None, **details: Any) -> AtoError:
    return AtoError(E_INTEGRITY, message, details=details, hint=hint,
                    problems=[Problem("ATO_ERR_INTEGRITY_FAILURE", message, details)])


# ---------------------------------------------------------------- references


@dataclass(frozen=True)
class FetchRef:
    """What ``ato fetch <ref>`` names: a local ``.capsule`` file, or a release in a registry."""

    path: Path | None = None
    publisher: str | None = None
    slug: str | None = None
    version: str | None = None
    registry: str | None = None  # normalized by the caller (no trailing /)

    @property
    def scoped_id(self) -> str:
        return f"{self.publisher}/{self.slug}"


def _split_version(text: str) -> tuple[str, str | None]:
    for sep in ("@", ":"):
        if sep in text:
            name, _, version = text.rpartition(sep)
            if not name:
                raise AtoError(E_USAGE, "invalid_fetch_ref: missing capsule slug before version")
            if not version:
                raise AtoError(E_USAGE, f"invalid_fetch_ref: empty version after {sep!r} in {text!r}")
            return name, version
    return text, None


def parse_ref(ref: str, registry: str | None, version: str | None) -> FetchRef:
    """Parse ``<file.capsule>``, ``<publisher>/<slug>[@ver]`` (with ``--registry``), or an inline
    registry ref ``[http(s)://]<host[:port]>/[<publisher>/]<slug>[:ver|@ver]`` (publisher ``local``)."""
    text = ref.strip()
    if not text:
        raise AtoError(E_USAGE, "invalid_fetch_ref: the capsule reference is empty")
    candidate = Path(text).expanduser()
    if text.endswith(".capsule") or candidate.is_file():
        if not candidate.is_file():
            raise AtoError(E_USAGE, f"no such .capsule file: {candidate}", details={"path": str(candidate)})
        if version is not None or registry is not None:
            raise AtoError(E_USAGE, "--version and --registry apply to registry refs, not to a .capsule file")
        return FetchRef(path=candidate.absolute())
    inline = None
    rest = text
    if "://" in text:
        scheme, _, after = text.partition("://")
        host, _, rest = after.partition("/")
        inline = f"{scheme.lower()}://{host}"
    else:
        head, slash, after = text.partition("/")
        if slash and _HOSTISH.match(head):
            inline, rest = f"http://{head}", after
    if inline is not None and not rest.strip("/"):
        raise AtoError(E_USAGE, "invalid_fetch_ref: missing capsule path after registry host")
    if inline is not None and registry is not None and registry.rstrip("/") != inline:
        raise AtoError(E_USAGE, f"conflicting_registry_request: ref specifies registry '{inline}' but "
                                f"--registry requested '{registry}'")
    parts = rest.strip("/").split("/")
    if len(parts) > 2:
        raise AtoError(E_USAGE, "invalid_fetch_ref: use <registry>/<slug>:<version> or "
                                "<registry>/<publisher>/<slug>:<version>")
    last, ref_version = _split_version(parts[-1])
    if len(parts) == 1:
        if inline is None:
            raise AtoError(E_USAGE, f"scoped_id_required: use <publisher>/<slug> (got {ref!r})",
                           hint=f"e.g. local/{last.lower()}")
        publisher = "local"
    else:
        publisher = parts[0].lstrip("@").lower()
    slug = last.lower()
    for what, value in (("publisher", publisher), ("slug", slug)):
        if not _SEGMENT.match(value):
            raise AtoError(E_USAGE, f"invalid_fetch_ref: {what} {value!r} is not a valid name")
    if ref_version and version and ref_version != version:
        raise AtoError(E_USAGE, f"conflicting_version_request: ref specifies version '{ref_version}' but "
                                f"--version requested '{version}'")
    return FetchRef(publisher=publisher, slug=slug, version=ref_version or version, registry=inline or registry)


def local_labels(path: Path) -> tuple[str, str, str]:
    """(scoped_id, version, registry) of a ``.capsule`` file fetched by path: ``local/<name>``, its
    manifest version, and the file's URI."""
    manifest = read_capsule(path).manifest
    name = str(manifest.get("name") or "").strip().lower()
    version = str(manifest.get("version") or "").strip()
    if not name or not version:
        raise integrity(f"{path.name}: capsule.toml has no name/version", path=str(path))
    return f"local/{name}", version, path.absolute().as_uri()


# ---------------------------------------------------------------- the fetch cache


@dataclass
class FetchResult:
    envelope: dict[str, Any]
    record: dict[str, Any]
    cache_dir: Path


def cache_dir_for(parent_digest: str) -> Path:
    return paths.fetches_dir() / parse(parent_digest)


def _record(scoped_id: str, version: str, registry: str, parent_hex: str, artifact_hex: str) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "scoped_id": scoped_id, "version": version, "registry": registry,
            "fetched_at": now_rfc3339(), "parent_digest": label(parent_hex), "artifact_blake3": label(artifact_hex)}


def _same_labels(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("schema_version", "scoped_id", "version", "registry", "parent_digest", "artifact_blake3")
    return all(old.get(k) == new.get(k) for k in keys)


def envelope(record: dict[str, Any], cache: Path) -> dict[str, Any]:
    return {"schema_version": record["schema_version"], "scoped_id": record["scoped_id"],
            "version": record["version"], "cache_dir": str(cache), "artifact_dir": str(cache / ARTIFACT_DIR),
            "parent_digest": record["parent_digest"], "registry": record["registry"]}


def _cache_lock() -> contextlib.AbstractContextManager[None]:
    return flocked(paths.state_dir() / "native-delivery" / "fetches.lock")


def _copy_synced(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, COPY)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dest, 0o644)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        fsync_dir(Path(dirpath))


def tree_hex(root: Path) -> str:
    try:
        return tree_digest(root)
    except TreeDigestError as exc:
        raise integrity(f"cannot digest {root}: {exc}", path=str(root)) from None


def _accepted(path: Path, trust: TrustPort | None, scope: str | None) -> Verdict:
    """``path`` verified once and accepted on that verdict (``trust``, or without a port the format's
    checks only); the verdict, for what the caller reads from it."""
    verdict = verify(path, trust.limits if trust is not None else Limits())
    if trust is not None:
        trust.accept(verdict, scope)
    return verdict.require()


def fetch_capsule(path: Path, *, scoped_id: str, version: str, registry: str, trust: TrustPort | None,
                  trust_scope: str | None = None, expected_blake3: str | None = None,
                  expected_name: str | None = None) -> FetchResult:
    """Accept ``path`` (``trust.check``, or without a port the format's checks only) and materialize
    it in the fetch cache (always does the work; see :func:`fetch`). ``trust_scope`` is the
    publisher/slug the signer is checked against (None: the artifact's own name, as for a file)."""
    path = Path(path)
    verdict = _accepted(path, trust, trust_scope)
    capsule = verdict.capsule
    assert capsule is not None and verdict.artifact_blake3 is not None
    artifact_hex = parse(verdict.artifact_blake3)
    if expected_blake3 is not None and parse(expected_blake3) != artifact_hex:
        raise integrity(f"artifact digest mismatch for {scoped_id}@{version}: the registry names "
                        f"{label(parse(expected_blake3))}, the downloaded bytes hash to {label(artifact_hex)}",
                        expected=label(parse(expected_blake3)), actual=label(artifact_hex))
    if expected_name is not None and (capsule.name != expected_name or str(capsule.version) != version):
        raise integrity(f"artifact manifest is {capsule.name} {capsule.version}, expected {expected_name} {version}")
    root = paths.fetches_dir()
    root.mkdir(parents=True, exist_ok=True)
    sweep([root])  # what a killed fetch left (only if its process is gone)
    tmp = root / temp_name("fetch")
    os.mkdir(tmp, 0o755)
    try:
        artifact = tmp / ARTIFACT_DIR
        os.mkdir(artifact, 0o755)
        os.chmod(artifact, 0o755)
        unpack_payload(capsule, artifact, durable=True)
        stop_point("fetch.unpacked")  # crash tests: the payload tree in its temp dir, nothing committed
        _copy_synced(path, tmp / ARTIFACT_FILE)
        parent_hex = tree_hex(artifact)
        record = _record(scoped_id, version, registry, parent_hex, artifact_hex)
        write_doc(tmp / FETCH_RECORD, record, "fetch-record")
        _fsync_tree(tmp)
        final = root / parent_hex
        with _cache_lock():
            record = _commit(tmp, final, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return FetchResult(envelope(record, final), record, final)


def _commit(tmp: Path, final: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Move a complete fetch into place; reuse an intact cache entry, repair a damaged one."""
    parent_hex = parse(record["parent_digest"])
    if final.exists():
        intact = (final / ARTIFACT_DIR).is_dir() and _safe_tree_hex(final / ARTIFACT_DIR) == parent_hex
        if intact:
            old = _try_read(final / FETCH_RECORD)
            if old is not None and _same_labels(old, record):
                return old
            if old is None or old.get("artifact_blake3") != record["artifact_blake3"] or \
                    not (final / ARTIFACT_FILE).is_file():
                os.replace(tmp / ARTIFACT_FILE, final / ARTIFACT_FILE)
            os.replace(tmp / FETCH_RECORD, final / FETCH_RECORD)
            fsync_dir(final)
            return record
        trash = temp_path(final)
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return record


def _safe_tree_hex(root: Path) -> str | None:
    try:
        return tree_digest(root)
    except (OSError, TreeDigestError):
        return None


def _try_read(path: Path) -> dict[str, Any] | None:
    try:
        return read_doc(path, "fetch.json")
    except AtoError:
        return None


def cached_ok(cache: Path, record: dict[str, Any]) -> bool:
    """The cache entry still holds this fetch: same labels in fetch.json, same tree digest."""
    old = _try_read(cache / FETCH_RECORD)
    if old is None or not _same_labels(old, record):
        return False
    return _safe_tree_hex(cache / ARTIFACT_DIR) == parse(record["parent_digest"])


def inputs_digest(scoped_id: str, version: str, registry: str, artifact_blake3: str) -> str:
    return jcs_digest({"stage": "fetch", "schema_version": SCHEMA_VERSION, "scoped_id": scoped_id,
                       "version": version, "registry": registry, "artifact_blake3": label(parse(artifact_blake3))})


# ---------------------------------------------------------------- reading a fetch back


def load_fetched(fetched_dir: Path) -> tuple[dict[str, Any], Path]:
    """fetch.json of a fetch cache dir (checked) and its ``artifact/`` dir."""
    fetched_dir = Path(fetched_dir)
    if not fetched_dir.is_dir():
        raise AtoError(E_USAGE, f"not a fetched artifact directory: {fetched_dir}",
                       hint="pass the cache_dir printed by `ato fetch`")
    record_path = fetched_dir / FETCH_RECORD
    record = read_doc(record_path, "fetch.json")
    check_schema_version(record, record_path, "fetch.json")
    for key in ("scoped_id", "version", "registry", "parent_digest"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise integrity(f"fetch.json is missing {key}: {record_path}", path=str(record_path))
    try:
        parse(record["parent_digest"])
    except DigestError as exc:
        raise integrity(f"fetch.json: {exc}", path=str(record_path)) from None
    artifact = fetched_dir / ARTIFACT_DIR
    if not artifact.is_dir() or artifact.is_symlink():
        raise integrity(f"Fetched artifact directory is missing: {artifact}", path=str(artifact))
    return record, artifact


def check_parent(artifact: Path, record: dict[str, Any]) -> str:
    """Recompute the parent digest; E208 when it differs from fetch.json (a tampered fetch)."""
    actual = label(tree_hex(artifact))
    expected = label(parse(record["parent_digest"]))
    if actual != expected:
        raise integrity(f"Fetched artifact integrity mismatch: expected {expected}, got {actual}",
                        expected=expected, actual=actual, path=str(artifact))
    return actual


def trust_scope(record: dict[str, Any]) -> str | None:
    """The publisher/slug a fetch's signer is checked against: None (the artifact's own name) for a
    file fetched by path, as ``ato fetch <file>`` checked it."""
    return None if str(record.get("registry", "")).startswith("file:") else str(record["scoped_id"])


def accept_fetched(fetched_dir: Path, record: dict[str, Any], trust: TrustPort | None) -> None:
    """The artifact a fetch came from, accepted again exactly as fetch accepted it (finalize and
    project call this): ``artifact.capsule`` must be there, pass ``trust``, and be the bytes fetch.json
    names. E208 otherwise."""
    path = Path(fetched_dir) / ARTIFACT_FILE
    if path.is_symlink() or not path.is_file():
        raise integrity(f"the fetched artifact {path} is missing, so its signature cannot be checked",
                        path=str(path), hint="fetch it again (ato fetch / ato install)")
    verdict = _accepted(path, trust, trust_scope(record))
    if verdict.artifact_blake3 != record.get("artifact_blake3"):
        raise integrity(f"{path} is not the artifact fetch.json names ({record.get('artifact_blake3')}, the file "
                        f"hashes to {verdict.artifact_blake3})", path=str(path))


def is_native_payload(artifact: Path) -> bool:
    return (artifact / SIDECAR_NAME).is_file()

