"""Finding and scanning input files: file/glob/folder, formats, compression, hive partitions, fingerprint."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from recsys_embed.config import SourceConfig
from recsys_embed.data.sources import (
    PRE_REASON_COL,
    RAW_LINE_COL,
    ROW_COL,
    detect_format,
    fingerprint,
    list_sources,
    read_source,
    resolve_files,
    split_extension,
)
from recsys_embed.errors import IngestError

CSV = b"user_id,item_id,timestamp\nu1,007,1700000000\nu2,i2,1700000100\n"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _one_line(e: pytest.ExceptionInfo[IngestError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    return msg


def _read(path: Path, **source: object) -> pl.DataFrame:
    src = SourceConfig(path=str(path), **source)  # type: ignore[arg-type]
    (f,) = list_sources(src)
    return read_source(f, src).frame.collect()


# ---------------------------------------------------------------------------------------------------------
# resolve_files / formats


def test_resolve_file_glob_and_folder_are_sorted_and_skip_hidden(tmp_path: Path) -> None:
    for name in ["b.csv", "a.csv", "sub/c.csv", "_SUCCESS", ".hidden.csv", "_tmp/d.csv", "notes.md"]:
        _write(tmp_path / name, CSV)
    # a single file
    assert resolve_files(SourceConfig(path=str(tmp_path / "b.csv"))) == [tmp_path / "b.csv"]
    # a glob: sorted, hidden names skipped
    got = resolve_files(SourceConfig(path=str(tmp_path / "*.csv")))
    assert got == [tmp_path / "a.csv", tmp_path / "b.csv"]
    # a folder: recursive, only data extensions, _/. prefixed names and folders skipped
    got = resolve_files(SourceConfig(path=str(tmp_path)))
    assert got == [tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "sub" / "c.csv"]
    # ** recurses in globs
    got = resolve_files(SourceConfig(path=str(tmp_path / "**" / "*.csv")))
    assert tmp_path / "sub" / "c.csv" in got and tmp_path / "_tmp" / "d.csv" not in got


def test_nothing_matches_names_the_pattern_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as e:
        resolve_files(SourceConfig(path=str(tmp_path / "x" / "*.csv")))
    msg = _one_line(e)
    assert f"'{tmp_path / 'x' / '*.csv'}'" in msg and "ingest.source.path" in msg
    with pytest.raises(IngestError, match="does not exist"):
        resolve_files(SourceConfig(path=str(tmp_path / "missing.csv")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(IngestError, match="no data files under folder"):
        resolve_files(SourceConfig(path=str(tmp_path / "empty_dir")))


@pytest.mark.parametrize(
    ("name", "fmt", "comp"),
    [
        ("a.csv", "csv", None),
        ("a.TSV", "csv", None),
        ("a.txt.gz", "csv", "gzip"),
        ("a.parquet", "parquet", None),
        ("a.pq", "parquet", None),
        ("a.ndjson.zst", "ndjson", "zstd"),
        ("a.jsonl", "ndjson", None),
        ("a.json.gz", "ndjson", "gzip"),
        ("a.log", None, None),
    ],
)
def test_split_extension(name: str, fmt: str | None, comp: str | None) -> None:
    assert split_extension(name) == (fmt, comp)


def test_detect_format_override_and_unknown_extension() -> None:
    assert detect_format(Path("events.log"), "csv") == "csv"
    with pytest.raises(IngestError) as e:
        detect_format(Path("events.log"))
    assert "'events.log'" in _one_line(e) and "ingest.source.format" in str(e.value)


def test_mixed_formats_in_one_glob_name_two_files(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", CSV)
    pl.DataFrame({"user_id": [1]}).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(IngestError) as e:
        list_sources(SourceConfig(path=str(tmp_path / "*")))
    msg = _one_line(e)
    assert "a.csv" in msg and "b.parquet" in msg and "mixes formats" in msg


def test_hive_partitions_detected_from_key_value_folders(tmp_path: Path) -> None:
    for day in ["2024-01-01", "2024-01-02"]:
        p = tmp_path / f"day={day}" / "country=United%20Kingdom" / "part-0.parquet"
        p.parent.mkdir(parents=True)
        pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4]}).write_parquet(p)
    files = list_sources(SourceConfig(path=str(tmp_path)))
    assert [f.partitions for f in files] == [
        {"day": "2024-01-01", "country": "United Kingdom"},  # %20 is URL-decoded as hive writers encode it
        {"day": "2024-01-02", "country": "United Kingdom"},
    ]
    raw = read_source(files[1], SourceConfig(path=str(tmp_path)))
    frame = raw.frame.collect()
    assert raw.rows == 2 and frame["day"].to_list() == ["2024-01-02"] * 2
    assert raw.schema.names() == ["user_id", "item_id", "day", "country"]
    # hive_partitioning=False: no partition columns
    files = list_sources(SourceConfig(path=str(tmp_path), hive_partitioning=False))
    assert all(f.partitions == {} for f in files)


# ---------------------------------------------------------------------------------------------------------
# reading


def test_csv_is_read_as_strings_so_nothing_is_coerced(tmp_path: Path) -> None:
    frame = _read(_write(tmp_path / "a.csv", CSV))
    assert frame.schema["item_id"] == pl.String and frame.schema["timestamp"] == pl.String
    assert frame["item_id"].to_list() == ["007", "i2"]  # leading zeros kept
    assert frame[ROW_COL].to_list() == [0, 1]
    assert frame[PRE_REASON_COL].null_count() == 2


def test_csv_blank_lines_are_not_rows_and_truncated_line_is_flagged(tmp_path: Path) -> None:
    data = b'user_id,item_id,timestamp\r\nu1,"a,b",1\r\n\r\nu2,"say ""hi""",2\r\nu3,i3'
    src = SourceConfig(path=str(_write(tmp_path / "a.csv", data)))
    raw = read_source(list_sources(src)[0], src)
    frame = raw.frame.collect()
    # 3 data rows: the blank line is skipped; quoted separators and "" escapes are one field
    assert raw.rows == 3
    assert frame["item_id"].to_list() == ["a,b", 'say "hi"', "i3"]
    assert frame[PRE_REASON_COL].to_list() == [None, None, "malformed_row"]
    assert frame[RAW_LINE_COL].to_list() == [None, None, "u3,i3"]


