"""Raw log files -> validated, deduplicated, rule-filtered event table + quarantine + row report.

Every step is a vectorised Polars expression. All files are parsed by one streaming query (Parquet is
scanned lazily with projection pushdown, so only mapped columns are read). The happy path stays lean:
event types are matched exactly and integer epochs cast directly; only rows that miss (types with stray
whitespace, time strings that are not integers) get the costlier treatment, and only quarantined rows are
cast to String (re-read by row number).

Row accounting (``RowReport``): ``rows_read = kept + duplicates + quarantined + filtered`` exactly, where

1. quarantined rows carry the first matching reason, in this order: ``malformed_row`` (CSV field count
   differs from the header, incl. a truncated last line; NDJSON line that is not a JSON object),
   ``unterminated_quote`` (a CSV line whose quote never closes on it, which would swallow the lines after it:
   the line is the row, located by ``source_line``, and parsing resumes on the next line),
   ``invalid_encoding`` (the file is not valid UTF-8 and this row holds undecodable bytes: the file is read
   lossily and rows holding U+FFFD are quarantined; a strict read comes first, so valid files never pay
   for this, and a genuine U+FFFD in a valid file is kept), ``null_user``, ``null_item`` (null, blank, or a
   null token such as ``NULL``/``NaN``/``NA``), ``invalid_id`` (a text ID longer than ``max_id_length``
   bytes, holding control characters such as NUL, that is a JSON object/array, or in the scientific notation a
   spreadsheet leaves (``1.23457E+11``: digits lost); a float ID that is not whole (``1000.5``) or is beyond
   2**53, whose digits a float cannot hold; text that is no integer where ``ingest.user_id_type`` /
   ``item_id_type`` is ``int``), ``null_timestamp``, ``unparsable_timestamp``, ``implausible_timestamp`` (at or before
   ``plausible_after``, default epoch 0, or at or after ``plausible_before``, default 2100),
   ``timestamp_out_of_window``, ``unknown_event_type``, ``invalid_weight``;
2. exact duplicates (every mapped column equal after parsing) are dropped, the first occurrence kept;
3. rule filters remove rows: each ``item_filters`` rule by name, then ``rating_below_threshold``, then
   ``after_until`` (events at or after ``ingest.until``: the log cut of a backtest).

Text files also account for their physical lines (``report.details["lines_read"]`` = header + blank + rows +
continuation lines of quoted multi-line fields, checked per file), so rows lost to a quote that swallowed lines
cannot balance silently. Files with no data rows (0 bytes, empty once decompressed, header only) are skipped with
a ``DataWarning`` (``report.details["files_skipped"]``); a log in which every file is empty is an error.

Text IDs are NFC-normalized and stripped of zero-width characters (``ingest.id_normalization``, after parsing,
on the non-ASCII rows only), so look-alike spellings are one ID; the rows changed are counted
(``report.details["ids_normalized"]``) and a ``DataWarning`` shows examples.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from recsys_embed.config import ColumnMap, IngestConfig
from recsys_embed.data.dedup import first_occurrence_mask
from recsys_embed.data.parsing import (
    NULL_TOKENS,
    TS_DTYPE,
    guess_unit,
    id_expr,
    id_kind,
    is_text_dtype,
    magnitude_unit,
    normalize_text_ids,
    number_expr,
    parse_time_text,
    stripped,
    ts_exprs,
)
from recsys_embed.data.sources import (
    LINE_COL,
    PRE_REASON_COL,
    RAW_LINE_COL,
    READ_ERRORS,
    ROW_COL,
    EmptyFileError,
    RawFrame,
    fingerprint,
    list_sources,
    read_source,
)
from recsys_embed.errors import DataWarning, IngestError
from recsys_embed.io import write_parquet_atomic
from recsys_embed.progress import track
from recsys_embed.types import RowReport

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "item_id", "ts", "weight", "event_type", "rating")
"""The clean event table's columns, in order."""
REASONS = (
    "malformed_row",
    "unterminated_quote",
    "invalid_encoding",
    "null_user",
    "null_item",
    "invalid_id",
    "null_timestamp",
    "unparsable_timestamp",
    "implausible_timestamp",
    "timestamp_out_of_window",
    "unknown_event_type",
    "invalid_weight",
)
"""Quarantine reasons, in precedence order (a row gets the first that applies)."""
RATING_RULE = "rating_below_threshold"
UNTIL_RULE = "after_until"

_FIX = {
    "malformed_row": "rows do not have the header's number of fields; check ingest.source.csv_separator and quoting",
    "unterminated_quote": (
        "a field opens a quote (\") that never closes on its line; fix the quoting on the lines the quarantine's "
        'source_line names (a quote inside a field is written "")'
    ),
    "invalid_encoding": "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "null_user": "map the user column with ingest.columns.user",
    "null_item": "map the item column with ingest.columns.item",
    "invalid_id": (
        "IDs must be whole numbers or scalar text of at most ingest.max_id_length bytes without control "
        "characters (a number like 1000.5 is no ID: check ingest.columns.user / item and ingest.user_id_type / "
        "item_id_type); IDs like 1.23457E+11 lost digits in a spreadsheet: re-export the log with the ID columns "
        "as text"
    ),
    "null_timestamp": "map the time column with ingest.columns.timestamp (or set it to null)",
    "unparsable_timestamp": "map the time column with ingest.columns.timestamp and check ingest.timestamp_unit",
    "implausible_timestamp": (
        "check ingest.timestamp_unit (ms read as s lands in year 55,000) or widen ingest.plausible_after / "
        "ingest.plausible_before"
    ),
    "timestamp_out_of_window": "widen ingest.window_start / ingest.window_end",
    "unknown_event_type": "add the log's event types to ingest.event_weights",
    "invalid_weight": "map numeric columns with ingest.columns.weight / quantity / rating",
}

