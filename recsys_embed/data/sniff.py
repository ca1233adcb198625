"""A newcomer's own log -> a proposed pipeline config (``recsys-embed init LOG``).

``read_sample`` reads the head of a few of the log's files with the ingest readers (``recsys_embed.data.sources``:
a file, a glob or a partitioned folder of CSV / Parquet / NDJSON). ``propose`` looks at that sample and
returns a ``LogProposal``: which column holds users, items, event time and event type (by name and by
content: dtype, cardinality, values that parse as times), the event types with suggested weights, an item
text column, and null for every optional mapping the log lacks. ``render_yaml`` writes the proposal as a
config whose every choice carries a comment (``CHECK`` where a person should look), and ``write_config``
validates it against ``PipelineConfig`` and writes it atomically, refusing to overwrite without ``force``.

Nothing here decides how the log is ingested: the written config does, and ``ingest`` reads it like any other.
"""

from __future__ import annotations

import gzip
import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import TypeAdapter, ValidationError

from recsys_embed.config import FolderName, PipelineConfig, SourceConfig
from recsys_embed.data.parsing import NULL_TOKENS, TS_DTYPE, guess_unit, is_text_dtype, parse_time_text
from recsys_embed.data.sources import (
    COMPRESSION_BY_EXTENSION,
    FORMAT_BY_EXTENSION,
    READ_ERRORS,
    SourceFile,
    list_sources,
    read_source,
)
from recsys_embed.errors import ConfigError, IngestError
from recsys_embed.io import write_text_atomic

