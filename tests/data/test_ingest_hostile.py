"""Hostile input: every broken file yields quarantined rows with reasons or a one-line error naming the file
(and the column), never a bare traceback or a silent drop. Plus property tests of the row accounting."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_embed.config import IngestConfig
from recsys_embed.data.ingest import REASONS, load_events
from recsys_embed.errors import DataWarning, IngestError

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
        ("utf16.csv", HEADER.decode().encode("utf-16-le"), "binary"),  # no BOM: cannot be told from binary
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
    # regression: T0 * 1000 read in seconds is the year 55,000; it used to be kept as a clean event
    far = pl.col("user_id").is_not_null() & (pl.col("timestamp") == T0 * 1000)
    ok = frame.filter(pl.col("user_id").is_not_null() & pl.col("timestamp").is_not_null() & ~far)
    if ok.height == 0:
        with pytest.raises(IngestError):
            load_events(cfg)
        return
    ev = load_events(cfg)
    assert ev.report.is_balanced() and ev.report.rows_read == n
    assert ev.report.quarantined.get("null_user", 0) == frame["user_id"].null_count()
    assert ev.report.quarantined.get("implausible_timestamp", 0) == frame.filter(far).height
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


# ---------------------------------------------------------------------------------------------------------
# The hostile-file corpus (issue 7): every file is generated here, none is checked in. Each case states its
# outcome: rows quarantined with a reason and the accounting balanced, or a one-line IngestError naming the
# file, the column/problem and the fix. Every load runs under a deadline, so a hang fails instead of stalling.

DEADLINE_S = 30.0


def _bounded(fn: Callable[[], Any], seconds: float = DEADLINE_S) -> Any:
    """Run ``fn`` in a daemon thread; fail the test if it has not returned within ``seconds`` (a hang)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"ingest did not finish within {seconds:.0f}s (a hang)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _nd(*rows: dict[str, Any]) -> bytes:
    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


R1 = {"user_id": "u1", "item_id": "i1", "timestamp": T0, "event_type": "view"}
R2 = {"user_id": "u2", "item_id": "i2", "timestamp": T0 + 100, "event_type": "view"}
PAD = GOOD * 300  # pushes a late byte past the 8 KiB binary sniff
NDPAD = _nd(*({**R1, "user_id": f"p{k}"} for k in range(200)))


def _pq(**cols: Any) -> Callable[[Path], None]:
    """A Parquet writer: the three base columns, replaced or extended by ``cols`` (pyarrow arrays)."""
    base: dict[str, Any] = {
        "user_id": pa.array([1, 2, 3]),
        "item_id": pa.array(["a", "b", "c"]),
        "timestamp": pa.array([T0, T0 + 1, T0 + 2]),
    }
    base.update(cols)
    return lambda p: pq.write_table(pa.table(base), p)


@dataclass
class Case:
    """One hostile file and its required outcome: ``quarantined`` (+ ``kept``, ``read``) or ``error`` substrings."""

    name: str
    data: bytes | Callable[[Path], None]
    cfg: dict[str, Any] = field(default_factory=dict)
    quarantined: dict[str, int] | None = None
    kept: int | None = None
    read: int | None = None
    error: tuple[str, ...] = ()
    warns: str | None = None  # a DataWarning matching this regex is raised (input repaired)


