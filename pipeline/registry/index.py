"""The registry index: one data-access layer over SQLite (embedded default) or PostgreSQL.

Every SQL statement the registry runs is here, written once for both databases (SQLAlchemy Core
for the connection pool, parameter binding and DDL; the SQL itself is portable: ``ON CONFLICT``,
``RETURNING``, ``LIKE ... ESCAPE``). The schema is :mod:`pipeline.registry.migrations`.

Concurrency lives in the database, never in a process:

* a write is one transaction (``BEGIN IMMEDIATE`` on SQLite, which serialises writers across
  processes; an ordinary transaction on PostgreSQL, whose row locks do the rest);
* which of two racing publishes of one version wins is decided by the ``releases`` primary key;
* rows a transaction depends on are locked in one order (``FOR SHARE`` / ``FOR UPDATE`` on
  PostgreSQL, sorted by key) so two transactions cannot deadlock on them, and a deadlock or
  serialisation failure PostgreSQL reports anyway is retried by :meth:`Index.transaction`.

Where ``database`` comes from: ``--database`` or ``ATO_REGISTRY_DATABASE_URL``, a
``postgresql://user:password@host:port/dbname`` URL (``postgres://`` and
``postgresql+psycopg://`` are accepted; the driver is psycopg 3), or ``sqlite:///path``; by
default ``sqlite:///<data dir>/registry.sqlite3`` (WAL, ``synchronous=FULL``, 30 s busy timeout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError

from pipeline.errors import E_NETWORK, AtoError
from pipeline.registry import migrations

Row = Mapping[str, Any]
T = TypeVar("T")
RETRY_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected
RETRIES = 5
IN_BATCH = 500  # keys per IN (...) list
VALUES_BATCH = 500  # rows per multi-row VALUES statement (6 columns: 3,000 parameters, under every limit)


def database_url(value: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL of the index (``value`` as given by the user, or the embedded default)."""
    if not value:
        return f"sqlite:///{Path(data_dir) / 'registry.sqlite3'}"
    text_ = value.strip()
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if text_.startswith(prefix):
            return "postgresql+psycopg://" + text_[len(prefix):]
    if text_.startswith("sqlite:///"):
        return text_
    raise AtoError("E100", f"--database must be a postgresql://… or sqlite:///… URL (got {redact(text_)!r})")


def redact(url: str) -> str:
    """The URL with its password hidden (for messages and the serve envelope)."""
    with contextlib.suppress(ArgumentError, ValueError):
        return make_url(url).render_as_string(hide_password=True).replace("postgresql+psycopg://", "postgresql://")
    return url.split("@")[-1]


class Index:
    """A pool of connections to one index. Thread-safe; one per process (per worker)."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        self.kind = "postgresql" if url.startswith("postgresql") else "sqlite"
        if self.kind == "sqlite":
            path = make_url(url).database
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, pool_size=pool_size, max_overflow=32, pool_timeout=60,
                                   connect_args={"timeout": 30, "check_same_thread": False,
                                                 "isolation_level": None})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_size=pool_size, max_overflow=32, pool_timeout=60,
                                   pool_pre_ping=True, connect_args={"connect_timeout": 10})
        self.engine: Engine = engine
        # PostgreSQL row locks; SQLite has none (BEGIN IMMEDIATE already serialises its writers)
        self.for_share = " FOR SHARE" if self.kind == "postgresql" else ""
        self.for_update = " FOR UPDATE" if self.kind == "postgresql" else ""

    def describe(self) -> str:
        return redact(self.url)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ connections

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (SQLite: autocommit statements; PostgreSQL: one read transaction)."""
        with self._connect() as conn:
            try:
                yield conn
            finally:
                conn.rollback()

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back when it raises."""
        with self._connect() as conn:
            if self.kind == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(DBAPIError):
                    conn.rollback()
                raise
            conn.commit()

    def transaction(self, work: Callable[[Connection], T]) -> T:
        """``work`` in one write transaction, run again when PostgreSQL reports a deadlock or a
        serialisation failure (the transaction was rolled back; nothing of it happened)."""
        for attempt in range(RETRIES):
            try:
                with self.write() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if attempt + 1 < RETRIES and getattr(exc.orig, "sqlstate", None) in RETRY_SQLSTATES:
                    time.sleep(0.01 * (attempt + 1))
                    continue
                raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            conn = self.engine.connect()
        except DBAPIError as exc:
            raise AtoError(E_NETWORK, f"cannot reach the registry database {self.describe()}: "
                                      f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}") from None
        with conn:
            yield conn

    def migrate(self) -> list[int]:
        """Bring the schema to :data:`migrations.HEAD` (once, whichever process gets the lock first)."""
        with self.write() as conn:
            return migrations.migrate(conn)

    # ------------------------------------------------------------------ statement helpers

    @staticmethod
    def one(conn: Connection, sql: str, **params: Any) -> Row | None:
        return conn.execute(text(sql), params).mappings().first()

    @staticmethod
    def all(conn: Connection, sql: str, **params: Any) -> list[Row]:
        return list(conn.execute(text(sql), params).mappings().all())

    @staticmethod
    def scalar(conn: Connection, sql: str, **params: Any) -> Any:
        return conn.execute(text(sql), params).scalar()

    @staticmethod
    def run(conn: Connection, sql: str, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None) -> int:
        result = conn.execute(text(sql), params if params is not None else {})
        return result.rowcount

    @staticmethod
    def values_in(conn: Connection, sql: str, keys: Iterable[str], **params: Any) -> list[Row]:
        """``sql`` with ``IN :keys`` run over ``keys`` in batches; the rows of every batch."""
        stmt = text(sql).bindparams(bindparam("keys", expanding=True))
        unique = sorted(set(keys))
        out: list[Row] = []
        for i in range(0, len(unique), IN_BATCH):
            out += conn.execute(stmt, {**params, "keys": unique[i:i + IN_BATCH]}).mappings().all()
        return out

    @staticmethod
    def insert_values(conn: Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = "") -> list[Row]:
        """``head VALUES (...), (...) tail`` over ``rows`` (tuples in column order), VALUES_BATCH rows a
        statement; the rows a ``RETURNING`` tail gives.

        The values are bound by the database driver itself, positionally: for the thousands of chunk
        rows of one publish, SQLAlchemy's per-parameter binding of ``text()`` cost ten times the
        statements (0.3 s of an 80 MB publish). ``head`` and ``tail`` are fixed SQL, never data."""
        mark = "?" if conn.dialect.paramstyle in ("qmark", "numeric") else "%s"
        out: list[Row] = []
        for i in range(0, len(rows), VALUES_BATCH):
            part = rows[i:i + VALUES_BATCH]
            one = "(" + ", ".join([mark] * len(part[0])) + ")"
            result = conn.exec_driver_sql(f"{head} VALUES {', '.join([one] * len(part))} {tail}",
                                          tuple(v for row in part for v in row))
            if result.returns_rows:
                out += result.mappings().all()
        return out

    @staticmethod
    def is_conflict(exc: BaseException) -> bool:
        return isinstance(exc, IntegrityError)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
    finally:
        cur.close()
