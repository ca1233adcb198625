"""Finding and scanning raw event-log files: a file, a glob or a (hive-partitioned) folder.

Formats: CSV/TSV (``.csv .tsv .txt``), Parquet (``.parquet .pq``) and NDJSON (``.ndjson .jsonl .json``); text
formats may be gzip- or zstd-compressed (``.gz``/``.zst``; recognised by magic bytes too). zstd is read through
pyarrow, which the project already depends on, so no ``zstandard`` module is needed.

Every file becomes a ``RawFrame``: its original columns (CSV: all String, so nothing is silently coerced to
null), hive partition columns, a 0-based data-row index (``ROW_COL``) and, for text formats, a per-row
pre-parse verdict (``PRE_REASON_COL``: ``malformed_row``, ``unterminated_quote`` or ``invalid_encoding``) plus
the raw text of those rows (``RAW_LINE_COL``) and, for CSV, the physical line they start on (``LINE_COL``).
Text formats also account for every physical line (``LineCount``): header, blank, one per row, and the extra
lines of rows whose quoted field spans lines; a file whose lines do not add up is a bug, never a silent loss.
Hive partition values (``key=value`` folders, URL-decoded) become String columns; a column the file itself holds
wins. Parsing, validation and quarantine happen in ``recsys_embed.data.ingest``.

A file that cannot be an event log (empty, binary, an image, a Parquet file with bad magic) raises a one-line
``IngestError`` naming the file and the fix (``EmptyFileError`` for an empty one, which ingest skips), never a
bare Polars traceback. Text with a byte order mark is repaired: a UTF-8 BOM is dropped, UTF-16 (with its BOM)
is transcoded to UTF-8 with a ``DataWarning``; UTF-16 without a BOM is reported as binary (it holds NUL bytes)
with the fix.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import logging
import os
import re
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import polars as pl

from recsys_embed.config import SourceConfig
from recsys_embed.errors import AccountingError, DataWarning, IngestError

log = logging.getLogger(__name__)

Format = Literal["csv", "parquet", "ndjson"]
Compression = Literal["gzip", "zstd"]

ROW_COL = "__recsys_row"
"""0-based data-row index within its file (header and blank lines not counted)."""
PRE_REASON_COL = "__recsys_pre_reason"
"""String: ``malformed_row`` / ``invalid_encoding`` for rows broken before parsing, else null (text formats)."""
RAW_LINE_COL = "__recsys_raw_line"
"""String: the raw text of a row flagged in ``PRE_REASON_COL`` (for the quarantine), else null."""
LINE_COL = "__recsys_line_no"
"""Int64: the 1-based physical line a CSV row starts on (every row after the exact parser ran, else only rows
flagged in ``PRE_REASON_COL``; null elsewhere). Absent when no row needs it."""
HELPER_COLUMNS = (ROW_COL, PRE_REASON_COL, RAW_LINE_COL, LINE_COL)
READ_ERRORS: tuple[type[BaseException], ...] = (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)
"""What reading a broken file can raise (Polars panics on some corrupt Parquet); turned into IngestError."""

FORMAT_BY_EXTENSION: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
}
COMPRESSION_BY_EXTENSION: dict[str, Compression] = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}

# Files whose content hash is part of the fingerprint; larger ones use size + mtime (hashing is ~1 s/GB).
FINGERPRINT_CONTENT_LIMIT = 256 * 1024**2

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
# Leading bytes of common non-log files -> what they are (for the error message).
_KNOWN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (zip/xlsx/docx)"),
    (b"\xd0\xcf\x11\xe0", "an old Office document (xls/doc)"),
    (b"SQLite format 3\x00", "a SQLite database"),
    (b"\x7fELF", "an executable"),
    (b"ARROW1", "an Arrow IPC file"),
    (_PARQUET_MAGIC, "a Parquet file"),
    (_GZIP_MAGIC, "gzip-compressed data"),
    (_ZSTD_MAGIC, "zstd-compressed data"),
)
# The one-column "line" read splits on a control byte that text logs practically never hold.
_LINE_SEP_CANDIDATES = (0x1F, 0x1E, 0x1D, 0x1C, *range(0x01, 0x09), *range(0x0E, 0x1C), 0x7F)
_NULL_FIELD = re.compile(r"^\s*$")


class EmptyFileError(IngestError):
    """The file holds no bytes (or none once decompressed); ingest skips it among other files.

    ``what`` says which, for the skip warning: ``"0 bytes"`` or ``"empty once decompressed"``.
    """

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class LineCount:
    """Where a text file's physical lines went (a line ends at ``\\n``; a last line without one counts).

    ``read == header + blank + rows + continuation``: ``continuation`` counts the lines after the first of rows
    whose quoted field spans lines (so a quote that swallowed lines shows up here, or as quarantined rows).
    """

    read: int
    header: int
    blank: int
    rows: int
    continuation: int = 0

    def balanced(self) -> bool:
        return min(self.header, self.blank, self.rows, self.continuation) >= 0 and self.read == (
            self.header + self.blank + self.rows + self.continuation
        )


def count_lines(data: bytes) -> int:
    """Physical lines in ``data``: one per ``\\n``, plus a last line that lacks one (C speed)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@dataclass(frozen=True)
