"""Ingest: parsing, validation, quarantine, dedup, rule filters and exact row accounting."""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from recsys_embed.config import IngestConfig
from recsys_embed.data import ingest as ingest_module
from recsys_embed.data.ingest import EVENT_COLUMNS, REASONS, TS_DTYPE, EventLog, load_events, write_quarantine
from recsys_embed.errors import DataWarning, IngestError

REPO = Path(__file__).resolve().parents[2]
RETAIL = REPO / "data" / "online-retail" / "events.parquet"
OTTO = REPO / "data" / "otto-sample" / "events.parquet"

RETAIL_INGEST: dict[str, Any] = {
    "source": {"path": str(RETAIL)},
    "columns": {
        "user": "user_id",
        "item": "item_id",
        "timestamp": "timestamp",
        "event_type": "event_type",
        "quantity": "quantity",
        "item_text": "description",
    },
    "event_weights": {"purchase": 1.0, "cancellation": -1.0},
    "use_quantity": False,
    "item_filters": [
        {
            "name": "non_product_item",
            "exclude_pattern": r"^(POST|DOT|M|m|C2|D|S|B|BANK CHARGES|AMAZONFEE|CRUK|PADS|gift_0001_\d+)$",
        }
    ],
}

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
T0_DT = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
HEADER = "user_id,item_id,timestamp,event_type\n"


def _cfg(path: Path | str, **kw: Any) -> IngestConfig:
    tree: dict[str, Any] = {"source": {"path": str(path)}}
    tree.update(kw)
    return IngestConfig.model_validate(tree)


def _csv(tmp_path: Path, body: str, name: str = "events.csv", header: str = HEADER) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(header + body, encoding="utf-8")
    return p


def _assert_contract(ev: EventLog) -> None:
    ev.report.check()
    assert ev.events.columns == list(EVENT_COLUMNS)
    assert ev.events.schema["ts"] == TS_DTYPE
    assert ev.events.schema["weight"] == pl.Float64 and ev.events.schema["rating"] == pl.Float64
    assert ev.events.height == ev.report.kept
    assert ev.quarantine.height == ev.report.n_quarantined
    assert sum(ev.report.sources.values()) == ev.report.rows_read
    if ev.quarantine.height:
        assert set(ev.quarantine["reason"].unique()) <= set(REASONS)
        assert ev.quarantine["reason"].null_count() == 0


# ---------------------------------------------------------------------------------------------------------
# shipped logs


def test_retail_log_with_the_shipped_config() -> None:
    ev = load_events(IngestConfig.model_validate(RETAIL_INGEST))
    _assert_contract(ev)
    r = ev.report
    assert r.rows_read == 541_909 and r.sources == {str(RETAIL): 541_909}
    assert dict(r.quarantined) == {"null_user": 135_080}  # the 135,080 rows without a CustomerID
    # 5,318 rows repeat every mapped column (user, item, time, type, quantity, description) of an earlier row
    assert r.duplicates == 5_318
    assert r.filtered["non_product_item"] == 1_867  # postage, manual, bank charges, ... lines
    assert r.kept == 541_909 - 135_080 - 5_318 - 1_867 == 399_644
    ev_df = ev.events
    assert ev_df.schema["user_id"] == pl.Int64 and ev_df.schema["item_id"] == pl.String
    # cancellations are negative events
    n_cancel = ev_df.filter(pl.col("event_type") == "cancellation").height
    assert n_cancel > 0 and ev_df.filter(pl.col("weight") == -1.0).height == n_cancel
    assert set(ev_df["weight"].unique()) == {1.0, -1.0}
    assert not ev_df["item_id"].is_in(["POST", "M", "BANK CHARGES"]).any()
    assert ev_df["ts"].min() == datetime(2010, 12, 1, 8, 26, tzinfo=UTC)
    # one text per kept item
    assert ev.item_text is not None
    assert ev.item_text.height == ev_df["item_id"].n_unique() == ev.item_text["item_id"].n_unique()
    assert ev.item_text.filter(pl.col("item_id") == "85123A")["text"].item() == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert ev.quarantine.columns[-3:] == ["reason", "source_file", "source_row"]
    assert ev.quarantine["user_id"].null_count() == 135_080
    assert len(ev.fingerprint) == 64 and ev.files == [str(RETAIL)]


