"""Exact-duplicate detection across files: the mask equals a brute-force first-occurrence over every column."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys_embed.data.dedup import first_occurrence_mask, overlap_groups


def _log(seed: int, n_files: int = 5, rows: int = 400) -> pl.DataFrame:
    """Files whose time ranges overlap pairwise (0-1, 2-3) or not (4), with repeats inside and across files."""
    rng = np.random.default_rng(seed)
    parts = []
    for f in range(n_files):
        base = {0: 0, 1: 50, 2: 1000, 3: 1040, 4: 5000}[f]
        ts = np.sort(base + rng.integers(0, 100, rows))
        parts.append(pl.DataFrame({
            "user_id": rng.integers(0, 5, rows), "item_id": rng.integers(0, 4, rows),
            "ts": pl.Series(ts * 1_000_000).cast(pl.Datetime("us", "UTC")),
            "weight": rng.choice([1.0, 3.0], rows), "__file": pl.Series([f] * rows, dtype=pl.UInt32),
        }))  # fmt: skip
    return pl.concat(parts)


def test_overlap_groups_join_only_files_whose_times_overlap() -> None:
    log = _log(0)
    offsets = np.arange(6) * 400
    assert overlap_groups(log["ts"], offsets, True) == [[0, 1], [2, 3], [4]]
    assert overlap_groups(log["ts"], offsets, False) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("has_time", [True, False])
def test_mask_equals_brute_force_first_occurrence(seed: int, has_time: bool) -> None:
    log = _log(seed)
    keys = ["user_id", "item_id", "ts", "weight"]
    expected = log.select(pl.struct(keys).is_first_distinct()).to_series()
    assert not expected.all(), "the fixture must hold duplicates"
    got = first_occurrence_mask(log, "__file", 5, has_time)
    assert got is not None and got.to_list() == expected.to_list()


def test_rows_equal_in_user_item_time_but_not_weight_are_kept() -> None:
    """Same (user, item, ts) hash, different weight: a candidate, but not a duplicate."""
    ts = pl.Series([10, 10], dtype=pl.Int64).cast(pl.Datetime("us", "UTC"))
    log = pl.DataFrame({"user_id": [1, 1], "item_id": [2, 2], "ts": ts, "weight": [1.0, 3.0],
                        "__file": pl.Series([0, 0], dtype=pl.UInt32)})  # fmt: skip
    assert first_occurrence_mask(log, "__file", 1, True) is None
