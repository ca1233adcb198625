"""Raw column values -> typed values, as Polars expressions over one raw file: IDs, numbers and timestamps.

Ingest builds each file's parsing query from these. Nothing here reads files or decides quarantine reasons; the
expressions return nulls (or a "no value was given" flag) that ingest turns into reasons.

Timestamps: integer / float epochs in s, ms, us or ns (``guess_unit`` picks one by magnitude, or per row for a
column that mixes units), ``Datetime`` / ``Date`` columns, and ISO-8601 text with or without a zone (naive
times are localized to ``ingest.assume_timezone``). Everything ends as ``TS_DTYPE`` (Datetime[us, UTC]).
"""

from __future__ import annotations

import math
from collections import Counter

import polars as pl

from recsys_embed.errors import IngestError

TS_DTYPE = pl.Datetime("us", "UTC")
# Text that means "no value" in exported logs (pandas, R, SQL dumps); compared after stripping whitespace.
NULL_TOKENS = ["", "null", "NULL", "Null", "none", "None", "NONE", "nan", "NaN", "NAN", "na", "NA", "n/a", "N/A"]
UNIT_MICROS = {"s": 1_000_000, "ms": 1_000, "us": 1}  # multiply to get microseconds ("ns": divide by 1000)
_I64_MAX = 2**63 - 1
# Unicode White_Space: what ``str.strip_chars()`` strips by default, spelled out to add characters to it.
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
# Invisible characters that ride along with pasted IDs. Zero-width space, word joiner and BOM never carry meaning
# in an ID and go wherever they are; the zero-width (non-)joiner shape emoji and Persian/Indic text inside a
# word, so they go only at the ends.
ZERO_WIDTH_ANYWHERE = "\u200b\u2060\ufeff"
ZERO_WIDTH_EDGES = "\u200c\u200d"


def is_int_dtype(dtype: pl.DataType) -> bool:
    return dtype.is_integer()


def is_text_dtype(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)


def stripped(name: str, extra: str = "") -> pl.Expr:
    """String column stripped (of whitespace and the characters in ``extra``); blank and null tokens -> null."""
    s = pl.col(name).cast(pl.String)
    s = s.str.strip_chars(WHITESPACE + extra) if extra else s.str.strip_chars()
    return pl.when(s.is_in(NULL_TOKENS)).then(pl.lit(None, dtype=pl.String)).otherwise(s)


def normalize_text_ids(ids: pl.Series) -> pl.Series:
    """Stripped text IDs -> one spelling per look-alike (``ingest.id_normalization: nfc``), null where none is left.

    Drops ``ZERO_WIDTH_ANYWHERE`` everywhere, strips whitespace and ``ZERO_WIDTH_EDGES`` from the ends, then
    NFC-normalizes (``"jose\u0301"`` -> ``"jos\xe9"``); text that ends blank or a null token becomes null. Costs a
    Unicode pass, so callers hand it only the non-ASCII IDs (ASCII text is already in NFC).
    """
    out = ids.str.replace_all(f"[{ZERO_WIDTH_ANYWHERE}]", "").str.strip_chars(WHITESPACE + ZERO_WIDTH_EDGES)
    out = out.str.normalize("NFC")
    return pl.select(pl.when(out.is_in(NULL_TOKENS)).then(pl.lit(None, dtype=pl.String)).otherwise(out)).to_series()


def id_kind(dtype: pl.DataType, file: str, col: str, role: str) -> str:
    """``int`` / ``float`` / ``str`` for an ID column's dtype; any other dtype is an ``IngestError``."""
    if dtype == pl.Null:
        raise IngestError(
            f"events file '{file}' column '{col}' is null in every row (no {role} IDs at all); map the {role} "
            f"column with ingest.columns.{role}"
        )
    if is_int_dtype(dtype):
        return "int"
    if dtype.is_float():
        return "float"
    if is_text_dtype(dtype):
        return "str"
    raise IngestError(
        f"events file '{file}' column '{col}' holds {dtype} values; {role} IDs must be integers or strings, "
        f"map another column with ingest.columns.{role}"
    )


FLOAT_EXACT = 2**53
"""Floats hold every integer below this exactly, and not all above it."""
_WHOLE_TEXT = r"^([+-]?\d+)\.0*$"  # "17850.0": an integer written as a float (pandas, with gaps in the column)


