"""Registry storage: the SQLite index, a CAS and the artifact files, under one data dir.

Layout of ``<data>`` (default ``$ATO_HOME/local-registry``)::

    registry.sqlite3            the index (WAL, synchronous=FULL, busy timeout 30 s)
    artifacts/<p>/<s>/<v>/<f>   the published ``.capsule`` bytes, verbatim
    cas/packs/<blake3>.capsule  the same file (a hard link): a published artifact is the pack of its
                                chunks, so the registry holds each payload once, never one file per chunk
    cas/index.sqlite            the CAS index (cas.index): chunk -> (pack, offset, frame), and the
                                payload manifests of published releases
    tmp/                        uploads in flight and chunk-upload sessions (temp names of
                                cas.tempfiles: swept at start-up once their process is gone)

Index tables: ``packages`` (one row per publisher/slug), ``releases`` (digests,
sizes, the skeleton geometry and the frame layout used for delta installs, the
manifest text and README), ``runtime_configs`` (per-capsule run overrides from the
web UI). (``chunks`` is a table of earlier versions, no longer used.) Chunks are
served from the artifacts that hold them (the CAS index says where).

Commit rule: everything about an upload is checked before anything is written
(both digests, then the format's one verifier, :func:`stages.capsule.verify`: every member,
the signature, every chunk under the decoding caps, every payload entry, the payload ceiling;
then manifest name/version against the path). The
commit then runs under one process-wide lock and one ``BEGIN IMMEDIATE``
transaction (which also serialises several server processes on one data dir):
the artifact is linked into place and indexed as a pack, rows inserted,
and the transaction committed. Any failure rolls the transaction back and
removes every file and directory the commit created, so the data dir is as it
was. The only files outside that rule are SQLite's ``-shm`` index (rewritten by
readers; it holds no data) and ``tmp/``, which holds only in-flight work.

``--allow-existing`` is decided by the artifact digests: the same version with
the same SHA-256 and BLAKE3 is answered 200 ``already_existed: true`` and
nothing is written; anything else for an existing version is 409
``version_exists``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import tomli_w
import zstandard

from cas.atomic import fsync_dir
from cas.digest import DigestError, label, parse, write_hashed
from cas.frames import ChunkError
from cas.index import Location
from cas.packs import FrameSpan, frames_at
from cas.payload_manifest import MAX_CHUNK, PayloadManifest
from cas.stoppoints import stop_point
from cas.store import CasStore
from cas.tempfiles import SweepReport, sweep, temp_name, temp_path
from pipeline import names
from pipeline.errors import AtoError, printable
from stages.capsule import Limits, consumer_limits, read_capsule, verify
from stages.capsule.payload import FrameError, FrameRef, check_frame, decode_frame, read_frame
from stages.capsule.signature import SignatureInfo, check_signature

SCHEMA_VERSION = "ato-local-registry-2"
README_LIMIT = 512 * 1024
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")
SESSION_TTL_SECONDS = 3600
RELEASE_SUMMARY = ("scoped_id, version, file_name, sha256, blake3, size_bytes, manifest_hash, payload_hash, "
                   "chunk_count, layout IS NOT NULL AS spliceable, created_at, signed, signer_key_id, signed_at, "
                   "yanked_at, json_extract(manifest_json, '$.metadata') AS metadata_json")
# Columns added after schema ato-local-registry-2 first shipped: added in place by initialize().
RELEASE_COLUMNS_ADDED = (("signed", "INTEGER"), ("signer_key_id", "TEXT"), ("signed_at", "TEXT"),
                         ("yanked_at", "TEXT"))
SEARCH_LIMIT_MAX = 50
RUN_BYTES = 4 << 20  # frames served per read
# A release is visible (searchable, eligible as "latest") unless it is yanked.
_VISIBLE = "EXISTS (SELECT 1 FROM releases r WHERE r.scoped_id = packages.scoped_id AND r.yanked_at IS NULL)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages(
  scoped_id TEXT PRIMARY KEY, publisher TEXT NOT NULL, slug TEXT NOT NULL, name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '', latest_version TEXT NOT NULL,
  created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases(
  scoped_id TEXT NOT NULL, version TEXT NOT NULL, file_name TEXT NOT NULL,
  sha256 TEXT NOT NULL, blake3 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
  manifest_hash TEXT NOT NULL, payload_hash TEXT NOT NULL,
  prefix_size INTEGER NOT NULL, payload_size INTEGER NOT NULL, suffix_size INTEGER NOT NULL,
  chunk_count INTEGER NOT NULL, layout TEXT,
  manifest_toml TEXT NOT NULL, manifest_json TEXT NOT NULL, readme TEXT, readme_name TEXT,
  created_at TEXT NOT NULL, signed INTEGER, signer_key_id TEXT, signed_at TEXT, yanked_at TEXT,
  PRIMARY KEY(scoped_id, version));
CREATE TABLE IF NOT EXISTS chunks(
  raw_hash TEXT PRIMARY KEY, raw_size INTEGER NOT NULL, frame_size INTEGER NOT NULL,
  frame_blake3 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runtime_configs(
  scoped_id TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_at TEXT NOT NULL);
"""


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
    rows: list[sqlite3.Row]
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


