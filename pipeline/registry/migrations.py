"""The registry index's schema, as numbered migrations applied in order (forward only).

Why a small versioned-migration table and not Alembic: every ``ato registry serve`` process
(several workers, several hosts) migrates at start-up, so "read the version, apply what is
missing, record it" must run under a database lock (PostgreSQL: a transaction-scoped advisory
lock; SQLite: ``BEGIN IMMEDIATE``), which Alembic leaves to its caller anyway; the schema is a
handful of tables; an index written before migrations existed (``ato-local-registry-2``) has to
be adopted in place; and Alembic's script machinery would cost every server start a quarter of a
second. The DDL is SQLAlchemy's, so one migration serves SQLite and PostgreSQL alike.

``schema_migrations(version, name, applied_at)`` lists what was applied. All pending
migrations run in one transaction (both databases have transactional DDL): a failure leaves
the index as it was. An index whose newest version is above :data:`HEAD` was written by a newer
ato and is refused (E100), never downgraded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    inspect,
    text,
)

from pipeline.errors import AtoError

LEGACY_SCHEMA = "ato-local-registry-2"  # the index before migrations (meta.schema_version)
SCHEMA_MARK = "ato-registry-index"  # meta.schema_version from migration 2 on: older ato refuses it
ADVISORY_LOCK = 0x6174_6F72_6567  # "atoreg": one PostgreSQL advisory lock key for migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


def _baseline(conn: Connection) -> None:
    """The index as ``ato-local-registry-2`` had it (created, or adopted when it is already there)."""
    md = MetaData()
    Table("meta", md, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
    Table("packages", md,
          Column("scoped_id", Text, primary_key=True), Column("publisher", Text, nullable=False),
          Column("slug", Text, nullable=False), Column("name", Text, nullable=False),
          Column("description", Text, nullable=False, server_default=""),
          Column("latest_version", Text, nullable=False), Column("created_at", Text, nullable=False),
          Column("updated_at", Text, nullable=False))
    Table("releases", md,
          Column("scoped_id", Text, nullable=False), Column("version", Text, nullable=False),
          Column("file_name", Text, nullable=False), Column("sha256", Text, nullable=False),
          Column("blake3", Text, nullable=False), Column("size_bytes", BigInteger, nullable=False),
          Column("manifest_hash", Text, nullable=False), Column("payload_hash", Text, nullable=False),
          Column("prefix_size", BigInteger, nullable=False), Column("payload_size", BigInteger, nullable=False),
          Column("suffix_size", BigInteger, nullable=False), Column("chunk_count", Integer, nullable=False),
          Column("layout", Text), Column("manifest_toml", Text, nullable=False),
          Column("manifest_json", Text, nullable=False), Column("readme", Text), Column("readme_name", Text),
          Column("created_at", Text, nullable=False), Column("signed", Integer), Column("signer_key_id", Text),
          Column("signed_at", Text), Column("yanked_at", Text),
          # the unique constraint that decides which of two racing publishes of one version wins
          PrimaryKeyConstraint("scoped_id", "version"))
    Table("chunks", md,
          Column("raw_hash", Text, primary_key=True), Column("raw_size", BigInteger, nullable=False),
          Column("frame_size", BigInteger, nullable=False), Column("frame_blake3", Text, nullable=False))
    Table("runtime_configs", md,
          Column("scoped_id", Text, primary_key=True), Column("doc", Text, nullable=False),
          Column("updated_at", Text, nullable=False))
    md.create_all(conn, checkfirst=True)
    # an index written before the signer and yank columns existed
    have = _columns(conn, "releases")
    for col, kind in (("signed", "INTEGER"), ("signer_key_id", "TEXT"), ("signed_at", "TEXT"),
                      ("yanked_at", "TEXT")):
        if col not in have:
            conn.execute(text(f"ALTER TABLE releases ADD COLUMN {col} {kind}"))
    mark = conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar()
    if mark is None:
        conn.execute(text("INSERT INTO meta(key, value) VALUES('schema_version', :v)"), {"v": LEGACY_SCHEMA})
    elif mark not in (LEGACY_SCHEMA, SCHEMA_MARK):
        raise AtoError("E100", f"the registry index has schema {mark!r}; this ato reads {LEGACY_SCHEMA!r} "
                               "and later", hint="use another --data-dir / --database, or remove the old index")


def _shared_state(conn: Connection) -> None:
    """Everything several workers share: chunk references per release, upload sessions and their
    staged frames, GC marks, Store sources and sync runs; plus two release columns (``[metadata]``
    as JSON, the artifact's blob key) so no query needs a database-specific JSON function."""
    md = MetaData()
    Table("release_chunks", md,
          Column("scoped_id", Text, nullable=False), Column("version", Text, nullable=False),
          Column("raw_hash", Text, nullable=False),
          PrimaryKeyConstraint("scoped_id", "version", "raw_hash"),  # removed with its release (delete)
          Index("release_chunks_by_hash", "raw_hash"))
    Table("upload_sessions", md,
          Column("session_id", Text, primary_key=True), Column("created_at", Float, nullable=False),
          Column("expires_at", Float, nullable=False))
    Table("session_chunks", md,
          Column("session_id", Text, nullable=False), Column("raw_hash", Text, nullable=False),
          Column("raw_size", BigInteger, nullable=False), Column("frame_size", BigInteger, nullable=False),
          Column("frame_blake3", Text, nullable=False), Column("blob_key", Text, nullable=False),
          Column("blob_offset", BigInteger, nullable=False),
          PrimaryKeyConstraint("session_id", "raw_hash"),
          ForeignKeyConstraint(["session_id"], ["upload_sessions.session_id"], ondelete="CASCADE"))
    Table("gc_marks", md, Column("key", Text, primary_key=True), Column("marked_at", Float, nullable=False))
    Table("sources", md,
          Column("source_id", Text, primary_key=True), Column("owner", Text, nullable=False),
          Column("doc", Text, nullable=False), Column("created_at", Text, nullable=False))
    Table("source_runs", md,
          Column("sync_run_id", Text, primary_key=True), Column("source_id", Text, nullable=False),
          Column("status", Text, nullable=False), Column("doc", Text, nullable=False),
          Column("heartbeat_at", Float, nullable=False),
          Index("source_runs_by_source", "source_id"))
    md.create_all(conn, checkfirst=True)
    conn.execute(text("ALTER TABLE releases ADD COLUMN metadata_json TEXT"))
    conn.execute(text("ALTER TABLE releases ADD COLUMN artifact_key TEXT"))
    rows = conn.execute(text("SELECT scoped_id, version, file_name, manifest_json, layout FROM releases")).all()
    for scoped_id, version, file_name, manifest_json, layout in rows:
        try:
            meta = json.loads(manifest_json).get("metadata")
        except (ValueError, AttributeError):
            meta = None
        conn.execute(text("UPDATE releases SET metadata_json=:m, artifact_key=:k WHERE scoped_id=:s AND version=:v"),
                     {"m": json.dumps(meta) if isinstance(meta, dict) else None,
                      "k": f"artifacts/{scoped_id}/{version}/{file_name}", "s": scoped_id, "v": version})
        hashes = sorted({str(f["raw_hash"]).removeprefix("blake3:") for f in json.loads(layout)}) if layout else []
        if hashes:
            conn.execute(text("INSERT INTO release_chunks(scoped_id, version, raw_hash) VALUES(:s, :v, :h)"),
                         [{"s": scoped_id, "v": version, "h": h} for h in hashes])
    conn.execute(text("UPDATE meta SET value=:v WHERE key='schema_version'"), {"v": SCHEMA_MARK})


def _artifacts_are_packs(conn: Connection) -> None:
    """A chunk is served from an artifact that holds its frame (the artifact is the pack of its
    chunks), never from a file or object of its own: ``chunks`` says where (blob key, offset) and
    ``release_chunks`` where each release's artifact holds each chunk. Chunks that no artifact holds
    keep their file of an earlier version (``cas/objects/blake3/..``, read as a blob key of the
    data dir); the files of the others, and GC marks written with the old key forms, become marks
    on blob keys, swept after the grace period."""
    conn.execute(text("ALTER TABLE chunks ADD COLUMN blob_key TEXT"))
    conn.execute(text("ALTER TABLE chunks ADD COLUMN blob_offset BIGINT"))
    conn.execute(text("ALTER TABLE release_chunks ADD COLUMN frame_offset BIGINT"))
    Index("chunks_by_blob", Table("chunks", MetaData(), Column("blob_key", Text)).c.blob_key).create(conn)
    frame_blake3 = dict(conn.execute(text("SELECT raw_hash, frame_blake3 FROM chunks")).all())
    located: dict[str, tuple[str, int]] = {}
    rows = conn.execute(text("SELECT scoped_id, version, file_name, artifact_key, prefix_size, layout FROM releases "
                             "WHERE layout IS NOT NULL ORDER BY scoped_id, version")).all()
    # an index whose chunk rows were kept elsewhere (the registry briefly indexed them in cas/index.sqlite):
    # the frames of the releases' layouts are the chunk rows (the first release's frame for each chunk)
    missing: dict[str, dict[str, object]] = {}
    for *_ignored, layout in rows:
        for f in json.loads(layout):
            raw = str(f["raw_hash"]).removeprefix("blake3:")
            if raw not in frame_blake3 and raw not in missing:
                missing[raw] = {"h": raw, "r": int(f["raw_size"]), "f": int(f["frame_size"]),
                                "b": str(f["frame_blake3"]).removeprefix("blake3:")}
    if missing:
        conn.execute(text("INSERT INTO chunks(raw_hash, raw_size, frame_size, frame_blake3) VALUES(:h, :r, :f, :b)"),
                     [missing[h] for h in sorted(missing)])
        frame_blake3.update({h: str(m["b"]) for h, m in missing.items()})
    for scoped_id, version, file_name, key, prefix_size, layout in rows:
        key = key or f"artifacts/{scoped_id}/{version}/{file_name}"
        offsets: dict[str, int] = {}
        offset = int(prefix_size)
        for f in json.loads(layout):
            raw = str(f["raw_hash"]).removeprefix("blake3:")
            if frame_blake3.get(raw) == str(f["frame_blake3"]).removeprefix("blake3:"):
                offsets.setdefault(raw, offset)
            offset += int(f["frame_size"])
        if offsets:
            conn.execute(text("UPDATE release_chunks SET frame_offset=:o WHERE scoped_id=:s AND version=:v "
                              "AND raw_hash=:h"),
                         [{"o": o, "s": scoped_id, "v": version, "h": h} for h, o in sorted(offsets.items())])
        for h, o in offsets.items():
            located.setdefault(h, (key, o))
    stamp = time.time()
    marks: set[str] = set()
    for raw in sorted(frame_blake3):
        old = f"cas/objects/blake3/{raw[:2]}/{raw[2:4]}/{raw}.zst"
        key, offset = located.get(raw, (old, 0))
        if key != old:
            marks.add(old)
        conn.execute(text("UPDATE chunks SET blob_key=:k, blob_offset=:o WHERE raw_hash=:h"),
                     {"k": key, "o": offset, "h": raw})
    for (old,) in conn.execute(text("SELECT key FROM gc_marks")).all():
        kind, _, rest = str(old).partition(":")
        if kind in ("chunk", "manifest"):
            conn.execute(text("DELETE FROM gc_marks WHERE key=:k"), {"k": old})
            marks.add(f"cas/objects/blake3/{rest[:2]}/{rest[2:4]}/{rest}.zst" if kind == "chunk"
                      else f"cas/manifests/blake3/{rest}.json")
    for key in sorted(marks):
        conn.execute(text("INSERT INTO gc_marks(key, marked_at) VALUES(:k, :t) ON CONFLICT(key) DO NOTHING"),
                     {"k": key, "t": stamp})


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline (ato-local-registry-2)", _baseline),
    Migration(2, "shared state for several workers", _shared_state),
    Migration(3, "artifacts are the packs of their chunks", _artifacts_are_packs),
)
HEAD = MIGRATIONS[-1].version


def applied_versions(conn: Connection) -> set[int]:
    if not inspect(conn).has_table("schema_migrations"):
        return set()
    return {int(v) for v in conn.execute(text("SELECT version FROM schema_migrations")).scalars()}


def migrate(conn: Connection) -> list[int]:
    """Apply every pending migration in the caller's transaction, under the database's lock.

    Returns the versions applied (empty when the index was current)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
    md = MetaData()
    Table("schema_migrations", md, Column("version", Integer, primary_key=True),
          Column("name", Text, nullable=False), Column("applied_at", Float, nullable=False))
    md.create_all(conn, checkfirst=True)
    done = applied_versions(conn)
    newer = [v for v in done if v > HEAD]
    if newer:
        raise AtoError("E100", f"the registry index is at schema version {max(newer)}, newer than this ato "
                               f"knows ({HEAD})", hint="run the newer ato against this index, or use another one")
    applied = []
    for m in MIGRATIONS:
        if m.version in done:
            continue
        m.apply(conn)
        conn.execute(text("INSERT INTO schema_migrations(version, name, applied_at) VALUES(:v, :n, :t)"),
                     {"v": m.version, "n": m.name, "t": time.time()})
        applied.append(m.version)
    return applied