def id_expr(
    col: str, dtype: pl.DataType, target: pl.DataType, normalize: bool = False
) -> tuple[pl.Expr, pl.Expr | None]:
    """(IDs as ``target``, Int64 or String, or null; "a value was given but is no ID of that type" or None).

    The one rule that makes an ID mean the same in every file, whatever its column type there:

    - integer columns: the integer (``target`` String: its decimal text);
    - float columns: whole values are integers (``1000.0`` -> ``1000`` / ``"1000"``, never ``"1000.0"``); a
      non-integral value (``1000.5``), an infinity, or a value at or beyond 2**53 (digits already lost) is not
      an ID (the second expression is True); null and NaN are missing (pandas spells a gap NaN);
    - text columns read as String: stripped, null tokens -> null (text checks and, with ``normalize``,
      ``normalize_text_ids`` happen in ingest, on the non-ASCII rows only);
    - text columns read as Int64: an integer, optionally written with a zero fraction (``"17850.0"``), with
      ``normalize`` also with zero-width characters around it (``"1000\u200b"``); any other text is not an ID.
    """
    c = pl.col(col)
    if is_text_dtype(dtype):
        if target == pl.String:
            return stripped(col), None
        s = stripped(col, ZERO_WIDTH_ANYWHERE + ZERO_WIDTH_EDGES if normalize else "")
        value = s.str.replace(_WHOLE_TEXT, "${1}").cast(pl.Int64, strict=False)
        return value, s.is_not_null() & value.is_null()
    if dtype.is_float():
        given = c.is_not_null() & ~c.is_nan()
        whole = c.is_finite() & (c == c.round()) & (c.abs() < FLOAT_EXACT)
        value = pl.when(whole).then(c.cast(pl.Int64, strict=False))
        return (value.cast(pl.String) if target == pl.String else value), given & ~whole.fill_null(False)
    if target == pl.String:
        return c.cast(pl.String), None
    if dtype != pl.UInt64:
        return c.cast(pl.Int64), None  # every value fits: no flag on the hot path
    value = c.cast(pl.Int64, strict=False)  # UInt64 above 2**63 - 1 does not fit
    return value, c.is_not_null() & value.is_null()


def number_expr(col: str, dtype: pl.DataType, file: str, role: str) -> tuple[pl.Expr, pl.Expr]:
    """(value as Float64 or null, "a value was given") for a numeric column that may arrive as text."""
    if dtype == pl.Null:  # e.g. an NDJSON key that is null on every line: no value was given
        return pl.lit(None, dtype=pl.Float64), pl.lit(False)
    if dtype.is_numeric() or dtype == pl.Boolean:
        return pl.col(col).cast(pl.Float64), pl.col(col).is_not_null()
    if is_text_dtype(dtype):
        s = stripped(col)
        return s.cast(pl.Float64, strict=False), s.is_not_null()
    raise IngestError(
        f"events file '{file}' column '{col}' holds {dtype} values, not numbers; map a numeric column with "
        f"ingest.columns.{role}"
    )


def guess_unit(magnitude: float | None) -> str:
    """Epoch unit from the median absolute value: <1e11 s, <1e14 ms, <1e17 us, else ns."""
    if magnitude is None or not math.isfinite(magnitude) or magnitude < 1e11:
        return "s"
    if magnitude < 1e14:
        return "ms"
    return "us" if magnitude < 1e17 else "ns"


def magnitude_unit(x: pl.Expr) -> pl.Expr:
    """Each value's epoch unit by its magnitude (String), with ``guess_unit``'s thresholds."""
    return per_row_unit(x, pl.lit("s"), pl.lit("ms"), pl.lit("us"), pl.lit("ns"))


def per_row_unit(x: pl.Expr, s: pl.Expr, ms: pl.Expr, us: pl.Expr, ns: pl.Expr) -> pl.Expr:
    """``s``/``ms``/``us``/``ns`` by the magnitude of each value, with ``guess_unit``'s thresholds."""
    a = x.abs()
    return pl.when(a < 10**11).then(s).when(a < 10**14).then(ms).when(a < 10**17).then(us).otherwise(ns)