NOEV = {"columns": {"event_type": None}}
CASES = [
    # --- truncated and ragged
    Case("trunc.ndjson", _nd(R1, R2) + b'{"user_id":"u3","item', quarantined={"malformed_row": 1}, kept=2, read=3),
    Case("ragged_all.csv", HEADER + b"u1,i1,1,view,x\nu2,i2,2,view,y\n",
         error=("all 2 rows are malformed_row", "csv_separator")),
    Case("trunc_header.csv", b"user_id,item_id,time", error=("no data rows",)),
    Case("trunc.csv.zst", pa.compress(HEADER + GOOD * 1000, codec="zstd", asbytes=True)[:-30],
         error=("could not be decompressed", "copy it again")),
    # --- encodings and byte order marks
    Case("utf16.csv", b"\xff\xfe" + (HEADER + GOOD).decode().encode("utf-16-le"), quarantined={}, kept=2,
         warns="UTF-16"),
    Case("utf16be.csv", b"\xfe\xff" + (HEADER + GOOD).decode().encode("utf-16-be"), quarantined={}, kept=2,
         warns="UTF-16"),
    Case("utf16.ndjson", _nd(R1, R2).decode().encode("utf-16"), quarantined={}, kept=2, warns="UTF-16"),
    Case("utf16_odd.csv", b"\xff\xfe" + (HEADER + GOOD).decode().encode("utf-16-le") + b"\x00",
         error=("not valid UTF-16", "re-encode it as UTF-8")),
    Case("bom.ndjson", b"\xef\xbb\xbf" + _nd(R1, R2), quarantined={}, kept=2),  # regression: was "not JSON"
    Case("bom.tsv", b"\xef\xbb\xbf" + (HEADER + GOOD).replace(b",", b"\t"), quarantined={}, kept=2),
    Case("latin1.ndjson", _nd(R1) + b'{"user_id":"u2","item_id":"caf\xe9","timestamp":1700000000}\n',
         quarantined={"invalid_encoding": 1}, kept=1),
    # two files concatenated: the second BOM + header is a data row now
    Case("concat.csv", b"\xef\xbb\xbf" + HEADER + GOOD + b"\xef\xbb\xbf" + HEADER + GOOD,
         quarantined={"unparsable_timestamp": 1}, kept=2, read=5),
    # --- NUL bytes
    Case("nul_head.csv", HEADER + b"u3,i\x003,1700000200,view\n" + GOOD, error=("binary", "NUL")),
    Case("nul_id.csv", HEADER + PAD + b"u3,i\x003,1700000200,view\n", quarantined={"invalid_id": 1}, kept=2),
    Case("nul_type.csv", HEADER + PAD + b"u3,i3,1700000200,vi\x00ew\n", cfg={"event_weights": {"view": 1.0}},
         quarantined={"unknown_event_type": 1}, kept=2),
    Case("nul_raw.ndjson", NDPAD + b'{"user_id":"u\x003","item_id":"i1","timestamp":1700000000}\n',
         quarantined={"malformed_row": 1}, kept=200),
    Case("nul_escaped.ndjson", NDPAD + _nd({**R1, "user_id": "u\u00003"}), quarantined={"invalid_id": 1}, kept=200),
    # --- giant fields and IDs
    Case("giant_field.csv", b"user_id,item_id,timestamp,event_type,note\n" + b"u1,i1,1700000000,view,"
         + b"n" * (1 << 20) + b"\nu2,i2,1700000000,view,short\n", quarantined={}, kept=2),
    Case("giant_item.csv", HEADER + GOOD + b"u3," + b"x" * (1 << 20) + b",1700000000,view\n",
         quarantined={"invalid_id": 1}, kept=2),
    Case("giant_user.csv", HEADER + GOOD + b"u" * 10_000 + b",i3,1700000000,view\n",
         quarantined={"invalid_id": 1}, kept=2),
    Case("giant_user_allowed.csv", HEADER + GOOD + b"u" * 10_000 + b",i3,1700000000,view\n",
         cfg={"max_id_length": 20_000}, quarantined={}, kept=3),
    Case("giant_line.csv", b"a" * (2 << 20), error=("no data rows",)),
    # --- scientific-notation and negative IDs
    Case("sci.csv", HEADER + GOOD + b"1.23457E+11,i3,1700000000,view\n1E+11,i4,1700000000,view\n"
         b"3e10,i5,1700000000,view\n", quarantined={"invalid_id": 2}, kept=3),  # 3e10: a hex ID, kept
    Case("negative.csv", HEADER + GOOD + b"-5,-7,1700000000,view\n", quarantined={}, kept=3),
    Case("negative.parquet", _pq(user_id=pa.array([-1, -2**63, 3])), cfg=NOEV, quarantined={}, kept=3),
    # beyond 2**53 a float lost the last digits; 1.5 is no ID (it used to be kept as the text "1.5", and 7.0 as
    # "7.0", another user than 7 in an integer file)
    Case("float_ids.ndjson", _nd({**R1, "user_id": 9007199254740993}, {**R2, "user_id": 1.5},
                                 {**R2, "user_id": 7.0}), quarantined={"invalid_id": 2}, kept=1,
         warns="float-typed"),
    Case("uint64_ids.parquet", _pq(user_id=pa.array([1, 2**63 + 5, 3], pa.uint64())), cfg=NOEV, quarantined={},
         kept=3),  # regression: the big one was quarantined as null_user
    Case("decimal_ids.parquet", _pq(user_id=pa.array([1, 2, 3], pa.decimal128(20, 0))), cfg=NOEV,
         error=("'user_id'", "Decimal", "ingest.columns.user")),
    Case("null_ids.parquet", _pq(user_id=pa.nulls(3)), cfg=NOEV,
         error=("'user_id'", "null in every row", "ingest.columns.user")),
    # --- timestamps: far past, far future, placeholders, mixed units
    Case("far.csv", HEADER + GOOD + b"u3,i3,-62135596800,view\nu4,i4,0,view\nu5,i5,9999-12-31T00:00:00Z,view\n"
         b"u6,i6,0001-01-01T00:00:00Z,view\nu7,i7,4200000000,view\n",
         quarantined={"implausible_timestamp": 5}, kept=2),
    Case("far_allowed.csv", HEADER + GOOD + b"u3,i3,1960-05-01T00:00:00Z,view\n", cfg={"plausible_after": None},
         quarantined={}, kept=3),
    Case("mixed_units.csv", HEADER + b"u1,i1,1700000000,view\nu2,i2,1700000000000,view\n"
         b"u3,i3,1700000000000000,view\nu4,i4,1700000100000,view\nu5,i5,1700000200000,view\n",
         quarantined={"implausible_timestamp": 2}, kept=3, warns="mixes epoch units"),
    Case("ms_read_as_s.csv", HEADER + GOOD + b"u3,i3,1700000000000,view\n", cfg={"timestamp_unit": "s"},
         quarantined={"implausible_timestamp": 1}, kept=2),
    Case("far.parquet", _pq(timestamp=pa.array([T0 * 10**9, 0, 2**62], pa.timestamp("ns"))), cfg=NOEV,
         quarantined={"implausible_timestamp": 2}, kept=1),
    Case("far_dates.parquet", _pq(timestamp=pa.array([19_000, -700_000, 2_900_000], pa.date32())), cfg=NOEV,
         quarantined={"implausible_timestamp": 2}, kept=1),
    Case("ts_duration.parquet", _pq(timestamp=pa.array([1, 2, 3], pa.duration("s"))), cfg=NOEV,
         error=("'timestamp'", "Duration", "ingest.columns.timestamp")),
    # --- duplicate headers
    Case("dup_header.csv", b"user_id,item_id,user_id,timestamp,event_type\nu1,i1,u9,1700000000,view\n",
         error=("'user_id' more than once", "ingest.columns.user")),
    Case("dup_unmapped.csv", b"user_id,item_id,timestamp,event_type,note,note\nu1,i1,1700000000,view,a,b\n"
         b"u2,i2,1700000000,view,a,b\n", quarantined={}, kept=2),
    Case("dup_columns.parquet", lambda p: pq.write_table(pa.Table.from_arrays(
        [pa.array([1]), pa.array([2]), pa.array(["a"]), pa.array([T0])],
        names=["user_id", "user_id", "item_id", "timestamp"]), p), cfg=NOEV,
        error=("'user_id' more than once", "unique column names")),
    # --- NDJSON: nested values, missing keys, mixed kinds
    Case("nested_id.ndjson", _nd(R1, R2, {**R2, "user_id": {"id": 3}}, {**R2, "item_id": [1, 2]}),
         quarantined={"invalid_id": 2}, kept=2),
    Case("nested_other.ndjson", _nd({**R1, "meta": {"a": [1, {"b": 2}]}}, {**R2, "meta": None}),
         quarantined={}, kept=2),
    Case("missing_key.ndjson", _nd(R1, R2, {"user_id": "u3", "timestamp": T0}), quarantined={"null_item": 1},
         kept=2),
    Case("missing_everywhere.ndjson", _nd({"user_id": "u1", "item_id": "i1"}),
         error=("lacks column 'timestamp'", "ingest.columns.timestamp")),
    Case("null_everywhere.ndjson", _nd({**R1, "timestamp": None}, {**R2, "timestamp": None}),
         error=("'timestamp'", "null in every row", "ingest.columns.timestamp")),
    Case("kinds.ndjson", _nd(R1, {**R2, "timestamp": {"s": 1}}), error=("could not be read as NDJSON", "one kind")),
    Case("scalars.ndjson", _nd(R1) + b'42\n"text"\n[1, 2]\nnull\n' + _nd(R2), quarantined={"malformed_row": 4},
         kept=2),
    Case("deep.ndjson", _nd(R1, R2) + b'{"user_id":"u3","x":' + b"[" * 5000 + b"]" * 5000 + b"}\n",
         quarantined={"malformed_row": 1}, kept=2),
    # --- Parquet with unexpected types
    Case("ts_text.parquet", _pq(timestamp=pa.array(["2023-11-14T22:13:20Z", "yesterday", str(T0)])), cfg=NOEV,
         quarantined={"unparsable_timestamp": 1}, kept=2),
    Case("ids_struct.parquet", _pq(item_id=pa.array([{"a": 1}, {"a": 2}, {"a": 3}])), cfg=NOEV,
         error=("'item_id'", "Struct", "ingest.columns.item")),
    Case("weight_text.parquet", _pq(w=pa.array(["1.5", "abc", ""])), cfg={"columns": {"event_type": None,
         "weight": "w"}}, quarantined={"invalid_weight": 2}, kept=1),
    Case("weight_list.parquet", _pq(w=pa.array([[1.0], [2.0], [3.0]])), cfg={"columns": {"event_type": None,
         "weight": "w"}}, error=("'w'", "not numbers", "ingest.columns.weight")),
    Case("type_list.parquet", _pq(event_type=pa.array([["a"], ["b"], ["c"]])),
         error=("'event_type'", "not text", "ingest.columns.event_type")),
    Case("rating_text.parquet", _pq(r=pa.array(["5", "x", None])), cfg={"columns": {"event_type": None,
         "rating": "r"}}, quarantined={"invalid_weight": 1}, kept=2),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_corpus(tmp_path: Path, case: Case) -> None:
    p = tmp_path / case.name
    if isinstance(case.data, bytes):
        p.write_bytes(case.data)
    else:
        case.data(p)
    cfg = _cfg(p, **case.cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.error:
            with pytest.raises(IngestError) as e:
                _bounded(lambda: load_events(cfg))
            msg = str(e.value)
            assert "\n" not in msg, f"not one line: {msg!r}"
            assert f"'{p}'" in msg, f"does not name the file: {msg!r}"
            for part in case.error:
                assert part in msg, f"{part!r} missing from {msg!r}"
            return
        ev = _bounded(lambda: load_events(cfg))
    r = ev.report
    r.check()  # rows read = kept + duplicates + quarantined + filtered
    assert dict(r.quarantined) == case.quarantined
    assert r.kept == ev.events.height == case.kept
    if case.read is not None:
        assert r.rows_read == case.read
    assert ev.quarantine.height == r.n_quarantined
    if ev.quarantine.height:  # every quarantined row carries a known reason and where it came from
        assert ev.quarantine["reason"].null_count() == 0 and set(ev.quarantine["reason"]) <= set(REASONS)
        assert (ev.quarantine["source_file"] == str(p)).all()
    if case.warns:
        assert any(issubclass(w.category, DataWarning) and re.search(case.warns, str(w.message)) for w in caught)


def test_mixed_units_can_be_read_per_value(tmp_path: Path) -> None:
    # timestamp_unit=mixed: each value in the unit its magnitude implies (a log whose unit changed)
    body = b"".join(f"u{k},i{k},{T0 * 1000**k},view\n".encode() for k in range(4))  # s, ms, us, ns
    ev = _load(tmp_path, "m.csv", HEADER + body, timestamp_unit="mixed")
    assert ev.report.n_quarantined == 0
    assert ev.events["ts"].to_list() == [datetime.fromtimestamp(T0, UTC)] * 4


def test_hostile_ids_are_kept_exactly(tmp_path: Path) -> None:
    # negative, huge unsigned and hex-like IDs are data: they come out exactly as they went in
    p = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"user_id": pa.array([0, 2**64 - 1, 2**63], pa.uint64()), "item_id": ["3e10", "-0", "a b"],
                             "timestamp": [T0, T0, T0]}), p)  # fmt: skip
    ev = load_events(_cfg(p, columns={"event_type": None}))
    assert ev.events["user_id"].to_list() == ["0", str(2**64 - 1), str(2**63)]
    assert ev.events["item_id"].to_list() == ["3e10", "-0", "a b"]


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: random CSV / NDJSON content (hypothesis). Whatever the bytes, ingest either balances its books
# (every quarantined row with a known reason) or fails with one line naming the file; never a bare Polars or
# Arrow error, never a hang.