def test_otto_sample_with_column_mapping() -> None:
    weights = {"clicks": 1.0, "carts": 3.0, "orders": 6.0}
    ev = load_events(
        _cfg(OTTO, columns={"user": "session_id", "item": "item_id", "timestamp": "timestamp"}, event_weights=weights)
    )
    _assert_contract(ev)
    assert ev.report.rows_read == 862 and ev.report.kept == 862
    assert ev.events.schema["user_id"] == pl.Int64 and ev.events.schema["item_id"] == pl.Int64
    assert ev.events["user_id"].n_unique() == 20
    # 800 clicks x 1 + 52 carts x 3 + 10 orders x 6 = 1016
    assert ev.events["weight"].sum() == pytest.approx(1016.0)
    # the millisecond column gives the same times (auto unit: ~1.66e12 -> ms) to the second
    ev_ms = load_events(
        _cfg(OTTO, columns={"user": "session_id", "item": "item_id", "timestamp": "ts_ms"}, event_weights=weights)
    )
    assert (ev_ms.events["ts"].dt.truncate("1s") == ev.events["ts"]).all()
    assert not (ev_ms.events["ts"] == ev.events["ts"]).all()  # milliseconds were kept


# ---------------------------------------------------------------------------------------------------------
# columns and types


def test_missing_column_error_names_file_column_found_and_key(tmp_path: Path) -> None:
    p = _csv(tmp_path, "u1,1,2\n", header="sku,ts,user_id\n")
    with pytest.raises(IngestError) as e:
        load_events(_cfg(p))
    msg = str(e.value)
    assert msg == (
        f"events file '{p}' lacks column 'item_id' (found: ['sku', 'ts', 'user_id']); map it with ingest.columns.item"
    )
    # mapping it fixes it
    ev = load_events(_cfg(p, columns={"item": "sku", "timestamp": "ts", "event_type": None}))
    assert ev.events["item_id"].to_list() == ["u1"] and ev.events["user_id"].to_list() == ["2"]


def test_string_ids_are_stripped_and_int_ids_stay_int(tmp_path: Path) -> None:
    p = _csv(tmp_path, f" u1 ,\t007 ,{T0},view\n")
    ev = load_events(_cfg(p))
    assert ev.events.schema["user_id"] == pl.String
    assert ev.events.row(0)[:2] == ("u1", "007")
    q = tmp_path / "int.parquet"
    pl.DataFrame(
        {"user_id": [1, 2], "item_id": pl.Series([10, 20], dtype=pl.UInt32), "timestamp": [T0, T0]}
    ).write_parquet(q)
    ev = load_events(_cfg(q, columns={"event_type": None}))
    assert ev.events.schema["user_id"] == pl.Int64 and ev.events.schema["item_id"] == pl.Int64
    assert ev.events["item_id"].to_list() == [10, 20]


