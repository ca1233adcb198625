"""Atomic writes: a reader sees the old file/table or the new one, never a partial one.

Files are written to a temporary sibling and ``os.replace``d into place. Tables (folders of Parquet
parts) are staged in a hidden sibling folder, finished with a ``_SUCCESS`` marker, then swapped in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

SUCCESS_MARKER = "_SUCCESS"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_atomic(frame: pl.DataFrame, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    return Path(target)


def write_json_atomic(obj: Any, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str), encoding="utf-8")
    return Path(target)


def write_text_atomic(text: str, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


@contextlib.contextmanager
def staged_table(target: str | Path) -> Iterator[Path]:
    """Stage a table folder and swap it in as ``target`` on success.

    Write part files into the yielded folder. On exit a ``_SUCCESS`` marker is written, the old table
    (if any) is moved aside and the staged one renamed into place; the old one is then deleted. The
    window between the two renames is two metadata operations; readers should check ``_SUCCESS``.
    On error the staging folder is removed and the previous table stays intact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        yield stage
        (stage / SUCCESS_MARKER).write_text("", encoding="utf-8")
        _fsync_dir(stage)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(stage, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def is_complete_table(path: str | Path) -> bool:
    """True when ``path`` is a table folder committed by ``staged_table``."""
    p = Path(path)
    return p.is_dir() and (p / SUCCESS_MARKER).exists()


def read_table(path: str | Path) -> pl.DataFrame:
    """Read a committed table folder (all ``part-*.parquet``) or a single Parquet file."""
    p = Path(path)
    if p.is_dir():
        if not is_complete_table(p):
            raise FileNotFoundError(f"table '{p}' has no {SUCCESS_MARKER} marker: it was not committed")
        parts = sorted(p.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"table '{p}' holds no Parquet parts")
        return pl.concat([pl.read_parquet(x) for x in parts], how="vertical")
    return pl.read_parquet(p)