# Internal column names of the parsed frame.
_R = "__reason"
_QTY = "__quantity"
_TEXT = "__item_text"
_TS_TEXT = "__ts_text"
_OFF_BAND = "__ts_off_band"
_FILE = "__file"
_NON_ASCII = "__non_ascii_"  # + user_id / item_id: the text ID holds a non-ASCII character (normalize it)
_I64_MAX = 2**63 - 1
_ROLE_WORDS = {
    "timestamp": "event time",
    "event_type": "event type (then every row is one event of weight 1)",
    "weight": "per-row weight",
    "quantity": "quantity",
    "rating": "rating",
    "item_text": "item text",
}
# A text ID that is not one: a control character (NUL, newline, ...), a JSON object ({"key": ...}) or array
# ([1, ...]), or a number in the scientific notation a spreadsheet writes (a mantissa with a point, or an
# exponent with a sign; hex IDs such as 3e10 hold neither). Text that merely has braces ({{x}}, [abc]) is data.
_BAD_TEXT_ID = (
    r"[\x00-\x1f\x7f]"
    r"|^\{\s*(?:\}|\"(?:[^\"\\]|\\.)*\"\s*:.*\})$"
    r"|^\[\s*(?:\]|(?:[-0-9\"\[{]|true|false|null).*\])$"
    r"|^[+-]?(?:\d+\.\d*[eE][+-]?\d+|\d+[eE][+-]\d+)$"
)


@dataclass
class EventLog:
    """The ingest result.

    Attributes:
        events: clean events, columns ``EVENT_COLUMNS``: ``user_id``/``item_id`` (one dtype per role for the
            whole input, ``_id_dtypes``: Int64, or String stripped of surrounding whitespace; a whole float is the
            same integer ID in every file), ``ts``
            (Datetime[us, UTC]; all null without a timestamp column), ``weight`` (Float64, signed: event-type
            weight x |quantity| (if ``use_quantity``) x weight column), ``event_type`` (String or null),
            ``rating`` (Float64 or null). ``events.height == report.kept``.
        report: rows read / duplicates / quarantined by reason / filtered by rule; balanced.
        quarantine: one row per quarantined input row: original columns as String, ``reason``,
            ``source_file``, ``source_row`` (0-based data row in that file) and, for rows broken before
            parsing, ``raw_line`` and (CSV) ``source_line`` (the 1-based physical line it starts on).
        item_text: ``item_id``, ``text`` (the most frequent text of each kept item, null if none) when
            ``columns.item_text`` is set.
        files: the input files read, in order.
        fingerprint: ``sources.fingerprint`` of ``files``.
    """

    events: pl.DataFrame
    report: RowReport
    quarantine: pl.DataFrame
    item_text: pl.DataFrame | None
    files: list[str]
    fingerprint: str


# ----------------------------------------------------------------------------------------------------------
# Column parsing (expressions)


# ----------------------------------------------------------------------------------------------------------
# Per-file plan


def _check_columns(raw: RawFrame, columns: ColumnMap) -> None:
    found = raw.schema.names()
    for role, name in columns.model_dump().items():
        if name is None or name in found:
            continue
        shown = [f[:40] for f in found[:20]] + (["..."] if len(found) > 20 else [])
        hint = ""
        close = [f for f in found if f.strip().lower() == name.strip().lower()]
        if close:
            hint = f"; did you mean {close[0]!r}?"
        elif len(found) <= 1:
            hint = (
                "; it has a single column, so it is not a delimited event log (or its separator is not "
                "ingest.source.csv_separator)"
            )
        fix = f"map it with ingest.columns.{role}"
        if role != "user" and role != "item":  # optional: the log may simply not have one
            fix = (
                f"map the right column with ingest.columns.{role}, or set `ingest.columns.{role}: null` if the log "
                f"has no {_ROLE_WORDS[role]}"
            )
            if role == "timestamp":
                fix += " (and split.method: random)"
        raise IngestError(f"events file '{raw.file.name}' lacks column '{name}' (found: {shown}){hint}; {fix}")
    for role, name in columns.model_dump().items():
        if name is not None and name in raw.duplicates:
            raise IngestError(
                f"events file '{raw.file.name}' has column '{name}' more than once in its header, so "
                f"ingest.columns.{role} is ambiguous; rename or drop the copies"
            )
    for role in ("event_type", "item_text"):
        name = getattr(columns, role)
        dtype = raw.schema[name] if name is not None else None
        if dtype is not None and (dtype.is_nested() or dtype == pl.Object):
            raise IngestError(
                f"events file '{raw.file.name}' column '{name}' holds {dtype} values, not text; map a text column "
                f"with ingest.columns.{role}"
            )


@dataclass
class _Profile:
    ts_unit: str  # s / ms / us / ns, or "mixed": each value's unit by its magnitude
    # auto unit, and the column's magnitudes span several units: numeric rows whose magnitude means another unit
    # than ``ts_unit`` are quarantined as implausible_timestamp (read in ts_unit they land in early 1970 or far
    # future); text that is no number (ISO-8601) has no magnitude and is never off band
    ts_off_band: bool = False
    # how the numeric part of the time column was read, for the log line ("epoch s (auto: ...)"); None: no
    # numbers (ISO text, Datetime; ``_time_flags`` says what it parsed)
    ts_epoch: str | None = None