def test_integral_float_ids_become_int_and_mixed_files_become_string(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    # pandas writes an integer column with missing values as float: 17850.0
    pl.DataFrame({"user_id": [17850.0, None, float("nan")], "item_id": [1, 2, 3], "timestamp": [T0] * 3}).write_parquet(
        d / "a.parquet"
    )
    with pytest.warns(DataWarning, match="integral"):
        ev = load_events(_cfg(d / "a.parquet", columns={"event_type": None}))
    assert ev.events.schema["user_id"] == pl.Int64 and ev.events["user_id"].to_list() == [17850]
    assert dict(ev.report.quarantined) == {"null_user": 2}  # null and NaN
    # a second file with string user IDs: one ID dtype for the whole log, String
    pl.DataFrame({"user_id": ["x"], "item_id": [3], "timestamp": [T0 + 5]}).write_parquet(d / "b.parquet")
    with pytest.warns(DataWarning):
        ev = load_events(_cfg(d, columns={"event_type": None}))
    assert ev.events.schema["user_id"] == pl.String
    assert ev.events["user_id"].to_list() == ["17850", "x"]
    assert ev.report.sources == {str(d / "a.parquet"): 3, str(d / "b.parquet"): 1}


# ---------------------------------------------------------------------------------------------------------
# IDs mean the same in every file


def _pq_log(path: Path, users: list[Any], items: list[Any] | None = None) -> Path:
    n = len(users)
    items = items if items is not None else [f"i{k}" for k in range(n)]
    pl.DataFrame({"user_id": users, "item_id": items, "timestamp": [T0 + k for k in range(n)]}).write_parquet(path)
    return path


def test_float_ids_mean_the_same_in_every_file(tmp_path: Path) -> None:
    # Regression (issue 14): a float ID column was read as Int64 (1000) in a file whose values were all whole and
    # as text (1000.0) in a file holding a fractional value, so one user became two and the accounting balanced.
    d = tmp_path / "logs"
    d.mkdir()
    _pq_log(d / "a.parquet", [1000.0, 2000.0, 3000.0])
    _pq_log(d / "b.parquet", [1000.0, 1000.5, 2000.0, float("nan")], ["j0", "j1", "j2", "j3"])
    with pytest.warns(DataWarning, match="float-typed in 2 file"):
        ev = load_events(_cfg(d, columns={"event_type": None}))
    _assert_contract(ev)
    assert ev.events.schema["user_id"] == pl.Int64
    assert ev.events.group_by("user_id").len().sort("user_id").rows() == [(1000, 2), (2000, 2), (3000, 1)]
    assert dict(ev.report.quarantined) == {"invalid_id": 1, "null_user": 1}  # 1000.5 is no ID; NaN is a gap
    bad = ev.quarantine.filter(pl.col("reason") == "invalid_id")
    assert bad.select("user_id", "source_row").rows() == [("1000.5", 1)]
    assert ev.report.rows_read == 7 and ev.report.kept == 5
    # a third file holding the IDs as text makes them text everywhere, and the same text in every file
    pl.DataFrame({"user_id": ["1000", "u9"], "item_id": ["k0", "k1"], "timestamp": [T0, T0]}).write_parquet(
        d / "c.parquet"
    )
    with (
        pytest.warns(DataWarning, match="float-typed in 2 file"),
        pytest.warns(DataWarning, match=r"read as text in every file because .*c\.parquet.*2 file\(s\) hold numbers"),
    ):
        ev = load_events(_cfg(d, columns={"event_type": None}))
    assert ev.events.schema["user_id"] == pl.String
    counts = dict(ev.events.group_by("user_id").len().rows())
    assert counts == {"1000": 3, "2000": 2, "3000": 1, "u9": 1}
    assert dict(ev.report.quarantined) == {"invalid_id": 1, "null_user": 1}
    # ingest.user_id_type pins the type whatever the files hold: int parses the text, u9 is no integer
    with pytest.warns(DataWarning):
        ev = load_events(_cfg(d, columns={"event_type": None}, user_id_type="int"))
    assert ev.events.schema["user_id"] == pl.Int64
    assert dict(ev.events.group_by("user_id").len().rows()) == {1000: 3, 2000: 2, 3000: 1}
    assert dict(ev.report.quarantined) == {"invalid_id": 2, "null_user": 1}
    (d / "c.parquet").unlink()
    with pytest.warns(DataWarning):
        ev = load_events(_cfg(d, columns={"event_type": None}, user_id_type="string"))
    assert dict(ev.events.group_by("user_id").len().rows()) == {"1000": 2, "2000": 2, "3000": 1}


def test_id_type_int_reads_text_ids_written_as_floats(tmp_path: Path) -> None:
    # pandas writes an integer column with gaps as 17850.0; a day without gaps as 17850. As text (the default
    # for CSV) those are two IDs; ingest.user_id_type=int reads both as the integer 17850.
    d = tmp_path / "logs"
    _csv(d, f"17850.0,i1,{T0},view\n,i2,{T0},view\n", name="a.csv")
    _csv(d, f"17850,i1,{T0 + 9},view\n 12 ,i3,{T0},view\nabc,i4,{T0},view\n1.23457E+11,i5,{T0},view\n", name="b.csv")
    ev = load_events(_cfg(d))
    assert sorted(ev.events["user_id"].to_list()) == ["12", "17850", "17850.0", "abc"]
    ev = load_events(_cfg(d, user_id_type="int"))
    _assert_contract(ev)
    assert ev.events.schema["user_id"] == pl.Int64 and ev.events.schema["item_id"] == pl.String
    assert sorted(ev.events["user_id"].to_list()) == [12, 17850, 17850]
    # spreadsheet notation lost digits: no ID either way
    assert dict(ev.report.quarantined) == {"invalid_id": 2, "null_user": 1}
    assert sorted(ev.quarantine.filter(pl.col("reason") == "invalid_id")["user_id"].to_list()) == [
        "1.23457E+11",
        "abc",
    ]


@pytest.mark.parametrize(
    ("values", "unit"),
    [
        ([T0, T0 + 1], "s"),
        ([T0 * 1_000, (T0 + 1) * 1_000], "ms"),
        ([T0 * 1_000_000, (T0 + 1) * 1_000_000], "us"),
        ([T0 * 1_000_000_000, (T0 + 1) * 1_000_000_000], "ns"),
    ],
)
def test_epoch_units_auto_and_explicit(tmp_path: Path, values: list[int], unit: str) -> None:
    p = tmp_path / "e.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": values}).write_parquet(p)
    for cfg_unit in ("auto", unit):
        ev = load_events(_cfg(p, columns={"event_type": None}, timestamp_unit=cfg_unit))
        assert ev.events["ts"].to_list() == [T0_DT, datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC)]
    # epoch digits in a CSV string column are epochs too
    c = _csv(tmp_path, "".join(f"u{k},i{k},{v},view\n" for k, v in enumerate(values)), name="e.csv")
    assert load_events(_cfg(c)).events["ts"].to_list()[0] == T0_DT


