"""Exact-duplicate detection over a multi-file event log, without a full sort of the log.

Used by ingest: a row is dropped as a duplicate only when every column equals an earlier row's. The hash of
(user, item, time) only picks candidates; the candidates are compared on every column, so a hash collision can
never drop a distinct row.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl


def first_occurrence_mask(events: pl.DataFrame, file_col: str, n_files: int, has_time: bool) -> pl.Series | None:
    """Boolean mask keeping the first occurrence of every distinct row; None when there are no duplicates.

    ``events`` holds each file's rows contiguously, in file order, tagged by ``file_col`` (0..n_files-1). A
    64-bit hash of (user, item, time) -- equal rows have equal keys -- is sorted to find candidate duplicates;
    only the candidates are compared exactly on every column (``file_col`` aside), so a hash collision can never
    drop a distinct row.
    Sorting per file keeps the sorts cache-sized; rows of two files can only be equal when the files' time
    ranges overlap, so only such groups of files are sorted together (without time: all files).
    """
    if events.height < 2:
        return None
    h = events[["user_id", "item_id", "ts"]].hash_rows(seed=0x5EED)
    # the file tags ascend (files are contiguous, in order): binary search finds each file's first row
    bounds = pl.Series(np.arange(n_files + 1), dtype=events[file_col].dtype)
    offsets = events[file_col].search_sorted(bounds, side="left").to_numpy().astype(np.int64)
    sizes = np.diff(offsets)
    groups = overlap_groups(events["ts"], offsets, has_time)

    def repeated(group: list[int]) -> pl.Series | None:
        parts = [h.slice(int(offsets[k]), int(sizes[k])) for k in group if sizes[k]]
        if not parts or sum(p.len() for p in parts) < 2:
            return None
        s = (pl.concat(parts) if len(parts) > 1 else parts[0]).sort()
        d = s.filter(s == s.shift(1))
        return d if d.len() else None

    # Polars sorts small series on one thread and releases the GIL: a pool sorts the groups side by side.
    with ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1)) as pool:
        dup_hashes = [d for d in pool.map(repeated, groups) if d is not None]
    if not dup_hashes:
        return None
    cand = h.is_in(pl.concat(dup_hashes).unique().implode())
    keys = [c for c in events.columns if c != file_col]
    first = events[keys].filter(cand).select(pl.struct(keys).is_first_distinct()).to_series()
    drop = cand.arg_true().filter(~first)
    if drop.len() == 0:
        return None
    return pl.repeat(True, events.height, eager=True).scatter(drop, False)


def overlap_groups(ts: pl.Series, offsets: np.ndarray, has_time: bool) -> list[list[int]]:
    """Files (contiguous slices of ``ts`` at ``offsets``) grouped where their [min, max] times overlap."""
    n_files = len(offsets) - 1
    if not has_time:
        return [list(range(n_files))]
    phys = ts.to_physical()
    bounds: list[tuple[int, int, int]] = []
    for k in range(n_files):
        part = phys.slice(int(offsets[k]), int(offsets[k + 1] - offsets[k]))
        if part.len():  # clean rows always have a time when the log has one
            bounds.append((int(part.min()), int(part.max()), k))  # type: ignore[arg-type]
    bounds.sort()
    groups: list[list[int]] = []
    hi = 0
    for lo, top, k in bounds:
        if groups and lo <= hi:
            groups[-1].append(k)
            hi = max(hi, top)
        else:
            groups.append([k])
            hi = top
    return [sorted(g) for g in groups]