def _profile(raw: RawFrame, cfg: IngestConfig) -> _Profile:
    """The epoch unit of one file's time column; scans it only for an auto unit over numbers or text."""
    col = cfg.columns.timestamp
    name = raw.file.name
    if col is None:
        return _Profile(cfg.timestamp_unit)
    ts_dtype = raw.schema[col]
    numeric = ts_dtype.is_numeric()
    if not numeric and not is_text_dtype(ts_dtype):  # Datetime / Date: nothing to guess (others: ts_exprs fails)
        if isinstance(ts_dtype, pl.Datetime | pl.Date):
            zone = getattr(ts_dtype, "time_zone", None)
            how = f"with zone {zone}" if zone else f"naive, taken as {cfg.assume_timezone}"
            log.info("'%s': timestamp column '%s' read as %s values (%s)", name, col, type(ts_dtype).__name__, how)
        return _Profile(cfg.timestamp_unit)
    if cfg.timestamp_unit != "auto":
        given = f"epoch {cfg.timestamp_unit} (ingest.timestamp_unit)"
        if numeric:
            log.info("'%s': timestamp column '%s' read as %s", name, col, given)
        return _Profile(cfg.timestamp_unit, ts_epoch=given)
    if numeric:
        size = pl.col(col).cast(pl.Float64).abs()
        text = pl.lit(False)
    else:
        s = stripped(col)
        size = s.cast(pl.Float64, strict=False).abs()
        text = (s.is_not_null() & size.is_null()).any()  # some value is not a number: ISO-8601 or the like
    ok = size.filter(size.is_finite() & (size > 0))  # median picks the unit; the range tells a mix of units
    aggs = [size.median().alias("ts_mag"), ok.min().alias("ts_lo"), ok.max().alias("ts_hi"), text.alias("ts_text")]
    try:
        stats = raw.frame.select(aggs).collect(engine="streaming").row(0, named=True)
    except READ_ERRORS as e:
        raise _unreadable(raw, e) from None
    mag, lo, hi = stats["ts_mag"], stats["ts_lo"], stats["ts_hi"]
    unit = guess_unit(None if mag is None else float(mag))
    lo_unit = guess_unit(None if lo is None else float(lo))
    hi_unit = guess_unit(None if hi is None else float(hi))
    off_band = lo is not None and hi is not None and lo_unit != hi_unit
    if off_band:
        msg = (
            f"events file '{name}': timestamp column '{col}' mixes epoch units (magnitudes from "
            f"{lo_unit} to {hi_unit}); its numbers are read as {unit} (the median's unit) and "
            "those whose magnitude means another unit are quarantined as implausible_timestamp (ISO-8601 text is "
            "read as ISO); set "
            "ingest.timestamp_unit=mixed to read each value in the unit its magnitude implies"
        )
        log.warning(msg)
        warnings.warn(msg, DataWarning, stacklevel=3)
    read_as = None if mag is None else f"epoch {unit} (auto: median magnitude {float(mag):.3g})"
    if numeric or (read_as is not None and not stats["ts_text"]):  # text columns with text: _time_flags logs
        log.info("'%s': timestamp column '%s' read as %s", name, col, read_as or f"epoch {unit}")
    return _Profile(unit, off_band, read_as)


def _id_dtypes(raws: list[RawFrame], cfg: IngestConfig) -> tuple[pl.DataType, pl.DataType]:
    """One ID dtype per role for the whole input: Int64 or String, by ``ingest.user_id_type`` / ``item_id_type``.

    Decided from the files' schemas (no data pass), except for UInt64 columns under "auto", whose maximum is
    read to tell whether they fit Int64. "auto": String when any file holds the column as text (or as UInt64
    above 2**63 - 1), else Int64. Logs (and warns, for input worth a look) how the type was decided.
    """
    out: list[pl.DataType] = []
    for role in ("user", "item"):
        col = getattr(cfg.columns, role)
        id_type = getattr(cfg, f"{role}_id_type")
        kinds = [id_kind(raw.schema[col], raw.file.name, col, role) for raw in raws]
        text_files = [raw.file.name for raw, k in zip(raws, kinds, strict=True) if k == "str"]
        float_files = [raw.file.name for raw, k in zip(raws, kinds, strict=True) if k == "float"]
        huge = False  # UInt64 IDs above Int64's range: "auto" reads them as their exact text
        if id_type == "auto" and not text_files:
            for raw in raws:
                if raw.schema[col] != pl.UInt64:
                    continue
                try:
                    top = raw.frame.select(pl.col(col).max()).collect(engine="streaming").item()
                except READ_ERRORS as e:
                    raise _unreadable(raw, e) from None
                if top is not None and int(top) > _I64_MAX:
                    huge = True
                    log.info(
                        "'%s': %s column '%s' holds UInt64 IDs above 2**63; read as text", raw.file.name, role, col
                    )
        if id_type == "int":
            dtype: pl.DataType = pl.Int64()
        elif id_type == "string" or text_files or huge:
            dtype = pl.String()
        else:
            dtype = pl.Int64()
        if float_files:
            msg = (
                f"{role} column '{col}' is float-typed in {len(float_files)} file(s) (e.g. '{float_files[0]}'); whole "
                f"values are read as integer IDs (1000.0 -> 1000) and non-integral ones are quarantined as invalid_id"
            )
            log.warning(msg)
            warnings.warn(msg, DataWarning, stacklevel=3)
        n_numeric = len(raws) - len(text_files)
        if id_type == "auto" and text_files and n_numeric:
            msg = (
                f"{role} IDs are read as text in every file because '{text_files[0]}' holds column '{col}' as "
                f"text, while {n_numeric} file(s) hold numbers (written as their integer text, 1000.0 -> '1000'); "
                f"set ingest.{role}_id_type=int to read them all as integers"
            )
            log.warning(msg)
            warnings.warn(msg, DataWarning, stacklevel=3)
        log.info("ingest: %s IDs read as %s (ingest.%s_id_type=%s)", role, dtype, role, id_type)
        out.append(dtype)
    return out[0], out[1]


def _flag(reason: str) -> str:
    return f"__f_{reason}"


def _bad_text_id(c: pl.Expr, max_len: int) -> pl.Expr:
    """True where a text ID is ``invalid_id``: too long, a control character, JSON, spreadsheet notation.

    (Float IDs are invalid at or beyond 2**53, where a float no longer holds every integer.)"""
    return (c.str.len_bytes() > max_len) | c.str.contains(_BAD_TEXT_ID)


