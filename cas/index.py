"""The CAS index: where every chunk lives, and the payload manifests, in one SQLite database.

``<cas root>/index.sqlite`` (WAL, ``synchronous=FULL``) holds

* ``packs``: each pack file by name, size and kind (``pack`` written by a build, a migration or a
  repack; ``capsule`` an adopted artifact);
* ``chunks``: chunk BLAKE3 -> (pack, offset, length of the zstd frame, raw size, BLAKE3 of the
  frame bytes). A chunk may live in several packs; any one of them serves it;
* ``payloads`` and ``pages``: payload manifests, stored compactly. A manifest's chunk list is cut
  into pages where a chunk digest's first byte is below ``PAGE_CUT`` (content-defined, so a
  one-file change rewrites one or two pages, not the whole list); pages are keyed by their own
  BLAKE3 and shared between manifests, and a payload row keeps only the list of its pages.

SQLite gives what the store needs from an index: a transaction per pack (a pack is visible to
readers with all its chunks or not at all), many processes and threads reading while one writes,
and no corruption when a writer is killed. Every thread uses its own connection.
"""

from __future__ import annotations

import atexit
import json
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from cas.chunker import CdcParams
from cas.payload_manifest import ChunkRef, PayloadManifest, PayloadManifestError

SCHEMA_VERSION = 1
DB_PAGE_SIZE = 1024  # bytes, for a new index: a one-file rebuild grows it by ~its rows, not by 4 KiB per row
BUSY_TIMEOUT_S = 120.0  # a writer waits this long for another writer's transaction
PAGE_CUT = 8  # a page ends after a chunk whose digest starts with a byte below this: ~1 in 32 (see DB_PAGE_SIZE)
PAGE_MAX = 256  # entries, whatever the digests say
_ENTRY = struct.Struct(">32sII")  # raw hash, raw size, zstd size hint (NO_HINT when unknown)
NO_HINT = 0xFFFFFFFF
_LOOKUP_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    hash BLOB NOT NULL,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    raw_size INTEGER NOT NULL,
    frame_hash BLOB NOT NULL,
    PRIMARY KEY (hash, pack)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks (pack);
