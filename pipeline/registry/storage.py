"""Registry storage: the index (SQLite or PostgreSQL) and the blob store (a directory or a bucket).

Blobs (:mod:`pipeline.registry.blobs`; by default files under ``<data>``, default
``$ATO_HOME/local-registry``; with ``--blob-store s3://bucket/prefix`` objects in a bucket)::

    artifacts/<p>/<s>/<v>/<f>     a published ``.capsule``, verbatim. It is also the *pack* of its
                                  chunks: a chunk is served as a byte range of an artifact that holds
                                  its frame, so the store never holds one object per chunk
    manifests/<blake3>.json       payload manifests of published releases
    sessions/<id>/<batch>.frames  frames staged by chunk-upload sessions (one object per upload request)
    chunks/<blake3>.zst           a chunk stored on its own by ``PUT /v1/chunks/{hash}`` (no release)

Local files only: ``registry.sqlite3`` (the index when no --database is given: WAL,
``synchronous=FULL``) and ``tmp/`` (uploads in flight, temp names of cas.tempfiles, swept at
start-up once their process is gone). A data dir of an earlier version (one file per chunk under
``cas/objects``, manifests under ``cas/manifests``) is still read; migration 3 points each chunk at
an artifact that holds it and marks the old chunk files for the GC sweep.

The index (:mod:`pipeline.registry.index`, schema in :mod:`pipeline.registry.migrations`):
``packages``, ``releases`` (digests, sizes, the skeleton geometry and frame layout used for delta
installs, the manifest text and README, the artifact's blob key), ``release_chunks`` (which chunks
each release's artifact holds, and at which offset), ``chunks`` (raw hash → the exact frame stored
for it and where: blob key and offset), ``runtime_configs``, ``upload_sessions`` and
``session_chunks`` (chunk-upload sessions and where their staged frames are), ``gc_marks`` (blobs
nothing may reference any more, and since when), ``sources`` and ``source_runs`` (the Store's
source-backed publishing). Nothing a request needs lives in a process's memory, so any worker of
any ``ato registry serve`` sharing the index and the blob store can serve any request.

Commit rule: everything about an upload is checked before anything is written (both digests,
then the format's one verifier, :func:`stages.capsule.verify`: every member, the signature, every
chunk under the decoding caps, every payload entry, the payload ceiling; then manifest
name/version against the path). The commit is then one transaction whose first
statement inserts the release row: the ``releases`` primary key decides which of two racing
publishes of a version wins (the loser gets 409 ``version_exists`` and has written nothing).
It then claims the chunk rows it needs in hash order (inserting the new ones, located in this
artifact, which makes this transaction their only writer; locking the existing ones against
deletion), stores the artifact (and a payload manifest the store lacks), records the chunk
references and the package, and commits. A failure removes the artifact it stored while its row
locks still keep everyone else away from it, then rolls back.

Every blob is *marked* (``gc_marks``, in its own committed transaction) before it is written, and
the transaction that makes something reference it drops the mark: a process killed between the
two leaves a mark, never an object nobody knows of. Deleting never removes a blob another
transaction might be about to use: the delete removes the rows, points each chunk still in use at
another artifact that holds it, and marks what nothing references; :meth:`RegistryStore.gc` sweeps
a mark only after the grace period, only when no upload session older than the mark is still
open, and only after checking again, under the mark's row lock, that nothing references the blob.
A publish that needs a marked blob takes that row lock first (and drops the mark), so a sweep and
a publish never cross.

``--allow-existing`` is decided by the artifact digests: the same version with the same SHA-256
and BLAKE3 is answered 200 ``already_existed: true`` and nothing is written; anything else for an
existing version is 409 ``version_exists``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import tomli_w
import zstandard
from sqlalchemy import Connection

from cas.digest import DigestError, label, parse, write_hashed
from cas.payload_manifest import MAX_CHUNK, PayloadManifest
from cas.stoppoints import stop_point
from cas.tempfiles import SweepReport, sweep, temp_name
from pipeline import names
from pipeline.errors import AtoError, printable
from pipeline.registry.blobs import BlobStore, open_blob_store
from pipeline.registry.index import Index, Row, database_url
from stages.capsule import Limits, consumer_limits, read_capsule, verify
from stages.capsule.payload import FrameError, FrameRef, check_frame, decode_frame, read_frame
from stages.capsule.signature import SignatureInfo, check_signature

README_LIMIT = 512 * 1024
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")
SESSION_TTL_SECONDS = 3600  # an upload session lives this long after its last request
GC_GRACE_SECONDS = 900  # a file nothing references is kept this long before a sweep may remove it
RELEASE_SUMMARY = ("scoped_id, version, file_name, sha256, blake3, size_bytes, manifest_hash, payload_hash, "
                   "chunk_count, CASE WHEN layout IS NULL THEN 0 ELSE 1 END AS spliceable, created_at, signed, "
                   "signer_key_id, signed_at, yanked_at, metadata_json")
SEARCH_LIMIT_MAX = 50
RUN_BYTES = 8 << 20  # adjacent frames read (or requested from a bucket) at once
# A release is visible (searchable, eligible as "latest") unless it is yanked.
_VISIBLE = "EXISTS (SELECT 1 FROM releases r WHERE r.scoped_id = packages.scoped_id AND r.yanked_at IS NULL)"


class RegistryError(Exception):
    """A refusal with an HTTP status and the ``{"error", "message"}`` body."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON error body; the message echoes request values, so its control characters are escaped."""
        return {"error": self.code, "message": printable(self.message), **self.extra}


@dataclass
class SearchPage:
    rows: list[Row]
    total: int
    next_cursor: str | None


def encode_cursor(updated_at: str, scoped_id: str, query: str) -> str:
    doc = json.dumps({"u": updated_at, "s": scoped_id, "q": query}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, query: str) -> tuple[str, str]:
    """(updated_at, scoped_id) of the last row of the previous page; 400 ``invalid_cursor`` otherwise."""
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = (doc["u"], doc["s"])
        if not all(isinstance(v, str) for v in after) or not isinstance(doc["q"], str):
            raise TypeError
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise RegistryError(400, "invalid_cursor", "cursor is not one this registry handed out "
                            "(use the next_cursor of the previous page)") from None
    if doc["q"] != query:
        raise RegistryError(400, "invalid_cursor", "cursor belongs to another query; start again without it")
    return after


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_scope(publisher: str, slug: str) -> str:
    if not names.valid_segment(publisher) or not names.valid_segment(slug):
        raise RegistryError(400, "invalid_scope", f"invalid scoped id {publisher}/{slug!s}: segments are 1-63 "
                            "characters of [a-z0-9-], starting with a letter or digit")
    return f"{publisher}/{slug}"


def check_version(version: str) -> None:
    if not names.valid_version(version):
        raise RegistryError(400, "invalid_version", "invalid version segment")


def check_file_name(file_name: str) -> None:
    if not names.valid_file_name(file_name):
        raise RegistryError(400, "invalid_file_name", "file_name must be a .capsule file name")


def bare_hex(value: str, what: str, algo: str = "blake3") -> str:
    """Strip an optional ``<algo>:`` label; require 64 lowercase-able hex."""
    text = (value or "").strip()
    if text.lower().startswith(algo + ":"):
        text = text[len(algo) + 1:]
    text = text.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise RegistryError(400, "invalid_header" if what.startswith("x-") else "invalid_digest",
                            f"{what} is not a {algo} digest")
    return text