def _weight_match(et: pl.Expr, weights: dict[str, float]) -> pl.Expr:
    """Event-type weight (Float64) or null for a type that is not a key; exact match on ``et``."""
    if len(weights) > 16:
        return et.replace_strict(weights, default=None, return_dtype=pl.Float64)
    chain: Any = None
    for k, w in weights.items():
        chain = (
            pl.when(et == k).then(pl.lit(w, pl.Float64))
            if chain is None
            else chain.when(et == k).then(pl.lit(w, pl.Float64))
        )
    return chain.otherwise(pl.lit(None, pl.Float64)) if chain is not None else pl.lit(None, pl.Float64)


def _parse_frame(
    raw: RawFrame, prof: _Profile, id_dtypes: tuple[pl.DataType, pl.DataType], cfg: IngestConfig
) -> tuple[pl.LazyFrame, list[str]]:
    """The parsing query of one file and the reasons it can flag.

    Output columns: ``ROW_COL``, ``EVENT_COLUMNS``, aux columns (``__quantity``, ``__item_text``,
    ``__rest`` = the weight factor besides the event-type weight, ``__non_ascii_<id>`` = text IDs for
    ``_normalize_ids``), and one Boolean ``__f_<reason>`` per
    reason the query can decide (``reasons`` also lists the time reasons that ``_time_flags`` decides
    after collection; non-integer time text travels in ``__ts_text``). Derived columns are staged so that
    each is computed once; event types are matched exactly here (no per-row strip on the happy path) and
    rows that miss are re-matched after stripping in ``_rematch_event_types``.
    """
    cols = cfg.columns
    name = raw.file.name
    tz = cfg.assume_timezone
    schema = raw.schema

    stage1: list[pl.Expr] = []
    flags: dict[str, pl.Expr] = {}
    late: list[str] = []
    aux: list[str] = []
    if PRE_REASON_COL in raw.frame.collect_schema():
        flags["malformed_row"] = pl.col(PRE_REASON_COL) == "malformed_row"
        if raw.file.format == "csv":
            flags["unterminated_quote"] = pl.col(PRE_REASON_COL) == "unterminated_quote"
        flags["invalid_encoding"] = pl.col(PRE_REASON_COL) == "invalid_encoding"
    normalize = cfg.id_normalization == "nfc"
    stage2: list[pl.Expr] = []
    bad_ids: list[pl.Expr] = []
    for col, target, out, reason in (
        (cols.user, id_dtypes[0], "user_id", "null_user"),
        (cols.item, id_dtypes[1], "item_id", "null_item"),
    ):
        value, bad = id_expr(col, schema[col], target, normalize)
        stage1.append(value.alias(out))
        if bad is None:
            flags[reason] = pl.col(out).is_null()
        else:  # given but no ID of the decided type (1000.5, "abc" read as int): invalid_id, not missing
            stage1.append(bad.alias(f"__bad_{out}"))
            bad_ids.append(pl.col(f"__bad_{out}"))
            flags[reason] = pl.col(out).is_null() & ~pl.col(f"__bad_{out}")
        if is_text_dtype(schema[col]) and target == pl.String:  # checked on the parsed (stripped) text
            bad_ids.append(_bad_text_id(pl.col(out), cfg.max_id_length))
            if normalize:  # ASCII is NFC already; _normalize_ids treats the rest after collection
                stage2.append((pl.col(out).str.len_bytes() != pl.col(out).str.len_chars()).alias(_NON_ASCII + out))
                aux.append(_NON_ASCII + out)
    if bad_ids:
        flags["invalid_id"] = pl.any_horizontal(bad_ids)
    if cols.timestamp:
        ts, ts_missing, ts_text = ts_exprs(cols.timestamp, schema[cols.timestamp], prof.ts_unit, tz, name)
        stage1 += [ts.alias("ts"), ts_missing.alias("__ts_missing")]
        if ts_text is not None:
            stage1.append(ts_text.alias(_TS_TEXT))
            aux.append(_TS_TEXT)
        flags["null_timestamp"] = pl.col("__ts_missing")
        if prof.ts_off_band:  # auto unit over a column of several units: _time_flags quarantines the others
            ts_dtype = schema[cols.timestamp]
            num = pl.col(cols.timestamp) if ts_dtype.is_numeric() else stripped(cols.timestamp)
            num = num.cast(pl.Float64, strict=False)
            # only numbers have a unit: ISO text (null here) is parsed as ISO, never off band
            stage1.append((num.is_not_null() & (magnitude_unit(num) != prof.ts_unit)).alias(_OFF_BAND))
            aux.append(_OFF_BAND)
        # unparsable_timestamp and timestamp_out_of_window are flagged by _time_flags once text is parsed
        late += ["unparsable_timestamp"]
        late += ["implausible_timestamp"] if cfg.plausible_after or cfg.plausible_before or prof.ts_off_band else []
        late += ["timestamp_out_of_window"] if cfg.window_start or cfg.window_end else []
    else:
        stage1.append(pl.lit(None, dtype=TS_DTYPE).alias("ts"))

    if cols.event_type:  # with weights: exact match first, strip only the misses (see _rematch_event_types)
        et = pl.col(cols.event_type).cast(pl.String) if cfg.event_weights else stripped(cols.event_type)
    else:
        et = pl.lit(None, dtype=pl.String)
    stage1.append(et.alias("event_type"))

    rest: list[pl.Expr] = []
    bad_w: list[pl.Expr] = []
    if cols.quantity:
        q, _q_given = number_expr(cols.quantity, schema[cols.quantity], name, "quantity")
        stage1.append(q.alias(_QTY))
        aux.append(_QTY)
        if cfg.use_quantity:  # |quantity|: retail cancellations carry negative quantities
            bad_w.append(pl.col(_QTY).is_null() | ~pl.col(_QTY).is_finite() | (pl.col(_QTY) == 0))
            rest.append(pl.col(_QTY).abs())
    if cols.weight:
        w, _w_given = number_expr(cols.weight, schema[cols.weight], name, "weight")
        stage1.append(w.alias("__w"))
        bad_w.append(pl.col("__w").is_null() | ~pl.col("__w").is_finite() | (pl.col("__w") < 0))
        rest.append(pl.col("__w"))
    if cols.rating:
        r, r_given = number_expr(cols.rating, schema[cols.rating], name, "rating")
        stage1 += [r.alias("rating"), r_given.alias("__r_given")]
        bad_w.append(pl.col("__r_given") & (pl.col("rating").is_null() | ~pl.col("rating").is_finite()))
    else:
        stage1.append(pl.lit(None, dtype=pl.Float64).alias("rating"))
    if cols.item_text:
        stage1.append(stripped(cols.item_text).alias(_TEXT))
        aux.append(_TEXT)

    rest_expr = None
    for e in rest:
        rest_expr = e if rest_expr is None else rest_expr * e
    if cfg.event_weights:
        stage2.append(_weight_match(pl.col("event_type"), cfg.event_weights).alias("__ew"))
        flags["unknown_event_type"] = pl.col("__ew").is_null()
        weight = pl.col("__ew") if rest_expr is None else pl.col("__ew") * pl.col("__rest")
        if rest_expr is not None:
            stage2.append(rest_expr.alias("__rest"))
            aux.append("__rest")
    else:
        weight = pl.lit(1.0, pl.Float64) if rest_expr is None else rest_expr
    if bad_w:
        flags["invalid_weight"] = pl.any_horizontal(bad_w)
    reasons = [r for r in REASONS if r in flags or r in late]
    lf = (
        raw.frame.with_columns(stage1)
        .with_columns(stage2)
        .with_columns(
            weight.cast(pl.Float64).alias("weight"), *(f.fill_null(False).alias(_flag(r)) for r, f in flags.items())
        )
        .select(ROW_COL, *EVENT_COLUMNS, *aux, *(_flag(r) for r in reasons if r in flags))
    )
    return lf, reasons