class SourceFile:
    """One input file. ``name`` is how messages and the report refer to it (the path as resolved)."""

    path: Path
    format: Format
    compression: Compression | None = None
    partitions: dict[str, str | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class RawFrame:
    """A scanned file: lazily readable original columns plus the helper columns described in the module doc.

    Attributes:
        file: where it came from.
        frame: original + hive columns, ``ROW_COL`` (integer), and for text formats ``PRE_REASON_COL`` and
            ``RAW_LINE_COL``. Parquet stays a lazy scan; text formats are parsed once into memory.
        schema: the original + hive columns only (no helper columns), in file order.
        rows: number of data rows (header and blank lines excluded; malformed rows included).
        lines: the physical-line accounting of a text file (None for Parquet).
    """

    file: SourceFile
    frame: pl.LazyFrame
    schema: pl.Schema
    rows: int
    duplicates: tuple[str, ...] = ()
    """Header names that occur more than once (CSV; the copies are read as ``<name>_duplicated_<k>``)."""
    lines: LineCount | None = None


# ----------------------------------------------------------------------------------------------------------
# Resolving paths


def _strip_compression(name: str) -> str:
    for ext in COMPRESSION_BY_EXTENSION:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def split_extension(path: str | Path) -> tuple[Format | None, Compression | None]:
    """(format, compression) implied by a file name, e.g. ``x.csv.gz`` -> ("csv", "gzip"); None where unknown."""
    name = Path(path).name.lower()
    base = _strip_compression(name)
    compression = COMPRESSION_BY_EXTENSION.get(name[len(base) :]) if base != name else None
    return FORMAT_BY_EXTENSION.get(Path(base).suffix), compression


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _hidden(rel: Path) -> bool:
    # Spark/Hadoop/our own staging conventions: _SUCCESS, _temporary/, .part.crc, .staging-*
    return any(part.startswith((".", "_")) for part in rel.parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts:
        if _is_glob(part):
            break
        root.append(part)
    return Path(*root) if root else Path(".")


def resolve_files(source: SourceConfig) -> list[Path]:
    """The input files ``source.path`` names, sorted (deterministic).

    ``path`` may be a file, a glob (``logs/*.csv.gz``, ``**`` recurses) or a folder (every data file below
    it, recursively, skipping names that start with ``.`` or ``_`` such as ``_SUCCESS``).

    Raises:
        IngestError: nothing matches.
    """
    raw = os.path.expanduser(source.path)
    p = Path(raw)
    if _is_glob(raw):
        root = _glob_root(raw)
        files = [Path(m) for m in glob.glob(raw, recursive=True)]
        files = [f for f in files if f.is_file() and not _hidden(_relative(f, root))]
        if not files:
            raise IngestError(f"no input files match '{source.path}'; check ingest.source.path")
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p))]
        if source.format == "auto":
            files = [f for f in files if split_extension(f)[0] is not None]
        if not files:
            exts = "/".join(FORMAT_BY_EXTENSION)
            raise IngestError(
                f"no data files under folder '{source.path}' (looked for {exts}, optionally .gz/.zst); "
                "check ingest.source.path"
            )
    elif p.is_file():
        files = [p]
    else:
        raise IngestError(f"input file '{source.path}' does not exist; check ingest.source.path")
    return sorted(files, key=lambda f: f.as_posix())