def json_safe(value: Any) -> Any:
    """TOML values as JSON (dates and times become ISO strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return value


@dataclass
class Upload:
    """A complete candidate artifact in ``tmp/`` and what the uploader claims about it."""

    path: Path
    publisher: str
    slug: str
    version: str
    file_name: str
    allow_existing: bool
    sha256: str  # hex
    blake3: str  # hex
    size: int
    session: str | None = None

    @property
    def scoped_id(self) -> str:
        return f"{self.publisher}/{self.slug}"


@dataclass
class Inspection:
    manifest: dict[str, Any]
    manifest_toml: str  # display form: the manifest with distribution.chunk_list left out
    manifest_json: str
    manifest_hash: str
    payload: PayloadManifest
    prefix_size: int
    payload_size: int
    suffix_size: int
    frames: list[FrameRef] | None
    readme: str | None
    readme_name: str | None
    signature: SignatureInfo


_REFUSALS = {"payload_too_large": (413, "payload_too_large"), "unsafe_entry": (422, "unsafe_payload"),
             "name_too_long": (422, "unsafe_payload"), "unreadable_tar": (422, "unsafe_payload")}


def inspect_artifact(path: Path, publisher: str, slug: str, version: str, limits: Limits | None = None) -> Inspection:
    """Every check an upload must pass before anything is stored; raises RegistryError.

    The format's one verifier (tar framing, every member's digest, the signature, every chunk under
    the decoding caps, every payload entry, the payload ceiling) decides, the same one publish,
    install and run apply, so a registry never holds what a client would refuse.
    """
    verdict = verify(path, limits)
    if verdict.error is not None:
        status, code = _REFUSALS.get(str(verdict.error.details.get("reason")), (422, "invalid_artifact"))
        raise RegistryError(status, code, verdict.error.message)
    capsule, scan = verdict.capsule, verdict.scan
    assert capsule is not None and scan is not None
    manifest = capsule.manifest
    name, mversion = manifest.get("name"), manifest.get("version")
    if name != slug:
        raise RegistryError(400, "scoped_id_mismatch",
                            f"path slug {slug!r} does not match artifact manifest.name {name!r}")
    if mversion != version:
        raise RegistryError(400, "version_mismatch",
                            f"path version {version!r} does not match artifact manifest.version {mversion!r}")
    size = capsule.layout.size
    display = display_manifest(manifest)
    toml_text = tomli_w.dumps(display)
    suffix = size - capsule.payload_offset - capsule.payload_size
    readme = capsule.readme[:README_LIMIT] if capsule.readme is not None else None
    return Inspection(manifest, toml_text, json.dumps(display, sort_keys=True),
                      str(manifest["distribution"]["manifest_hash"]), capsule.payload_manifest,
                      capsule.payload_offset, capsule.payload_size, suffix,
                      list(scan.frames) if scan.frames is not None else None, readme, capsule.readme_name,
                      verdict.signature or SignatureInfo(False))


class RegistryStore:
    """The data dir and index of one registry. Thread-safe; one instance per server process (worker).

    ``database`` is a ``postgresql://`` or ``sqlite:///`` URL (default: the embedded SQLite index
    in the data dir)."""

    def __init__(self, data_dir: Path, database: str | None = None, limits: Limits | None = None,
                 blob_store: str | BlobStore | None = None) -> None:
        self.limits = limits or consumer_limits()  # the decoded-payload ceiling an upload must stay under
        self.root = Path(data_dir)
        self.index = Index(database_url(database, self.root))
        self.blobs = blob_store if isinstance(blob_store, BlobStore) else open_blob_store(blob_store, self.root)
        self.tmp = self.root / "tmp"

    @property
    def db_path(self) -> Path:
        """The embedded SQLite index file (meaningful only without ``--database``)."""
        return self.root / "registry.sqlite3"

    # ------------------------------------------------------------------ setup

    def initialize(self) -> None:
        """Create the layout, migrate the index, record the signature of releases indexed before
        signatures were, and sweep the temp files of servers that are no longer running."""
        for d in (self.root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.blobs.check()
        self.sweep_temps()
        self.index.migrate()
        self._record_signatures()
        if self.index.kind == "sqlite":
            with self.index.read() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def _record_signatures(self) -> None:
        """Releases whose signature was never recorded (an index from before signer columns existed):
        read it from each artifact's signature.json, once."""
        with self.index.read() as conn:
            unknown = self.index.all(conn, "SELECT scoped_id, version, file_name, artifact_key FROM releases "
                                           "WHERE signed IS NULL")
        for rel in unknown:
            info = SignatureInfo(False)
            with contextlib.suppress(AtoError, OSError), self.local_copy(self.release_key(rel)) as path:
                info = check_signature(read_capsule(path).signature_doc)
            with self.index.write() as conn:
                self.index.run(conn, "UPDATE releases SET signed=:s, signer_key_id=:k, signed_at=:t "
                                     "WHERE scoped_id=:id AND version=:v AND signed IS NULL",
                               {"s": int(info.signed), "k": info.key_id, "t": info.signed_at,
                                "id": rel["scoped_id"], "v": rel["version"]})

    def close(self) -> None:
        self.index.close()

    def new_temp(self, suffix: str = ".upload", name: str | None = None) -> Path:
        """A temp file in ``tmp/``; ``name`` (an upload's file_name) is what a refusal's message calls it."""
        return self.tmp / temp_name(name or "upload" + suffix)

    def sweep_temps(self, *, dry_run: bool = False) -> SweepReport:
        """Temp files whose process is gone (another live server keeps its own)."""
        dirs = [self.root, self.tmp, self.root / "cas" / "tmp"]
        local = self.blobs.local_path("sessions")
        return sweep(dirs + ([local] if local is not None else []), dry_run=dry_run)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """The blob as a local file: itself in a local store, else a temp copy removed afterwards."""
        local = self.blobs.local_path(key)
        if local is not None:
            yield local
            return
        tmp = self.new_temp(".blob")
        try:
            with open(tmp, "wb") as fh:
                size = self.blobs.size(key)
                if size is None:
                    raise FileNotFoundError(key)
                for piece in self.blobs.iter_range(key, 0, size):
                    fh.write(piece)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads

    def package(self, scoped_id: str) -> Row | None:
        with self.index.read() as conn:
            return self.index.one(conn, "SELECT * FROM packages WHERE scoped_id=:s", s=scoped_id)

    def releases(self, scoped_id: str) -> list[Row]:
        """Every release of a capsule, newest version first, without the large columns."""
        with self.index.read() as conn:
            rows = self.index.all(conn, f"SELECT {RELEASE_SUMMARY} FROM releases WHERE scoped_id=:s", s=scoped_id)
        return sorted(rows, key=lambda r: names.version_key(r["version"]), reverse=True)

    def release(self, scoped_id: str, version: str, *, summary: bool = False,
                conn: Connection | None = None) -> Row | None:
        cols = RELEASE_SUMMARY if summary else "*"
        sql = f"SELECT {cols} FROM releases WHERE scoped_id=:s AND version=:v"
        if conn is not None:
            return self.index.one(conn, sql, s=scoped_id, v=version)
        with self.index.read() as c:
            return self.index.one(c, sql, s=scoped_id, v=version)

    def resolve_release(self, publisher: str, slug: str, version: str | None) -> Row:
        scoped = check_scope(publisher, slug)
        pkg = self.package(scoped)
        if pkg is None:
            raise RegistryError(404, "not_found", "Capsule not found")
        wanted = version or pkg["latest_version"]
        check_version(wanted)
        rel = self.release(scoped, wanted)
        if rel is None:
            raise RegistryError(404, "version_not_found", "Version not found")
        if not version and rel["yanked_at"] is not None:
            raise RegistryError(410, "version_yanked", f"every version of {scoped} is yanked; ask for an exact "
                                "version (yanked versions stay downloadable by exact version)", yanked=True)
        return rel

    @staticmethod
    def release_key(rel: Row) -> str:
        """The blob key of a release's artifact."""
        return rel["artifact_key"] or artifact_key(rel["scoped_id"], rel["version"], rel["file_name"])

    def search(self, q: str, limit: int, cursor: str | None = None) -> SearchPage:
        """One page of the capsules matching ``q`` (newest update first), the total count, and the opaque
        cursor of the next page. Capsules whose every version is yanked are not listed.

        The cursor names the last row shown (keyset paging), so a capsule published between two pages
        does not shift the next page (an offset would show a row twice); one updated meanwhile moves to
        the front. The cursor is bound to its query. A plain decimal cursor (what the reference
        server hands out) is still read as an offset."""
        text = q.strip().lower()
        where = [_VISIBLE]
        args: dict[str, Any] = {}
        if text:
            args["like"] = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(lower(slug) LIKE :like ESCAPE '\\' OR lower(name) LIKE :like ESCAPE '\\'"
                         " OR lower(description) LIKE :like ESCAPE '\\' OR lower(scoped_id) LIKE :like ESCAPE '\\')")
        with self.index.read() as conn:
            total = self.index.scalar(conn, f"SELECT COUNT(*) FROM packages WHERE {' AND '.join(where)}", **args)
            offset = 0
            if cursor and cursor.isdigit():
                offset = int(cursor)
            elif cursor:
                after = decode_cursor(cursor, text)
                where.append("(updated_at < :after_u OR (updated_at = :after_u AND scoped_id > :after_s))")
                args.update(after_u=after[0], after_s=after[1])
            sql = (f"SELECT * FROM packages WHERE {' AND '.join(where)} ORDER BY updated_at DESC, scoped_id ASC "
                   "LIMIT :limit OFFSET :offset")
            rows = self.index.all(conn, sql, **args, limit=limit + 1, offset=offset)
        page = rows[:limit]
        nxt = encode_cursor(page[-1]["updated_at"], page[-1]["scoped_id"], text) if len(rows) > limit else None
        return SearchPage(page, int(total), nxt)

    def search_all(self) -> Iterator[Row]:
        """Every listed capsule, page by page."""
        cursor: str | None = None
        while True:
            page = self.search("", SEARCH_LIMIT_MAX, cursor)
            yield from page.rows
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def runtime_config(self, scoped_id: str) -> dict[str, Any] | None:
        with self.index.read() as conn:
            doc = self.index.scalar(conn, "SELECT doc FROM runtime_configs WHERE scoped_id=:s", s=scoped_id)
        return json.loads(doc) if doc else None

    def skeleton(self, rel: Row) -> dict[str, Any]:
        """Prefix and suffix bytes plus the ordered frames: everything a client splices an artifact from."""
        if rel["layout"] is None:
            raise RegistryError(409, "not_spliceable", "this release's payload frames do not match its chunks; "
                                "download the artifact instead")
        key = self.release_key(rel)
        try:
            prefix = self.blobs.read_range(key, 0, rel["prefix_size"])
            tail = rel["prefix_size"] + rel["payload_size"]
            suffix = self.blobs.read_range(key, tail, rel["size_bytes"] - tail)
        except OSError as exc:
            raise RegistryError(500, "storage_error", f"artifact of {rel['scoped_id']} {rel['version']}: {exc}") from None
        return {
            "scoped_id": rel["scoped_id"], "version": rel["version"], "file_name": rel["file_name"],
            "size_bytes": rel["size_bytes"], "sha256": "sha256:" + rel["sha256"], "blake3": label(rel["blake3"]),
            "payload_hash": label(rel["payload_hash"]), "payload_size": rel["payload_size"],
            "prefix": base64.b64encode(prefix).decode("ascii"),
            "suffix": base64.b64encode(suffix).decode("ascii"),
            "frames": json.loads(rel["layout"]),
        }

    def locate(self, hexes: list[str], conn: Connection | None = None) -> dict[str, Piece]:
        """raw hash → where its stored frame is (blob key, offset, size), for the chunks the registry holds."""
        rows = self._chunk_rows("raw_hash, blob_key, blob_offset, frame_size", hexes, conn)
        return {r["raw_hash"]: Piece(r["blob_key"], int(r["blob_offset"]), int(r["frame_size"]))
                for r in rows if r["blob_key"] is not None}

    def chunk_frame(self, raw_hash: str) -> bytes | None:
        """The stored frame of one chunk, or None when the registry does not hold it."""
        where = self.locate([raw_hash]).get(raw_hash)
        if where is None:
            return None
        return b"".join(self.read_pieces([where]))

    def frame_runs(self, hexes: list[str]) -> tuple[int, list[Piece]]:
        """The frames of ``hexes`` in order, as runs of adjacent bytes of one blob: (total size, runs).
        Missing chunks are a 404 naming them."""
        found = self.locate(hexes)
        missing = [label(h) for h in hexes if h not in found]
        if missing:
            raise RegistryError(404, "not_found", f"{len(missing)} chunk(s) not found", missing_chunks=missing)
        pieces = [found[h] for h in hexes]
        return sum(p.size for p in pieces), coalesce(pieces)

    def read_pieces(self, runs: list[Piece]) -> Iterator[bytes]:
        """The bytes of ``runs``, in order (one read or request per run)."""
        for run in runs:
            got = 0
            try:
                for data in self.blobs.iter_range(run.key, run.offset, run.size):
                    got += len(data)
                    yield data
            except FileNotFoundError:
                raise RegistryError(500, "storage_error", f"blob {run.key} is missing") from None
            if got != run.size:
                raise RegistryError(500, "storage_error", f"blob {run.key} is shorter than the index says")

    def payload_manifest_bytes(self, payload_hash: str) -> bytes | None:
        """The stored payload manifest of a release (JSON), or None."""
        for key in (manifest_key(payload_hash), legacy_manifest_key(payload_hash)):
            with contextlib.suppress(FileNotFoundError):
                return self.blobs.read(key)
        return None

    def known_frames(self, hexes: list[str], conn: Connection | None = None) -> dict[str, str]:
        """raw hash → frame BLAKE3 of the chunks the registry holds."""
        return {r["raw_hash"]: r["frame_blake3"] for r in self._chunk_rows("raw_hash, frame_blake3", hexes, conn)}

    def _chunk_rows(self, columns: str, hexes: list[str], conn: Connection | None) -> list[Row]:
        """``columns`` of the chunk rows of ``hexes``, in ``conn``'s transaction or a read of their own."""
        sql = f"SELECT {columns} FROM chunks WHERE raw_hash IN :keys"
        if conn is not None:
            return self.index.values_in(conn, sql, hexes)
        with self.index.read() as c:
            return self.index.values_in(c, sql, hexes)

    # ------------------------------------------------------------------ chunk sessions

    @staticmethod
    def check_session(session: str) -> str:
        if not SESSION_RE.match(session or ""):
            raise RegistryError(400, "invalid_session", "session must be the session_id negotiate returned")
        return session

    def negotiate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Which chunks an uploader must send; also refuses a version conflict before any upload.

        When chunks are missing it opens an upload session in the index: the chunks it calls known
        are then safe from a GC sweep until the session is committed or expires. A ``dry_run``
        records nothing."""
        if body.get("schema_version", 3) != 3:
            raise RegistryError(400, "invalid_schema_version", "schema_version must be 3")
        chunks = body.get("chunks")
        if not isinstance(chunks, list):
            raise RegistryError(400, "invalid_manifest", "chunks must be a list")
        wanted: list[tuple[str, str | None]] = []
        for c in chunks:
            if not isinstance(c, dict):
                raise RegistryError(400, "invalid_chunk_hash", "each chunk must be an object")
            try:
                raw = parse(str(c.get("raw_hash", "")))
                fb = parse(str(c["frame_blake3"])) if c.get("frame_blake3") else None
            except DigestError:
                raise RegistryError(400, "invalid_chunk_hash", f"invalid chunk hash in {c!r}") from None
            size = c.get("raw_size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK:
                raise RegistryError(400, "invalid_chunk_size", f"invalid raw_size in {str(c)[:200]} (a chunk is 1 to "
                                    f"{MAX_CHUNK} bytes)")
            wanted.append((raw, fb))
        existing = None
        if body.get("publisher") or body.get("slug") or body.get("version"):
            scoped = check_scope(str(body.get("publisher", "")), str(body.get("slug", "")))
            check_version(str(body.get("version", "")))
            rel = self.release(scoped, str(body["version"]))
            if rel is not None:
                same = (rel["sha256"] == str(body.get("sha256", "")).lower().removeprefix("sha256:")
                        and rel["blake3"] == str(body.get("blake3", "")).lower().removeprefix("blake3:"))
                if not body.get("allow_existing"):
                    raise RegistryError(409, "version_exists", "same version is already published")
                if not same:
                    raise RegistryError(409, "version_exists",
                                        "same version is already published (artifact digest differs)")
                existing = {"version": rel["version"], "same_artifact": True}
        session = secrets.token_hex(16)
        known = self.known_frames([h for h, _ in wanted])
        missing: list[str] = []
        conflicts: list[str] = []
        seen: set[str] = set()
        for raw, fb in wanted:
            if raw in seen:
                continue
            seen.add(raw)
            if raw not in known:
                missing.append(label(raw))
            elif fb is not None and known[raw] != fb:
                conflicts.append(label(raw))
        if missing and existing is None and not body.get("dry_run"):
            self._touch_session(session)  # from now on, what negotiate called known outlives this upload
        return {"session_id": session, "missing_chunks": missing, "frame_conflicts": conflicts,
                "total_chunks": len(wanted), "existing": existing, "skeleton_upload": True}

    def _touch_session(self, session: str, conn: Connection | None = None) -> None:
        """Open ``session`` (or keep it open another TTL)."""
        stamp = time.time()
        sql = ("INSERT INTO upload_sessions(session_id, created_at, expires_at) VALUES(:s, :t, :e) "
               "ON CONFLICT(session_id) DO UPDATE SET expires_at=excluded.expires_at")
        params = {"s": session, "t": stamp, "e": stamp + SESSION_TTL_SECONDS}
        if conn is not None:
            self.index.run(conn, sql, params)
            return
        with self.index.write() as c:
            self.index.run(c, sql, params)

    def stage_frames(self, session: str, source: Path) -> list[dict[str, Any]]:
        """Split an uploaded run of frames and verify each; the run itself (one file, offsets in the
        index) becomes one staged batch of the session, readable by every worker."""
        self.check_session(session)
        frames: list[tuple[dict[str, Any], int]] = []
        offset = 0
        with open(source, "rb") as fh:
            while True:
                try:
                    frame = read_frame(fh)
                except FrameError as exc:
                    raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
                if frame is None:
                    break
                frames.append((self._check_staged(frame, None), offset))
                offset += len(frame)
        return self._stage_batch(session, source, frames)

    def stage_chunk(self, session: str | None, raw_hash: str, raw_size: int, frame: bytes) -> dict[str, Any]:
        """``PUT /v1/chunks/{hash}``: into a session, or (no session) straight into the CAS."""
        try:
            check_frame(frame, raw_hash, raw_size)
        except (FrameError, zstandard.ZstdError) as exc:
            raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
        if session is not None:
            self.check_session(session)
            batch = self.new_temp(".frame")
            try:
                batch.write_bytes(frame)
                return self._stage_batch(session, batch, [(self._check_staged(frame, (raw_hash, raw_size)), 0)])[0]
            finally:
                batch.unlink(missing_ok=True)
        ref = FrameRef(raw_hash, raw_size, len(frame), blake3.blake3(frame).hexdigest())
        key = standalone_chunk_key(raw_hash)
        self._premark([key])

        def commit(conn: Connection) -> bool:
            owned, _locked = self._claim_chunks(conn, [ref], {raw_hash: (key, 0)})
            if not owned:
                return False
            self._clear_marks(conn, [key])
            self.blobs.put_bytes(key, frame)  # this transaction owns the row, so nobody else writes the key
            return True
        inserted = False
        try:
            inserted = self.index.transaction(commit)
        finally:
            if not inserted:
                self._sweep_now([key])
        return {"raw_hash": label(raw_hash), "inserted": inserted, "zstd_size": len(frame)}

    @staticmethod
    def _check_staged(frame: bytes, expect: tuple[str, int] | None) -> dict[str, Any]:
        if expect is None:
            try:
                size = zstandard.get_frame_parameters(frame).content_size
                raw = decode_frame(frame, size)
            except (FrameError, zstandard.ZstdError) as exc:
                raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
            raw_hash = blake3.blake3(raw).hexdigest()
        else:
            raw_hash, size = expect
        return {"raw_hash": raw_hash, "raw_size": size, "zstd_size": len(frame),
                "frame_blake3": blake3.blake3(frame).hexdigest()}

    def _stage_batch(self, session: str, source: Path, frames: list[tuple[dict[str, Any], int]]
                     ) -> list[dict[str, Any]]:
        """Store ``source`` as one batch blob of the session and index its frames (first copy wins)."""
        if not frames:
            return []
        self.check_session(session)
        key = f"sessions/{session}/{secrets.token_hex(8)}.frames"
        self._premark([key])
        self.blobs.put_file(key, source)

        def record(conn: Connection) -> set[str]:
            self._touch_session(session, conn)
            known = {r["raw_hash"] for r in self.index.values_in(
                conn, "SELECT raw_hash FROM session_chunks WHERE session_id=:s AND raw_hash IN :keys",
                [f["raw_hash"] for f, _o in frames], s=session)}
            fresh: dict[str, dict[str, Any]] = {}
            for f, off in frames:
                if f["raw_hash"] not in known and f["raw_hash"] not in fresh:
                    fresh[f["raw_hash"]] = {"s": session, "h": f["raw_hash"], "rs": f["raw_size"],
                                            "fs": f["zstd_size"], "fb": f["frame_blake3"], "k": key, "o": off}
            if fresh:
                self.index.run(conn, "INSERT INTO session_chunks(session_id, raw_hash, raw_size, frame_size, "
                                     "frame_blake3, blob_key, blob_offset) VALUES(:s, :h, :rs, :fs, :fb, :k, :o) "
                                     "ON CONFLICT(session_id, raw_hash) DO NOTHING", list(fresh.values()))
                self._clear_marks(conn, [key])
            return set(fresh)
        fresh: set[str] = set()
        try:
            fresh = self.index.transaction(record)
        finally:
            if not fresh:  # nothing new in it, or the index said no: still marked, so sweep it now
                self._sweep_now([key])
        out = []
        for f, _off in frames:
            new = f["raw_hash"] in fresh
            fresh.discard(f["raw_hash"])
            out.append({"raw_hash": label(f["raw_hash"]), "raw_size": f["raw_size"], "inserted": new,
                        "zstd_size": f["zstd_size"]})
        return out

    def drop_session(self, session: str | None) -> None:
        """Close a session: its index rows, then its staged frames."""
        if not session or not SESSION_RE.match(session):
            return
        with self.index.write() as conn:
            keys = self._end_sessions(conn, [session])
        self._remove_blobs(keys)

    def _end_sessions(self, conn: Connection, sessions: list[str]) -> list[str]:
        """Delete sessions' rows; returns the batch blobs only they referenced."""
        keys = {r["blob_key"] for r in self.index.values_in(
            conn, "SELECT DISTINCT blob_key FROM session_chunks WHERE session_id IN :keys", sessions)}
        self.index.values_in(conn, "DELETE FROM session_chunks WHERE session_id IN :keys RETURNING session_id",
                             sessions)
        self.index.values_in(conn, "DELETE FROM upload_sessions WHERE session_id IN :keys RETURNING session_id",
                             sessions)
        return sorted(keys)

    def _remove_blobs(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError, OSError, AtoError):
                self.blobs.delete(key)

    def reconstruct(self, session: str | None, prefix: bytes, suffix: bytes,
                    chunks: list[tuple[str, int]], file_name: str | None = None) -> tuple[Path, str, str, int]:
        """Rebuild a candidate artifact from prefix + frames (session or stored) + suffix in ``tmp/``.

        Returns ``(path, sha256 hex, blake3 hex, size)``. Missing frames → 400 ``missing_chunks``.
        """
        staged: dict[str, Piece] = {}
        hexes = [h for h, _ in chunks]
        if session:
            self.check_session(session)
            with self.index.read() as conn:
                staged = {r["raw_hash"]: Piece(r["blob_key"], int(r["blob_offset"]), int(r["frame_size"]))
                          for r in self.index.values_in(
                              conn, "SELECT raw_hash, frame_size, blob_key, blob_offset FROM session_chunks "
                                    "WHERE session_id=:s AND raw_hash IN :keys", hexes, s=session)}
        stored = self.locate([h for h in hexes if h not in staged])
        pieces: list[Piece] = []
        missing: list[str] = []
        for raw in hexes:
            where = staged.get(raw) or stored.get(raw)
            if where is None:
                missing.append(label(raw))
            else:
                pieces.append(where)
        if missing:
            raise RegistryError(400, "missing_chunks", f"{len(missing)} chunk(s) were neither uploaded nor stored: "
                                f"{', '.join(missing[:5])}", missing_chunks=missing)
        out = self.new_temp(".capsule", file_name)

        def body() -> Iterator[bytes]:
            yield prefix
            yield from self.read_pieces(coalesce(pieces))
            yield suffix
        sha, b3, size = write_hashed(out, body())
        return out, sha, b3, size

    # ------------------------------------------------------------------ publish

    def existing_outcome(self, rel: Row, upload: Upload) -> dict[str, Any]:
        if not upload.allow_existing:
            raise RegistryError(409, "version_exists", "same version is already published")
        if rel["sha256"] != upload.sha256 or rel["blake3"] != upload.blake3:
            raise RegistryError(409, "version_exists", "same version is already published (artifact digest differs)")
        return self.release_doc(rel, already_existed=True)

    def release_doc(self, rel: Row, *, already_existed: bool, chunks_new: int = 0) -> dict[str, Any]:
        return {
            "scoped_id": rel["scoped_id"], "version": rel["version"], "file_name": rel["file_name"],
            "sha256": "sha256:" + rel["sha256"], "blake3": label(rel["blake3"]), "size_bytes": rel["size_bytes"],
            "manifest_hash": rel["manifest_hash"], "already_existed": already_existed,
            "spliceable": rel["layout"] is not None, "chunks_total": rel["chunk_count"],
            "chunks_new": chunks_new,
        }

    def publish(self, upload: Upload) -> tuple[int, dict[str, Any]]:
        """Check and commit a candidate artifact. Returns (HTTP status, release document)."""
        scoped = check_scope(upload.publisher, upload.slug)
        check_version(upload.version)
        check_file_name(upload.file_name)
        rel = self.release(scoped, upload.version)
        if rel is not None:  # advisory; decided by the release row's primary key inside the transaction
            return 200, self.existing_outcome(rel, upload)
        insp = inspect_artifact(upload.path, upload.publisher, upload.slug, upload.version, self.limits)
        keys = [artifact_key(scoped, upload.version, upload.file_name)]
        keys += [manifest_key(insp.payload.artifact_hash)] if insp.frames is not None else []
        self._premark(keys)
        committed = False
        try:
            result = self.index.transaction(lambda conn: self._commit(conn, upload, insp))
            committed = True
            return result
        except _LostRace:
            rel = self.release(scoped, upload.version)
            if rel is None:  # the winner was deleted meanwhile: a retry of the upload will do
                raise RegistryError(409, "version_exists", "a concurrent publish of this version was "
                                    "committed and removed meanwhile; retry") from None
            return 200, self.existing_outcome(rel, upload)
        finally:
            if not committed:
                self._sweep_now(keys)

    def _claim_chunks(self, conn: Connection, refs: list[FrameRef], where: dict[str, tuple[str, int]]
                      ) -> tuple[set[str], dict[str, str]]:
        """Make the chunk rows of ``refs`` this transaction's to rely on, in hash order; a new row
        says its frame is at ``where[hash]`` (blob key, offset).

        Returns (hashes whose row this transaction inserted; raw hash → frame BLAKE3 of the rows
        that were there, now locked against deletion until commit)."""
        by_hash = {r.raw_hash: r for r in refs}
        owned: set[str] = set()
        locked: dict[str, str] = {}
        todo = sorted(by_hash)
        while todo:
            rows = self.index.insert_values(
                conn, "INSERT INTO chunks(raw_hash, raw_size, frame_size, frame_blake3, blob_key, blob_offset)",
                [(h, by_hash[h].raw_size, by_hash[h].frame_size, by_hash[h].frame_blake3, *where[h]) for h in todo],
                "ON CONFLICT(raw_hash) DO NOTHING RETURNING raw_hash")
            owned.update(r["raw_hash"] for r in rows)
            rest = [h for h in todo if h not in owned]
            for row in self.index.values_in(conn, "SELECT raw_hash, frame_blake3 FROM chunks WHERE raw_hash IN :keys "
                                                  f"ORDER BY raw_hash{self.index.for_share}", rest):
                locked[row["raw_hash"]] = row["frame_blake3"]
            todo = [h for h in rest if h not in locked]  # deleted between the two statements: claim again
        return owned, locked

    def _clear_marks(self, conn: Connection, keys: list[str]) -> None:
        """Drop the GC marks of ``keys``, taking their row locks: a sweep of them waits for this
        transaction, or has finished before it (and the files are then written again)."""
        if keys:
            self.index.values_in(conn, "DELETE FROM gc_marks WHERE key IN :keys RETURNING key", keys)

    def _mark(self, conn: Connection, keys: list[str]) -> None:
        if keys:
            stamp = time.time()
            self.index.run(conn, "INSERT INTO gc_marks(key, marked_at) VALUES(:k, :t) ON CONFLICT(key) DO UPDATE "
                                 "SET marked_at=excluded.marked_at", [{"k": k, "t": stamp} for k in sorted(set(keys))])

    def _premark(self, keys: list[str]) -> None:
        """Mark blobs about to be written, in a transaction of their own (see the module docstring)."""
        with self.index.write() as conn:
            self._mark(conn, keys)

    def _commit(self, conn: Connection, upload: Upload, insp: Inspection) -> tuple[int, dict[str, Any]]:
        """One publish transaction (run by :meth:`Index.transaction`, again after a deadlock)."""
        scoped = upload.scoped_id
        frames = insp.frames
        if frames is not None:
            known = self.known_frames([f.raw_hash for f in frames], conn)
            if any(known.get(f.raw_hash, f.frame_blake3) != f.frame_blake3 for f in frames):
                frames = None  # the CAS holds other frames for some chunks: serve this release whole
        stamp = now()
        layout = json.dumps([f.to_json() for f in frames], separators=(",", ":")) if frames else None
        meta = insp.manifest.get("metadata")
        try:  # first: the release row, whose primary key decides a race for this version
            self.index.run(conn, "INSERT INTO releases(scoped_id, version, file_name, sha256, blake3, size_bytes, "
                                 "manifest_hash, payload_hash, prefix_size, payload_size, suffix_size, chunk_count, "
                                 "layout, manifest_toml, manifest_json, readme, readme_name, created_at, signed, "
                                 "signer_key_id, signed_at, metadata_json, artifact_key) VALUES(:s, :v, :f, :sha, "
                                 ":b3, :size, :mh, :ph, :pre, :pay, :suf, :cc, :layout, :toml, :json, :readme, :rn, "
                                 ":at, :signed, :key, :sat, :meta, :akey)",
                           {"s": scoped, "v": upload.version, "f": upload.file_name, "sha": upload.sha256,
                            "b3": upload.blake3, "size": upload.size, "mh": insp.manifest_hash,
                            "ph": insp.payload.artifact_hash, "pre": insp.prefix_size, "pay": insp.payload_size,
                            "suf": insp.suffix_size, "cc": len(insp.payload.chunks), "layout": layout,
                            "toml": insp.manifest_toml, "json": insp.manifest_json, "readme": insp.readme,
                            "rn": insp.readme_name, "at": stamp, "signed": int(insp.signature.signed),
                            "key": insp.signature.key_id, "sat": insp.signature.signed_at,
                            "meta": json.dumps(json_safe(meta)) if isinstance(meta, dict) else None,
                            "akey": artifact_key(scoped, upload.version, upload.file_name)})
        except Exception as exc:
            if self.index.is_conflict(exc):
                raise _LostRace() from None
            raise
        key = artifact_key(scoped, upload.version, upload.file_name)
        stored = False
        try:
            chunks_new = 0
            if insp.frames is not None and frames is not None:
                offsets: dict[str, tuple[str, int]] = {}
                offset = insp.prefix_size
                for f in insp.frames:
                    offsets.setdefault(f.raw_hash, (key, offset))
                    offset += f.frame_size
                unique = list({f.raw_hash: f for f in frames}.values())
                owned, locked = self._claim_chunks(conn, unique, offsets)
                chunks_new = len(owned)
                if any(locked[f.raw_hash] != f.frame_blake3 for f in unique if f.raw_hash in locked):
                    # another publish stored other frames for a chunk meanwhile: serve this release whole
                    frames = None
                    self.index.run(conn, "UPDATE releases SET layout=NULL WHERE scoped_id=:s AND version=:v",
                                   {"s": scoped, "v": upload.version})
                # which chunks this artifact holds (the frames the index knows for them), and where
                held = [f for f in unique if f.raw_hash in owned or locked.get(f.raw_hash) == f.frame_blake3]
                if held:
                    self.index.insert_values(conn, "INSERT INTO release_chunks(scoped_id, version, raw_hash, frame_offset)",
                                             [(scoped, upload.version, f.raw_hash, offsets[f.raw_hash][1])
                                              for f in sorted(held, key=lambda f: f.raw_hash)])
                if frames is not None:
                    mkey = manifest_key(insp.payload.artifact_hash)
                    self._clear_marks(conn, [mkey])
                    if self.blobs.size(mkey) is None:
                        self.blobs.put_bytes(mkey, insp.payload.to_bytes())
            self._clear_marks(conn, [key])
            # no committed release names this key and this transaction holds the version: what is
            # there was left by a killed commit or a deleted release, and is replaced
            stored = True
            self.blobs.put_file(key, upload.path)
            self._upsert_package(conn, upload, insp, stamp)
            stop_point("registry.commit")  # crash tests: the artifact stored, rows not committed
            rel = self.release(scoped, upload.version, conn=conn)
            assert rel is not None
            doc = self.release_doc(rel, already_existed=False, chunks_new=chunks_new)
        except BaseException:
            if stored:  # before the rollback: this transaction's row locks still keep everyone else away
                with contextlib.suppress(Exception):
                    self.blobs.delete(key)
            raise
        return 201, doc

    def _upsert_package(self, conn: Connection, upload: Upload, insp: Inspection, stamp: str) -> None:
        manifest = insp.manifest
        meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        description = str(manifest.get("description") or meta.get("description") or "")
        name = str(meta.get("display_name") or manifest.get("name") or upload.slug)
        created = self.index.all(conn, "INSERT INTO packages(scoped_id, publisher, slug, name, description, "
                                       "latest_version, created_at, updated_at) VALUES(:s, :p, :slug, :n, :d, :v, "
                                       ":t, :t) ON CONFLICT(scoped_id) DO NOTHING RETURNING scoped_id",
                                 s=upload.scoped_id, p=upload.publisher, slug=upload.slug, n=name, d=description,
                                 v=upload.version, t=stamp)
        if created:
            return
        latest = self._refresh_latest(conn, upload.scoped_id, stamp)
        if latest == upload.version:
            self.index.run(conn, "UPDATE packages SET name=:n, description=:d WHERE scoped_id=:s",
                           {"n": name, "d": description, "s": upload.scoped_id})

    def _refresh_latest(self, conn: Connection, scoped_id: str, stamp: str) -> str | None:
        """Set a capsule's ``latest_version``: its newest version that is not yanked (the newest of all when
        every one is yanked, so the capsule still has a detail page). Returns it (None: no release left).

        Locks the package row first, so concurrent publishes of one capsule take turns here and the
        last one sees every committed release."""
        self.index.one(conn, f"SELECT scoped_id FROM packages WHERE scoped_id=:s{self.index.for_update}", s=scoped_id)
        rows = self.index.all(conn, "SELECT version, yanked_at FROM releases WHERE scoped_id=:s", s=scoped_id)
        latest = names.latest([r["version"] for r in rows if r["yanked_at"] is None]) or \
            names.latest([r["version"] for r in rows])
        if latest is not None:
            self.index.run(conn, "UPDATE packages SET latest_version=:v, updated_at=:t WHERE scoped_id=:s",
                           {"v": latest, "t": stamp, "s": scoped_id})
        return latest

    def yank(self, publisher: str, slug: str, version: str, yanked: bool = True) -> dict[str, Any]:
        """Yank (or, with ``yanked=False``, restore) one version, as ``cargo yank`` does: a yanked version is
        not listed by search and never chosen as "latest", but its exact version stays downloadable."""
        scoped = check_scope(publisher, slug)
        check_version(version)

        def work(conn: Connection) -> dict[str, Any]:
            rel = self.index.one(conn, "SELECT yanked_at FROM releases WHERE scoped_id=:s AND version=:v"
                                       f"{self.index.for_update}", s=scoped, v=version)
            if rel is None:
                raise RegistryError(404, "version_not_found", f"Version '{version}' not found")
            stamp = now()
            when = (rel["yanked_at"] or stamp) if yanked else None
            self.index.run(conn, "UPDATE releases SET yanked_at=:w WHERE scoped_id=:s AND version=:v",
                           {"w": when, "s": scoped, "v": version})
            latest = self._refresh_latest(conn, scoped, stamp)
            return {"scoped_id": scoped, "version": version, "yanked": yanked, "yanked_at": when,
                    "latest_version": latest}
        return self.index.transaction(work)

    # ------------------------------------------------------------------ runtime config, delete, gc

    def put_runtime_config(self, scoped_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        if self.package(scoped_id) is None:
            raise RegistryError(404, "not_found", "Capsule not found")
        normalized = normalize_runtime_config(doc)

        def work(conn: Connection) -> None:
            if normalized["targets"] or normalized.get("selected_target"):
                self.index.run(conn, "INSERT INTO runtime_configs(scoped_id, doc, updated_at) VALUES(:s, :d, :t) "
                                     "ON CONFLICT(scoped_id) DO UPDATE SET doc=excluded.doc, "
                                     "updated_at=excluded.updated_at",
                               {"s": scoped_id, "d": json.dumps(normalized, sort_keys=True), "t": now()})
            else:
                self.index.run(conn, "DELETE FROM runtime_configs WHERE scoped_id=:s", {"s": scoped_id})
        self.index.transaction(work)
        return normalized

    def delete(self, publisher: str, slug: str, version: str | None) -> dict[str, Any]:
        """Remove a release (or every release of a capsule) from the index in one transaction; its files
        are marked for the GC sweep (:meth:`gc`), which removes them after the grace period."""
        scoped = check_scope(publisher, slug)
        if version is not None:
            check_version(version)

        def work(conn: Connection) -> dict[str, Any]:
            pkg = self.index.one(conn, f"SELECT scoped_id FROM packages WHERE scoped_id=:s{self.index.for_update}",
                                 s=scoped)
            if pkg is None:
                raise RegistryError(404, "not_found", "Capsule not found")
            doomed = self.index.all(conn, "SELECT version, file_name, payload_hash, artifact_key FROM releases "
                                          "WHERE scoped_id=:s" + ("" if version is None else " AND version=:v"),
                                    s=scoped, v=version)
            if not doomed:
                raise RegistryError(404, "version_not_found", f"Version '{version}' not found")
            candidates = sorted({r["raw_hash"] for r in self.index.values_in(
                conn, "SELECT raw_hash FROM release_chunks WHERE scoped_id=:s AND version IN :keys",
                [r["version"] for r in doomed], s=scoped)})
            for r in doomed:
                self.index.run(conn, "DELETE FROM release_chunks WHERE scoped_id=:s AND version=:v",
                               {"s": scoped, "v": r["version"]})
                self.index.run(conn, "DELETE FROM releases WHERE scoped_id=:s AND version=:v",
                               {"s": scoped, "v": r["version"]})
            remaining = self.index.scalar(conn, "SELECT COUNT(*) FROM releases WHERE scoped_id=:s", s=scoped)
            removed_capsule = not remaining
            if removed_capsule:
                self.index.run(conn, "DELETE FROM packages WHERE scoped_id=:s", {"s": scoped})
                self.index.run(conn, "DELETE FROM runtime_configs WHERE scoped_id=:s", {"s": scoped})
            else:
                self._refresh_latest(conn, scoped, now())
            doomed_keys = [self.release_key(r) for r in doomed]
            candidates = sorted(set(candidates) | {r["raw_hash"] for r in self.index.values_in(
                conn, "SELECT raw_hash FROM chunks WHERE blob_key IN :keys", doomed_keys)})
            # lock the candidate chunk rows (a publish relying on one holds it FOR SHARE until it commits),
            # then look again at what still references them
            rows = self.index.values_in(conn, "SELECT raw_hash, blob_key FROM chunks WHERE raw_hash IN :keys "
                                              f"ORDER BY raw_hash{self.index.for_update}", candidates)
            located = {r["raw_hash"]: r["blob_key"] for r in rows}
            live: set[str] = set()
            holders: dict[str, tuple[str, int]] = {}
            for r in self.index.values_in(
                    conn, "SELECT rc.raw_hash, r.artifact_key, r.scoped_id, r.version, r.file_name, rc.frame_offset "
                          "FROM release_chunks rc JOIN releases r ON r.scoped_id = rc.scoped_id AND "
                          "r.version = rc.version WHERE rc.raw_hash IN :keys ORDER BY rc.raw_hash, r.scoped_id, "
                          "r.version", candidates):
                live.add(r["raw_hash"])
                if r["frame_offset"] is not None:
                    holders.setdefault(r["raw_hash"], (self.release_key(r), int(r["frame_offset"])))
            gone = set(doomed_keys)
            dead = [h for h in sorted(located) if h not in live]
            moved = [{"h": h, "k": holders[h][0], "o": holders[h][1]} for h in sorted(located)
                     if h in live and located[h] in gone and h in holders]
            if moved:  # still used: served from another artifact that holds the same frame
                self.index.run(conn, "UPDATE chunks SET blob_key=:k, blob_offset=:o WHERE raw_hash=:h", moved)
            dead_keys = [located[h] for h in dead if located[h] is not None and located[h] not in gone]
            self.index.values_in(conn, "DELETE FROM chunks WHERE raw_hash IN :keys RETURNING raw_hash", dead)
            payloads = {r["payload_hash"] for r in doomed}
            live_payloads = {r["payload_hash"] for r in self.index.values_in(
                conn, "SELECT DISTINCT payload_hash FROM releases WHERE payload_hash IN :keys", payloads)}
            self._mark(conn, dead_keys + [manifest_key(p) for p in payloads - live_payloads] + doomed_keys)
            return {"deleted": True, "scoped_id": scoped, "removed_capsule": removed_capsule,
                    "removed_versions": [r["version"] for r in
                                         sorted(doomed, key=lambda r: names.version_key(r["version"]), reverse=True)],
                    "removed_chunks": len(dead)}
        return self.index.transaction(work)

    def gc(self, grace: float = GC_GRACE_SECONDS, *, limit: int = 1000) -> dict[str, Any]:
        """Sweep what nothing references: expired upload sessions, then files marked longer than
        ``grace`` seconds ago, and only those marked before every open upload session began (a
        session may have been told the registry holds a chunk that was deleted after). Safe to run
        from every worker at once: each mark is swept by one transaction, which checks again under
        its row lock that nothing references the file."""
        stamp = time.time()
        expired = self._sweep_sessions(stamp)
        with self.index.read() as conn:
            oldest = self.index.scalar(conn, "SELECT MIN(created_at) FROM upload_sessions WHERE expires_at >= :t",
                                       t=stamp)
            cutoff = min(stamp - grace, oldest if oldest is not None else stamp)
            keys = [r["key"] for r in self.index.all(conn, "SELECT key FROM gc_marks WHERE marked_at < :c "
                                                           "ORDER BY key LIMIT :n", c=cutoff, n=limit)]
        removed = kept = 0
        freed = 0
        for key in keys:
            result = self._sweep_mark(key, cutoff)
            if result is None:
                kept += 1
            else:
                removed += 1
                freed += result
        if self.index.kind == "sqlite" and (removed or expired):
            with self.index.read() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"sessions_expired": expired, "files_removed": removed, "marks_kept": kept, "bytes_freed": freed}

    def _sweep_mark(self, key: str, cutoff: float) -> int | None:
        """Remove the blob of one mark set before ``cutoff`` if nothing references it, in one
        transaction holding the mark's row lock. Returns the bytes freed (None: kept or not marked)."""
        def sweep_one(conn: Connection) -> int | None:
            if not self.index.all(conn, "DELETE FROM gc_marks WHERE key=:k AND marked_at < :c RETURNING key",
                                  k=key, c=cutoff):
                return None  # swept by another worker, or a publish took it back
            if self._referenced(conn, key):
                return None
            return self._remove_file(key)
        return self.index.transaction(sweep_one)

    def _sweep_now(self, keys: list[str]) -> None:
        """Sweep this request's own marks at once (what it wrote is not used after all); anything
        left is the GC's, after the grace period."""
        for key in keys:
            with contextlib.suppress(Exception):
                self._sweep_mark(key, float("inf"))

    def _referenced(self, conn: Connection, key: str) -> bool:
        """Whether any row names the blob ``key`` (checked under the mark's row lock by a sweep)."""
        payload = manifest_hash_of(key)
        if payload is not None:
            return self.index.one(conn, "SELECT 1 AS x FROM releases WHERE payload_hash=:h", h=payload) is not None
        for sql in ("SELECT 1 AS x FROM releases WHERE artifact_key=:k", "SELECT 1 AS x FROM chunks WHERE blob_key=:k",
                    "SELECT 1 AS x FROM session_chunks WHERE blob_key=:k"):
            if self.index.one(conn, sql, k=key) is not None:
                return True
        return False

    def _remove_file(self, key: str) -> int:
        return self.blobs.delete(key)

    def _sweep_sessions(self, stamp: float) -> int:
        with self.index.write() as conn:
            gone = [r["session_id"] for r in self.index.all(
                conn, "SELECT session_id FROM upload_sessions WHERE expires_at < :t", t=stamp)]
            keys = self._end_sessions(conn, gone) if gone else []
        self._remove_blobs(keys)
        return len(gone)