def test_csv_quoted_newlines_use_the_exact_parser(tmp_path: Path) -> None:
    data = b'user_id,item_id,timestamp\nu1,"multi\nline",1\nu2,i2,2,extra\nu3,"open'
    frame = _read(_write(tmp_path / "a.csv", data))
    assert frame["item_id"].to_list()[0] == "multi\nline"
    # too many fields and an unterminated quote are malformed
    assert frame[PRE_REASON_COL].to_list() == [None, "malformed_row", "malformed_row"]


def test_tsv_defaults_to_tab_and_separator_override(tmp_path: Path) -> None:
    frame = _read(_write(tmp_path / "a.tsv", b"user_id\titem_id\nu1\ti,1\n"))
    assert frame["item_id"].to_list() == ["i,1"]
    frame = _read(_write(tmp_path / "b.csv", b"user_id;item_id\nu1;i1\n"), csv_separator=";")
    assert frame["item_id"].to_list() == ["i1"]


def test_gzip_and_zstd_text(tmp_path: Path) -> None:
    gz = _write(tmp_path / "a.csv.gz", gzip.compress(CSV))
    zst = _write(tmp_path / "b.csv.zst", pa.Codec("zstd").compress(CSV, asbytes=True))
    plain = _write(tmp_path / "c.csv", CSV)
    for p in (gz, zst):
        assert _read(p).drop(ROW_COL).equals(_read(plain).drop(ROW_COL))
    # gzip content under a plain name is detected by its magic bytes
    sneaky = _write(tmp_path / "d.csv", gzip.compress(CSV))
    assert _read(sneaky)["item_id"].to_list() == ["007", "i2"]
    # a .gz name over plain bytes is an error naming the file
    _write(tmp_path / "e.csv.gz", CSV)
    with pytest.raises(IngestError) as e:
        _read(tmp_path / "e.csv.gz")
    assert "e.csv.gz" in _one_line(e)
    # a truncated gzip stream is an error, not a partial read
    _write(tmp_path / "f.csv.gz", gzip.compress(CSV * 50)[:-30])
    with pytest.raises(IngestError) as e:
        _read(tmp_path / "f.csv.gz")
    assert "f.csv.gz" in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_ndjson_broken_lines_are_flagged(tmp_path: Path) -> None:
    data = b'{"user_id": 1, "item_id": "a"}\n\nnot json\n{"user_id": 2, "item_id": "b"}\n{"user_id": 3, "it'
    src = SourceConfig(path=str(_write(tmp_path / "a.ndjson", data)))
    raw = read_source(list_sources(src)[0], src)
    frame = raw.frame.collect()
    assert raw.rows == 4  # the blank line is not a row
    assert frame["user_id"].to_list() == [1, None, 2, None]  # typed: JSON integers stay integers
    assert frame[PRE_REASON_COL].to_list() == [None, "malformed_row", None, "malformed_row"]
    assert frame[RAW_LINE_COL].to_list()[1] == "not json"


