"""Database export: atomic swap seen by a concurrent reader, hostile IDs round-trip, SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from recsys_embed.io import staged_table
from recsys_embed.serving.dbexport import DatabaseExportError, dialect_for, export_table, read_db_table, write_frames
from tests.pg_server import postgres_server

HOSTILE = ["o'brien", "a;b", "x -- y", "Robert'); DROP TABLE recsys_topk;--", "café ☕ 東京", '"quoted"', "\\back"]


@pytest.fixture(scope="module")
def pg_uri() -> Iterator[str]:
    with postgres_server() as uri:
        yield uri


@pytest.fixture(params=["sqlite", "postgresql"])
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'recs.db'}"
    return str(request.getfixturevalue("pg_uri"))


def _topk_table(folder: Path, n_users: int, k: int, run_id: str, ids: list[str] | None = None) -> Path:
    users = ids or [f"u{i}" for i in range(n_users)]
    frame = pl.DataFrame(
        {
            "user_id": [u for u in users for _ in range(k)],
            "rank": pl.Series([r + 1 for _ in users for r in range(k)], dtype=pl.Int32),
            "item_id": [f"{u}|item{r}" for u in users for r in range(k)],
            "score": pl.Series([1.0 / (r + 1) for _ in users for r in range(k)], dtype=pl.Float32),
            "model": "als",
            "run_id": run_id,
        }
    )
    with staged_table(folder) as stage:
        half = frame.height // 2
        frame.slice(0, half).write_parquet(stage / "part-00000.parquet")
        frame.slice(half).write_parquet(stage / "part-00001.parquet")
    return folder


def test_hostile_ids_round_trip_exactly(uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = "recsys_topk"
    src = _topk_table(tmp_path / "topk", 0, 3, "run'1;--", ids=HOSTILE)
    with caplog.at_level(logging.INFO, logger="recsys_embed.serving.dbexport"):
        res = export_table(src, uri, table, model_version="7", batch_rows=4)
    assert res.rows == len(HOSTILE) * 3
    back = read_db_table(uri, table).sort("user_id", "rank")
    want = pl.read_parquet(src / "*.parquet").sort("user_id", "rank")
    assert back["user_id"].to_list() == want["user_id"].to_list()  # quotes, ';', '--', non-ASCII intact
    assert back["item_id"].to_list() == want["item_id"].to_list()
    assert set(back["run_id"]) == {"run'1;--"} and set(back["model_version"]) == {"7"}
    assert back["rank"].to_list() == want["rank"].to_list()
    # the injection-looking ID did not drop anything, and no staging/old tables are left behind
    d = dialect_for(uri)
    conn = d.connect()
    try:
        q = (
            "SELECT name FROM sqlite_master WHERE type='table'"
            if uri.startswith("sqlite")
            else "SELECT tablename FROM pg_tables WHERE schemaname='public'"
        )
        names = sorted(r[0] for r in conn.execute(q).fetchall())
    finally:
        conn.close()
    assert names == [table]
    assert "s3cret" not in caplog.text  # the PostgreSQL URI's password never reaches the log


@pytest.mark.slow
def test_concurrent_reader_never_sees_a_mixed_table(uri: str, tmp_path: Path) -> None:
    n_users, k = 400, 20
    table = "recsys_topk"
    a = _topk_table(tmp_path / "a", n_users, k, "run-a")
    b = _topk_table(tmp_path / "b", n_users, k, "run-b")
    export_table(a, uri, table, model_version="1")

    seen: list[tuple[int, int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        d = dialect_for(uri)
        conn = d.connect()
        try:
            while not stop.is_set():
                row = conn.execute(
                    f'SELECT COUNT(*), COUNT(DISTINCT run_id), MIN(run_id) FROM "{table}"'
                ).fetchone()
                seen.append((int(row[0]), int(row[1]), str(row[2])))
        except BaseException as e:
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    for i in range(3):  # several swaps, small batches: many commits for the readers to land between
        export_table(b if i % 2 == 0 else a, uri, table, model_version=str(i + 2), batch_rows=500)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(seen) > 20, "the readers barely ran"
    # every read saw one whole table: users x k rows of exactly one run
    assert {(n, runs) for n, runs, _ in seen} == {(n_users * k, 1)}
    assert {r for *_, r in seen} == {"run-a", "run-b"}  # and it did see both sides of a swap
    final = read_db_table(uri, table)
    assert final.height == n_users * k and set(final["model_version"]) == {"4"}


def test_failed_write_keeps_the_old_table(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'recs.db'}"
    export_table(_topk_table(tmp_path / "a", 5, 2, "run-a"), uri, "t", model_version=None)

    def broken() -> Iterator[pl.DataFrame]:
        yield pl.DataFrame({"x": [1]})
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_frames(broken(), pl.Schema({"x": pl.Int64()}), uri, "t")
    back = read_db_table(uri, "t")
    assert back.height == 10 and set(back["run_id"]) == {"run-a"}


def test_bad_table_name_and_scheme_are_named() -> None:
    with pytest.raises(DatabaseExportError, match="plain SQL identifier"):
        write_frames(iter([]), pl.Schema({"x": pl.Int64()}), "sqlite:///x.db", 'x"; DROP TABLE y')
    with pytest.raises(DatabaseExportError, match=r"mysql.*sqlite:///") as err:
        dialect_for("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(err.value)