# Eager steps on the collected frame use Series operations and ``frame[[...]]``: an eager expression on a
# frame of many chunks (one per streamed morsel) makes Polars copy every column first (~1 s at 20M rows).


def _without(frame: pl.DataFrame, *names: str) -> pl.DataFrame:
    """``frame`` without ``names`` (absent names ignored), zero-copy."""
    return frame[[c for c in frame.columns if c not in names]]


def _log_time_text(name: str, cfg: IngestConfig, prof: _Profile, n: int, formats: Counter[str]) -> None:
    """Say how one file's non-integer time text was read: each format with its count, the zone of naive times."""
    parsed = ", ".join(f"{c:,} as '{f}'" for f, c in formats.most_common())
    unparsed = n - formats.total()
    naive = any(not f.startswith("decimal") and "%#z" not in f for f in formats)
    log.info(
        "'%s': timestamp column '%s' read as text: %s%s%s%s",
        name,
        cfg.columns.timestamp,
        parsed or "nothing parsed",
        f", {unparsed:,} unparsable" if unparsed else "",
        f"; naive times taken as {cfg.assume_timezone} (ingest.assume_timezone)" if naive else "",
        f"; the other values as {prof.ts_epoch}" if prof.ts_epoch else "",
    )


def _time_flags(parsed: pl.DataFrame, profiles: list[_Profile], names: list[str], cfg: IngestConfig) -> pl.DataFrame:
    """Parse the time text the query left (only rows that need it, each file in its own epoch unit),
    then flag unparsable and out-of-window times."""
    if cfg.columns.timestamp is None:
        return parsed
    ts = parsed["ts"]
    if _TS_TEXT in parsed.columns:
        text = parsed[_TS_TEXT]
        if text.null_count() < text.len():
            ts = ts.clone()
            todo = text.is_not_null().arg_true()
            files = parsed[_FILE].gather(todo)
            for k in files.unique().sort().to_list():
                idx = todo.filter(files == k)
                formats: Counter[str] = Counter()
                ts.scatter(idx, parse_time_text(text.gather(idx), profiles[k].ts_unit, cfg.assume_timezone, formats))
                _log_time_text(names[k], cfg, profiles[k], idx.len(), formats)
        parsed = _without(parsed, _TS_TEXT)
    out = [ts, (ts.is_null() & ~parsed[_flag("null_timestamp")]).alias(_flag("unparsable_timestamp"))]
    outside: pl.Series | None = None
    tz = ZoneInfo(cfg.assume_timezone)
    implausible: pl.Series | None = None
    for bound, after in ((cfg.plausible_after, True), (cfg.plausible_before, False)):
        if bound is not None:
            edge = (bound.replace(tzinfo=tz) if bound.tzinfo is None else bound).astimezone(UTC)
            cond = (ts <= edge) if after else (ts >= edge)
            implausible = cond if implausible is None else implausible | cond
    if _OFF_BAND in parsed.columns:  # null for files that were not checked
        off = parsed[_OFF_BAND].fill_null(False)
        implausible = off if implausible is None else implausible | off
        parsed = _without(parsed, _OFF_BAND)
    if implausible is not None:
        out.append(implausible.fill_null(False).alias(_flag("implausible_timestamp")))
    for bound, after in ((cfg.window_start, False), (cfg.window_end, True)):
        if bound is not None:
            edge = (bound.replace(tzinfo=tz) if bound.tzinfo is None else bound).astimezone(UTC)
            cond = (ts >= edge) if after else (ts < edge)
            outside = cond if outside is None else outside | cond
    if outside is not None:
        out.append(outside.fill_null(False).alias(_flag("timestamp_out_of_window")))
    return parsed.with_columns(out)