def test_json_array_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as e:
        _read(_write(tmp_path / "a.json", b'[{"user_id": 1}]'))
    assert "a.json" in _one_line(e) and "JSON array" in str(e.value)


@pytest.mark.parametrize(
    ("name", "data", "expect"),
    [
        ("png.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(64)), "PNG image"),
        ("bin.csv", bytes(range(256)) * 4, "binary"),
        ("zip.ndjson", b"PK\x03\x04" + bytes(64), "ZIP archive"),
        ("bad.parquet", b"this is not parquet", "not a readable Parquet file"),
        ("png.parquet", b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
        ("empty.csv", b"", "empty (0 bytes)"),
        ("empty.parquet", b"", "empty (0 bytes)"),
    ],
)
def test_wrong_file_types_give_one_line_errors(tmp_path: Path, name: str, data: bytes, expect: str) -> None:
    with pytest.raises(IngestError) as e:
        _read(_write(tmp_path / name, data))
    msg = _one_line(e)
    assert f"'{tmp_path / name}'" in msg and expect in msg


def test_truncated_parquet_is_a_one_line_error(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"user_id": list(range(1000))}).write_parquet(good)
    bad = _write(tmp_path / "cut.parquet", good.read_bytes()[:-100])
    with pytest.raises(IngestError) as e:
        _read(bad)
    assert "cut.parquet" in _one_line(e)


def test_parquet_is_lazy_with_row_count(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": ["a", "b", "c"]}).write_parquet(p)
    src = SourceConfig(path=str(p))
    raw = read_source(list_sources(src)[0], src)
    assert isinstance(raw.frame, pl.LazyFrame) and raw.rows == 3
    assert raw.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.String})
    assert raw.frame.select(ROW_COL).collect().to_series().to_list() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable_content_sensitive_and_location_free(tmp_path: Path) -> None:
    a = _write(tmp_path / "d1" / "a.csv", CSV)
    b = _write(tmp_path / "d1" / "b.csv", CSV + b"u3,i3,1\n")
    fp = fingerprint([a, b])
    assert len(fp) == 64 and fp == fingerprint([b, a])  # order of the list does not matter
    # the same files in another folder: same fingerprint (names are relative)
    shutil.copytree(tmp_path / "d1", tmp_path / "d2")
    assert fingerprint([tmp_path / "d2" / "a.csv", tmp_path / "d2" / "b.csv"]) == fp
    # a content change of the same size changes it
    b.write_bytes((CSV + b"u3,i3,1\n").replace(b"u3", b"u4"))
    assert fingerprint([a, b]) != fp
    # a renamed file changes it
    assert fingerprint([a]) != fingerprint([b])


def test_exact_parser_flags_invalid_encoding_too(tmp_path: Path) -> None:
    # a quoted newline forces the exact parser; a latin-1 byte on another row is invalid_encoding there too
    data = b'user_id,item_id,timestamp\nu1,"two\nlines",1\nu2,caf\xe9,2\nu3,i3,3\n'
    frame = _read(_write(tmp_path / "a.csv", data))
    assert frame[PRE_REASON_COL].to_list() == [None, "invalid_encoding", None]
    assert frame["item_id"].to_list() == ["two\nlines", "caf\ufffd", "i3"]
