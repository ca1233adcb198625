"""Export tables to a database through a URI: SQLite (stdlib) by default, PostgreSQL (psycopg 3) supported.

A write is atomic for readers: rows go into a fresh staging table (parameterized ``executemany`` only: no
value is ever spliced into SQL text), then one transaction renames the live table aside, renames the staging
table into place and drops the old one. A reader sees the old table or the new one, never a mix, and never
a missing table once the first export committed:

- SQLite: the database is switched to WAL, so readers keep reading their snapshot during the swap.
- PostgreSQL: DDL is transactional; a reader blocked on the swap's lock re-resolves the name after commit.

Every row carries ``run_id`` (the pipeline run) and ``model_version`` (the registered version, or null).
Identifiers (table names) are validated against ``[A-Za-z_][A-Za-z0-9_]*`` and quoted; URIs are logged
redacted (``tracking.redact_uri``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys_embed.errors import RecsysEmbedError
from recsys_embed.io import read_table
from recsys_embed.progress import bar as progress_bar

log = logging.getLogger(__name__)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


class DatabaseExportError(RecsysEmbedError):
    """The export database cannot be written (names the URI, secrets redacted, and the fix)."""


@dataclass
class DbExportResult:
    """One committed database table: where, how many rows, and how long it took."""

    uri: str  # redacted
    table: str
    rows: int
    seconds: float


def redact(text: str) -> str:
    """A URI (or a driver message quoting one) with secrets masked: ``tracking.redact_uri``, then any
    ``//user:secret@`` or ``password=`` left inside free text."""
    from recsys_embed.tracking.tracker import redact_uri  # imports no mlflow at module level

    out = re.sub(r"//([^:/@\s]+):[^@\s]*@", r"//\1:***@", redact_uri(text))
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", out)


def check_table_name(name: str) -> str:
    if not _IDENT.fullmatch(name):
        raise DatabaseExportError(
            f"table name {name!r} is not a plain SQL identifier; use letters, digits and '_' (at most 40 characters), "
            "e.g. export.database.topk_table=recsys_topk"
        )
    return name


# ----------------------------------------------------------------------------------------------------------
# Dialects: the few statements that differ between SQLite and PostgreSQL


class _Dialect:
    placeholder = "?"

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def connect(self) -> Any:
        raise NotImplementedError

    def sql_type(self, dtype: pl.DataType) -> str:
        if dtype.is_integer():
            return "BIGINT"
        if dtype.is_float():
            return "DOUBLE PRECISION"
        if dtype == pl.Boolean:
            return "BOOLEAN"
        return "TEXT"

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def quote(self, ident: str) -> str:
        return '"' + ident + '"'  # callers pass checked names plus a hex suffix only

    def rename_if_exists(self, conn: Any, table: str, new: str) -> None:
        conn.execute(f"ALTER TABLE IF EXISTS {self.quote(table)} RENAME TO {self.quote(new)}")


class _Sqlite(_Dialect):
    placeholder = "?"

    def path(self) -> Path:
        rest = self.uri[len("sqlite:///") :]
        if not rest or rest == ":memory:":
            raise DatabaseExportError(f"database URI {self.uri!r} names no file; use sqlite:///path/to/file.db")
        return Path(rest)

    def connect(self) -> Any:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # explicit BEGIN/COMMIT below
        conn.execute("PRAGMA journal_mode=WAL")  # readers keep their snapshot while the swap commits
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def sql_type(self, dtype: pl.DataType) -> str:
        if dtype.is_integer():
            return "INTEGER"
        if dtype.is_float():
            return "REAL"
        return "TEXT"

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first rename

    def rename_if_exists(self, conn: Any, table: str, new: str) -> None:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
            conn.execute(f"ALTER TABLE {self.quote(table)} RENAME TO {self.quote(new)}")


class _Postgres(_Dialect):
    placeholder = "%s"

    def connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise DatabaseExportError(
                "PostgreSQL export needs the psycopg driver; pip install -c constraints.txt 'psycopg[binary]'"
            ) from None
        conninfo = re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", self.uri)
        try:
            conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatabaseExportError(
                f"cannot connect to {redact(self.uri)}: {redact(first)}; check export.database.uri (or the variable "
                "named by export.database.uri_env) and that the server is running"
            ) from None
        return conn


def dialect_for(uri: str) -> _Dialect:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        return _Sqlite(uri)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return _Postgres(uri)
    raise DatabaseExportError(
        f"database URI {redact(uri)!r} has an unsupported scheme {scheme!r}; use sqlite:///file.db or "
        "postgresql://user:password@host:5432/db"
    )