def _rematch_event_types(parsed: pl.DataFrame, cfg: IngestConfig) -> pl.DataFrame:
    """Re-match rows whose event type missed ``event_weights`` exactly, after stripping whitespace and
    nulling null tokens; only those rows are touched (usually none)."""
    flag = _flag("unknown_event_type")
    if flag not in parsed.columns or not parsed[flag].any():
        return parsed
    idx = parsed[flag].arg_true()
    stripped = pl.col("event_type").str.strip_chars()
    sub = parsed[["event_type", "__rest"] if "__rest" in parsed.columns else ["event_type"]][idx].with_columns(
        pl.when(stripped.is_in(NULL_TOKENS)).then(pl.lit(None, pl.String)).otherwise(stripped).alias("event_type")
    )
    ew = sub.select(_weight_match(pl.col("event_type"), cfg.event_weights)).to_series()
    new_w = ew * sub["__rest"] if "__rest" in sub.columns else ew
    return parsed.with_columns(
        parsed["event_type"].clone().scatter(idx, sub["event_type"]),
        parsed["weight"].clone().scatter(idx, new_w),
        parsed[flag].clone().scatter(idx, ew.is_null()),
    )


def _normalize_ids(parsed: pl.DataFrame, report: RowReport) -> pl.DataFrame:
    """NFC-normalize the non-ASCII text IDs and strip their zero-width characters (``normalize_text_ids``), so
    look-alike spellings are one ID; only the rows flagged ``__non_ascii_*`` by the query are touched (usually
    few). An ID left empty becomes null_user / null_item. Counts the rows changed into
    ``report.details["ids_normalized"]`` and warns with a few examples."""
    changed_rows = 0
    notes: list[str] = []
    for out, null_reason in (("user_id", "null_user"), ("item_id", "null_item")):
        col = _NON_ASCII + out
        if col not in parsed.columns:
            continue
        mask = parsed[col].fill_null(False)  # null: a file whose IDs are not text
        parsed = _without(parsed, col)
        if not mask.any():
            continue
        idx = mask.arg_true()
        old = parsed[out].gather(idx)
        new = normalize_text_ids(old)
        diff = (new != old).fill_null(True)
        if not diff.any():
            continue
        flag = _flag(null_reason)
        now_null = parsed[flag].gather(idx) | new.is_null()
        parsed = parsed.with_columns(parsed[out].clone().scatter(idx, new), parsed[flag].clone().scatter(idx, now_null))
        pairs = pl.DataFrame({"old": old.filter(diff), "new": new.filter(diff)})
        changed_rows += pairs.height
        distinct = pairs.unique(maintain_order=True)
        shown = ", ".join(f"{a!a} -> {'null' if b is None else ascii(b)}" for a, b in distinct.head(3).rows())
        role = out.removesuffix("_id")
        notes.append(f"{pairs.height:,} {role} ID(s) in {distinct.height:,} spelling(s) (e.g. {shown})")
    if changed_rows:
        report.details["ids_normalized"] = changed_rows
        msg = (
            f"ingest: Unicode normalization (NFC, zero-width characters removed) changed {' and '.join(notes)}, so "
            "look-alike IDs are one ID; set ingest.id_normalization=none to keep IDs byte for byte"
        )
        log.warning(msg)
        warnings.warn(msg, DataWarning, stacklevel=3)
    return parsed


def _reason_of(frame: pl.DataFrame, reasons: list[str]) -> pl.Series:
    """The first applicable reason per row of ``frame`` (whose flags are set), as String."""
    chain: Any = None
    for r in reasons:
        cond = pl.col(_flag(r))
        chain = pl.when(cond).then(pl.lit(r)) if chain is None else chain.when(cond).then(pl.lit(r))
    assert chain is not None
    return frame.select(chain.otherwise(pl.lit(None, pl.String)).alias(_R)).to_series()


def _quarantine_rows(raw: RawFrame, bad: pl.DataFrame) -> pl.DataFrame:
    """The original columns (as String) of ``bad``'s rows plus reason, source_file, source_row, raw_line and
    (CSV rows broken before parsing) source_line."""
    reserved = {"reason", "source_file", "source_row", "raw_line", "source_line"}
    exprs: list[pl.Expr] = []
    for c, dt in raw.schema.items():
        out = f"orig_{c}" if c in reserved else c
        if dt.is_nested():
            continue  # lists/structs have no faithful one-cell text form; the row number locates them
        e = pl.col(c).bin.encode("hex") if dt == pl.Binary else pl.col(c).cast(pl.String)
        exprs.append(e.alias(out))
    helpers = raw.frame.collect_schema()
    rows = raw.frame.join(bad.lazy(), on=ROW_COL, how="inner", maintain_order="left")
    q = rows.select(
        *exprs,
        pl.col(_R).alias("reason"),
        pl.lit(raw.file.name).alias("source_file"),
        pl.col(ROW_COL).cast(pl.Int64).alias("source_row"),
        *([pl.col(RAW_LINE_COL).alias("raw_line")] if RAW_LINE_COL in helpers else []),
        *([pl.col(LINE_COL).alias("source_line")] if LINE_COL in helpers else []),
    )
    try:
        return q.collect(engine="streaming")
    except READ_ERRORS as e:
        raise _unreadable(raw, e) from None


def _empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema={"reason": pl.String, "source_file": pl.String, "source_row": pl.Int64})


# ----------------------------------------------------------------------------------------------------------
# Whole-log steps