def _relative(f: Path, root: Path) -> Path:
    try:
        return f.relative_to(root)
    except ValueError:
        return Path(f.name)


def detect_format(path: Path, override: str = "auto") -> Format:
    """The format of ``path``: ``override`` unless "auto", else from the extension.

    Raises:
        IngestError: "auto" and the extension is not a known one.
    """
    if override != "auto":
        return override  # type: ignore[return-value]
    fmt, _ = split_extension(path)
    if fmt is None:
        raise IngestError(
            f"cannot tell the format of '{path}' from its extension; rename it (.csv/.parquet/.ndjson, "
            "optionally .gz/.zst) or set ingest.source.format to csv, parquet or ndjson"
        )
    return fmt


def _partitions(path: Path, root: Path | None, mode: bool | str) -> dict[str, str | None]:
    if mode is False or root is None:
        return {}
    out: dict[str, str | None] = {}
    for part in _relative(path, root).parent.parts:
        m = re.fullmatch(r"([^=]+)=(.*)", part)
        if m:
            value = unquote(m.group(2))
            out[unquote(m.group(1))] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return out


def list_sources(source: SourceConfig) -> list[SourceFile]:
    """Resolve ``source`` into typed ``SourceFile``s (format, compression, hive partition values).

    Raises:
        IngestError: nothing matches, an unknown extension, or two formats mixed under "auto".
    """
    files = resolve_files(source)
    raw = os.path.expanduser(source.path)
    root: Path | None = _glob_root(raw) if _is_glob(raw) else (Path(raw) if Path(raw).is_dir() else None)
    out: list[SourceFile] = []
    for f in files:
        fmt = detect_format(f, source.format)
        out.append(SourceFile(f, fmt, split_extension(f)[1], _partitions(f, root, source.hive_partitioning)))
    if source.format == "auto":
        first = out[0]
        other = next((s for s in out if s.format != first.format), None)
        if other is not None:
            raise IngestError(
                f"'{source.path}' mixes formats: '{first.name}' is {first.format} but '{other.name}' is "
                f"{other.format}; narrow ingest.source.path to one format (e.g. '*.{first.format}')"
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading bytes


def _describe_magic(head: bytes) -> str | None:
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            return what
    return None


def _decompress(file: SourceFile, data: bytes, compression: Compression) -> bytes:
    try:
        if compression == "gzip":
            return gzip.decompress(data)
        import pyarrow as pa

        return pa.input_stream(io.BytesIO(data), compression="zstd").read()
    except (OSError, EOFError, zlib.error, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IngestError(
            f"events file '{file.name}' could not be decompressed ({compression}: {first}); the file is "
            "truncated or corrupt, copy it again"
        ) from None


def _load_text_bytes(file: SourceFile) -> bytes:
    """The file's bytes, decompressed (by extension and by magic), checked to look like text."""
    if file.path.stat().st_size == 0:
        raise EmptyFileError(
            f"events file '{file.name}' is empty (0 bytes); remove it or check ingest.source.path", "0 bytes"
        )
    data = file.path.read_bytes()
    magic: Compression | None = (
        "gzip" if data.startswith(_GZIP_MAGIC) else "zstd" if data.startswith(_ZSTD_MAGIC) else None
    )
    if file.compression is not None and magic != file.compression:
        raise IngestError(
            f"events file '{file.name}' is named as {file.compression}-compressed but is not "
            f"({_describe_magic(data[:16]) or 'plain bytes'}); rename it to match its content"
        )
    if magic is not None:
        data = _decompress(file, data, magic)
        if not data:
            raise EmptyFileError(
                f"events file '{file.name}' is empty once decompressed; remove it", "empty once decompressed"
            )
    data = _as_utf8(file, data)
    head = data[:8192]
    what = _describe_magic(head)
    if what is not None or b"\x00" in head:
        what = what or "binary (it holds NUL bytes; if it is UTF-16 text, re-encode it as UTF-8)"
        raise IngestError(
            f"events file '{file.name}' is {what}, not {file.format.upper()} text; point ingest.source.path "
            "at the event log or set ingest.source.format"
        )
    return data


def _as_utf8(file: SourceFile, data: bytes) -> bytes:
    """Drop a UTF-8 byte order mark; transcode UTF-16 that starts with its BOM to UTF-8 (with a warning)."""
    if data.startswith(_UTF8_BOM):
        return data[len(_UTF8_BOM) :]
    if not data.startswith(_UTF16_BOMS):
        return data
    try:
        text = data.decode("utf-16")  # the BOM says which byte order; it is consumed
    except UnicodeDecodeError as e:
        raise IngestError(
            f"events file '{file.name}' starts with a UTF-16 byte order mark but is not valid UTF-16 ({e.reason} at "
            f"byte {e.start}); re-encode it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"
        ) from None
    msg = (
        f"events file '{file.name}' is UTF-16 text; it was transcoded to UTF-8 to read it (re-encode it as UTF-8 "
        "to skip this step)"
    )
    log.warning(msg)
    warnings.warn(msg, DataWarning, stacklevel=2)
    return text.encode("utf-8")


def _read_lines(data: bytes) -> pl.Series | None:
    """One String per physical line (lossy UTF-8, CR stripped), blank lines and the header included.

    Polars reads the bytes as a one-column CSV split on a control byte the data does not hold; None when
    every candidate byte occurs (the caller then takes its exact path).
    """
    sep = next((chr(b) for b in _LINE_SEP_CANDIDATES if bytes([b]) not in data), None)
    if sep is None:
        return None
    try:
        frame = pl.read_csv(
            data,
            has_header=False,
            separator=sep,
            quote_char=None,
            infer_schema=False,
            empty_string_is_null=False,
            new_columns=["line"],
            encoding="utf8-lossy",
            raise_if_empty=False,
        )
    except READ_ERRORS:
        return None
    return frame["line"] if frame.width else pl.Series("line", [], dtype=pl.String)


# ----------------------------------------------------------------------------------------------------------
# CSV


def _sep_rx(sep: str) -> str:
    return f"\\x{{{ord(sep):x}}}"  # a regex escape that is safe for any one-byte separator


def _quoted_field_rx(sep: str) -> str:
    """A whole quoted field at the start of a line or after ``sep``; group 1 keeps the separator."""
    return f'(^|{_sep_rx(sep)})"(?:[^"]|"")*"'


def _csv_polars(data: bytes, sep: str, encoding: str) -> pl.DataFrame | None:
    try:
        return pl.read_csv(
            data,
            separator=sep,
            infer_schema=False,
            truncate_ragged_lines=True,
            encoding=encoding,
            raise_if_empty=False,
        )
    except READ_ERRORS:
        return None


def _csv_fast(data: bytes, sep: str) -> tuple[pl.DataFrame, LineCount] | None:
    """Vectorised path: Polars parses records; a one-column line read gives each row's field count.

    Returns None when records and lines do not align (quoted fields spanning lines, an unterminated quote,
    or an unusual byte), so the caller falls back to the exact parser. The cheap evidence is the count: one
    record per physical line after the header (blank lines included), checked against the newline count.
    """
    physical = count_lines(data)
    body_start = len(data) - len(data.lstrip(b"\r\n"))  # polars skips leading blank lines; the line read must too
    lead = data[:body_start].count(b"\n")
    data = data[body_start:]
    lossy = False
    records = _csv_polars(data, sep, "utf8")
    if records is None:
        records = _csv_polars(data, sep, "utf8-lossy")
        lossy = True
    if records is None or records.width == 0:
        return None
    lines = _read_lines(data)
    if lines is None or lines.len() - 1 != records.height or lead + lines.len() != physical:
        return None
    body = lines.slice(1)
    # Field count per line = separators outside quoted fields + 1 (quoted fields are cut out first).
    quoted = b'"' in data
    residual = body.str.replace_all(_quoted_field_rx(sep), "${1}") if quoted else body
    malformed = residual.str.count_matches(sep, literal=True) + 1 != records.width
    if quoted:  # a quote that opens a field but never closes: polars would have merged lines
        malformed = malformed | residual.str.contains(f'(^|{_sep_rx(sep)})"')
    bad_enc = body.str.contains("\ufffd", literal=True) if lossy else pl.repeat(False, body.len(), eager=True)
    blank = body.str.strip_chars() == ""
    flagged = malformed | bad_enc
    columns: dict[str, pl.Series] = {
        "__recsys_blank": blank,
        PRE_REASON_COL: pl.select(
            pl.when(malformed)
            .then(pl.lit("malformed_row"))
            .when(bad_enc)
            .then(pl.lit("invalid_encoding"))
            .otherwise(pl.lit(None, dtype=pl.String))
        ).to_series(),
        "__recsys_line": body,
    }
    if flagged.any():  # the physical line of each flagged row (the header is line lead + 1)
        line_no = pl.int_range(lead + 2, lead + 2 + body.len(), eager=True, dtype=pl.Int64)
        columns[LINE_COL] = pl.select(pl.when(flagged).then(line_no)).to_series().alias(LINE_COL)
    out = pl.concat([records, pl.DataFrame(columns)], how="horizontal").filter(~pl.col("__recsys_blank"))
    out = out.with_columns(
        pl.when(pl.col(PRE_REASON_COL).is_not_null()).then(pl.col("__recsys_line")).alias(RAW_LINE_COL)
    ).drop("__recsys_blank", "__recsys_line")
    n_blank = int(blank.sum())
    return out, LineCount(read=physical, header=1, blank=lead + n_blank, rows=out.height)


def _physical_lines(text: str) -> list[str]:
    """``text`` cut after each ``\\n`` (terminators kept, as the csv module needs them inside quoted fields)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _csv_exact(data: bytes, sep: str, name: str) -> tuple[pl.DataFrame, LineCount]:
    """Exact fallback with Python's csv module (C speed, one Python step per row; only for odd files).

    Every row records the physical line it starts on (``LINE_COL``). A row that spans lines and then fails
    (the csv module's error, or a field count other than the header's) began with a quote that never closed
    on its line: that first line is the row, ``unterminated_quote``, and parsing resumes on the next line, so
    the quote cannot swallow the rest of the file. A broken row on one line is ``malformed_row``.

    Raises:
        IngestError: the header line cannot be read (e.g. a quote in it never closes).
    """
    log.warning(
        "'%s': rows do not split line by line (quoted fields span lines, a quote is unterminated, or the "
        "file holds stray control bytes); using the exact, slower CSV parser",
        name,
    )
    try:
        text = data.decode("utf-8")
        lossy = False
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        lossy = True
    lines = _physical_lines(text.removeprefix("\ufeff"))
    total = len(lines)
    base = 0  # index (in ``lines``) of the first line the current reader reads
    reader = csv.reader(iter(lines), delimiter=sep, strict=True)
    header: list[str] | None = None
    header_lines = blank = continuation = 0
    rows: list[list[str | None]] = []
    reasons: list[str | None] = []
    raws: list[str | None] = []
    starts: list[int] = []
    n = 0
    while True:
        start = base + reader.line_num  # this record's first line (0-based)
        try:
            rec: list[str] | None = next(reader)
        except StopIteration:
            break
        except csv.Error:
            rec = None  # e.g. "unexpected end of data": a quoted field that never closes
        span = base + reader.line_num - start
        if header is None:
            if rec is not None and not any(f.strip() for f in rec):
                blank += span
                continue  # blank lines before the header
            if rec is None:
                raise IngestError(
                    f"events file '{name}' has an unreadable header (line {start + 1}; e.g. a quote that never "
                    "closes); fix its quoting"
                ) from None
            header, header_lines, n = rec, span, len(rec)
            continue
        if span > 1 and (rec is None or len(rec) != n):  # a quote opened on line `start` swallowed the next ones
            rows.append([None] * n)
            reasons.append("unterminated_quote")
            raws.append(lines[start].removesuffix("\n").removesuffix("\r"))
            starts.append(start + 1)
            base = start + 1
            reader = csv.reader(map(lines.__getitem__, range(base, total)), delimiter=sep, strict=True)
            continue
        if rec is not None and (not rec or (len(rec) == 1 and _NULL_FIELD.match(rec[0]))):
            blank += span
            continue  # blank line
        if rec is None or len(rec) != n:
            fields = (rec or [])[:n]
            reasons.append("malformed_row")
            raws.append(sep.join(rec) if rec is not None else lines[start].removesuffix("\n").removesuffix("\r"))
        else:
            fields = rec
            bad = lossy and any("\ufffd" in f for f in rec)
            reasons.append("invalid_encoding" if bad else None)
            raws.append(sep.join(rec) if bad else None)
        rows.append([f if f != "" else None for f in fields] + [None] * (n - len(fields)))
        starts.append(start + 1)
        continuation += span - 1
    if header is None:
        return pl.DataFrame(), LineCount(read=total, header=0, blank=blank, rows=0)
    names = _dedupe_names(header)
    cols = {c: [r[j] for r in rows] for j, c in enumerate(names)}
    frame = pl.DataFrame(cols, schema=dict.fromkeys(names, pl.String))
    frame = frame.with_columns(
        pl.Series(PRE_REASON_COL, reasons, dtype=pl.String),
        pl.Series(RAW_LINE_COL, raws, dtype=pl.String),
        pl.Series(LINE_COL, starts, dtype=pl.Int64),
    )
    return frame, LineCount(read=total, header=header_lines, blank=blank, rows=len(rows), continuation=continuation)


def _dedupe_names(header: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for h in header:
        if h in seen:
            out.append(f"{h}_duplicated_{seen[h]}")
            seen[h] += 1
        else:
            seen[h] = 0
            out.append(h)
    return out


def _read_csv(file: SourceFile, source: SourceConfig) -> tuple[pl.DataFrame, LineCount]:
    data = _load_text_bytes(file)
    sep = source.csv_separator
    tsv = _strip_compression(file.path.name.lower()).endswith(".tsv")
    if tsv and "csv_separator" not in source.model_fields_set:
        sep = "\t"  # .tsv means tabs unless the config names a separator
    if len(sep.encode()) != 1:
        raise IngestError(f"ingest.source.csv_separator must be one byte, got {sep!r}")
    fast = _csv_fast(data, sep)
    frame, lines = fast if fast is not None else _csv_exact(data, sep, file.name)
    if frame.width == 0:
        raise IngestError(f"events file '{file.name}' holds no header line; it is not a CSV event log")
    return frame, lines


# ----------------------------------------------------------------------------------------------------------
# NDJSON


def _read_ndjson(file: SourceFile) -> tuple[pl.DataFrame, LineCount]:
    """NDJSON rows: one per non-blank line (a line that is not a JSON object is a ``malformed_row``)."""
    data = _load_text_bytes(file)
    frame = _ndjson_rows(file, data)
    physical = count_lines(data)  # polars and the line split both cut at \n only; the others are blank
    return frame, LineCount(read=physical, header=0, blank=physical - frame.height, rows=frame.height)


def _ndjson_rows(file: SourceFile, data: bytes) -> pl.DataFrame:
    start = data.lstrip()[:1]
    if start == b"[":
        raise IngestError(
            f"events file '{file.name}' holds one JSON array, not one JSON object per line; convert it "
            "(e.g. jq -c '.[]') or export it as NDJSON"
        )
    if start not in (b"{", b""):
        raise IngestError(
            f"events file '{file.name}' does not hold JSON objects (it starts with {data.lstrip()[:20]!r}); "
            "point ingest.source.path at the event log or set ingest.source.format"
        )
    try:
        frame = pl.read_ndjson(data, infer_schema_length=None)
        return frame.with_columns(
            pl.lit(None, dtype=pl.String).alias(PRE_REASON_COL), pl.lit(None, dtype=pl.String).alias(RAW_LINE_COL)
        )
    except READ_ERRORS:
        pass  # some line is broken: validate line by line below
    split = _read_lines(data)
    if split is None:  # every control byte occurs: split in Python (C speed; a pathological file)
        text = data.decode("utf-8", errors="replace")
        split = pl.Series("line", [ln.removesuffix("\r") for ln in text.split("\n")], dtype=pl.String)
    lines = split.filter(split.str.strip_chars() != "")
    try:
        data.decode("utf-8")
        lossy = False
    except UnicodeDecodeError:
        lossy = True
    bad_enc = lines.str.contains("\ufffd", literal=True) if lossy else pl.repeat(False, lines.len(), eager=True)
    doc = lines.str.json_path_match("$")
    valid = doc.is_not_null() & doc.str.starts_with("{") & ~bad_enc
    pos = pl.int_range(0, lines.len(), eager=True, dtype=pl.Int64)
    good_lines = lines.filter(valid)
    try:
        good = (
            pl.read_ndjson(good_lines.str.join("\n").item().encode(), infer_schema_length=None)
            if good_lines.len()
            else pl.DataFrame()
        )
    except READ_ERRORS as e:
        raise IngestError(
            f"events file '{file.name}' could not be read as NDJSON ({_first_line(e)}); a key holds different "
            "kinds of JSON value on different lines (e.g. an object on one, a number on another): give each key "
            "one kind"
        ) from None
    good = good.with_columns(pos.filter(valid).alias(ROW_COL))
    bad = pl.DataFrame(
        {
            ROW_COL: pos.filter(~valid),
            PRE_REASON_COL: pl.select(
                pl.when(bad_enc.filter(~valid)).then(pl.lit("invalid_encoding")).otherwise(pl.lit("malformed_row"))
            ).to_series(),
            RAW_LINE_COL: lines.filter(~valid),
        }
    )
    return pl.concat([good, bad], how="diagonal").sort(ROW_COL).drop(ROW_COL)


# ----------------------------------------------------------------------------------------------------------
# Parquet


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _scan_parquet(file: SourceFile) -> tuple[pl.LazyFrame, pl.Schema, int]:
    size = file.path.stat().st_size
    if size == 0:
        raise EmptyFileError(
            f"events file '{file.name}' is empty (0 bytes); remove it or check ingest.source.path", "0 bytes"
        )
    with open(file.path, "rb") as fh:
        head = fh.read(16)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    source: Path | io.BytesIO = file.path
    if file.compression is not None or head.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)):
        raw = file.path.read_bytes()
        comp: Compression = "gzip" if raw.startswith(_GZIP_MAGIC) else "zstd"
        data = _decompress(file, raw, comp)
        head, tail, source = data[:16], data[-4:], io.BytesIO(data)
    if not (head.startswith(_PARQUET_MAGIC) and tail == _PARQUET_MAGIC):
        what = _describe_magic(head) or ("truncated (no footer)" if head.startswith(_PARQUET_MAGIC) else None)
        raise IngestError(
            f"events file '{file.name}' is not a readable Parquet file (bad magic bytes"
            f"{'; it is ' + what if what else ''}); re-export it or set ingest.source.format"
        )
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = pq.read_metadata(source)  # the footer alone: no data pages read
        rows = int(meta.num_rows)
        dup = _repeated(meta.schema.to_arrow_schema().names)
        if dup:
            raise IngestError(
                f"events file '{file.name}' has column {dup[0]!r} more than once; re-export it with unique column "
                "names"
            )
        if isinstance(source, io.BytesIO):
            source.seek(0)
        lf = pl.scan_parquet(source, row_index_name=ROW_COL, hive_partitioning=False)
        schema = lf.collect_schema()
    except (*READ_ERRORS, pa.ArrowException) as e:
        raise IngestError(
            f"events file '{file.name}' is not a readable Parquet file ({_first_line(e)}); re-export it"
        ) from None
    return lf, schema, rows


def _repeated(names: list[str]) -> list[str]:
    """Names that occur more than once, in order of their second occurrence."""
    seen: set[str] = set()
    out: list[str] = []
    for n in names:
        if n in seen:
            out.append(n)
        seen.add(n)
    return out


# ----------------------------------------------------------------------------------------------------------
# Public entry


def read_source(file: SourceFile, source: SourceConfig) -> RawFrame:
    """Scan one file into a ``RawFrame`` (see the module doc for its columns).

    Parquet stays lazy (only the columns ingest selects are read); CSV and NDJSON are parsed once into
    memory, CSV with every column as String.

    Raises:
        EmptyFileError: the file holds no bytes (or none once decompressed).
        IngestError: the file is binary, compressed wrongly, or not readable in its format.
        AccountingError: a text file's physical lines do not add up (a bug).
    """
    duplicates: tuple[str, ...] = ()
    lines: LineCount | None = None
    if file.format == "parquet":
        lf, schema, rows = _scan_parquet(file)
        names = [c for c in schema.names() if c != ROW_COL]
    else:
        frame, lines = _read_csv(file, source) if file.format == "csv" else _read_ndjson(file)
        if not lines.balanced():
            raise AccountingError(
                f"events file '{file.name}': its {lines.read:,} lines do not add up (header {lines.header:,} + "
                f"blank {lines.blank:,} + rows {lines.rows:,} + continuation {lines.continuation:,}); this is a bug in "
                "recsys-embed, please report it with the file"
            )
        rows = frame.height
        names = [c for c in frame.columns if c not in HELPER_COLUMNS]
        if file.format == "csv":  # both CSV parsers name a repeated header `<name>_duplicated_<k>`
            copies = (re.fullmatch(r"(.+)_duplicated_\d+", c) for c in names)
            duplicates = tuple(dict.fromkeys(m.group(1) for m in copies if m and m.group(1) in names))
        lf = frame.with_row_index(ROW_COL).lazy()
        schema = frame.schema
    hive = {k: v for k, v in file.partitions.items() if k not in names}
    if hive:
        lf = lf.with_columns(pl.lit(v, dtype=pl.String).alias(k) for k, v in hive.items())
    out_schema = pl.Schema([(c, schema[c]) for c in names] + [(k, pl.String()) for k in hive])
    return RawFrame(file=file, frame=lf, schema=out_schema, rows=rows, duplicates=duplicates, lines=lines)


_DIGESTS: dict[tuple[str, int, int, int], str] = {}
# Like git's "racy clean" rule: a file modified this recently may change again within the same mtime tick,
# so its digest is not cached.
_RACY_NS = 2_000_000_000


def _content_digest(path: Path, st: os.stat_result) -> str:
    """sha256 of the file, cached per (path, size, mtime, inode) so one process hashes a file once."""
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        _DIGESTS[key] = digest
    return digest


def fingerprint(files: list[Path]) -> str:
    """A stable sha256 (hex) over the files: relative name, size, and content hash (size + mtime_ns for
    files over 256 MB). Names are relative to the files' common folder, so moving the data keeps it."""
    if not files:
        return hashlib.sha256(b"").hexdigest()
    resolved = sorted((Path(f).resolve() for f in files), key=lambda f: f.as_posix())
    base = Path(os.path.commonpath([f.parent for f in resolved]))
    h = hashlib.sha256()
    for f in resolved:
        st = f.stat()
        h.update(f.relative_to(base).as_posix().encode())
        h.update(b"\x00")
        h.update(str(st.st_size).encode())
        h.update(b"\x00")
        if st.st_size < FINGERPRINT_CONTENT_LIMIT:
            h.update(_content_digest(f, st).encode())
        else:
            h.update(f"mtime_ns={st.st_mtime_ns}".encode())
        h.update(b"\n")
    return h.hexdigest()