def epoch_int(x: pl.Expr, unit: str) -> pl.Expr:
    """Integer epoch in ``unit`` (``mixed``: each value's unit by its magnitude) -> Datetime[us, UTC]; values
    that would overflow -> null."""
    if unit == "mixed":  # |x| < 1e11 s, 1e14 ms, 1e17 us: none of the products can overflow
        return per_row_unit(x, x * 1_000_000, x * 1_000, x, x // 1000).cast(TS_DTYPE)
    if unit == "ns":
        micros = x // 1000
    else:
        mult = UNIT_MICROS[unit]
        micros = pl.when(x.abs() <= _I64_MAX // mult).then(x * mult)
    return micros.cast(TS_DTYPE)


def epoch_float(x: pl.Expr, unit: str) -> pl.Expr:
    if unit == "mixed":
        micros = x * per_row_unit(x, pl.lit(1e6), pl.lit(1e3), pl.lit(1.0), pl.lit(1e-3))
    else:
        micros = x * (1e-3 if unit == "ns" else float(UNIT_MICROS[unit]))
    ok = micros.is_finite() & (micros.abs() < 9.2e18)
    return pl.when(ok).then(micros.round()).cast(pl.Int64, strict=False).cast(TS_DTYPE)


def localize(x: pl.Expr, tz: str) -> pl.Expr:
    """Naive datetime taken in ``tz`` -> UTC (ambiguous DST times: earliest; nonexistent: null)."""
    return x.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC")


ISO_FORMATS = (
    # (format, aware); chrono's %#z takes Z, +hh, +hhmm and +hh:mm; %.f takes zero or more fraction digits
    ("%Y-%m-%dT%H:%M:%S%.f%#z", True),
    ("%Y-%m-%d %H:%M:%S%.f%#z", True),
    ("%Y-%m-%dT%H:%M:%S%.f", False),
    ("%Y-%m-%d %H:%M:%S%.f", False),
    ("%Y-%m-%dT%H:%M%#z", True),
    ("%Y-%m-%d %H:%M%#z", True),
    ("%Y-%m-%dT%H:%M", False),
    ("%Y-%m-%d %H:%M", False),
    ("%Y-%m-%d", False),
)


def parse_time_text(text: pl.Series, unit: str, tz: str, formats: Counter[str] | None = None) -> pl.Series:
    """Stripped non-integer time strings -> Datetime[us, UTC] (null where unparsable).

    Tries a decimal epoch (``1.7e9``, ``1700000000.5``) in ``unit``, then ISO-8601 formats one at a time on
    the rows still unparsed, so a column in one format costs one parse; a last pass normalises odd
    spellings (``t`` separator, `` UTC`` suffix, a space before the offset) and retries.

    ``formats``, when given, is incremented by the number of values each way of reading parsed: the ISO
    format (chrono syntax, ``+normalised`` for the last pass), or ``decimal epoch <unit>``.
    """
    out: pl.Series = pl.select(epoch_float(pl.lit(text).cast(pl.Float64, strict=False), unit)).to_series()
    if formats is not None and out.len() - out.null_count():
        formats[f"decimal epoch {unit}"] += out.len() - out.null_count()
    for attempt in range(2):
        todo = out.is_null()
        if not todo.any():
            break
        idx = todo.arg_true()
        rest = text.gather(idx)
        if attempt == 1:
            rest = (
                rest.str.replace(r"^(\d{4}-\d{2}-\d{2})[Tt]", "${1}T")
                .str.replace(r"\s*(?:[Zz]|UTC|GMT)$", "+00:00")
                .str.replace(r"\s+([+-]\d{2}(?::?\d{2})?)$", "${1}")
            )
        got = pl.repeat(None, rest.len(), dtype=TS_DTYPE, eager=True)
        for fmt, aware in ISO_FORMATS:
            miss = got.is_null()
            if not miss.any():
                break
            sub_idx = miss.arg_true()
            sub = rest.gather(sub_idx)
            if aware:
                parsed = sub.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
            else:
                naive = sub.str.to_datetime(fmt, strict=False, time_unit="us")
                parsed = pl.select(localize(pl.lit(naive), tz)).to_series()
            got = got.scatter(sub_idx, parsed.cast(TS_DTYPE))
            if formats is not None and parsed.len() - parsed.null_count():
                formats[fmt + (" +normalised" if attempt else "")] += parsed.len() - parsed.null_count()
        out = out.scatter(idx, got)
    return out


def ts_exprs(col: str, dtype: pl.DataType, unit: str, tz: str, file: str) -> tuple[pl.Expr, pl.Expr, pl.Expr | None]:
    """(timestamp as Datetime[us, UTC] or null, "no value was given", text left for ``parse_time_text``).

    Text columns are parsed as integer epochs here (the common, cheap case); any other text is handed on
    as the third expression, non-null only on the rows that still need parsing.
    """
    c = pl.col(col)
    if is_int_dtype(dtype):
        return epoch_int(c.cast(pl.Int64, strict=False), unit), c.is_null(), None
    if dtype.is_float():
        return epoch_float(c.cast(pl.Float64), unit), c.is_null(), None
    if isinstance(dtype, pl.Datetime):
        x = c.dt.cast_time_unit("us")
        x = localize(x, tz) if dtype.time_zone is None else x.dt.convert_time_zone("UTC")
        return x.cast(TS_DTYPE), c.is_null(), None
    if dtype == pl.Date:
        return localize(c.cast(pl.Datetime("us")), tz).cast(TS_DTYPE), c.is_null(), None
    if is_text_dtype(dtype):
        s = stripped(col)
        ts = epoch_int(s.cast(pl.Int64, strict=False), unit)
        return ts, s.is_null(), pl.when(ts.is_null()).then(s)
    if dtype == pl.Null:
        raise IngestError(
            f"events file '{file}' column '{col}' is null in every row (no times at all); map the time column "
            "with ingest.columns.timestamp, or set it to null for a log without time"
        )
    raise IngestError(
        f"events file '{file}' column '{col}' holds {dtype} values, not times; map the time column with "
        "ingest.columns.timestamp"
    )