def resolve_uri(uri: str, root: Path | None = None) -> str:
    """Make a relative SQLite path absolute (relative to ``root``, default the working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = Path(uri[len("sqlite:///") :])
        if not rel.is_absolute():
            return f"sqlite:///{((root or Path.cwd()) / rel).resolve().as_posix()}"
    return uri


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_frames(
    frames: Iterator[pl.DataFrame],
    schema: pl.Schema,
    uri: str,
    table: str,
    total_rows: int = 0,
    batch_rows: int = 10_000,
    index_columns: tuple[str, ...] = (),
) -> DbExportResult:
    """Write ``frames`` (all with ``schema``) as table ``table`` of ``uri``, replacing it atomically.

    Args:
        frames: the rows, chunk by chunk (memory is bounded by one chunk).
        schema: column names and Polars dtypes (mapped to INTEGER/BIGINT, REAL/DOUBLE PRECISION, TEXT).
        uri: ``sqlite:///path.db`` or ``postgresql://user:pw@host:port/db`` (never logged unredacted).
        table: the live table's name; a plain identifier.
        total_rows: for the progress bar only.
        batch_rows: rows per ``executemany`` call.
        index_columns: an index on these columns is built before the swap (e.g. ``user_id, rank``).

    Returns:
        ``DbExportResult`` with the committed row count.
    """
    t0 = time.perf_counter()
    check_table_name(table)
    d = dialect_for(uri)
    tag = uuid.uuid4().hex[:8]
    staging, old = f"{table}__staging_{tag}", f"{table}__old_{tag}"
    cols = list(schema.names())
    col_sql = ", ".join(f'"{c}" {d.sql_type(t)}' for c, t in schema.items())
    insert = (
        f"INSERT INTO {d.quote(staging)} ({', '.join(chr(34) + c + chr(34) for c in cols)}) "
        f"VALUES ({', '.join([d.placeholder] * len(cols))})"
    )
    conn = d.connect()
    rows = 0
    try:
        conn.execute(f"DROP TABLE IF EXISTS {d.quote(staging)}")
        conn.execute(f"CREATE TABLE {d.quote(staging)} ({col_sql})")
        try:
            with progress_bar(f"db export {table}", total_rows or None, "rows") as bar:
                for frame in frames:
                    for start in range(0, frame.height, batch_rows):
                        batch = frame.slice(start, batch_rows).select(cols).rows()
                        d.begin(conn)
                        conn.cursor().executemany(insert, batch)
                        conn.execute("COMMIT")
                        rows += len(batch)
                        bar.advance(len(batch))
            if index_columns:
                ix = ", ".join(f'"{c}"' for c in index_columns)
                conn.execute(f"CREATE INDEX {d.quote(f'ix_{table}_{tag}')} ON {d.quote(staging)} ({ix})")
            # the swap: one transaction, so a reader sees the old table or the new one
            d.begin(conn)
            d.rename_if_exists(conn, table, old)
            conn.execute(f"ALTER TABLE {d.quote(staging)} RENAME TO {d.quote(table)}")
            conn.execute(f"DROP TABLE IF EXISTS {d.quote(old)}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            with contextlib.suppress(Exception):
                conn.execute(f"DROP TABLE IF EXISTS {d.quote(staging)}")
            raise
    except (sqlite3.Error, _pg_errors()) as e:
        raise DatabaseExportError(
            f"writing table {table!r} to {redact(uri)} failed: {redact(str(e).splitlines()[0] if str(e) else '')}; "
            "the previous table (if any) is unchanged"
        ) from None
    finally:
        conn.close()
    seconds = time.perf_counter() - t0
    log.info("db export: committed %s in %s (%d rows, %.1fs)", table, redact(uri), rows, seconds)
    return DbExportResult(uri=redact(uri), table=table, rows=rows, seconds=round(seconds, 3))


def _pg_errors() -> type[Exception]:
    try:
        import psycopg
    except ImportError:
        return sqlite3.Error
    return psycopg.Error


def export_table(
    path: str | Path,
    uri: str,
    table: str,
    model_version: str | None,
    batch_rows: int = 10_000,
    index_columns: tuple[str, ...] = (),
) -> DbExportResult:
    """Copy a committed export table folder (``topk`` / ``similar_items``) into ``table``, adding ``model_version``.

    Part files are read one at a time, so memory is bounded by one part.
    """
    folder = Path(path)
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else [folder]
    read_table(folder)  # raises when the table was never committed (no _SUCCESS)
    first = pl.read_parquet_schema(parts[0])
    schema = pl.Schema([*first.items(), ("model_version", pl.String())])
    total = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in parts)

    def frames() -> Iterator[pl.DataFrame]:
        for p in parts:
            yield pl.read_parquet(p).with_columns(pl.lit(model_version, dtype=pl.String).alias("model_version"))

    return write_frames(frames(), schema, uri, table, total, batch_rows, index_columns)


def read_db_table(uri: str, table: str) -> pl.DataFrame:
    """Read a whole table back (tests and small tables; ``SELECT *`` through the same drivers)."""
    d = dialect_for(uri)
    conn = d.connect()
    try:
        cur = conn.execute(f"SELECT * FROM {d.quote(table)}")
        names = [c[0] for c in cur.description]
        data = cur.fetchall()
    finally:
        conn.close()
    return pl.DataFrame(data, schema=names, orient="row", infer_schema_length=None)