def test_iso_strings_with_and_without_zone(tmp_path: Path) -> None:
    body = (
        "u1,i1,2023-11-14T22:13:20Z,view\n"
        "u2,i2,2023-11-14 23:13:20+01:00,view\n"
        "u3,i3,2023-11-14T22:13:20.000,view\n"  # naive -> assume_timezone (UTC)
        "u4,i4,2023-11-14 22:13:20 +0000,view\n"
        "u5,i5,2023-11-14,view\n"
        "u6,i6,2023-11-14T22:13,view\n"
    )
    ev = load_events(_cfg(_csv(tmp_path, body)))
    ts = ev.events["ts"].to_list()
    assert ts[:4] == [T0_DT] * 4
    assert ts[4] == datetime(2023, 11, 14, tzinfo=UTC) and ts[5] == datetime(2023, 11, 14, 22, 13, tzinfo=UTC)
    # naive strings follow assume_timezone: 23:13:20 in Berlin (UTC+1 in November) is 22:13:20 UTC
    p = _csv(tmp_path, "u1,i1,2023-11-14 23:13:20,view\nu2,i2,2023-11-14T22:13:20Z,view\n", name="b.csv")
    ev = load_events(_cfg(p, assume_timezone="Europe/Berlin"))
    assert ev.events["ts"].to_list() == [T0_DT, T0_DT]
    with pytest.raises(IngestError, match="assume_timezone"):
        load_events(_cfg(p, assume_timezone="Mars/Olympus"))


