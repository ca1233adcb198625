"""Hostile input: every broken file yields quarantined rows with reasons or a one-line error naming the file
(and the column), never a bare traceback or a silent drop. Plus property tests of the row accounting."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_embed.config import IngestConfig
from recsys_embed.errors import IngestError
from recsys_embed.ingest import REASONS, load_events

T0 = 1_700_000_000
HEADER = b"user_id,item_id,timestamp,event_type\n"
GOOD = b"u1,i1,1700000000,view\nu2,i2,1700000100,view\n"


def _cfg(path: Path, **kw: Any) -> IngestConfig:
    return IngestConfig.model_validate({"source": {"path": str(path)}, **kw})


def _load(tmp_path: Path, name: str, data: bytes, **kw: Any) -> Any:
    p = tmp_path / name
    p.write_bytes(data)
    return load_events(_cfg(p, **kw))


def _error(tmp_path: Path, name: str, data: bytes, **kw: Any) -> str:
    with pytest.raises(IngestError) as e:
        _load(tmp_path, name, data, **kw)
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert f"'{tmp_path / name}'" in msg, f"does not name the file: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------------
# the acceptance list


def test_truncated_last_csv_line_is_quarantined_malformed(tmp_path: Path) -> None:
    # a writer died mid-line: the last row lost its last two fields
    ev = _load(tmp_path, "t.csv", HEADER + GOOD + b"u3,i3,17000")
    ev.report.check()
    assert ev.report.rows_read == 3 and dict(ev.report.quarantined) == {"malformed_row": 1}
    assert ev.quarantine.select("reason", "source_row", "raw_line").rows() == [("malformed_row", 2, "u3,i3,17000")]
    # truncated inside a quoted field
    ev = _load(tmp_path, "q.csv", HEADER + GOOD + b'u3,"i3')
    assert ev.report.rows_read == 3 and dict(ev.report.quarantined) == {"malformed_row": 1}


def test_non_utf8_bytes_are_quarantined_invalid_encoding(tmp_path: Path) -> None:
    # a latin-1 "é" (0xE9) in one row of an otherwise UTF-8 file
    ev = _load(tmp_path, "e.csv", HEADER + GOOD + b"u3,caf\xe9,1700000200,view\n")
    ev.report.check()
    assert dict(ev.report.quarantined) == {"invalid_encoding": 1}
    assert ev.quarantine["item_id"].to_list() == ["caf\ufffd"]  # shown lossily, located by source_row
    assert ev.events["item_id"].to_list() == ["i1", "i2"]
    # a genuine U+FFFD in a valid UTF-8 file is data, not an encoding error
    ev = _load(tmp_path, "ok.csv", HEADER + GOOD + "u3,\ufffd,1700000200,view\n".encode())
    assert ev.report.n_quarantined == 0 and ev.events.height == 3


def test_string_in_timestamp_column_is_quarantined(tmp_path: Path) -> None:
    ev = _load(tmp_path, "s.csv", HEADER + GOOD + b"u3,i3,last tuesday,view\n")
    assert dict(ev.report.quarantined) == {"unparsable_timestamp": 1}
    assert ev.quarantine["timestamp"].to_list() == ["last tuesday"]
    # a string in an integer parquet column cannot happen; a string column of epochs with one word can
    p = tmp_path / "s.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [str(T0), "soon"]}).write_parquet(p)
    ev = load_events(_cfg(p, columns={"event_type": None}))
    assert dict(ev.report.quarantined) == {"unparsable_timestamp": 1}
    assert ev.events["ts"].to_list() == [datetime.fromtimestamp(T0, UTC)]


def test_empty_files(tmp_path: Path) -> None:
    assert "empty (0 bytes)" in _error(tmp_path, "empty.csv", b"")
    assert "no data rows" in _error(tmp_path, "header.csv", HEADER)
    assert "empty (0 bytes)" in _error(tmp_path, "empty.parquet", b"")
    assert "empty" in _error(tmp_path, "empty.ndjson", b"")


def test_empty_file_among_good_files_is_skipped_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(HEADER + GOOD)
    (tmp_path / "b.csv").write_bytes(HEADER)
    from recsys_embed.errors import DataWarning

    with pytest.warns(DataWarning, match="b.csv"):
        ev = load_events(_cfg(tmp_path / "*.csv"))
    assert ev.report.sources == {str(tmp_path / "a.csv"): 2, str(tmp_path / "b.csv"): 0}
    assert ev.report.kept == 2


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    msg = _error(tmp_path, "m.csv", b"user_id,sku,timestamp,event_type\nu1,i1,1,view\n")
    assert "lacks column 'item_id'" in msg and "'sku'" in msg and "ingest.columns.item" in msg
    msg = _error(tmp_path, "m.csv", b"User_ID,item_id,timestamp,event_type\nu1,i1,1,view\n")
    assert "did you mean 'User_ID'?" in msg


@pytest.mark.parametrize(
    ("name", "data", "expect"),
    [
        ("png.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), "PNG image"),
        ("random.csv", bytes(range(256)) * 8, "binary"),
        ("utf16.csv", HEADER.decode().encode("utf-16"), "binary"),
        (
            "prose.txt",
            b"It was a bright cold day in April.\nAnd the clocks were striking thirteen.\n",
            "not a delimited",
        ),
        ("semicolons.csv", b"user_id;item_id;timestamp;event_type\nu1;i1;1;view\n", "csv_separator"),
        ("notparquet.parquet", b"user_id,item_id\n1,2\n", "not a readable Parquet file"),
        ("png.parquet", b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
        ("xlsx.jsonl", b"PK\x03\x04" + bytes(100), "ZIP archive"),
        ("words.jsonl", b"hello world\n", "does not hold JSON objects"),
    ],
)
def test_files_that_are_not_logs(tmp_path: Path, name: str, data: bytes, expect: str) -> None:
    assert expect in _error(tmp_path, name, data)


def test_wrong_column_types_name_file_and_column(tmp_path: Path) -> None:
    p = tmp_path / "l.parquet"
    pl.DataFrame({"user_id": [[1], [2]], "item_id": [1, 2], "timestamp": [T0, T0]}).write_parquet(p)
    with pytest.raises(IngestError) as e:
        load_events(_cfg(p, columns={"event_type": None}))
    msg = str(e.value)
    assert "\n" not in msg and "'user_id'" in msg and str(p) in msg and "ingest.columns.user" in msg
    p2 = tmp_path / "b.parquet"
    pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [True]}).write_parquet(p2)
    with pytest.raises(IngestError, match=r"ingest\.columns\.timestamp"):
        load_events(_cfg(p2, columns={"event_type": None}))


def test_ragged_rows_in_the_middle_and_quoted_fields(tmp_path: Path) -> None:
    data = HEADER + b'u1,"i,1",1700000000,view\nu2,i2,1700000000,view,EXTRA\nu3,i3\n\nu4,i4,1700000000,view\n'
    ev = _load(tmp_path, "r.csv", data)
    ev.report.check()
    assert ev.report.rows_read == 4  # the blank line is not a row
    assert dict(ev.report.quarantined) == {"malformed_row": 2}
    assert ev.events["item_id"].to_list() == ["i,1", "i4"]


def test_corrupt_gzip_is_one_line(tmp_path: Path) -> None:
    import gzip

    assert "could not be decompressed" in _error(tmp_path, "c.csv.gz", gzip.compress(HEADER + GOOD * 100)[:-40])


# ---------------------------------------------------------------------------------------------------------
# property: accounting balances, every quarantined row has the reason a reference model expects, no clean
# row violates validation

USERS = ["u1", "u2", " u3 ", "", "NULL", "u4"]
ITEMS = ["i1", "i2", "i3 ", "", "N/A"]
TIMES = [str(T0), str(T0 + 60), str(T0 + 3600), "", "garbage", "2023-11-14T22:13:20Z", "2023-11-14 22:14:20", "5"]
TYPES = ["view", "buy", " view", "unknown", "", "VIEW"]
WEIGHTS = {"view": 1.0, "buy": -1.0}
WINDOW_START = datetime(2023, 1, 1, tzinfo=UTC)
NULLS = {"", "NULL", "N/A"}


def _expected(row: tuple[str, str, str, str]) -> tuple[str | None, tuple[Any, ...] | None]:
    """Reference model: (reason, parsed clean row) for one CSV row of strings."""
    u, i, t, e = (x.strip() for x in row)
    if u in NULLS:
        return "null_user", None
    if i in NULLS:
        return "null_item", None
    if t == "":
        return "null_timestamp", None
    if t.isdigit():
        ts = datetime.fromtimestamp(int(t), UTC)  # all epochs here are seconds (median ~1.7e9)
    elif t == "2023-11-14T22:13:20Z":
        ts = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    elif t == "2023-11-14 22:14:20":
        ts = datetime(2023, 11, 14, 22, 14, 20, tzinfo=UTC)  # naive -> UTC
    else:
        return "unparsable_timestamp", None
    if ts < WINDOW_START:
        return "timestamp_out_of_window", None
    if e not in WEIGHTS:
        return "unknown_event_type", None
    return None, (u, i, ts, WEIGHTS[e], e)


rows_strategy = st.lists(
    st.tuples(st.sampled_from(USERS), st.sampled_from(ITEMS), st.sampled_from(TIMES), st.sampled_from(TYPES)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, dup_idx=st.lists(st.integers(0, 39), max_size=10), truncate=st.booleans())
def test_property_accounting_and_reasons_match_a_reference_model(
    tmp_path: Path, rows: list[tuple[str, str, str, str]], dup_idx: list[int], truncate: bool
) -> None:
    rows = rows + [rows[k % len(rows)] for k in dup_idx]  # planted exact duplicates
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["user_id", "item_id", "timestamp", "event_type"])
    w.writerows(rows)
    text = buf.getvalue()
    if truncate:  # a torn last line: "u1,i1" with no more fields
        text += "u1,i1"
    p = tmp_path / "prop.csv"
    p.write_text(text, encoding="utf-8")

    expected = [_expected(r) for r in rows] + ([("malformed_row", None)] if truncate else [])
    exp_reasons = [r for r, _ in expected if r is not None]
    clean = [c for r, c in expected if r is None]
    exp_dups = len(clean) - len(set(clean))

    cfg = _cfg(p, event_weights=WEIGHTS, window_start=WINDOW_START)
    if not clean:
        with pytest.raises(IngestError) as e:
            load_events(cfg)
        assert "\n" not in str(e.value) and "no usable rows" in str(e.value)
        return
    ev = load_events(cfg)

    r = ev.report
    assert r.is_balanced()
    assert r.rows_read == len(rows) + int(truncate)
    assert r.kept + r.duplicates + r.n_quarantined + r.n_filtered == r.rows_read
    assert ev.events.height == r.kept == len(set(clean))
    assert r.duplicates == exp_dups
    # every quarantined row has a reason, the one the reference model gives, in file order
    assert ev.quarantine.height == r.n_quarantined
    assert ev.quarantine["reason"].to_list() == exp_reasons
    assert set(ev.quarantine["reason"]) <= set(REASONS)
    # no clean row violates validation
    e = ev.events
    assert e["user_id"].null_count() == 0 and e["item_id"].null_count() == 0
    assert not e["user_id"].is_in(list(NULLS)).any() and not e["item_id"].is_in(list(NULLS)).any()
    assert (e["user_id"] == e["user_id"].str.strip_chars()).all()
    assert e["ts"].null_count() == 0 and (e["ts"] >= WINDOW_START).all()
    assert e["event_type"].is_in(list(WEIGHTS)).all()
    assert e["weight"].to_list() == [WEIGHTS[t] for t in e["event_type"]]
    # the kept rows are exactly the distinct clean rows, first occurrence order
    assert e.select("user_id", "item_id", "ts", "weight", "event_type").rows() == list(dict.fromkeys(clean))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    users=st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=1, max_size=30),
    data=st.data(),
)
def test_property_parquet_int_ids_balance(tmp_path: Path, users: list[int | None], data: st.DataObject) -> None:
    n = len(users)
    items = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    times = data.draw(st.lists(st.one_of(st.none(), st.sampled_from([T0, T0 + 1, T0 * 1000])), min_size=n, max_size=n))
    p = tmp_path / "prop.parquet"
    frame = pl.DataFrame(
        {"user_id": users, "item_id": items, "timestamp": times},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    )
    frame.write_parquet(p)
    cfg = _cfg(p, columns={"event_type": None}, timestamp_unit="s")
    ok = frame.filter(pl.col("user_id").is_not_null() & pl.col("timestamp").is_not_null())
    if ok.height == 0:
        with pytest.raises(IngestError):
            load_events(cfg)
        return
    ev = load_events(cfg)
    assert ev.report.is_balanced() and ev.report.rows_read == n
    assert ev.report.quarantined.get("null_user", 0) == frame["user_id"].null_count()
    assert ev.report.duplicates == ok.height - ok.unique().height
    assert ev.events.height == ok.unique().height
    assert ev.events.schema["user_id"] == pl.Int64


def test_bom_crlf_and_epoch_overflow(tmp_path: Path) -> None:
    ev = _load(tmp_path, "bom.csv", b"\xef\xbb\xbf" + (HEADER + GOOD).replace(b"\n", b"\r\n"))
    assert ev.events["user_id"].to_list() == ["u1", "u2"] and ev.report.n_quarantined == 0
    # 9e18 seconds cannot be a time (it overflows microseconds): unparsable, not a wrapped-around date
    p = tmp_path / "o.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [T0, 9_000_000_000_000_000_000]}).write_parquet(p)
    ev = load_events(_cfg(p, columns={"event_type": None}, timestamp_unit="s"))
    assert dict(ev.report.quarantined) == {"unparsable_timestamp": 1}


VALID = HEADER + b"".join(f"u{k % 7},i{k % 5},{T0 + k},{'view' if k % 3 else 'buy'}\n".encode() for k in range(30))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["f.csv", "f.ndjson", "f.tsv"]),
    edits=st.lists(st.tuples(st.integers(0, len(VALID)), st.binary(min_size=0, max_size=4)), max_size=6),
    cut=st.integers(0, len(VALID)),
)
def test_property_mangled_bytes_never_give_a_bare_traceback(
    tmp_path: Path, name: str, edits: list[tuple[int, bytes]], cut: int
) -> None:
    data = VALID if not name.endswith("ndjson") else _as_ndjson(VALID)
    for pos, junk in edits:  # overwrite/insert random bytes, then maybe truncate
        data = data[:pos] + junk + data[pos + len(junk) // 2 :]
    data = data[: max(cut, 1)] if cut < len(data) else data
    p = tmp_path / name
    p.write_bytes(data)
    try:
        ev = load_events(_cfg(p, event_weights={"view": 1.0, "buy": 2.0}))
    except IngestError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    ev.report.check()
    assert ev.quarantine.height == ev.report.n_quarantined
    assert ev.events.height == ev.report.kept


def _as_ndjson(csv_bytes: bytes) -> bytes:
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode())))
    import json

    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


def _valid_parquet() -> bytes:
    buf = io.BytesIO()
    pl.DataFrame(
        {"user_id": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"], "timestamp": [T0, T0 + 1, T0 + 2, T0 + 3]}
    ).write_parquet(buf, compression="uncompressed")
    return buf.getvalue()


VALID_PARQUET = _valid_parquet()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID_PARQUET) - 1), st.binary(min_size=1, max_size=8)), max_size=4),
    cut=st.integers(1, len(VALID_PARQUET)),
)
def test_property_corrupt_parquet_is_an_ingest_error_or_balanced(
    tmp_path: Path, edits: list[tuple[int, bytes]], cut: int
) -> None:
    data = VALID_PARQUET
    for pos, junk in edits:  # overwrite bytes in place (same length), then maybe truncate
        data = data[:pos] + junk + data[pos + len(junk) :]
    data = data[:cut]
    p = tmp_path / "c.parquet"
    p.write_bytes(data)
    try:
        ev = load_events(_cfg(p, columns={"event_type": None}))
    except IngestError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    ev.report.check()