@dataclass
class _Undo:
    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def mkdirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
                self.dirs.append(d)

    def run(self) -> None:
        for f in reversed(self.files):
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


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
    """The data dir of one registry. Thread-safe; one instance per server process."""

    def __init__(self, data_dir: Path, limits: Limits | None = None) -> None:
        self.limits = limits or consumer_limits()  # the decoded-payload ceiling an upload must stay under
        self.root = Path(data_dir)
        self.db_path = self.root / "registry.sqlite3"
        self.cas = CasStore(self.root / "cas")
        self.artifacts = self.root / "artifacts"
        self.tmp = self.root / "tmp"
        # chunk-upload sessions of this process: a killed server's sessions are swept with its other temps
        self.sessions = self.tmp / temp_name("sessions")
        self._local = threading.local()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup

    def initialize(self) -> None:
        """Create the layout and schema; sweep the temp files of servers that are no longer running."""
        for d in (self.root, self.artifacts, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.sweep_temps()
        conn = self.conn()
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with conn:
                conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise AtoError("E100", f"{self.db_path} has index schema {row[0]!r}; this ato expects "
                                   f"{SCHEMA_VERSION!r}", hint="use another --data-dir or remove the old one")
        self._add_release_columns(conn)
        self._packs_match_releases()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _packs_match_releases(self) -> None:
        """Every spliceable release's artifact is indexed as a pack, and no pack outlives its release.

        Brings a data dir of an earlier version (one file per chunk under ``cas/objects``, manifests
        as files) onto packs, and drops the pack a commit killed before its rows were written left.
        """
        cas = self.cas
        wanted: dict[str, sqlite3.Row] = {}
        for rel in self.conn().execute("SELECT scoped_id, version, file_name, blake3, payload_hash, prefix_size, "
                                       "layout FROM releases"):
            wanted[f"{rel['blake3']}.capsule"] = rel
        with cas.exclusive():
            for name in cas.packs.files():
                if name.endswith(".capsule") and name not in wanted:
                    cas.packs.remove_pack(name)
            for name, rel in wanted.items():
                if rel["layout"] is None or cas.packs.index.pack_entries(name):
                    continue
                path = self.artifact_path(rel["scoped_id"], rel["version"], rel["file_name"])
                frames = [FrameRef.from_json(f) for f in json.loads(rel["layout"])]
                with contextlib.suppress(OSError):
                    cas.adopt_artifact(path, rel["blake3"], frames_at(rel["prefix_size"], frames))
                    if not cas.has_manifest(rel["payload_hash"]):
                        cas.put_manifest(read_capsule(path).payload_manifest)
            for h in cas.legacy_manifest_hashes():
                with contextlib.suppress(OSError, ValueError):
                    cas.get_manifest(h)  # copied into the index
            shutil.rmtree(cas.objects.root / "objects", ignore_errors=True)
            shutil.rmtree(cas.manifest_dir.parent, ignore_errors=True)

    def _add_release_columns(self, conn: sqlite3.Connection) -> None:
        """Bring an index written before signer and yank columns existed up to date, in one transaction:
        add the columns, then record each release's signature from its artifact's signature.json."""
        have = {r[1] for r in conn.execute("PRAGMA table_info(releases)")}
        missing = [(n, t) for n, t in RELEASE_COLUMNS_ADDED if n not in have]
        unknown = conn.execute("SELECT scoped_id, version, file_name FROM releases WHERE signed IS NULL").fetchall() \
            if not missing else conn.execute("SELECT scoped_id, version, file_name FROM releases").fetchall()
        if not missing and not unknown:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for col, kind in missing:
                conn.execute(f"ALTER TABLE releases ADD COLUMN {col} {kind}")
            for rel in unknown:
                info = SignatureInfo(False)
                with contextlib.suppress(AtoError, OSError):
                    path = self.artifact_path(rel["scoped_id"], rel["version"], rel["file_name"])
                    info = check_signature(read_capsule(path).signature_doc)
                conn.execute("UPDATE releases SET signed=?, signer_key_id=?, signed_at=? WHERE scoped_id=? AND "
                             "version=?", (int(info.signed), info.key_id, info.signed_at, rel["scoped_id"],
                                           rel["version"]))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """On a clean shutdown: drop this server's unfinished chunk-upload sessions (they die with it)."""
        shutil.rmtree(self.sessions, ignore_errors=True)

    def new_temp(self, suffix: str = ".upload", name: str | None = None) -> Path:
        """A temp file in ``tmp/``; ``name`` (an upload's file_name) is what a refusal's message calls it."""
        return self.tmp / temp_name(name or "upload" + suffix)

    def sweep_temps(self, *, dry_run: bool = False) -> SweepReport:
        """Temp files and session dirs whose server process is gone (another live server keeps its own)."""
        return sweep([self.root, self.tmp, self.cas.packs.tmp], dry_run=dry_run)

    # ------------------------------------------------------------------ reads

    def package(self, scoped_id: str) -> sqlite3.Row | None:
        return self.conn().execute("SELECT * FROM packages WHERE scoped_id=?", (scoped_id,)).fetchone()

    def releases(self, scoped_id: str) -> list[sqlite3.Row]:
        """Every release of a capsule, newest version first, without the large columns."""
        rows = self.conn().execute(f"SELECT {RELEASE_SUMMARY} FROM releases WHERE scoped_id=?",
                                   (scoped_id,)).fetchall()
        return sorted(rows, key=lambda r: names.version_key(r["version"]), reverse=True)

    def release(self, scoped_id: str, version: str, *, summary: bool = False) -> sqlite3.Row | None:
        cols = RELEASE_SUMMARY if summary else "*"
        return self.conn().execute(f"SELECT {cols} FROM releases WHERE scoped_id=? AND version=?",
                                   (scoped_id, version)).fetchone()

    def resolve_release(self, publisher: str, slug: str, version: str | None) -> sqlite3.Row:
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

    def artifact_path(self, scoped_id: str, version: str, file_name: str) -> Path:
        publisher, slug = scoped_id.split("/")
        return self.artifacts / publisher / slug / version / file_name

    def search(self, q: str, limit: int, cursor: str | None = None) -> SearchPage:
        """One page of the capsules matching ``q`` (newest update first), the total count, and the opaque
        cursor of the next page. Capsules whose every version is yanked are not listed.

        The cursor names the last row shown (keyset paging), so a capsule published between two pages
        does not shift the next page (an offset would show a row twice); one updated meanwhile moves to
        the front. The cursor is bound to its query. A plain decimal cursor (what the reference
        server hands out) is still read as an offset."""
        text = q.strip().lower()
        where = [_VISIBLE]
        args: list[Any] = []
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(lower(slug) LIKE ? ESCAPE '\\' OR lower(name) LIKE ? ESCAPE '\\'"
                         " OR lower(description) LIKE ? ESCAPE '\\' OR lower(scoped_id) LIKE ? ESCAPE '\\')")
            args = [like, like, like, like]
        conn = self.conn()
        total = conn.execute(f"SELECT COUNT(*) FROM packages WHERE {' AND '.join(where)}", args).fetchone()[0]
        offset = 0
        if cursor and cursor.isdigit():
            offset = int(cursor)
        elif cursor:
            after = decode_cursor(cursor, text)
            where.append("(updated_at < ? OR (updated_at = ? AND scoped_id > ?))")
            args += [after[0], after[0], after[1]]
        sql = (f"SELECT * FROM packages WHERE {' AND '.join(where)} ORDER BY updated_at DESC, scoped_id ASC "
               "LIMIT ? OFFSET ?")
        rows = conn.execute(sql, (*args, limit + 1, offset)).fetchall()
        page = rows[:limit]
        nxt = encode_cursor(page[-1]["updated_at"], page[-1]["scoped_id"], text) if len(rows) > limit else None
        return SearchPage(page, total, nxt)

    def search_all(self) -> Iterator[sqlite3.Row]:
        """Every listed capsule, page by page."""
        cursor: str | None = None
        while True:
            page = self.search("", SEARCH_LIMIT_MAX, cursor)
            yield from page.rows
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def runtime_config(self, scoped_id: str) -> dict[str, Any] | None:
        row = self.conn().execute("SELECT doc FROM runtime_configs WHERE scoped_id=?", (scoped_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def skeleton(self, rel: sqlite3.Row) -> dict[str, Any]:
        """Prefix and suffix bytes plus the ordered frames: everything a client splices an artifact from."""
        if rel["layout"] is None:
            raise RegistryError(409, "not_spliceable", "this release's payload frames do not match its chunks; "
                                "download the artifact instead")
        path = self.artifact_path(rel["scoped_id"], rel["version"], rel["file_name"])
        with open(path, "rb") as fh:
            prefix = fh.read(rel["prefix_size"])
            fh.seek(rel["prefix_size"] + rel["payload_size"])
            suffix = fh.read()
        return {
            "scoped_id": rel["scoped_id"], "version": rel["version"], "file_name": rel["file_name"],
            "size_bytes": rel["size_bytes"], "sha256": "sha256:" + rel["sha256"], "blake3": label(rel["blake3"]),
            "payload_hash": label(rel["payload_hash"]), "payload_size": rel["payload_size"],
            "prefix": base64.b64encode(prefix).decode("ascii"),
            "suffix": base64.b64encode(suffix).decode("ascii"),
            "frames": json.loads(rel["layout"]),
        }

    def chunk_frame(self, raw_hash: str) -> bytes | None:
        """The stored frame of one chunk (checked against its frame digest), or None."""
        try:
            return self.cas.frame(raw_hash)
        except ChunkError as exc:
            if exc.kind == "missing":
                return None
            raise RegistryError(500, "storage_error", str(exc)) from None

    def frame_runs(self, hexes: list[str]) -> tuple[int, list[tuple[FrameSpan, list[Location]]]]:
        """The frames of ``hexes`` in order as runs of contiguous bytes in their packs: (total size, runs).
        Missing chunks are a 404 naming them."""
        found = self.cas.packs.locate_many(hexes)
        missing = [label(h) for h in hexes if h not in found]
        if missing:
            with self._lock:  # a commit in flight indexes its artifact just after its rows: wait for it
                found = self.cas.packs.locate_many(hexes)
            missing = [label(h) for h in hexes if h not in found]
        if missing:
            raise RegistryError(404, "not_found", f"{len(missing)} chunk(s) not found", missing_chunks=missing)
        runs: list[tuple[FrameSpan, list[Location]]] = []
        for span, frames in self.cas.packs.spans(hexes, found):
            start = 0
            while start < len(frames):  # pieces of about RUN_BYTES, cut between frames
                end, size = start, 0
                while end < len(frames) and (end == start or size + frames[end].length <= RUN_BYTES):
                    size += frames[end].length
                    end += 1
                part = frames[start:end]
                runs.append((FrameSpan(span.pack, part[0].offset, size), part))
                start = end
        return sum(found[h].length for h in hexes), runs

    def read_run(self, span: FrameSpan, frames: list[Location]) -> bytes:
        try:
            return bytes(self.cas.packs.checked_span(span, frames))
        except ChunkError as exc:
            raise RegistryError(500, "storage_error", str(exc)) from None

    def known_frames(self, hexes: list[str]) -> dict[str, str]:
        """raw hash → frame BLAKE3 of the chunks the registry holds."""
        return {h: where.frame_hash.hex() for h, where in self.cas.packs.locate_many(hexes).items()}

    def payload_manifest_bytes(self, payload_hash: str) -> bytes | None:
        try:
            return self.cas.get_manifest(payload_hash).to_bytes()
        except (ChunkError, ValueError):
            return None

    # ------------------------------------------------------------------ chunk sessions

    def session_dir(self, session: str) -> Path:
        if not SESSION_RE.match(session or ""):
            raise RegistryError(400, "invalid_session", "session must be the session_id negotiate returned")
        return self.sessions / session

    def negotiate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Which chunks an uploader must send; also refuses a version conflict before any upload."""
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
        return {"session_id": secrets.token_hex(16), "missing_chunks": missing, "frame_conflicts": conflicts,
                "total_chunks": len(wanted), "existing": existing}

    def stage_frames(self, session: str, source: Path) -> list[dict[str, Any]]:
        """Keep an uploaded run of frames in the session as it came (one file, not one per frame),
        each frame decoded and checked, with an index of where each chunk's frame is in it."""
        sdir = self.session_dir(session)
        self._sweep_sessions()
        sdir.mkdir(parents=True, exist_ok=True)
        known = self._session_index(sdir)
        out: list[dict[str, Any]] = []
        spans: dict[str, list[int]] = {}
        body = sdir / f"body-{secrets.token_hex(8)}.frames"
        with open(source, "rb") as fh:
            while True:
                offset = fh.tell()
                try:
                    frame = read_frame(fh)
                except FrameError as exc:
                    raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
                if frame is None:
                    break
                raw_hash, size = self._decode_checked(frame, None)
                inserted = raw_hash not in known and raw_hash not in spans
                if inserted:
                    spans[raw_hash] = [offset, len(frame)]
                out.append({"raw_hash": label(raw_hash), "raw_size": size, "inserted": inserted,
                            "zstd_size": len(frame)})
        if spans:
            os.link(source, body)
            _write_json(body.with_suffix(".json"), {h: [body.name, *at] for h, at in spans.items()})
        return out

    def stage_chunk(self, session: str | None, raw_hash: str, raw_size: int, frame: bytes) -> dict[str, Any]:
        """``PUT /v1/chunks/{hash}``: into a session, or (no session) straight into the CAS as a one-frame pack."""
        try:
            check_frame(frame, raw_hash, raw_size)
        except (FrameError, zstandard.ZstdError) as exc:
            raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
        if session is not None:
            sdir = self.session_dir(session)
            self._sweep_sessions()
            sdir.mkdir(parents=True, exist_ok=True)
            inserted = raw_hash not in self._session_index(sdir)
            if inserted:
                body = sdir / f"chunk-{raw_hash}.frames"
                tmp = temp_path(body)
                tmp.write_bytes(frame)
                os.replace(tmp, body)
                _write_json(body.with_suffix(".json"), {raw_hash: [body.name, 0, len(frame)]})
            return {"raw_hash": label(raw_hash), "raw_size": raw_size, "inserted": inserted, "zstd_size": len(frame)}
        with self.cas.shared():
            inserted = self.cas.locate(raw_hash) is None
            if inserted:
                with self.cas.packs.writer() as w:
                    w.add(raw_hash, frame, raw_size)
                    w.commit()
        return {"raw_hash": label(raw_hash), "inserted": inserted, "zstd_size": len(frame)}

    def _decode_checked(self, frame: bytes, expect: tuple[str, int] | None) -> tuple[str, int]:
        try:
            size = zstandard.get_frame_parameters(frame).content_size
            raw = decode_frame(frame, size)
        except (FrameError, zstandard.ZstdError) as exc:
            raise RegistryError(422, "chunk_validation_failed", str(exc)) from None
        return blake3.blake3(raw).hexdigest(), size

    @staticmethod
    def _session_index(sdir: Path) -> dict[str, list[Any]]:
        """raw hash → [file, offset, size] of every frame staged in a session."""
        out: dict[str, list[Any]] = {}
        for p in sorted(sdir.glob("*.json")) if sdir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out.update(json.loads(p.read_bytes()))
        return out

    def _sweep_sessions(self) -> None:
        cutoff = time.time() - SESSION_TTL_SECONDS
        root = self.sessions
        for d in root.iterdir() if root.is_dir() else []:
            with contextlib.suppress(OSError):
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)

    def drop_session(self, session: str | None) -> None:
        if session:
            with contextlib.suppress(RegistryError):
                shutil.rmtree(self.session_dir(session), ignore_errors=True)
            with contextlib.suppress(OSError):
                self.sessions.rmdir()  # only when no other session is open

    def reconstruct(self, session: str | None, prefix: bytes, suffix: bytes,
                    chunks: list[tuple[str, int]], file_name: str | None = None) -> tuple[Path, str, str, int]:
        """Rebuild a candidate artifact from prefix + frames (session or CAS) + suffix in ``tmp/``.

        Returns ``(path, sha256 hex, blake3 hex, size)``. Missing frames → 400 ``missing_chunks``.
        """
        sdir = self.session_dir(session) if session else None
        staged = self._session_index(sdir) if sdir is not None else {}
        stored = self.cas.packs.locate_many(h for h, _s in chunks if h not in staged)
        pieces: list[tuple[Path, int, int]] = []
        missing: list[str] = []
        for raw, _size in chunks:
            if raw in staged:
                name, offset, length = staged[raw]
                pieces.append((sdir / name, offset, length))  # type: ignore[operator]
            elif raw in stored:
                where = stored[raw]
                pieces.append((self.cas.packs.directory / where.pack, where.offset, where.length))
            else:
                missing.append(label(raw))
        if missing:
            raise RegistryError(400, "missing_chunks", f"{len(missing)} chunk(s) were neither uploaded nor stored: "
                                f"{', '.join(missing[:5])}", missing_chunks=missing)
        out = self.new_temp(".capsule", file_name)
        with self.cas.shared():  # the packs read here stay where the index says
            sha, b3, size = write_hashed(out, _iter_pieces(prefix, pieces, suffix))
        return out, sha, b3, size

    # ------------------------------------------------------------------ publish

    def existing_outcome(self, rel: sqlite3.Row, upload: Upload) -> dict[str, Any]:
        if not upload.allow_existing:
            raise RegistryError(409, "version_exists", "same version is already published")
        if rel["sha256"] != upload.sha256 or rel["blake3"] != upload.blake3:
            raise RegistryError(409, "version_exists", "same version is already published (artifact digest differs)")
        return self.release_doc(rel, already_existed=True)

    def release_doc(self, rel: sqlite3.Row, *, already_existed: bool, chunks_new: int = 0) -> dict[str, Any]:
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
        if rel is not None:  # advisory; decided again inside the transaction
            return 200, self.existing_outcome(rel, upload)
        insp = inspect_artifact(upload.path, upload.publisher, upload.slug, upload.version, self.limits)
        return self._commit(upload, insp)

    def _commit(self, upload: Upload, insp: Inspection) -> tuple[int, dict[str, Any]]:
        scoped = upload.scoped_id
        with self._lock, self.cas.shared():
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            undo = _Undo()
            try:
                rel = self.release(scoped, upload.version)
                if rel is not None:
                    conn.execute("ROLLBACK")
                    return 200, self.existing_outcome(rel, upload)
                frames = insp.frames
                chunks_new = 0
                known: dict[str, str] = {}
                if frames is not None:
                    known = self.known_frames([f.raw_hash for f in frames])
                    if any(known.get(f.raw_hash, f.frame_blake3) != f.frame_blake3 for f in frames):
                        frames = None  # the CAS holds other frames for some chunks: serve this release whole
                dest = self.artifact_path(scoped, upload.version, upload.file_name)
                undo.mkdirs(dest.parent)
                if dest.exists():
                    # no release row names it, and commits are serialised: a commit that was killed left it
                    dest.unlink()
                os.link(upload.path, dest)
                undo.files.append(dest)
                if frames is not None:
                    chunks_new = len({f.raw_hash for f in frames} - set(known))
                fsync_dir(dest.parent)
                stamp = now()
                layout = json.dumps([f.to_json() for f in frames], separators=(",", ":")) if frames else None
                conn.execute(
                    "INSERT INTO releases(scoped_id, version, file_name, sha256, blake3, size_bytes, manifest_hash,"
                    " payload_hash, prefix_size, payload_size, suffix_size, chunk_count, layout, manifest_toml,"
                    " manifest_json, readme, readme_name, created_at, signed, signer_key_id, signed_at)"
                    " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (scoped, upload.version, upload.file_name, upload.sha256, upload.blake3, upload.size,
                     insp.manifest_hash, insp.payload.artifact_hash, insp.prefix_size, insp.payload_size,
                     insp.suffix_size, len(insp.payload.chunks), layout, insp.manifest_toml, insp.manifest_json, insp.readme,
                     insp.readme_name, stamp, int(insp.signature.signed), insp.signature.key_id,
                     insp.signature.signed_at))
                self._upsert_package(conn, upload, insp, stamp)
                stop_point("registry.commit")  # crash tests: the artifact linked, rows not committed
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                undo.run()
                raise
            # The release row is the record; the CAS index is derived from it (a server killed right here
            # indexes the artifact at its next start): the artifact becomes the pack of its chunks.
            if frames is not None:
                self.cas.adopt_artifact(dest, upload.blake3, frames_at(insp.prefix_size, frames))
                self.cas.put_manifest(insp.payload)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            rel = self.release(scoped, upload.version)
        return 201, self.release_doc(rel, already_existed=False, chunks_new=chunks_new)

    def _upsert_package(self, conn: sqlite3.Connection, upload: Upload, insp: Inspection, stamp: str) -> None:
        manifest = insp.manifest
        meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        description = str(manifest.get("description") or meta.get("description") or "")
        name = str(meta.get("display_name") or manifest.get("name") or upload.slug)
        pkg = conn.execute("SELECT * FROM packages WHERE scoped_id=?", (upload.scoped_id,)).fetchone()
        if pkg is None:
            conn.execute("INSERT INTO packages(scoped_id, publisher, slug, name, description, latest_version,"
                         " created_at, updated_at) VALUES(?,?,?,?,?,?,?,?)",
                         (upload.scoped_id, upload.publisher, upload.slug, name, description, upload.version,
                          stamp, stamp))
            return
        latest = self._refresh_latest(conn, upload.scoped_id, stamp)
        if latest == upload.version:
            conn.execute("UPDATE packages SET name=?, description=? WHERE scoped_id=?",
                         (name, description, upload.scoped_id))

    @staticmethod
    def _refresh_latest(conn: sqlite3.Connection, scoped_id: str, stamp: str) -> str | None:
        """Set a capsule's ``latest_version``: its newest version that is not yanked (the newest of all when
        every one is yanked, so the capsule still has a detail page). Returns it (None: no release left)."""
        rows = conn.execute("SELECT version, yanked_at FROM releases WHERE scoped_id=?", (scoped_id,)).fetchall()
        latest = names.latest([r[0] for r in rows if r[1] is None]) or names.latest([r[0] for r in rows])
        if latest is not None:
            conn.execute("UPDATE packages SET latest_version=?, updated_at=? WHERE scoped_id=?",
                         (latest, stamp, scoped_id))
        return latest

    def yank(self, publisher: str, slug: str, version: str, yanked: bool = True) -> dict[str, Any]:
        """Yank (or, with ``yanked=False``, restore) one version, as ``cargo yank`` does: a yanked version is
        not listed by search and never chosen as "latest", but its exact version stays downloadable."""
        scoped = check_scope(publisher, slug)
        check_version(version)
        with self._lock:
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                rel = self.release(scoped, version, summary=True)
                if rel is None:
                    raise RegistryError(404, "version_not_found", f"Version '{version}' not found")
                stamp = now()
                when = (rel["yanked_at"] or stamp) if yanked else None
                conn.execute("UPDATE releases SET yanked_at=? WHERE scoped_id=? AND version=?",
                             (when, scoped, version))
                latest = self._refresh_latest(conn, scoped, stamp)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        return {"scoped_id": scoped, "version": version, "yanked": yanked, "yanked_at": when,
                "latest_version": latest}

    # ------------------------------------------------------------------ runtime config, delete

    def put_runtime_config(self, scoped_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        if self.package(scoped_id) is None:
            raise RegistryError(404, "not_found", "Capsule not found")
        normalized = normalize_runtime_config(doc)
        with self._lock:
            conn = self.conn()
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    if normalized["targets"] or normalized.get("selected_target"):
                        cur.execute("INSERT INTO runtime_configs(scoped_id, doc, updated_at) VALUES(?,?,?) "
                                    "ON CONFLICT(scoped_id) DO UPDATE SET doc=excluded.doc, "
                                    "updated_at=excluded.updated_at",
                                    (scoped_id, json.dumps(normalized, sort_keys=True), now()))
                    else:
                        cur.execute("DELETE FROM runtime_configs WHERE scoped_id=?", (scoped_id,))
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
        return normalized

    def delete(self, publisher: str, slug: str, version: str | None) -> dict[str, Any]:
        scoped = check_scope(publisher, slug)
        if version is not None:
            check_version(version)
        with self._lock:
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                pkg = self.package(scoped)
                if pkg is None:
                    raise RegistryError(404, "not_found", "Capsule not found")
                doomed = [self.release(scoped, r["version"]) for r in self.releases(scoped)] if version is None \
                    else [r for r in [self.release(scoped, version)] if r is not None]
                if not doomed:
                    raise RegistryError(404, "version_not_found", f"Version '{version}' not found")
                for r in doomed:
                    conn.execute("DELETE FROM releases WHERE scoped_id=? AND version=?", (scoped, r["version"]))
                remaining = [r["version"] for r in self.releases(scoped)]
                removed_capsule = not remaining
                if removed_capsule:
                    conn.execute("DELETE FROM packages WHERE scoped_id=?", (scoped,))
                    conn.execute("DELETE FROM runtime_configs WHERE scoped_id=?", (scoped,))
                else:
                    self._refresh_latest(conn, scoped, now())
                live_chunks: set[str] = set()
                live_payloads: set[str] = set()
                for row in conn.execute("SELECT layout, payload_hash FROM releases"):
                    live_payloads.add(row[1])
                    for f in json.loads(row[0]) if row[0] else []:
                        live_chunks.add(parse(f["raw_hash"]))
                dead_chunks: set[str] = set()
                dead_payloads: set[str] = set()
                for r in doomed:
                    if r["payload_hash"] not in live_payloads:
                        dead_payloads.add(r["payload_hash"])
                    for f in json.loads(r["layout"]) if r["layout"] else []:
                        h = parse(f["raw_hash"])
                        if h not in live_chunks:
                            dead_chunks.add(h)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            for r in doomed:
                path = self.artifact_path(scoped, r["version"], r["file_name"])
                with contextlib.suppress(OSError):
                    path.unlink()
                for d in (path.parent, path.parent.parent, path.parent.parent.parent):
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with self.cas.exclusive():
                for r in doomed:
                    self.cas.packs.remove_pack(f"{r['blake3']}.capsule")
                self.cas.remove_manifests(dead_payloads)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"deleted": True, "scoped_id": scoped, "removed_capsule": removed_capsule,
                "removed_versions": [r["version"] for r in doomed], "removed_chunks": len(dead_chunks)}


def _iter_pieces(prefix: bytes, pieces: list[tuple[Path, int, int]], suffix: bytes) -> Iterator[bytes]:
    """prefix, then each ``(file, offset, length)`` run (adjacent runs of one file read as one), then suffix."""
    yield prefix
    merged: list[list[Any]] = []
    for path, offset, length in pieces:
        last = merged[-1] if merged else None
        if last is not None and last[0] == path and last[1] + last[2] == offset:
            last[2] += length
        else:
            merged.append([path, offset, length])
    for path, offset, length in merged:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while length > 0:
                data = fh.read(min(length, 1 << 20))
                if not data:
                    raise RegistryError(500, "storage_error", f"{path.name} is shorter than the index says")
                length -= len(data)
                yield data
    yield suffix


def _write_json(path: Path, doc: Any) -> None:
    tmp = temp_path(path)
    tmp.write_bytes(json.dumps(doc, separators=(",", ":")).encode())
    os.replace(tmp, path)


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