CREATE TABLE IF NOT EXISTS payloads (
    artifact_hash BLOB PRIMARY KEY,
    params TEXT NOT NULL,
    chunk_count INTEGER NOT NULL,
    pages BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pages (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes (such as BUSY_RECOVERY) included."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and \
        code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class IndexUnreadable(Exception):
    """The index database cannot be opened or read (damaged, or written by a newer ato)."""


@dataclass(frozen=True)
class Location:
    """Where one chunk's frame is: ``length`` bytes at ``offset`` of pack ``pack``."""

    pack: str
    offset: int
    length: int
    raw_size: int
    frame_hash: bytes


@dataclass(frozen=True)
class PackEntry:
    """One chunk a pack holds (what :meth:`PackIndex.add_pack` records)."""

    hash: str  # hex
    offset: int
    length: int
    raw_size: int
    frame_hash: bytes


@dataclass(frozen=True)
class PackRow:
    name: str
    size: int
    kind: str
    chunks: int


def _pages(chunks: list[ChunkRef]) -> list[bytes]:
    """Cut a chunk list into pages at content-defined points."""
    pages: list[bytes] = []
    current: list[bytes] = []
    for c in chunks:
        raw = bytes.fromhex(c.raw_hash)
        hint = NO_HINT if c.zstd_size_hint is None or not 0 <= c.zstd_size_hint < NO_HINT else c.zstd_size_hint
        current.append(_ENTRY.pack(raw, c.raw_size, hint))
        if raw[0] < PAGE_CUT or len(current) >= PAGE_MAX:
            pages.append(b"".join(current))
            current = []
    if current:
        pages.append(b"".join(current))
    return pages


def _entries(page: bytes) -> Iterator[ChunkRef]:
    for raw, size, hint in _ENTRY.iter_unpack(page):
        yield ChunkRef(raw.hex(), size, None if hint == NO_HINT else hint)


class PackIndex:
    """The index database of one CAS root."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    # ---------------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        """Connect, creating the schema on first use.

        Several processes may open a new index at once: switching it to WAL takes an exclusive
        lock that SQLite does not wait for with the busy handler, so a "locked" answer while the
        schema is being set up is retried until the busy timeout, not reported.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.01
        while True:
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                self._prepare(conn)
                return conn
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                if isinstance(exc, sqlite3.DatabaseError):
                    raise IndexUnreadable(f"cannot open the CAS index {self.path}: {exc}") from None
                raise

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise IndexUnreadable(f"{self.path} was written by a newer ato (index schema {version})")
        if version < SCHEMA_VERSION:
            # Small pages for a new index (a no-op on one that has content): a build adds a few rows of a
            # kilobyte or two (chunk-list pages, a payload row), which would each take whole 4 KiB pages.
            conn.execute(f"PRAGMA page_size={DB_PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            with _write(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _reader(self) -> sqlite3.Connection | None:
        """A connection for a read, or None when there is no index yet (a read never creates one)."""
        if getattr(self._local, "conn", None) is None and not self.path.exists():
            return None
        return self._conn()

    def close(self) -> None:
        """Close every connection (the last one to close checkpoints and removes the WAL file)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # ---------------------------------------------------------------- chunks

    def locate(self, hex_digest: str) -> Location | None:
        conn = self._reader()
        if conn is None:
            return None
        row = conn.execute(
            "SELECT p.name, c.offset, c.length, c.raw_size, c.frame_hash FROM chunks c JOIN packs p ON p.id = c.pack "
            "WHERE c.hash = ? LIMIT 1", (bytes.fromhex(hex_digest),)).fetchone()
        return Location(*row) if row else None

    def locate_many(self, hexes: Iterable[str]) -> dict[str, Location]:
        """One location for each of ``hexes`` the index knows."""
        wanted = list(dict.fromkeys(hexes))
        out: dict[str, Location] = {}
        conn = self._reader()
        if conn is None:
            return out
        for i in range(0, len(wanted), _LOOKUP_BATCH):
            batch = [bytes.fromhex(h) for h in wanted[i:i + _LOOKUP_BATCH]]
            marks = ",".join("?" * len(batch))
            for h, *rest in conn.execute(
                    "SELECT c.hash, p.name, c.offset, c.length, c.raw_size, c.frame_hash FROM chunks c "
                    f"JOIN packs p ON p.id = c.pack WHERE c.hash IN ({marks})", batch):
                out.setdefault(h.hex(), Location(*rest))
        return out

    def add_pack(self, name: str, size: int, kind: str, entries: Iterable[PackEntry]) -> None:
        """Record a pack file already in place (renamed and synced) with the chunks it holds, atomically."""
        conn = self._conn()
        with _write(conn):
            if conn.execute("SELECT 1 FROM packs WHERE name = ?", (name,)).fetchone():
                return  # recorded already (two installs of the same artifact: the name is its BLAKE3)
            cur = conn.execute("INSERT INTO packs (name, size, kind) VALUES (?, ?, ?)", (name, size, kind))
            pack_id = cur.lastrowid
            conn.executemany(
                "INSERT OR IGNORE INTO chunks (hash, pack, offset, length, raw_size, frame_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((bytes.fromhex(e.hash), pack_id, e.offset, e.length, e.raw_size, e.frame_hash) for e in entries))

    def forget_location(self, hex_digest: str, pack: str) -> None:
        """Drop one location (a damaged frame): the chunk is then missing there, and rewritten when next stored."""
        conn = self._reader()
        if conn is None:
            return
        with _write(conn):
            conn.execute("DELETE FROM chunks WHERE hash = ? AND pack = (SELECT id FROM packs WHERE name = ?)",
                         (bytes.fromhex(hex_digest), pack))

    def packs(self) -> list[PackRow]:
        conn = self._reader()
        if conn is None:
            return []
        return [PackRow(*row) for row in conn.execute(
            "SELECT p.name, p.size, p.kind, (SELECT COUNT(*) FROM chunks c WHERE c.pack = p.id) "
            "FROM packs p ORDER BY p.name")]

    def pack_entries(self, name: str) -> list[PackEntry]:
        conn = self._reader()
        if conn is None:
            return []
        rows = conn.execute(
            "SELECT c.hash, c.offset, c.length, c.raw_size, c.frame_hash FROM chunks c JOIN packs p ON p.id = c.pack "
            "WHERE p.name = ? ORDER BY c.offset", (name,))
        return [PackEntry(h.hex(), off, length, raw, fh) for h, off, length, raw, fh in rows]

    def remove_pack(self, name: str) -> None:
        conn = self._reader()
        if conn is None:
            return
        with _write(conn):
            row = conn.execute("SELECT id FROM packs WHERE name = ?", (name,)).fetchone()
            if row:
                conn.execute("DELETE FROM chunks WHERE pack = ?", row)
                conn.execute("DELETE FROM packs WHERE id = ?", row)

    def chunk_count(self) -> int:
        conn = self._reader()
        return 0 if conn is None else conn.execute("SELECT COUNT(DISTINCT hash) FROM chunks").fetchone()[0]

    # ---------------------------------------------------------------- payload manifests

    def put_payload(self, manifest: PayloadManifest) -> bool:
        """Store a payload manifest; False when it was already there."""
        key = bytes.fromhex(manifest.artifact_hash)
        conn = self._conn()
        if conn.execute("SELECT 1 FROM payloads WHERE artifact_hash = ?", (key,)).fetchone():
            return False
        pages = _pages(manifest.chunks)
        digests = [blake3.blake3(p).digest() for p in pages]
        with _write(conn):
            conn.executemany("INSERT OR IGNORE INTO pages (hash, data) VALUES (?, ?)", zip(digests, pages, strict=True))
            cur = conn.execute("INSERT OR IGNORE INTO payloads (artifact_hash, params, chunk_count, pages) "
                               "VALUES (?, ?, ?, ?)", (key, json.dumps(manifest.params.to_json(), sort_keys=True),
                                                       len(manifest.chunks), b"".join(digests)))
        return cur.rowcount == 1

    def has_payload(self, artifact_hash: str) -> bool:
        conn = self._reader()
        return conn is not None and conn.execute("SELECT 1 FROM payloads WHERE artifact_hash = ?",
                                    (bytes.fromhex(artifact_hash),)).fetchone() is not None

    def get_payload(self, artifact_hash: str) -> PayloadManifest | None:
        """The stored manifest, checked against its name; None when it is not stored."""
        conn = self._reader()
        if conn is None:
            return None
        row = conn.execute("SELECT params, chunk_count, pages FROM payloads WHERE artifact_hash = ?",
                           (bytes.fromhex(artifact_hash),)).fetchone()
        if row is None:
            return None
        params_json, count, page_list = row
        chunks: list[ChunkRef] = []
        for i in range(0, len(page_list), 32):
            digest = page_list[i:i + 32]
            page = conn.execute("SELECT data FROM pages WHERE hash = ?", (digest,)).fetchone()
            if page is None or blake3.blake3(page[0]).digest() != digest:
                raise PayloadManifestError(f"payload manifest blake3:{artifact_hash} has a missing or damaged page")
            chunks.extend(_entries(page[0]))
        try:
            params = CdcParams(**json.loads(params_json))
        except (TypeError, ValueError) as exc:
            raise PayloadManifestError(f"payload manifest blake3:{artifact_hash} has bad cdc_params: {exc}") from None
        manifest = PayloadManifest(chunks, params)
        if len(chunks) != count or manifest.artifact_hash != artifact_hash:
            raise PayloadManifestError(f"payload manifest blake3:{artifact_hash} does not hash to its name")
        return manifest

    def payload_hashes(self) -> list[str]:
        conn = self._reader()
        if conn is None:
            return []
        return [h.hex() for (h,) in conn.execute("SELECT artifact_hash FROM payloads ORDER BY artifact_hash")]

    def remove_payloads(self, hexes: Iterable[str]) -> None:
        """Drop payload manifests, then every page no remaining manifest uses."""
        conn = self._reader()
        if conn is None:
            return
        with _write(conn):
            conn.executemany("DELETE FROM payloads WHERE artifact_hash = ?", ((bytes.fromhex(h),) for h in hexes))
            used: set[bytes] = set()
            for (page_list,) in conn.execute("SELECT pages FROM payloads"):
                used.update(page_list[i:i + 32] for i in range(0, len(page_list), 32))
            stale = [h for (h,) in conn.execute("SELECT hash FROM pages") if h not in used]
            conn.executemany("DELETE FROM pages WHERE hash = ?", ((h,) for h in stale))

    def free_bytes(self) -> tuple[int, int]:
        """(bytes in free pages, size of the database) as SQLite counts them; (0, 0) with no index."""
        conn = self._reader()
        if conn is None:
            return 0, 0
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        total = conn.execute("PRAGMA page_count").fetchone()[0]
        return free * page, total * page

    def disk_usage(self) -> int:
        """Blocks of the database and its WAL and shared-memory files, as du counts them."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.lstat(f"{self.path}{suffix}").st_blocks * 512
            except OSError:
                pass
        return total

    def compact(self) -> None:
        """Give the space of deleted rows back to the filesystem (after gc)."""
        conn = self._reader()
        if conn is None:
            return
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class _write:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error): one atomic write transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