def _apply_filters(events: pl.DataFrame, cfg: IngestConfig, report: RowReport) -> pl.DataFrame:
    """Apply ``item_filters`` (in order, each counted under its name), then ``rating_threshold``, then ``until``."""
    for k, rule in enumerate(cfg.item_filters):
        item = events["item_id"]
        hit: pl.Series | None = None
        if rule.exclude:
            if item.dtype == pl.Int64:
                ints = [int(x) for x in rule.exclude if re.fullmatch(r"\s*[+-]?\d+\s*", x)]
                hit = item.is_in(pl.Series(ints, dtype=pl.Int64).implode())
            else:
                hit = item.is_in(pl.Series(rule.exclude, dtype=pl.String).implode())
        if rule.exclude_pattern is not None:
            pattern = f"^(?:{rule.exclude_pattern})$"
            try:
                pl.Series([""], dtype=pl.String).str.contains(pattern)
            except pl.exceptions.PolarsError as e:
                raise IngestError(
                    f"ingest.item_filters[{k}].exclude_pattern {rule.exclude_pattern!r} is not a valid regular "
                    f"expression ({str(e).splitlines()[0]}); fix it (Rust regex syntax)"
                ) from None
            match = item.cast(pl.String).str.contains(pattern)
            hit = match if hit is None else hit | match
        if hit is None:
            continue
        before = events.height
        events = events.filter(~hit.fill_null(False))
        report.filter_out(rule.name, before - events.height)
    if cfg.rating_threshold is not None:
        before = events.height
        events = events.filter(~(events["rating"] < cfg.rating_threshold).fill_null(False))
        report.filter_out(RATING_RULE, before - events.height)
    if cfg.until is not None:
        until = cfg.until if cfg.until.tzinfo is not None else cfg.until.replace(tzinfo=ZoneInfo(cfg.assume_timezone))
        before = events.height
        events = events.filter(~(events["ts"] >= until.astimezone(UTC)).fill_null(False))
        report.filter_out(UNTIL_RULE, before - events.height)
    return events


def _item_texts(events: pl.DataFrame) -> pl.DataFrame:
    """One text per kept item: the most frequent (ties: lexicographically first); null when none."""
    counts = (
        events.filter(pl.col(_TEXT).is_not_null())
        .group_by("item_id", _TEXT)
        .len()
        .sort(["item_id", "len", _TEXT], descending=[False, True, False])
        .unique("item_id", keep="first", maintain_order=True)
        .select("item_id", pl.col(_TEXT).alias("text"))
    )
    items = events.select("item_id").unique().sort("item_id")
    return items.join(counts, on="item_id", how="left", maintain_order="left")


def _all_bad_error(name: str, reasons: Counter[str], parsed: pl.DataFrame, cfg: IngestConfig) -> IngestError:
    top, n = reasons.most_common(1)[0]
    fix = _FIX[top]
    if top == "unknown_event_type":
        seen = parsed["event_type"].drop_nulls().unique().sort().head(10).to_list()
        if seen:
            fix += f" (seen: {seen}; configured: {sorted(cfg.event_weights)})"
        else:
            fix = (
                f"column '{cfg.columns.event_type}' is empty in every row; map the event-type column with "
                "ingest.columns.event_type, or set it to null (every row is then one event of weight 1)"
            )
    elif top in ("null_user", "null_item"):
        col = cfg.columns.user if top == "null_user" else cfg.columns.item
        fix = f"column '{col}' is empty in every row; {fix}"
    return IngestError(f"events file '{name}' has no usable rows: all {n:,} rows are {top}; {fix}")