def test_datetime_columns_naive_and_aware(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    naive = datetime(2023, 11, 14, 23, 13, 20)
    pl.DataFrame(
        {
            "user_id": [1],
            "item_id": [1],
            "naive": pl.Series([naive], dtype=pl.Datetime("ns")),
            "aware": pl.Series([naive], dtype=pl.Datetime("ms")).dt.replace_time_zone("Europe/Berlin"),
        }
    ).write_parquet(p)
    ev = load_events(_cfg(p, columns={"timestamp": "aware", "event_type": None}))
    assert ev.events["ts"].to_list() == [T0_DT]
    ev = load_events(_cfg(p, columns={"timestamp": "naive", "event_type": None}, assume_timezone="Europe/Berlin"))
    assert ev.events["ts"].to_list() == [T0_DT]


def test_no_timestamp_column_gives_all_null_ts(tmp_path: Path) -> None:
    p = _csv(tmp_path, "u1,i1\nu1,i1\nu2,i2\n", header="user_id,item_id\n")
    ev = load_events(_cfg(p, columns={"timestamp": None, "event_type": None}))
    _assert_contract(ev)
    assert ev.events["ts"].null_count() == 2 and ev.events.schema["ts"] == TS_DTYPE
    assert ev.report.duplicates == 1 and ev.events["weight"].to_list() == [1.0, 1.0]
    assert ev.events["event_type"].null_count() == 2


# ---------------------------------------------------------------------------------------------------------
# weights, validation reasons


def test_event_weights_negative_and_unknown_types(tmp_path: Path) -> None:
    body = (
        f"u1,i1,{T0},purchase\n"
        f"u1,i2,{T0},  cancellation \n"  # whitespace around a known type is stripped, not unknown
        f"u1,i3,{T0},view\n"  # not a key: unknown
        f"u1,i4,{T0},\n"  # null type: unknown when weights are configured
    )
    ev = load_events(_cfg(_csv(tmp_path, body), event_weights={"purchase": 2.0, "cancellation": -1.0}))
    _assert_contract(ev)
    assert ev.events.select("item_id", "weight", "event_type").rows() == [
        ("i1", 2.0, "purchase"),
        ("i2", -1.0, "cancellation"),
    ]
    assert dict(ev.report.quarantined) == {"unknown_event_type": 2}
    assert ev.quarantine["event_type"].to_list() == ["view", None]


def test_event_type_null_means_one_event_of_weight_one(tmp_path: Path) -> None:
    # Regression (issue 14): with ingest.columns.event_type null, configured event weights quarantined every row
    # as unknown_event_type ("seen: []"). The config promises one event of weight 1 per row: weights are ignored.
    p = _csv(tmp_path, f"u1,i1,{T0},purchase\nu2,i2,{T0},view\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = load_events(_cfg(p, columns={"event_type": None}, event_weights={"purchase": 1.0, "cancel": -1.0}))
    _assert_contract(ev)
    assert ev.events["weight"].to_list() == [1.0, 1.0] and ev.report.n_quarantined == 0
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1 and "ingest.event_weights (cancel, purchase) is ignored" in msgs[0]
    # an event-type column that is empty in every row says so, instead of listing "seen: []"
    q = _csv(tmp_path, f"u1,i1,{T0},\nu2,i2,{T0},\n", name="empty_types.csv")
    with pytest.raises(IngestError, match=r"column 'event_type' is empty in every row.*set it to null") as e:
        load_events(_cfg(q, event_weights={"purchase": 1.0}))
    assert "seen: []" not in str(e.value)


@pytest.mark.parametrize(
    ("role", "column", "extra"),
    [
        ("quantity", "quantity", ""),
        ("item_text", "description", ""),
        ("event_type", "event_type", ""),
        ("timestamp", "timestamp", " (and split.method: random)"),
    ],
)
def test_missing_optional_column_says_set_it_to_null(tmp_path: Path, role: str, column: str, extra: str) -> None:
    # Regression (issue 14): the error for an absent optional column said "map it"; the log may not have one.
    p = _csv(tmp_path, f"c1,s1,{T0},buy\n", header="user_id,item_id,ts,action\n")
    columns: dict[str, Any] = {"timestamp": "ts", "event_type": None, role: column}
    with pytest.raises(IngestError) as e:
        load_events(_cfg(p, columns=columns))
    assert str(e.value) == (
        f"events file '{p}' lacks column '{column}' (found: ['user_id', 'item_id', 'ts', 'action']); map the right "
        f"column with ingest.columns.{role}, or set `ingest.columns.{role}: null` if the log has no "
        f"{ingest_module._ROLE_WORDS[role]}{extra}"
    )


def test_timestamp_log_line_says_what_was_parsed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Regression (issue 14): an ISO-8601 text column was logged as "read as epoch s".
    iso = _csv(tmp_path, "u1,i1,2023-11-14T22:13:20,view\nu2,i2,2023-11-14T22:13:21Z,view\n", name="iso.csv")
    with caplog.at_level(logging.INFO, logger="recsys_embed.data.ingest"):
        load_events(_cfg(iso))
    lines = [r.getMessage() for r in caplog.records if "timestamp column" in r.getMessage()]
    assert lines == [
        f"'{iso}': timestamp column 'timestamp' read as text: 1 as '%Y-%m-%dT%H:%M:%S%.f%#z', "
        "1 as '%Y-%m-%dT%H:%M:%S%.f'; naive times taken as UTC (ingest.assume_timezone)"
    ]
    caplog.clear()
    ms = _csv(tmp_path, f"u1,i1,{T0 * 1000},view\n", name="ms.csv")
    with caplog.at_level(logging.INFO, logger="recsys_embed.data.ingest"):
        load_events(_cfg(ms))
    lines = [r.getMessage() for r in caplog.records if "timestamp column" in r.getMessage()]
    assert lines == [f"'{ms}': timestamp column 'timestamp' read as epoch ms (auto: median magnitude 1.7e+12)"]


def test_quantity_and_weight_columns(tmp_path: Path) -> None:
    header = "user_id,item_id,timestamp,event_type,quantity,w\n"
    body = (
        f"u1,i1,{T0},purchase,3,0.5\n"  # 1 x |3| x 0.5 = 1.5
        f"u1,i2,{T0},cancellation,-2,1\n"  # -1 x |-2| x 1 = -2 (negative quantity is a cancellation, not bad)
        f"u1,i3,{T0},purchase,0,1\n"  # zero quantity: invalid_weight
        f"u1,i4,{T0},purchase,two,1\n"  # not a number: invalid_weight
        f"u1,i5,{T0},purchase,1,-1\n"  # negative weight column: invalid_weight
        f"u1,i6,{T0},purchase,1,inf\n"  # non-finite: invalid_weight
    )
    cfg = _cfg(
        _csv(tmp_path, body, header=header),
        columns={"quantity": "quantity", "weight": "w"},
        event_weights={"purchase": 1.0, "cancellation": -1.0},
        use_quantity=True,
    )
    ev = load_events(cfg)
    _assert_contract(ev)
    assert ev.events.select("item_id", "weight").rows() == [("i1", 1.5), ("i2", -2.0)]
    assert dict(ev.report.quarantined) == {"invalid_weight": 4}
    # without use_quantity the quantity is not used for weights (and not validated)
    cfg.use_quantity = False
    ev = load_events(cfg)
    assert ev.events.select("item_id", "weight").rows() == [("i1", 0.5), ("i2", -1.0), ("i3", 1.0), ("i4", 1.0)]


def test_rating_threshold_filter_and_invalid_rating(tmp_path: Path) -> None:
    header = "user_id,item_id,timestamp,rating\n"
    body = f"u1,i1,{T0},4.5\nu1,i2,{T0},2\nu1,i3,{T0},\nu1,i4,{T0},great\n"
    ev = load_events(
        _cfg(_csv(tmp_path, body, header=header), columns={"rating": "rating", "event_type": None}, rating_threshold=3)
    )
    _assert_contract(ev)
    # 4.5 kept, 2 < 3 filtered, missing rating kept (no rating to judge), "great" invalid
    assert ev.events.select("item_id", "rating").rows() == [("i1", 4.5), ("i3", None)]
    assert ev.report.filtered == {"rating_below_threshold": 1}
    assert dict(ev.report.quarantined) == {"invalid_weight": 1}


def test_window_is_half_open_and_quarantines(tmp_path: Path) -> None:
    body = f"u1,i1,{T0 - 1},view\nu1,i2,{T0},view\nu1,i3,{T0 + 59},view\nu1,i4,{T0 + 60},view\n"
    ev = load_events(
        _cfg(_csv(tmp_path, body), window_start="2023-11-14T22:13:20Z", window_end="2023-11-14T22:14:20+00:00")
    )
    _assert_contract(ev)
    assert ev.events["item_id"].to_list() == ["i2", "i3"]  # [start, end)
    assert dict(ev.report.quarantined) == {"timestamp_out_of_window": 2}


def test_reason_precedence_first_matching_wins(tmp_path: Path) -> None:
    body = (
        f",,{T0},view\n"  # null user and item: null_user
        f"u1, ,nope,view\n"  # null item and bad time: null_item
        f"u1,i1,,bogus\n"  # null time and unknown type: null_timestamp
        f"u1,i1,nope,bogus\n"  # unparsable_timestamp
        f"u1,i1,1,bogus\n"  # out of window and unknown: timestamp_out_of_window
        f"u1,i1,{T0},bogus\n"  # unknown_event_type
        f"NULL,i1,{T0},view\n"  # a null token is null: null_user
        f"u1,i1,{T0},view\n"  # clean
    )
    ev = load_events(_cfg(_csv(tmp_path, body), event_weights={"view": 1.0}, window_start="2020-01-01"))
    _assert_contract(ev)
    assert ev.quarantine["reason"].to_list() == [
        "null_user",
        "null_item",
        "null_timestamp",
        "unparsable_timestamp",
        "timestamp_out_of_window",
        "unknown_event_type",
        "null_user",
    ]
    assert ev.quarantine["source_row"].to_list() == [0, 1, 2, 3, 4, 5, 6]
    assert ev.events.height == 1


# ---------------------------------------------------------------------------------------------------------
# dedup, filters, files


def test_exact_duplicates_dropped_within_and_across_files(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    _csv(d, f"u1,i1,{T0},view\nu1,i1,{T0},view\nu1,i1,{T0},buy\nu1,i1,{T0 + 1},view\n", name="a.csv")
    # b.csv overlaps a.csv in time and repeats one of its rows
    _csv(d, f"u1,i1,{T0 + 1},view\nu2,i1,{T0},view\n", name="b.csv")
    ev = load_events(_cfg(d / "*.csv"))
    _assert_contract(ev)
    # a: row 2 repeats row 1; b: row 1 repeats a's row 4 -> 2 duplicates; the differing type is kept
    assert ev.report.duplicates == 2 and ev.report.rows_read == 6
    assert ev.events.select("user_id", "event_type").rows() == [
        ("u1", "view"),
        ("u1", "buy"),
        ("u1", "view"),
        ("u2", "view"),
    ]
    assert ev.report.sources == {str(d / "a.csv"): 4, str(d / "b.csv"): 2}


def test_item_filters_exact_ids_pattern_and_int_ids(tmp_path: Path) -> None:
    body = f"u1,POST,{T0},view\nu1,gift_0001_20,{T0},view\nu1,85123A,{T0},view\nu1,DOT,{T0},view\n"
    rules = [
        {"name": "postage", "exclude": ["POST", "DOT"]},
        {"name": "gift", "exclude_pattern": r"gift_0001_\d+"},  # full match: anchors are implied
        {"name": "partial", "exclude_pattern": "851"},  # only a prefix: a full match fails, nothing dropped
    ]
    ev = load_events(_cfg(_csv(tmp_path, body), item_filters=rules))
    _assert_contract(ev)
    assert ev.events["item_id"].to_list() == ["85123A"]
    assert dict(ev.report.filtered) == {"postage": 2, "gift": 1}
    p = tmp_path / "int.parquet"
    pl.DataFrame({"user_id": [1, 1, 1], "item_id": [7, 8, 77], "timestamp": [T0] * 3}).write_parquet(p)
    ev = load_events(
        _cfg(
            p,
            columns={"event_type": None},
            item_filters=[{"name": "x", "exclude": ["7"]}, {"name": "y", "exclude_pattern": "7+"}],
        )
    )
    assert ev.events["item_id"].to_list() == [8] and dict(ev.report.filtered) == {"x": 1, "y": 1}
    with pytest.raises(IngestError, match=r"item_filters\[0\]\.exclude_pattern"):
        load_events(_cfg(p, columns={"event_type": None}, item_filters=[{"exclude_pattern": "(unclosed"}]))


def test_all_bad_file_names_file_reason_and_fix(tmp_path: Path) -> None:
    p = _csv(tmp_path, f"u1,i1,{T0},click\nu2,i2,{T0},click\nu3,i3,{T0},tap\n")
    with pytest.raises(IngestError) as e:
        load_events(_cfg(p, event_weights={"view": 1.0}))
    msg = str(e.value)
    assert "\n" not in msg and f"'{p}'" in msg and "unknown_event_type" in msg
    assert "ingest.event_weights" in msg and "['click', 'tap']" in msg


def test_ndjson_and_hive_partition_columns(tmp_path: Path) -> None:
    nd = tmp_path / "e.jsonl"
    nd.write_text(
        f'{{"user_id": 1, "item_id": "a", "timestamp": {T0}}}\n{{"user_id": 2, "item_id": "b", "timestamp": "x"}}\n'
    )
    ev = load_events(_cfg(nd, columns={"event_type": None}))
    _assert_contract(ev)
    assert ev.events.row(0)[:3] == (1, "a", T0_DT) and dict(ev.report.quarantined) == {"unparsable_timestamp": 1}
    # the event type lives in the folder names: event_type=<type>/part.parquet
    root = tmp_path / "hive"
    for et, items in (("purchase", [1, 2]), ("view", [3])):
        (root / f"event_type={et}").mkdir(parents=True)
        pl.DataFrame({"user_id": [9] * len(items), "item_id": items, "timestamp": [T0] * len(items)}).write_parquet(
            root / f"event_type={et}" / "part-0.parquet"
        )
    ev = load_events(_cfg(root, event_weights={"purchase": 5.0, "view": 1.0}))
    _assert_contract(ev)
    assert ev.events.select("item_id", "event_type", "weight").rows() == [
        (1, "purchase", 5.0),
        (2, "purchase", 5.0),
        (3, "view", 1.0),
    ]


def test_item_text_is_the_most_frequent_text(tmp_path: Path) -> None:
    header = "user_id,item_id,timestamp,description\n"
    body = f"u1,i1,{T0},Mug\nu2,i1,{T0},mug \nu3,i1,{T0},Mug\nu4,i2,{T0},\n"
    ev = load_events(
        _cfg(_csv(tmp_path, body, header=header), columns={"event_type": None, "item_text": "description"})
    )
    assert ev.item_text is not None
    assert ev.item_text.rows() == [("i1", "Mug"), ("i2", None)]


def test_write_quarantine_round_trips(tmp_path: Path) -> None:
    p = _csv(tmp_path, f",i1,{T0},view\nu1,i1,{T0},view\n")
    ev = load_events(_cfg(p))
    out = write_quarantine(ev.quarantine, tmp_path / "q" / "quarantine.parquet")
    back = pl.read_parquet(out)
    assert back.equals(ev.quarantine) and back["reason"].to_list() == ["null_user"]
    assert back["timestamp"].to_list() == [str(T0)] and back["source_file"].to_list() == [str(p)]
    assert not list((tmp_path / "q").glob(".*tmp*"))  # nothing left behind


def test_cross_file_dedup_keeps_file_and_row_order(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    _csv(d, f"a,x,{T0},view\na,y,{T0 + 5},view\na,z,{T0 + 10},view\n", name="1.csv")
    _csv(d, f"b,x,{T0 + 100},view\nb,y,{T0 + 110},view\n", name="2.csv")  # overlaps nothing
    _csv(d, f"c,x,{T0 + 6},view\na,y,{T0 + 5},view\n", name="3.csv")  # overlaps 1.csv; repeats its 2nd row
    ev = load_events(_cfg(d))
    _assert_contract(ev)
    assert ev.report.duplicates == 1
    assert ev.events["user_id"].to_list() == ["a", "a", "a", "b", "b", "c"]  # files in order, rows in order


def test_many_event_types_use_a_lookup(tmp_path: Path) -> None:
    weights = {f"t{k}": float(k) for k in range(20)}  # more than 16 keys: replace_strict instead of a when-chain
    body = f"u1,i1,{T0},t3\nu1,i2,{T0}, t19 \nu1,i3,{T0},t20\n"
    ev = load_events(_cfg(_csv(tmp_path, body), event_weights=weights))
    assert ev.events.select("event_type", "weight").rows() == [("t3", 3.0), ("t19", 19.0)]
    assert dict(ev.report.quarantined) == {"unknown_event_type": 1}