SAMPLE_ROWS = 200_000
"""Rows read in all for the proposal (the head of each sampled file): enough to see every common event type."""
SAMPLE_FILES = 3
"""Files sampled: the first, the middle and the last, so that a layout change over time shows."""
MAX_EVENT_TYPES = 50
"""A column with more distinct values than this is not an event type."""
_PARSE_PROBE = 5_000  # values per text column tried as times
_PLAUSIBLE = (datetime(1995, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
ROLES = ("user", "item", "timestamp", "event_type", "weight", "quantity", "rating", "item_text")


def _words(text: str) -> set[str]:
    return set(text.split())


# Column names by role: exact names (lower case, separators dropped) and name tokens (words of the name).
_EXACT: dict[str, set[str]] = {
    role: _words(words)
    for role, words in {
        "user": """user userid uid customer customerid custid client clientid visitor visitorid member memberid
            account accountid buyer buyerid shopper shopperid person personid subscriber subscriberid viewer viewerid
            reader readerid listener profileid sessionid session""",
        "item": """item itemid iid product productid prodid sku skuid article articleid aid asin isbn movie movieid
            track trackid song songid video videoid book bookid stockcode offer offerid listing listingid content
            contentid goods goodsid variant variantid post postid recipe recipeid game gameid artist artistid course
            courseid job jobid ad adid place placeid restaurant hotel""",
        "timestamp": """ts timestamp time datetime date eventtime eventtimestamp eventdate eventts createdat created
            occurredat invoicedate orderdate purchasedate unixtime epoch clicktime servertime timestampms tsms when
            at""",
        "event_type": """event eventtype eventname eventkind action actiontype type interaction interactiontype
            behavior behaviour behaviortype behaviourtype activity kind verb""",
        "quantity": "quantity qty units numitems nitems pieces quantityordered",
        "rating": "rating stars score rate ratingvalue userrating grade",
        "weight": """weight plays playcount playcounts nplays numplays count counts cnt clicks clickcount nclicks
            numclicks views viewcount nviews listens listencount streams duration watchtime dwelltime dwell
            playtime seconds minutes frequency freq times visits nvisits""",
        "item_text": """description desc title name text label productname itemname producttitle itemtitle
            productdescription itemdescription""",
    }.items()
}
_TOKENS: dict[str, set[str]] = {
    role: _words(words)
    for role, words in {
        "user": "user customer client visitor member account buyer shopper cust subscriber",
        "item": "item product sku article movie track song video book asin stock listing offer goods variant",
        "timestamp": "time timestamp ts date datetime at epoch",
        "event_type": "event action type behavior behaviour interaction activity",
        "quantity": "quantity qty units",
        "rating": "rating stars",
        "weight": "plays count clicks views listens streams duration watchtime dwell playtime",
        "item_text": "description title name desc",
    }.items()
}

# Event-type vocabulary, matched on a value's lower-case words (and the whole value without separators).
_NEGATIVE = _words(
    """cancel cancellation cancelled canceled return returned refund refunded chargeback void remove removed
    removal delete deleted unlike dislike unfavorite unfavourite unsubscribe"""
)
_PURCHASE = _words(
    """purchase purchased purchases buy bought buys order orders ordered checkout transaction sale sold conversion
    paid payment booking booked subscribe subscribed rent rented"""
)
_CONSUME = _words("play played plays watch watched listen listened stream streamed read download downloaded")
_CART = _words("cart carts addtocart basket addtobasket")
_LIKE = _words(
    """like liked likes favorite favourite fav wishlist save saved bookmark bookmarked rate rated review reviewed
    share shared follow star starred"""
)
_CLICK = _words("click clicks clicked tap tapped select selected")
_VIEW = _words(
    "view views viewed pageview pv detail visit visited browse impression impressions show shown open opened"
)


@dataclass(frozen=True)
class Choice:
    """One proposed mapping: ``column`` (None: the log has none) and the comment saying why."""

    column: str | None
    why: str
    check: bool = False  # a person should look at this one


@dataclass(frozen=True)
class EventTypeGuess:
    """One distinct event type of the sample with its suggested weight."""

    value: str
    rows: int
    weight: float
    why: str
    check: bool = False


@dataclass(frozen=True)
class Sample:
    """The head of a few of the log's files, as read by the ingest readers.

    Attributes:
        frame: the sampled rows (original columns; CSV columns are all String, as ingest reads them).
        path, format, csv_separator: how the files were read (the proposal's ``ingest.source``).
        files: how many files the path names; ``files_read``: how many were sampled.
        rows_read: rows sampled; ``rows_estimate``: rows in the whole log (exact for Parquet, else by bytes).
    """

    frame: pl.DataFrame
    path: str
    format: str
    csv_separator: str
    files: int
    files_read: int
    rows_estimate: int


@dataclass(frozen=True)
class LogProposal:
    """What ``init`` proposes for a log: the column map, event weights, ID types, split, and what to check."""

    name: str
    path: str
    format: str
    csv_separator: str
    files: int
    files_read: int
    rows_sampled: int
    rows_estimate: int
    columns: dict[str, str]  # every column of the sample -> its dtype
    choices: dict[str, Choice]  # role (``ROLES``) -> choice
    event_types: tuple[EventTypeGuess, ...]
    id_types: dict[str, Choice]  # "user" / "item" -> Choice(column=the id type)
    naive_times: bool  # the timestamp column holds times without a zone
    split_method: str
    checks: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------------------------------------
# Reading the sample (the I/O edge)


_LOG_SUFFIXES = {*FORMAT_BY_EXTENSION, *COMPRESSION_BY_EXTENSION}


def default_name(path: str) -> str:
    """A config / output folder name from a log path: ``data/shop_log.csv.gz`` -> ``shop_log``."""
    p = Path(path.rstrip("/"))
    if any(ch in path for ch in "*?["):
        parts = [q for q in p.parts if not any(ch in q for ch in "*?[")]
        p = Path(*parts) if parts else Path("log")
    stem = p.name
    while Path(stem).suffix.lower() in _LOG_SUFFIXES:
        stem = Path(stem).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-_") or "mylog"
    return name[:64]


def check_name(name: str) -> str:
    """``name`` if it is a valid ``PipelineConfig.name`` (a plain folder name), else a ``ConfigError``."""
    try:
        return TypeAdapter(FolderName).validate_python(name)
    except ValidationError as e:
        raise ConfigError(f"--name {name!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def sniff_separator(file: SourceFile) -> str:
    """The CSV separator of ``file``: the most frequent of ``, ; TAB |`` in its header line (``,`` if none)."""
    if file.path.name.lower().removesuffix(".gz").removesuffix(".zst").endswith(".tsv"):
        return "\t"
    try:
        with open(file.path, "rb") as fh:
            head = fh.read(65_536)
        if head.startswith(b"\x1f\x8b"):
            with gzip.open(file.path, "rb") as gz:
                head = gz.read(65_536)
    except (OSError, EOFError):
        return ","
    line = head.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0].decode("utf-8", errors="replace")
    counts = {sep: line.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] else ","


def read_sample(
    path: str, source_format: Literal["auto", "csv", "parquet", "ndjson"] = "auto", max_rows: int = SAMPLE_ROWS
) -> Sample:
    """Read the head of up to ``SAMPLE_FILES`` of the log's files (first, middle, last) with the ingest readers.

    Raises:
        IngestError: no files, an unreadable file, or no data rows (the readers' messages, naming the file).
    """
    files = list_sources(SourceConfig(path=path, format=source_format))
    picks = sorted({0, len(files) // 2, len(files) - 1})[:SAMPLE_FILES]
    sep = sniff_separator(files[0]) if files[0].format == "csv" else ","
    source = SourceConfig(path=path, format=source_format, csv_separator=sep)
    per_file = max(1, max_rows // len(picks))
    frames: list[pl.DataFrame] = []
    rows_read_files = 0
    bytes_read_files = 0
    for k in picks:
        raw = read_source(files[k], source)
        try:
            frames.append(raw.frame.select(raw.schema.names()).head(per_file).collect())
        except READ_ERRORS as e:
            raise IngestError(f"events file '{files[k].name}' could not be read ({e}); re-export it") from None
        rows_read_files += raw.rows
        bytes_read_files += files[k].path.stat().st_size
    try:
        frame = pl.concat(frames, how="diagonal_relaxed")
    except READ_ERRORS:  # the files disagree on a column's type: compare them as text
        frame = pl.concat([f.cast(dict.fromkeys(f.columns, pl.String)) for f in frames], how="diagonal")
    if frame.height == 0:
        raise IngestError(f"'{path}' has no data rows in the files sampled; check the path")
    total_bytes = sum(f.path.stat().st_size for f in files)
    estimate = round(rows_read_files * total_bytes / bytes_read_files) if bytes_read_files else rows_read_files
    return Sample(
        frame=frame,
        path=path,
        format=files[0].format,
        csv_separator=sep,
        files=len(files),
        files_read=len(picks),
        rows_estimate=max(estimate, frame.height),
    )


# ----------------------------------------------------------------------------------------------------------
# Looking at the columns (pure)


@dataclass
class _Col:
    name: str
    dtype: pl.DataType
    kind: str  # int / float / text / datetime / other
    given: int  # non-null values
    distinct: int
    mean_len: float = 0.0  # text: mean length in characters
    spaced: float = 0.0  # text: share of values holding a space
    numeric: float = 0.0  # text: share of values that parse as numbers; numbers: 1
    whole_text: float = 0.0  # text: share written as integers, possibly with a zero fraction ("17850.0")
    float_text: float = 0.0  # text: share written as "<digits>.0"
    time_share: float = 0.0  # share of values that read as a plausible event time
    time_how: str = ""  # how those values read (the ingest reading): "ISO-8601 text", "epoch ms", ...
    naive: bool = False  # times without a zone


def _name_key(name: str) -> tuple[str, list[str]]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    tokens = [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]
    return "".join(tokens), tokens


def _name_score(role: str, name: str) -> int:
    """2: the name is one of the role's names; 1: it holds one of the role's words; 0: neither."""
    key, tokens = _name_key(name)
    if key in _EXACT[role]:
        return 2
    return 1 if any(t in _TOKENS[role] for t in tokens) else 0


def _plausible(ts: pl.Series) -> pl.Series:
    return (ts > _PLAUSIBLE[0]) & (ts < _PLAUSIBLE[1])


def _num(x: Any) -> float:
    """A Polars scalar aggregate (mean, median) as a float; 0.0 for null."""
    return 0.0 if x is None else float(x)


def _profile_column(s: pl.Series) -> _Col:
    dtype = s.dtype
    given = s.len() - s.null_count()
    if isinstance(dtype, pl.Datetime | pl.Date):
        ts = s.cast(pl.Datetime("us")).dt.replace_time_zone(None) if isinstance(dtype, pl.Datetime) else s
        ts = ts.cast(pl.Datetime("us")).dt.replace_time_zone("UTC").drop_nulls()
        share = _num(_plausible(ts).mean()) if ts.len() else 0.0
        naive = not (isinstance(dtype, pl.Datetime) and dtype.time_zone)
        zone = dtype.time_zone if isinstance(dtype, pl.Datetime) else None
        how = f"{'Datetime' if isinstance(dtype, pl.Datetime) else 'Date'} values" + (f" in {zone}" if zone else "")
        return _Col(s.name, dtype, "datetime", given, s.n_unique(), time_share=share, time_how=how, naive=naive)
    if dtype.is_integer() or dtype.is_float():
        v = s.drop_nulls().cast(pl.Float64)
        v = v.filter(v.is_finite())
        whole = bool(v.len()) and bool((v == v.round()).all())
        col = _Col(s.name, dtype, "int" if dtype.is_integer() or whole else "float", given, s.n_unique(), numeric=1.0)
        if v.len():
            unit = guess_unit(_num(v.abs().median()))
            micros = v * {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}[unit]
            ok = micros.abs() < 9e18
            ts = micros.filter(ok).round().cast(pl.Int64).cast(TS_DTYPE)
            col.time_share = float(_plausible(ts).sum()) / v.len()
            col.time_how = f"epoch {unit}"
        return col
    if not is_text_dtype(dtype):
        return _Col(s.name, dtype, "other", given, 0)
    t = s.cast(pl.String).str.strip_chars()
    t = t.filter(t.is_not_null() & ~t.is_in(NULL_TOKENS))
    col = _Col(s.name, dtype, "text", t.len(), t.n_unique())
    if not t.len():
        return col
    col.mean_len = _num(t.str.len_chars().mean())
    col.spaced = _num(t.str.contains(" ", literal=True).mean())
    num = t.cast(pl.Float64, strict=False)
    col.numeric = _num(num.is_not_null().mean())
    col.whole_text = _num(t.str.contains(r"^[+-]?\d+(?:\.0*)?$").mean())
    col.float_text = _num(t.str.contains(r"^[+-]?\d+\.0+$").mean())
    probe = t.head(_PARSE_PROBE)
    if col.numeric >= 0.95:  # numbers written as text: epochs if they read as plausible times
        v = probe.cast(pl.Float64, strict=False).drop_nulls()
        unit = guess_unit(_num(v.abs().median())) if v.len() else "s"
        ts = parse_time_text(probe, unit, "UTC")
        col.time_share = float(_plausible(ts.drop_nulls()).sum()) / probe.len()
        col.time_how = f"epoch {unit} written as text"
        return col
    formats: Counter[str] = Counter()
    ts = parse_time_text(probe, "s", "UTC", formats)
    col.time_share = float(_plausible(ts.drop_nulls()).sum()) / probe.len()
    if formats:
        fmt = formats.most_common(1)[0][0]
        col.time_how = f"ISO-8601 text ('{fmt}')"
        col.naive = "%#z" not in fmt
    return col


def _id_like(c: _Col) -> bool:
    if c.kind == "int":
        return c.distinct >= 2
    if c.kind == "text":  # numbers written as text may look like epochs; ISO times are no IDs
        iso_time = c.time_share >= 0.5 and not c.time_how.startswith("epoch")
        return c.distinct >= 2 and c.mean_len <= 64 and c.spaced <= 0.05 and not iso_time
    return False


def _event_vocab(values: list[str]) -> int:
    """How many of ``values`` are known event words (view, click, cart, purchase, ...)."""
    known = _NEGATIVE | _PURCHASE | _CONSUME | _CART | _LIKE | _CLICK | _VIEW
    return sum(1 for v in values if set(_value_tokens(v)) & known)


def _value_tokens(value: str) -> list[str]:
    key, tokens = _name_key(value)
    return [*tokens, key]


def _content_score(role: str, c: _Col, values: list[str] | None) -> float | None:
    """How well column ``c`` fits ``role`` by content; None: it cannot be that role."""
    if role in ("user", "item"):
        if not _id_like(c):
            return None
        return 1.0 + (0.5 if c.distinct >= 20 else 0.0)
    if role == "timestamp":
        if c.time_share < 0.9:
            return None
        return 1.0 if c.time_how.startswith("epoch") else 3.0  # numbers are epochs only if the name agrees
    if role == "event_type":
        if c.kind not in ("text", "int") or not 1 <= c.distinct <= MAX_EVENT_TYPES or c.mean_len > 40:
            return None
        if c.kind == "text" and c.time_share >= 0.5:
            return None
        vocab = _event_vocab(values or [])
        return 1.0 + (2.0 if vocab else 0.0) if c.kind == "text" else 0.5
    if role == "item_text":
        if c.kind != "text" or c.mean_len < 6 or c.numeric > 0.5:
            return None
        return 1.0 + (1.0 if c.spaced >= 0.5 and c.mean_len >= 15 else 0.0)
    if role in ("quantity", "rating", "weight"):
        if c.kind in ("int", "float") or (c.kind == "text" and c.numeric >= 0.95):
            return 1.0
        return None
    return None


def _event_weight(value: str) -> tuple[float, str, bool]:
    tokens = set(_value_tokens(value))
    if tokens & _NEGATIVE:
        if tokens & _CART:
            return -0.5, "undoes an earlier cart add (negative weights cancel earlier events of the pair)", False
        return -1.0, "cancels an earlier purchase of the same item (negative weights cancel earlier events)", False
    if tokens & _PURCHASE:
        return 1.0, "purchase-like: the strongest signal", False
    if tokens & _CONSUME:
        return 1.0, "consumption (play, watch, read): a media log's strongest signal", False
    if tokens & _CART:
        return 0.5, "cart add: strong interest, not yet a purchase", False
    if tokens & _LIKE:
        return 0.5, "explicit interest (like, save, rate)", False
    if tokens & _CLICK:
        return 0.3, "click: a choice among what was shown", False
    if tokens & _VIEW:
        return 0.1, "view: weak evidence of interest", False
    return 0.5, "CHECK this: an unknown event type, given a middling weight", True


# ----------------------------------------------------------------------------------------------------------
# The proposal (pure)


def propose(sample: Sample, name: str, hints: dict[str, str] | None = None) -> LogProposal:
    """Propose a config for ``sample``: the column of each role, event weights, ID types, split, what to check.

    Args:
        sample: the log's head (``read_sample``).
        name: the pipeline name (config file and output folder).
        hints: role -> column the user named (``init --user customer``); they win over any guess.

    Raises:
        IngestError: a hinted column is not in the log, or no user or item column could be told.
    """
    frame = sample.frame
    hints = {k: v for k, v in (hints or {}).items() if v}
    for role, col in hints.items():
        if col not in frame.columns:
            raise IngestError(
                f"--{role.replace('_', '-')} {col!r}: the log has no such column (found: {frame.columns})"
            )
    cols = {c: _profile_column(frame[c]) for c in frame.columns}
    values: dict[str, list[str]] = {}
    for c, prof in cols.items():
        if prof.kind in ("text", "int") and 1 <= prof.distinct <= MAX_EVENT_TYPES:
            values[c] = _event_values(frame[c]).unique().sort().to_list()
    taken: set[str] = set(hints.values())
    choices: dict[str, Choice] = {}
    checks: list[str] = []

    def pick(role: str, need_name: bool) -> str | None:
        best: tuple[float, int, str] | None = None
        for pos, (c, prof) in enumerate(cols.items()):
            if c in taken:
                continue
            content = _content_score(role, prof, values.get(c))
            if content is None:
                continue
            named = _name_score(role, c)
            if need_name and not named:
                continue
            if role == "timestamp" and prof.time_how.startswith("epoch") and not named:
                continue  # numbers (typed or written as text) are epochs only when the column's name says time
            if role == "event_type" and not named and not _event_vocab(values.get(c, [])):
                continue
            if role == "item_text" and not named and content < 2:
                continue
            score = 2.0 * named + content
            if best is None or (score, -pos) > (best[0], best[1]):
                best = (score, -pos, c)
        return None if best is None else best[2]

    for role in ("timestamp", "event_type", "user", "item", "item_text", "quantity", "rating", "weight"):
        if role in hints:
            choices[role] = Choice(hints[role], f"given on the command line (--{role.replace('_', '-')})")
            continue
        need_name = role in ("quantity", "rating", "weight")
        found = pick(role, need_name)
        if found is not None:
            taken.add(found)
            choices[role] = _why(role, cols[found], values.get(found))
    if "weight" not in choices and "quantity" in choices and "event_type" not in choices:
        # a quantity beside no event type is a count of the pair (units played, bought, watched), not an order
        # line's quantity: it is the per-row confidence
        q = choices.pop("quantity")
        choices["weight"] = Choice(q.column, f"{q.why}; a count per row with no event type: the pair's confidence")
    if choices.get("weight") is not None and "weight" not in hints:
        count_col = choices["weight"]
        choices["weight"] = Choice(count_col.column, f"{count_col.why}: counts, the per-row confidence (summed per "
                                   "pair; ALS reads it through models.als.confidence)", count_col.check)  # fmt: skip
    if "weight" not in choices:
        choices["weight"] = Choice(None, "no count-like column (plays, clicks, duration, ...): rows weigh as events")

    for role in ("user", "item"):
        if role not in choices:
            ids = [c for c, p in cols.items() if c not in taken and _id_like(p)]
            if not ids:
                raise IngestError(
                    f"could not tell which column of '{sample.path}' holds {role} IDs (columns: "
                    f"{list(cols)}); name it: recsys-embed init {sample.path} --{role} COLUMN"
                )
            taken.add(ids[0])
            choices[role] = Choice(
                ids[0],
                f"CHECK: the first ID-like column left ({cols[ids[0]].distinct:,} distinct in the sample); "
                f"the name says nothing, pass --{role} to choose another",
                check=True,
            )
    for role in ("timestamp", "event_type", "item_text", "quantity", "rating", "weight"):
        if role not in choices:
            choices[role] = Choice(None, _absent(role))

    # event types
    guesses: list[EventTypeGuess] = []
    et = choices["event_type"].column
    if et is not None:
        counts = _event_values(frame[et]).value_counts(sort=True)
        if counts.height > MAX_EVENT_TYPES:
            checks.append(
                f"column '{et}' has {counts.height} distinct values, too many for event types: set "
                "ingest.columns.event_type to null or list its weights yourself"
            )
        for value, n in counts.head(MAX_EVENT_TYPES).iter_rows():
            w, why, check = _event_weight(str(value))
            guesses.append(EventTypeGuess(str(value), int(n), w, why, check))
        if not any(g.weight > 0 for g in guesses):
            checks.append(f"no event type of column '{et}' has a positive weight: every pair would cancel out")
    guesses.sort(key=lambda g: (-g.weight, -g.rows, g.value))

    # ID types
    id_types: dict[str, Choice] = {}
    for role in ("user", "item"):
        prof = cols[choices[role].column or ""]
        if prof.kind == "text" and prof.float_text > 0 and prof.whole_text >= 0.999:
            example = _example(frame, prof.name, r"\.0+$")
            id_types[role] = Choice(
                "int",
                f"values like {example!r}: integers written as floats (pandas does so when a column has gaps); "
                "int reads 17850 and 17850.0 as one ID",
            )
        elif prof.kind == "text":
            id_types[role] = Choice("auto", "text: IDs are compared as written ('007' and '7' are two IDs)")
        elif prof.dtype.is_float():
            id_types[role] = Choice("auto", "float column: whole values are integer IDs, others invalid_id")
        else:
            id_types[role] = Choice("auto", "integers")

    ts_col = choices["timestamp"].column
    ts_prof = cols[ts_col] if ts_col is not None else None
    if ts_prof is None:
        checks.append("no event-time column found: the split is random (per user) instead of temporal")
    elif ts_prof.naive:
        checks.append(
            f"the times in '{ts_col}' carry no zone: they are taken as UTC; set ingest.assume_timezone to the "
            "log's zone (e.g. Europe/Berlin) if it is another"
        )
    if ts_prof is not None and ts_prof.time_share < 0.999:
        checks.append(f"{1 - ts_prof.time_share:.1%} of '{ts_col}' values in the sample do not read as times")
    if any(g.check for g in guesses):
        unknown = [g.value for g in guesses if g.check]
        checks.append(f"event types with a guessed weight: {unknown}; set their weights in ingest.event_weights")
    if frame.height < sample.rows_estimate and et is not None:
        checks.append(
            f"event types come from {frame.height:,} sampled rows; a type missing from ingest.event_weights is "
            "quarantined as unknown_event_type (`recsys-embed ingest --config ...` shows the count)"
        )
    checks.extend(c.why for c in choices.values() if c.check)
    return LogProposal(
        name=name,
        path=sample.path,
        format=sample.format,
        csv_separator=sample.csv_separator,
        files=sample.files,
        files_read=sample.files_read,
        rows_sampled=frame.height,
        rows_estimate=sample.rows_estimate,
        columns={c: str(frame.schema[c]) for c in frame.columns},
        choices=choices,
        event_types=tuple(guesses),
        id_types=id_types,
        naive_times=bool(ts_prof is not None and ts_prof.naive),
        split_method="auto" if ts_col is not None else "random",
        checks=tuple(checks),
    )


def _event_values(s: pl.Series) -> pl.Series:
    """An event-type column's values as ingest matches them: stripped text, null tokens and blanks dropped."""
    t = s.cast(pl.String).str.strip_chars()
    return t.filter(t.is_not_null() & ~t.is_in(NULL_TOKENS))


def _example(frame: pl.DataFrame, col: str, pattern: str) -> str:
    s = frame[col].cast(pl.String).str.strip_chars().drop_nulls()
    hit = s.filter(s.str.contains(pattern)).head(1)
    return str(hit.item()) if hit.len() else ""


def _why(role: str, c: _Col, values: list[str] | None) -> Choice:
    named = _name_score(role, c.name)
    by_name = "its name" if named == 2 else ("a word in its name" if named else "")
    if role in ("user", "item"):
        what = f"{c.distinct:,} distinct in the sample, {'integers' if c.kind == 'int' else 'short text'}"
        if not named:
            return Choice(c.name, f"CHECK: ID-like by content only ({what}); pass --{role} to choose another", True)
        if role == "user" and "session" in _name_key(c.name)[1]:
            return Choice(
                c.name, f"CHECK: sessions stand in for users ({what}); map a user column if the log has one", True
            )
        return Choice(c.name, f"{by_name} and content ({what})")
    if role == "timestamp":
        how = c.time_how or str(c.dtype)
        zone = "; no zone: taken as ingest.assume_timezone" if c.naive and c.kind != "int" else ""
        share = f"{c.time_share:.0%}" if c.time_share < 0.995 else "all"
        return Choice(c.name, f"{how}, {share} plausible times in the sample{zone}")
    if role == "event_type":
        shown = ", ".join((values or [])[:6]) + (", ..." if len(values or []) > 6 else "")
        basis = by_name or "its values (known event words)"
        return Choice(c.name, f"{basis}; {c.distinct} distinct: {shown} (weights below)")
    if role == "item_text":
        basis = by_name or "long text with spaces"
        return Choice(c.name, f"{basis}; mean {c.mean_len:.0f} characters (display and two-tower text features)")
    basis = by_name or "content"
    return Choice(c.name, f"{basis}, numeric")


def _absent(role: str) -> str:
    return {
        "timestamp": "the log has no event-time column: split.method is random",
        "event_type": "no event-type column: every row is one event of weight 1",
        "item_text": "no item description column: recommendations show IDs only",
        "quantity": "no quantity column",
        "rating": "no rating column",
        "weight": "no count-like column",
    }[role]


# ----------------------------------------------------------------------------------------------------------
# The config text (pure) and writing it


_COMMENT_AT = 34  # the column comments start at
_WIDTH = 118  # wrap comments to this line length


def _scalar(v: Any) -> str:
    """One YAML scalar (or flow sequence) on one line, quoted where YAML needs it."""
    text: str = yaml.safe_dump(v, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _line(indent: int, key: str, value: Any = None, comment: str = "", raw: str | None = None) -> str:
    """``key: value  # comment`` at ``indent`` (the comment wrapped onto aligned ``#`` lines); ``raw`` is written
    as is instead of ``value`` ("" for none)."""
    body = " " * indent + f"{_scalar(key)}:"
    if raw is None:
        body += f" {_scalar(value)}"
    elif raw:
        body += f" {raw}"
    if not comment:
        return body
    at = max(_COMMENT_AT, len(body) + 1)
    chunks = textwrap.wrap(comment.replace("\n", " "), width=max(_WIDTH - at - 3, 40))
    lines = [body.ljust(at) + " # " + chunks[0]]
    lines += [" " * at + " # " + c for c in chunks[1:]]
    return "\n".join(lines)


def _comment_block(text: str, lead: str) -> list[str]:
    """``text`` as ``#`` lines: the first starts with ``lead``, the others are indented under it."""
    chunks = textwrap.wrap(text, width=_WIDTH - len(lead))
    return [lead + chunks[0]] + ["#" + " " * (len(lead) - 1) + c for c in chunks[1:]]


def render_yaml(p: LogProposal, command: str) -> str:
    """The proposal as a commented pipeline config (every choice carries its reason; ``CHECK`` marks guesses).

    ``command`` is the ``init`` command line, recorded in the header.
    """
    ch = p.choices
    out = _comment_block(f"Written by `{command}`: a proposal from the log itself; read the lines marked CHECK.", "# ")
    out += _comment_block(
        f"Sampled {p.rows_sampled:,} rows of {p.files_read} of {p.files} file(s) ({p.format}); about "
        f"{p.rows_estimate:,} rows in all.",
        "# ",
    )
    out.append(f"# Then: recsys-embed run --config configs/{p.name}.yaml   (outputs go to outputs/{p.name}/)")
    for check in p.checks:
        out += _comment_block(check, "#   CHECK: ")
    out += [
        _line(0, "name", p.name, f"outputs go to outputs/{p.name}/, apart from other pipelines' outputs"),
        _line(0, "output_root", "outputs"),
        _line(0, "seed", 42),
        "",
        "ingest:",
        "  source:",
        _line(4, "path", p.path, "relative to the folder you run recsys-embed from"),
        _line(4, "format", "auto", f"{p.format}, by the file extension"),
    ]
    if p.format == "csv":
        out.append(_line(4, "csv_separator", p.csv_separator, "sniffed from the header line"))
    out.append("  columns:")
    for role in ROLES:
        out.append(_line(4, role, ch[role].column, ch[role].why))
    for role in ("user", "item"):
        t = p.id_types[role]
        out.append(_line(2, f"{role}_id_type", t.column, t.why))
    if ch["timestamp"].column is not None:
        out.append(_line(2, "timestamp_unit", "auto", "epoch numbers: s/ms/us/ns by magnitude; text: ISO-8601"))
        out.append(
            _line(
                2,
                "assume_timezone",
                "UTC",
                "CHECK: the zone of times written without one" if p.naive_times else "for times without a zone",
            )
        )
    if p.event_types:
        out.append(
            _line(
                2,
                "event_weights",
                raw="",
                comment="event type -> weight; types not listed are quarantined as unknown_event_type",
            )
        )
        for g in p.event_types:
            out.append(_line(4, g.value, g.weight, f"{g.rows:,} sampled rows; {g.why}"))
    else:
        out.append(_line(2, "event_weights", raw="{}", comment="no event types: every row is one event of weight 1"))
    if ch["quantity"].column is not None:
        out.append(_line(2, "use_quantity", False, "true multiplies each event weight by |quantity|"))
    out += [
        _line(2, "min_user_interactions", 1, "k-core off: every user is kept; 2 drops users with a single item"),
        _line(2, "min_item_interactions", 1),
        "",
        "split:",
        _line(
            2,
            "method",
            p.split_method,
            "a global time cutoff (train on the past, test on the future), or each user's last event when a "
            "window holds too few warm users to choose on (split.min_eval_users)"
            if p.split_method == "auto"
            else "no event time: each user's events are split at random (seeded)",
        ),
    ]
    if p.split_method == "auto":
        out += [
            _line(2, "test_quantile", 0.8, "the last 20% of the log's time span is the test period"),
            _line(2, "val_quantile", 0.9, "the last 10% of the rest validates (best iteration)"),
        ]
    out += [
        "",
        *_comment_block(
            "models and tuning are left to the defaults in code, the project's best recipe: popularity, EASE "
            "(where its item-item matrix fits models.ease.max_memory_gb), ALS and BPR, each searched on validation "
            "(tuning.n_trials trials per model: a trial budget, so the same log gives the same search on a busy "
            "or idle machine); the best model on validation users the search never scored is shipped.",
            "# ",
        ),
        "models:",
        *([_line(2, "als", raw="{confidence: log1p}",
                 comment=f"'{ch['weight'].column}' counts are summed per pair; log1p tames their tail (the search "
                 "also tries none and bm25)")]
          if ch["weight"].column is not None else []),
        _line(
            2,
            "two_tower",
            raw="{enabled: false}",
            comment="Lightning two-tower: minutes on CPU; turn on once the run above works"
            + (" (it uses the item text)" if ch["item_text"].column else ""),
        ),
        "",
        "eval:",
        _line(2, "ks", raw="[10, 20]"),
        _line(2, "primary_metric", "ndcg_at_20", "picks the run's best model"),
        "",
        "export:",
        _line(2, "k", 20, "recommendations per user"),
        _line(2, "similar_k", 20, "similar items per item"),
        "",
    ]
    return "\n".join(out)


def refuse_overwrite(path: str | Path, force: bool) -> None:
    """A ``ConfigError`` when ``path`` exists and ``force`` is false."""
    if Path(path).exists() and not force:
        raise ConfigError(f"config file '{path}' already exists; pass --force to overwrite it, or --name another")


def write_config(text: str, path: str | Path, force: bool = False) -> Path:
    """Validate ``text`` as a ``PipelineConfig`` and write it to ``path`` atomically.

    Raises:
        ConfigError: ``path`` exists and ``force`` is false, or the text is not a valid config (a bug).
    """
    path = Path(path)
    refuse_overwrite(path, force)
    try:
        PipelineConfig.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:  # pragma: no cover - a bug in render_yaml
        raise ConfigError(f"the proposed config for '{path}' does not validate ({e}); please report it") from None
    return write_text_atomic(text, path)


def describe(p: LogProposal) -> str:
    """What ``init`` guessed and what to check, for people (the CLI prints it)."""
    lines = [
        f"Read {p.rows_sampled:,} rows of {p.files_read} of {p.files} {p.format} file(s) under '{p.path}' "
        f"(about {p.rows_estimate:,} rows in all); columns: {', '.join(p.columns)}",
        "Proposed mapping:",
    ]
    for role in ROLES:
        c = p.choices[role]
        mark = "  CHECK" if c.check else ""
        lines.append(f"  {role:<11} {c.column if c.column is not None else '-':<20} {c.why}{mark}")
    if p.event_types:
        lines.append("Event weights:")
        for g in p.event_types:
            lines.append(f"  {g.value:<20} {g.weight:>5}  ({g.rows:,} rows) {g.why}")
    lines.append(f"Split: {p.split_method}")
    if p.checks:
        lines.append("Check:")
        lines += [f"  - {c}" for c in p.checks]
    return "\n".join(lines)