def _validate_cfg(cfg: IngestConfig) -> None:
    try:
        ZoneInfo(cfg.assume_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise IngestError(
            f"ingest.assume_timezone {cfg.assume_timezone!r} is not a known time zone; use e.g. 'UTC' or "
            "'Europe/London'"
        ) from None
    if cfg.columns.timestamp is None and (cfg.window_start or cfg.window_end):
        raise IngestError("ingest.window_start/window_end need a timestamp column; set ingest.columns.timestamp")
    if cfg.columns.timestamp is None and cfg.until is not None:
        raise IngestError("ingest.until needs a timestamp column; set ingest.columns.timestamp or ingest.until=null")


def _unreadable(raw: RawFrame, e: BaseException) -> IngestError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return IngestError(
        f"events file '{raw.file.name}' could not be read ({first}); the file is corrupt or not what "
        "ingest.columns expects, re-export it"
    )


def _collect(queries: list[pl.LazyFrame], raws: list[RawFrame]) -> pl.DataFrame:
    """Run every file's parsing query as one streaming query; on failure, find and name the file."""
    try:
        return pl.concat(queries, how="diagonal_relaxed").collect(engine="streaming")
    except READ_ERRORS:
        for q, raw in zip(queries, raws, strict=True):
            try:
                q.collect(engine="streaming")
            except READ_ERRORS as e:
                raise _unreadable(raw, e) from None
        raise IngestError(
            f"the {len(raws)} input files could not be combined (their mapped columns disagree in type); "
            "check that every file under ingest.source.path has the same layout"
        ) from None


def load_events(cfg: IngestConfig, only_files: set[Path] | None = None) -> EventLog:
    """Read every input file, quarantine bad rows, drop exact duplicates, apply rule filters.

    Args:
        cfg: the ingest slice (source, column map, timestamps, weights, window, filters).
        only_files: read just these of the source's files (resolved paths; incremental runs); None reads all.

    Returns:
        An ``EventLog`` whose report balances (``report.check()`` passed) and ``events.height == report.kept``.

    Without an event-type column (``columns.event_type`` null) every row is one event of weight 1 and
    ``event_weights`` is ignored, with one ``DataWarning``.

    Raises:
        IngestError: no files, an unreadable or non-log file, a missing column, every file empty (one empty
            file among others is skipped with a ``DataWarning``), or a file in which every row is quarantined
            (naming the file, the most common reason and the fix).
    """
    _validate_cfg(cfg)
    if cfg.columns.event_type is None and cfg.event_weights:
        msg = (
            f"ingest.event_weights ({', '.join(sorted(cfg.event_weights))}) is ignored: ingest.columns.event_type is "
            "null, so every row is one event of weight 1; map the event-type column or remove event_weights"
        )
        log.warning(msg)
        warnings.warn(msg, DataWarning, stacklevel=2)
        cfg = cfg.model_copy(update={"event_weights": {}})
    files = list_sources(cfg.source)
    if only_files is not None:
        files = [f for f in files if f.path.resolve() in only_files]
    report = RowReport()
    raws: list[RawFrame] = []
    empty: dict[str, EmptyFileError | None] = {}  # files without data rows: 0 bytes (the error) or header only
    lines: int | None = None  # physical lines of the text files
    for f in track(files, "ingest: reading files", unit="files"):
        try:
            raw = read_source(f, cfg.source)
        except EmptyFileError as e:
            report.sources[f.name] = 0
            empty[f.name] = e
            continue
        report.sources[f.name] = raw.rows
        report.rows_read += raw.rows
        if raw.lines is not None:
            lines = raw.lines.read + (lines or 0)
        if raw.rows:
            _check_columns(raw, cfg.columns)
            raws.append(raw)
        else:
            empty[f.name] = None
    if not raws:
        zero = empty.get(files[0].name) if len(files) == 1 else None
        if zero is not None:
            raise zero from None  # "is empty (0 bytes)"
        only = files[0].name if len(files) == 1 else f"all {len(files)} files under '{cfg.source.path}'"
        raise IngestError(f"events file '{only}' has no data rows (only a header or nothing); check ingest.source.path")
    for name, err in empty.items():
        msg = f"events file '{name}' has no data rows ({'a header only' if err is None else err.what}); skipped"
        log.warning(msg)
        warnings.warn(msg, DataWarning, stacklevel=2)
    if empty:
        report.details["files_skipped"] = len(empty)
    if lines is not None:  # each file's lines = header + blank + rows + continuation (checked in read_source)
        report.details["lines_read"] = lines
    profiles = [_profile(raw, cfg) for raw in raws]
    id_dtypes = _id_dtypes(raws, cfg)  # one ID dtype per role for the whole log, from the schemas

    # Parse every file in one streaming query; ``__file`` says where each row came from.
    queries: list[pl.LazyFrame] = []
    seen: set[str] = set()
    for k, (raw, prof) in enumerate(zip(raws, profiles, strict=True)):
        query, file_reasons = _parse_frame(raw, prof, id_dtypes, cfg)
        queries.append(query.with_columns(pl.lit(k, dtype=pl.UInt32).alias(_FILE)))
        seen.update(file_reasons)
    reasons = [r for r in REASONS if r in seen]
    parsed = _collect(queries, raws)
    # a flag that some file could not raise is null for its rows after the diagonal concat: False
    holes = [_flag(r) for r in reasons if _flag(r) in parsed.columns and parsed[_flag(r)].null_count()]
    if holes:
        parsed = parsed.with_columns(parsed[c].fill_null(False) for c in holes)
    parsed = _normalize_ids(parsed, report)
    parsed = _rematch_event_types(parsed, cfg)
    parsed = _time_flags(parsed, profiles, [raw.file.name for raw in raws], cfg)
    flag_cols = [_flag(r) for r in reasons]

    bad_mask = functools.reduce(operator.or_, (parsed[c] for c in flag_cols))  # null_user/null_item always
    quarantines: list[pl.DataFrame] = []
    if bad_mask.any():
        bad = parsed.filter(bad_mask)
        bad = bad.with_columns(_reason_of(bad, reasons))
        per_file = bad.group_by(_FILE, _R).len().sort(_FILE, "len", _R, descending=[False, True, False])
        for (k,), counts in per_file.group_by(_FILE, maintain_order=True):
            raw = raws[int(k)]
            by_reason = Counter(dict(counts.select(_R, "len").iter_rows()))
            if by_reason.total() == raw.rows:
                raise _all_bad_error(raw.file.name, by_reason, bad.filter(pl.col(_FILE) == k), cfg)
            report.quarantined.update(by_reason)
            quarantines.append(_quarantine_rows(raw, bad.filter(pl.col(_FILE) == k).select(ROW_COL, _R)))
        del bad
        parsed = parsed.filter(~bad_mask)
    events = _without(parsed, ROW_COL, *flag_cols, "__rest")
    del parsed

    before = events.height
    keep = first_occurrence_mask(events, _FILE, len(raws), cfg.columns.timestamp is not None)
    if keep is not None:
        events = events.filter(keep)
    # One chunk per numeric column keeps later steps (and callers') fast; the string columns (event type) are
    # left as they are: rechunking 20M strings costs more than every later use of them together.
    events = _without(events, _FILE)
    del raws
    report.duplicates = before - events.height
    report.kept = events.height
    events = _apply_filters(events, cfg, report)
    item_text = _item_texts(events) if cfg.columns.item_text else None
    events = events[list(EVENT_COLUMNS)]
    report.check()
    quarantine = pl.concat(quarantines, how="diagonal") if quarantines else _empty_quarantine()
    if report.n_quarantined:
        log.info(
            "ingest: %s rows quarantined (%s)",
            f"{report.n_quarantined:,}",
            ", ".join(f"{r}={n:,}" for r, n in report.quarantined.most_common()),
        )
    log.info(
        "ingest: %s rows read from %d file(s)%s; kept %s, duplicates %s, quarantined %s, filtered %s",
        f"{report.rows_read:,}",
        len(files),
        f" ({lines:,} lines)" if lines is not None else "",
        f"{report.kept:,}",
        f"{report.duplicates:,}",
        f"{report.n_quarantined:,}",
        f"{report.n_filtered:,}",
    )
    paths = [f.path for f in files]
    return EventLog(
        events=events,
        report=report,
        quarantine=quarantine,
        item_text=item_text,
        files=[str(p) for p in paths],
        fingerprint=fingerprint(paths),
    )


def write_quarantine(q: pl.DataFrame, path: str | Path) -> Path:
    """Write the quarantine frame atomically as Parquet (zstd); returns the path."""
    return write_parquet_atomic(q, path)