class _LostRace(Exception):
    """The release row of this version was committed by another publish first."""


def artifact_key(scoped_id: str, version: str, file_name: str) -> str:
    return f"artifacts/{scoped_id}/{version}/{file_name}"


def standalone_chunk_key(raw_hash: str) -> str:
    """A chunk stored on its own (``PUT /v1/chunks/{hash}`` outside a session)."""
    return f"chunks/{raw_hash}.zst"


def manifest_key(payload_hash: str) -> str:
    return f"manifests/{payload_hash}.json"


def legacy_manifest_key(payload_hash: str) -> str:
    """Where a data dir of an earlier version keeps a payload manifest (read, never written)."""
    return f"cas/manifests/blake3/{payload_hash}.json"


def manifest_hash_of(key: str) -> str | None:
    for prefix in ("manifests/", "cas/manifests/blake3/"):
        if key.startswith(prefix) and key.endswith(".json"):
            return key[len(prefix):-len(".json")]
    return None


@dataclass(frozen=True)
class Piece:
    """Bytes of one blob: ``size`` bytes from ``offset`` of ``key``."""

    key: str
    offset: int
    size: int


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of one blob merged into runs of at most :data:`RUN_BYTES` (one read or request each)."""
    runs: list[Piece] = []
    for p in pieces:
        last = runs[-1] if runs else None
        if last is not None and last.key == p.key and last.offset + last.size == p.offset \
                and last.size + p.size <= RUN_BYTES:
            runs[-1] = Piece(last.key, last.offset, last.size + p.size)
        else:
            runs.append(p)
    return runs


PERMISSION_MODES = ("sandbox", "dangerous")


def normalize_runtime_config(doc: Any) -> dict[str, Any]:
    """``{selected_target?, targets: {label: {port?, env?, permission_mode?}}}``, trimmed; empty parts dropped."""
    if not isinstance(doc, dict):
        raise RegistryError(400, "invalid_runtime_config", "runtime config must be a JSON object")
    out: dict[str, Any] = {}
    selected = doc.get("selected_target")
    if selected is not None:
        if not isinstance(selected, str):
            raise RegistryError(400, "invalid_runtime_config", "selected_target must be a string")
        if selected.strip():
            out["selected_target"] = selected.strip()
    targets_in = doc.get("targets")
    targets_in = {} if targets_in is None else targets_in
    if not isinstance(targets_in, dict):
        raise RegistryError(400, "invalid_runtime_config", "targets must be an object")
    targets: dict[str, Any] = {}
    for raw_label, cfg in targets_in.items():
        target_label = str(raw_label).strip()
        if not target_label:
            continue
        if not isinstance(cfg, dict):
            raise RegistryError(400, "invalid_runtime_config", f"targets.{target_label} must be an object")
        entry: dict[str, Any] = {}
        port = cfg.get("port")
        if port is not None and port != "":
            if isinstance(port, str) and port.strip().isdigit():
                port = int(port.strip())
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise RegistryError(400, "invalid_port", "port must be between 1 and 65535")
            entry["port"] = port
        env_in = cfg.get("env") or {}
        if not isinstance(env_in, dict):
            raise RegistryError(400, "invalid_env", f"targets.{target_label}.env must be an object")
        env = {}
        for k, v in env_in.items():
            key = str(k).strip()
            if not key:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise RegistryError(400, "invalid_env", f"env name {key!r} is not a valid variable name")
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise RegistryError(400, "invalid_env", f"env {key} must be a string")
            env[key] = str(v)
        if env:
            entry["env"] = env
        mode = cfg.get("permission_mode")
        if mode not in (None, "", "standard"):
            if mode not in PERMISSION_MODES:
                raise RegistryError(400, "invalid_permission_mode", "permission_mode must be sandbox or dangerous")
            entry["permission_mode"] = mode
        if entry:
            targets[target_label] = entry
    out["targets"] = targets
    return out


def display_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as the UI and the detail route show it: ``distribution.chunk_list`` (thousands of
    entries for a large payload) is replaced by its length, ``chunk_count``."""
    doc = json_safe(manifest)
    dist = doc.get("distribution")
    if isinstance(dist, dict) and isinstance(dist.get("chunk_list"), list):
        dist = dict(dist)
        dist["chunk_count"] = len(dist.pop("chunk_list"))
        doc["distribution"] = dist
    return doc