# printable text plus the characters that break parsers: separators, quotes, NUL, BOM, non-ASCII
FIELD_CHARS = st.sampled_from([*"abcXYZ019 .-+eE{}[]:/'\\;\t", '"', ",", "\x00", "\ufeff", "é", "€", "😀"])
FIELD = st.one_of(
    st.text(FIELD_CHARS, max_size=12),
    st.sampled_from(["", "NULL", "NaN", "1.23457E+11", "-5", str(T0), str(T0 * 1000), "9999-12-31", "view"]),
)
NAMES = st.sampled_from(["user_id", "item_id", "timestamp", "event_type", "x", "user_id", ""])


def _assert_accounted(p: Path, load: Callable[[], Any]) -> Any:
    try:
        ev = _bounded(load, 20.0)
    except IngestError as e:
        assert "\n" not in str(e) and str(p) in str(e), str(e)
        return None
    ev.report.check()
    assert ev.quarantine.height == ev.report.n_quarantined and ev.events.height == ev.report.kept
    if ev.quarantine.height:
        assert ev.quarantine["reason"].null_count() == 0 and set(ev.quarantine["reason"]) <= set(REASONS)
    return ev


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(NAMES, min_size=1, max_size=6),
    rows=st.lists(st.lists(FIELD, min_size=0, max_size=7), max_size=25),
    newline=st.sampled_from(["\n", "\r\n"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]),
    quote_all=st.booleans(),
)
def test_fuzz_random_csv(
    tmp_path: Path, header: list[str], rows: list[list[str]], newline: str, encoding: str, quote_all: bool
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=newline, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    w.writerow(header)
    w.writerows(rows)
    p = tmp_path / "fuzz.csv"
    p.write_bytes(buf.getvalue().encode(encoding, errors="replace"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        _assert_accounted(p, lambda: load_events(_cfg(p, event_weights={"view": 1.0})))


JSON_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(FIELD_CHARS, max_size=8)
)
JSON_VALUE = st.recursive(
    JSON_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3), max_leaves=6
)
JSON_LINE = st.one_of(
    st.dictionaries(NAMES, st.one_of(JSON_VALUE, FIELD), max_size=6).map(lambda d: json.dumps(d)),
    st.fixed_dictionaries(  # a well-formed event, so that some files have clean rows
        {"user_id": FIELD, "item_id": FIELD, "timestamp": st.sampled_from([T0, T0 + 5, str(T0), "2023-11-14"])}
    ).map(lambda d: json.dumps(d, ensure_ascii=False)),
    st.text(FIELD_CHARS, max_size=20),  # junk: not JSON at all
    JSON_VALUE.map(lambda v: json.dumps(v)),  # JSON, but not an object
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(JSON_LINE, min_size=1, max_size=25), bom=st.booleans())
def test_fuzz_random_ndjson(tmp_path: Path, lines: list[str], bom: bool) -> None:
    p = tmp_path / "fuzz.ndjson"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode("utf-8", errors="replace"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ev = _assert_accounted(p, lambda: load_events(_cfg(p, columns={"event_type": None})))
    if ev is not None:  # one row per non-blank line: nothing is lost or invented
        text = "\n".join(lines)
        assert ev.report.rows_read == sum(1 for ln in text.split("\n") if ln.strip())


# ---------------------------------------------------------------------------------------------------------
# Issue 20: silent losses and splits (items 3, 4, 5, 7a)

EPOCH_HEADER = "user_id,item_id,timestamp\n"


def _epoch_log(n: int) -> list[str]:
    """``n`` data lines like ``1127,SKU0017,1681232060`` (distinct rows, so none is a duplicate)."""
    return [f"{1000 + k % 300},SKU{k % 50:04d},{1681232060 + k}\n" for k in range(n)]


def test_unterminated_quote_quarantines_its_line_and_keeps_the_rest(tmp_path: Path) -> None:
    """Regression (issue 20.3): a quote that never closes on row 1,500 of a 3,001-line CSV swallowed the 1,500
    lines after it; the report said rows read 1,500, kept 1,499, one malformed_row with a null raw line, and
    balanced. Now that line alone is quarantined as unterminated_quote (file, line, text), every later line is
    parsed, and the report counts the physical lines read, so such a loss cannot balance silently."""
    rows = _epoch_log(3000)
    rows[1499] = '1127,"SKU0017,1681232060\n'  # data row 1,500 = physical line 1,501
    p = tmp_path / "quote.csv"
    p.write_text(EPOCH_HEADER + "".join(rows))
    ev = load_events(_cfg(p, columns={"event_type": None}))
    r = ev.report.check()
    assert (r.rows_read, r.kept, dict(r.quarantined)) == (3000, 2999, {"unterminated_quote": 1})
    assert r.details["lines_read"] == 3001  # header + 3,000 rows: nothing swallowed
    q = ev.quarantine.select("reason", "source_file", "source_row", "source_line", "raw_line").rows()
    assert q == [("unterminated_quote", str(p), 1499, 1501, '1127,"SKU0017,1681232060')]
    assert ev.events["ts"].max() == datetime.fromtimestamp(1681232060 + 2999, UTC)  # the last line is kept

    # two stray quotes (the second would close the first's field) and a legitimate quoted newline: each stray
    # line is its own culprit, the quoted newline is one row over two lines (a continuation line)
    rows = _epoch_log(40)
    rows[9] = '1009,"SKU0009,1681232069\n'
    rows[19] = '1019,SKU"0019,1681232079\n'  # a quote inside a field is text
    rows[29] = '1029,"SKU0029,1681232089\n'
    rows[35] = '1035,"SKU\n0035",1681232095\n'
    p.write_text(EPOCH_HEADER + "".join(rows))
    ev = load_events(_cfg(p, columns={"event_type": None}))
    r = ev.report.check()
    assert dict(r.quarantined) == {"unterminated_quote": 2, "invalid_id": 1}  # "SKU\n0035" holds a newline
    assert ev.quarantine.filter(pl.col("reason") == "unterminated_quote")["source_line"].to_list() == [11, 31]
    assert r.rows_read == 40 and r.kept == 37 and r.details["lines_read"] == 1 + 40 + 1


def test_unterminated_quote_in_the_header_names_file_and_line(tmp_path: Path) -> None:
    """Regression (issue 20.3): a header whose quote never closes became a header swallowing the whole file."""
    msg = _error(tmp_path, "h.csv", b'user_id,"item_id,timestamp\n' + "".join(_epoch_log(3)).encode() + b'1,"x\n')
    assert "unreadable header (line 1" in msg and "quoting" in msg


def test_lines_read_counts_every_physical_line(tmp_path: Path) -> None:
    """Regression (issue 20.3): the report counted parsed records only, so lines lost inside a record were
    invisible. ``lines_read`` = header + blank + rows + continuation lines, for both CSV parsers and NDJSON."""
    body = "".join(_epoch_log(5))
    ev = _load(tmp_path, "crlf.csv", (EPOCH_HEADER + "\n" + body + "\n\n").replace("\n", "\r\n").encode(),
               columns={"event_type": None})  # fmt: skip
    assert ev.report.rows_read == 5 and ev.report.details["lines_read"] == 1 + 1 + 5 + 2
    ev = _load(tmp_path, "quoted.csv", (EPOCH_HEADER + '1,"a\nb\nc",1681232060\n' + body).encode(),
               columns={"event_type": None})  # fmt: skip  # the exact parser: one row over three lines
    assert ev.report.rows_read == 6 and ev.report.details["lines_read"] == 1 + 3 + 5
    ev = _load(tmp_path, "n.ndjson", _nd(R1) + b"\n  \n" + _nd(R2) + b"not json")
    assert ev.report.rows_read == 3 and ev.report.details["lines_read"] == 5
    parquet = load_events(_cfg(_write_parquet(tmp_path), columns={"event_type": None}))
    assert "lines_read" not in parquet.report.details  # Parquet has no lines


def _write_parquet(tmp_path: Path) -> Path:
    p = tmp_path / "v.parquet"
    p.write_bytes(VALID_PARQUET)
    return p


@pytest.mark.parametrize("iso", ["2023-06-01T00:00:00Z", "2038-01-19T03:14:08Z"])
def test_iso_times_are_read_as_iso_in_a_column_of_mixed_epoch_units(tmp_path: Path, iso: str) -> None:
    """Regression (issue 20.4): with timestamp_unit auto, a text column of epoch seconds holding one ISO time and
    one millisecond value quarantined the valid ISO row as implausible_timestamp (an ISO string has no magnitude,
    and a null magnitude read as nanoseconds). ISO text is always read as ISO; numbers keep the unit rule."""
    body = "".join(_epoch_log(20)) + f"u1,i1,{iso}\nu2,i2,1681232060000\n"
    p = tmp_path / "mixed_iso.csv"
    p.write_text(EPOCH_HEADER + body)
    with pytest.warns(DataWarning, match="mixes epoch units"):
        ev = load_events(_cfg(p, columns={"event_type": None}))
    assert dict(ev.report.quarantined) == {"implausible_timestamp": 1}
    assert ev.quarantine["timestamp"].to_list() == ["1681232060000"]  # the ms value, read as seconds
    want = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    assert ev.events.filter(pl.col("user_id") == "u1")["ts"].to_list() == [want]
    for unit in ("s", "mixed"):  # the same rule in every mode
        ev = load_events(_cfg(p, columns={"event_type": None}, timestamp_unit=unit))
        assert ev.events.filter(pl.col("user_id") == "u1")["ts"].to_list() == [want]


def test_unicode_lookalike_ids_are_one_id(tmp_path: Path) -> None:
    """Regression (issue 20.5): "josé" in NFC and in NFD were two users, "café" NFC/NFD two items, and "1000"
    followed by a zero-width space (U+200B) a user apart from "1000". With ingest.id_normalization nfc (the
    default) text IDs are NFC-normalized and zero-width characters dropped, counted and named in a warning."""
    nfc, nfd = "jos\u00e9", "jose\u0301"
    rows = [
        (nfc, "caf\u00e9"), (nfd, "cafe\u0301"), ("1000", "i1"), ("1000\u200b", "i2"), ("\ufeff1001", "i1"),
        ("\u200b", "i1"),  # nothing left: no user
        ("\u200d\U0001f469\u200d\U0001f4bb", "i1"),  # a ZWJ inside an emoji sequence is part of it
    ]  # fmt: skip
    p = tmp_path / "ids.csv"
    p.write_text(EPOCH_HEADER + "".join(f"{u},{i},{1681232060 + k}\n" for k, (u, i) in enumerate(rows)))
    with pytest.warns(DataWarning, match=r"Unicode normalization .*'jose\\u0301' -> 'jos\\xe9'"):
        ev = load_events(_cfg(p, columns={"event_type": None}))
    users, items = ev.events["user_id"], ev.events["item_id"]
    assert sorted(users.unique()) == sorted({nfc, "1000", "1001", "\U0001f469\u200d\U0001f4bb"})
    assert sorted(items.unique()) == ["caf\u00e9", "i1", "i2"]
    assert dict(ev.report.quarantined) == {"null_user": 1}
    assert ev.report.details["ids_normalized"] == 6  # user rows NFD, U+200B, BOM, U+200B alone, ZWJ edge; 1 item
    # "none" keeps every spelling apart, byte for byte
    ev = load_events(_cfg(p, columns={"event_type": None}, id_normalization="none"))
    assert ev.events["user_id"].n_unique() == 7 and "ids_normalized" not in ev.report.details
    # integer IDs read from text: the zero-width space no longer makes "1000\u200b" an invalid_id
    p.write_text(EPOCH_HEADER + "1000,1,1681232060\n1000\u200b,2,1681232061\n")
    ev = load_events(_cfg(p, columns={"event_type": None}, user_id_type="int"))
    assert ev.events["user_id"].to_list() == [1000, 1000] and ev.report.n_quarantined == 0
    # the same in Parquet string columns
    pq.write_table(pa.table({"user_id": [nfc, nfd], "item_id": ["a", "a"], "timestamp": [T0, T0 + 1]}),
                   q := tmp_path / "ids.parquet")  # fmt: skip
    with pytest.warns(DataWarning, match="1 user ID"):
        assert load_events(_cfg(q, columns={"event_type": None})).events["user_id"].to_list() == [nfc, nfc]


def test_zero_byte_file_among_good_files_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """Regression (issue 20.7a): a 0-byte file among good ones stopped the whole ingest ("is empty (0 bytes)"),
    while a header-only file was skipped with a warning. Both are skipped with a DataWarning naming the file,
    counted in the report; a log in which every file is empty is still an error."""
    import gzip

    (tmp_path / "a.csv").write_bytes(HEADER + GOOD)
    (tmp_path / "b.csv").write_bytes(b"")
    (tmp_path / "c.csv").write_bytes(HEADER)
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = load_events(_cfg(tmp_path / "*.csv*"))
    said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("b.csv" in m and "0 bytes" in m and "skipped" in m for m in said)
    assert any("c.csv" in m and "header only" in m for m in said)
    assert any("d.csv.gz" in m and "empty once decompressed" in m for m in said)
    assert ev.report.kept == 2 and ev.report.details["files_skipped"] == 3
    assert ev.report.sources == {str(tmp_path / f): n for f, n in [("a.csv", 2), ("b.csv", 0), ("c.csv", 0),
                                                                   ("d.csv.gz", 0)]}  # fmt: skip
    # Parquet too
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.parquet").write_bytes(VALID_PARQUET)
    (tmp_path / "p" / "b.parquet").write_bytes(b"")
    with pytest.warns(DataWarning, match="b.parquet' has no data rows"):
        assert load_events(_cfg(tmp_path / "p", columns={"event_type": None})).report.kept == 4
    # every file empty: still one clear error
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.csv").write_bytes(b"")
    (tmp_path / "e" / "y.csv").write_bytes(b"")
    with pytest.raises(IngestError, match=r"all 2 files under .* have no data rows|no data rows"):
        load_events(_cfg(tmp_path / "e"))
