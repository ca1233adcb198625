"""Tests for recsys_embed.data.split: partitions, leakage guarantees, evaluation targets and row accounting."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_embed.config import IngestConfig, SplitConfig
from recsys_embed.data.interactions import build_interactions
from recsys_embed.data.split import TARGET_BUCKETS, build_targets, split_events
from recsys_embed.errors import ConfigError, IngestError
from recsys_embed.types import RowReport

T0 = datetime(2024, 1, 1, tzinfo=UTC)
FAST = settings(max_examples=50, deadline=None)
TS = pl.Datetime("us", "UTC")


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def frame(users, items, days, weights=None) -> pl.DataFrame:
    n = len(users)
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "ts": [None if d is None else day(d) for d in days],
            "weight": [1.0] * n if weights is None else [float(w) for w in weights],
            "row": list(range(n)),  # tracks input rows through the split
        },
        schema_overrides={"ts": TS},
    )


def synthetic(n: int = 400, n_users: int = 25, n_items: int = 30, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return frame(
        rng.integers(0, n_users, n).tolist(),
        rng.integers(0, n_items, n).tolist(),
        rng.integers(0, 60, n).tolist(),  # whole days: plenty of timestamp ties
        rng.choice([1.0, 1.0, 1.0, 2.0, -1.0], n).tolist(),
    )


def assert_partition(events: pl.DataFrame, s) -> None:
    """Every input row is in exactly one part."""
    parts = [s.fit["row"].to_list(), s.val["row"].to_list(), s.test["row"].to_list()]
    rows = [r for p in parts for r in p]
    assert sorted(rows) == events["row"].to_list()
    assert s.info["rows_fit"] + s.info["rows_val"] + s.info["rows_test"] == events.height


# ----------------------------------------------------------------------------------------------------------
# temporal
# ----------------------------------------------------------------------------------------------------------


def test_temporal_cutoffs_separate_the_parts():
    ev = synthetic()
    s = split_events(ev, SplitConfig(method="temporal", test_quantile=0.8, val_quantile=0.75))
    assert_partition(ev, s)
    cutoff = datetime.fromisoformat(s.info["cutoff"])
    val_cutoff = datetime.fromisoformat(s.info["val_cutoff"])
    # max(fit.ts) < val cutoff <= min(val.ts); max(val.ts) < test cutoff <= min(test.ts)
    assert s.fit["ts"].max() < val_cutoff <= s.val["ts"].min()
    assert s.val["ts"].max() < cutoff <= s.test["ts"].min()
    # the quantile cutoff holds out roughly the last 20% (ties at the cutoff go to test)
    assert 0.1 < s.test.height / ev.height < 0.3
    # row order is kept inside every part
    assert s.fit["row"].is_sorted() and s.test["row"].is_sorted()


def test_temporal_explicit_cutoff_and_no_validation():
    ev = frame([1, 1, 2, 2], [1, 2, 1, 3], [0, 5, 10, 15])
    # A naive datetime is taken as UTC: day(10) goes to test (ts >= cutoff).
    cfg = SplitConfig(method="temporal", cutoff=day(10).replace(tzinfo=None), val_quantile=None)
    s = split_events(ev, cfg)
    assert s.fit["row"].to_list() == [0, 1] and s.test["row"].to_list() == [2, 3] and s.val.height == 0
    assert s.info["cutoff"] == "2024-01-11T00:00:00+00:00" and "val_cutoff" not in s.info
    assert s.val.schema == ev.schema


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (SplitConfig(cutoff=day(-1)), r"split.cutoff=.* puts every event in test"),
        (SplitConfig(cutoff=day(99)), r"split.cutoff=.* is after the last event"),
        (SplitConfig(test_quantile=0.8, val_quantile=0.5), r"split.val_quantile=0.5 leaves nothing to fit"),
        (SplitConfig(val_quantile=1.5), r"split.val_quantile must be in \(0, 1\)"),
    ],
)
def test_temporal_errors_name_the_key(cfg, match):
    ev = frame([1, 1, 2, 2, 3], [1, 2, 1, 3, 1], [0, 0, 0, 10, 10])
    with pytest.raises(ConfigError, match=match):
        split_events(ev, cfg)


def test_temporal_quantile_with_one_timestamp_leaves_fit_empty():
    ev = frame([1, 2, 3], [1, 1, 1], [4, 4, 4])
    with pytest.raises(ConfigError, match=r"split\.test_quantile=0\.8 puts every event in test"):
        split_events(ev, SplitConfig())


def test_time_methods_need_timestamps():
    ev = frame([1, 1, 2], [1, 2, 1], [None, None, None])
    for method in ("temporal", "last_n", "last_fraction"):
        with pytest.raises(ConfigError, match=f"split.method='{method}' needs a timestamp.*split.method=random"):
            split_events(ev, SplitConfig(method=method))
    s = split_events(ev, SplitConfig(method="random", fraction=0.5, val_quantile=None))
    assert s.test.height == 1  # user 1: floor(0.5 * 2) = 1 held out; user 2 keeps its only event


def test_temporal_leakage_nothing_after_the_cutoff_reaches_training():
    """Issue acceptance: nothing at or after the cutoff reaches training artifacts.

    fit (before day 10):  a-x d0, a-y d1, b-x d2, b-y d3, k-x d4, a-z d9 (w=2)
    test (day 10 on):     a-new d10, late-x d11, k-y d12, b-z d13, a-x d14
    """
    ev = frame(
        ["a", "a", "b", "b", "k", "a", "a", "late", "k", "b", "a"],
        ["x", "y", "x", "y", "x", "z", "new", "x", "y", "z", "x"],
        [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14],
        [1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1],
    )
    s = split_events(ev, SplitConfig(method="temporal", cutoff=day(10), val_quantile=None))
    assert s.fit["ts"].max() < day(10) <= s.test["ts"].min()

    report = RowReport(rows_read=ev.height, kept=ev.height)
    # k has one fit item (x) and one test item (y): with test rows k would have 2 items and survive
    # min_user_interactions=2; computed on fit only, k is dropped. Half-life 5 days, reference = last fit ts.
    cfg = IngestConfig(min_user_interactions=2, time_decay_half_life_days=5.0)
    train = build_interactions(s.fit, cfg, report)
    assert "k" not in train.users.ids.to_list() and report.filtered["kcore_user"] == 1
    # ID maps from fit only: the user and the item that appear only after the cutoff are unknown.
    assert "late" not in train.users.ids.to_list() and "new" not in train.items.ids.to_list()
    assert train.items.ids.to_list() == ["x", "y", "z"]
    # Decay reference = max(fit.ts) = day 9, not the later test events: a-z (w=2 at day 9) keeps 2 * 0.5**0 = 2;
    # a-x at day 0 is 0.5 ** (9 / 5) = 0.2872 (with a test-time reference of day 14 it would be 0.5**2.8).
    a = train.users.ids.to_list().index("a")
    row = dict(zip(train.items.decode(train.matrix[a].indices).to_list(), train.matrix[a].data, strict=True))
    assert row["z"] == pytest.approx(2.0) and row["x"] == pytest.approx(0.5 ** (9 / 5), rel=1e-6)

    targets = build_targets(s.test, train, report, "test")
    # a-new: cold item; late-x: cold user; k-y: cold user (k was dropped from train);
    # b-z: target (b never had z); a-x: seen in train.
    assert targets.counts == {"target": 1, "seen_in_train": 1, "cold_user": 2, "cold_item": 1, "cancelled_out": 0}
    assert targets.cold_users.to_list() == ["k", "late"]
    b, z = train.users.ids.to_list().index("b"), train.items.ids.to_list().index("z")
    assert targets.matrix.shape == train.shape and targets.matrix.nnz == 1 and targets.matrix[b, z] == 1.0
    assert targets.n_warm_users == 1
    assert report.is_balanced() and report.kept == train.events.height + 1
    assert report.filtered["test_cold_user"] == 2 and report.filtered["test_seen_in_train"] == 1


# ----------------------------------------------------------------------------------------------------------
# per-user methods
# ----------------------------------------------------------------------------------------------------------


def held_out_counts(part: pl.DataFrame) -> dict:
    return dict(Counter(part["user_id"].to_list()))


def test_last_n_holds_out_each_users_latest_events():
    # user 1: 4 events, user 2: 2 events, user 3: 1 event (kept in train: every user keeps one)
    ev = frame([1, 1, 1, 1, 2, 2, 3], [1, 2, 3, 4, 1, 2, 1], [3, 1, 4, 2, 7, 8, 0])
    s = split_events(ev, SplitConfig(method="last_n", last_n=1))
    assert s.test["row"].to_list() == [2, 5]  # user 1's day 4, user 2's day 8
    # then the same rule on what is left: user 1's day 3; user 2 has one event left, which it keeps
    assert s.val["row"].to_list() == [0]
    assert s.fit["row"].to_list() == [1, 3, 4, 6]
    s2 = split_events(ev, SplitConfig(method="last_n", last_n=2, val_quantile=None))
    assert held_out_counts(s2.test) == {1: 2, 2: 1}  # min(2, count - 1)


def test_last_fraction_and_tie_break_is_input_order():
    # user 1: 5 events, all on the same day: floor(0.4 * 5) = 2 held out -> the last two rows in input order.
    ev = frame([1] * 5 + [2] * 2, [5, 4, 3, 2, 1, 1, 2], [6] * 5 + [0, 1])
    s = split_events(ev, SplitConfig(method="last_fraction", fraction=0.4, val_quantile=None))
    assert s.test["row"].to_list() == [3, 4]  # user 2: floor(0.4 * 2) = 0
    assert split_events(ev, SplitConfig(method="last_fraction", fraction=0.4)).test.equals(s.test)


def test_per_user_split_that_holds_out_nothing_is_an_error():
    ev = frame([1, 1, 2], [1, 2, 1], [0, 1, 2])
    with pytest.raises(ConfigError, match=r"split.fraction=0.2 holds out nothing"):
        split_events(ev, SplitConfig(method="last_fraction", fraction=0.2))


@FAST
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["last_n", "last_fraction"]), n=st.integers(1, 3))
def test_per_user_train_is_never_after_held_out(seed, method, n):
    ev = synthetic(n=120, n_users=8, seed=seed)
    cfg = SplitConfig(method=method, last_n=n, fraction=0.3)
    s = split_events(ev, cfg)
    assert_partition(ev, s)
    counts = Counter(ev["user_id"].to_list())
    for user, c in counts.items():
        fit = s.fit.filter(pl.col("user_id") == user)
        val = s.val.filter(pl.col("user_id") == user)
        test = s.test.filter(pl.col("user_id") == user)
        k = min(n, c - 1) if method == "last_n" else min(int(0.3 * c + 1e-9), c - 1)
        assert test.height == k and fit.height >= 1
        if test.height:
            train_max = pl.concat([fit, val])["ts"].max()
            assert train_max <= test["ts"].min()  # all train events at or before the first held-out one
        if val.height:
            assert fit["ts"].max() <= val["ts"].min()


def test_random_split_is_seeded():
    ev = synthetic(n=300)
    a = split_events(ev, SplitConfig(method="random", fraction=0.3, seed=7))
    b = split_events(ev, SplitConfig(method="random", fraction=0.3, seed=7))
    c = split_events(ev, SplitConfig(method="random", fraction=0.3, seed=8))
    assert a.test.equals(b.test) and a.val.equals(b.val) and a.info["seed"] == 7
    assert not a.test.equals(c.test)
    assert_partition(ev, a)
    # per-user counts do not depend on the seed: floor(0.3 * count), at least one train event
    assert held_out_counts(a.test) == held_out_counts(c.test)


# ----------------------------------------------------------------------------------------------------------
# targets + accounting
# ----------------------------------------------------------------------------------------------------------


def test_build_targets_excludes_seen_and_counts_cold():
    fit = frame(["u", "u", "v", "v"], ["a", "b", "a", "c"], [0, 1, 2, 3])
    report = RowReport(rows_read=11, kept=11)  # 4 fit + 7 held-out rows
    train = build_interactions(fit.drop("row"), IngestConfig(), report)
    held = frame(
        ["u", "u", "v", "v", "v", "w", "u"],
        ["c", "a", "b", "b", "b", "a", "zz"],
        [5, 5, 5, 6, 7, 6, 6],
        [1, 1, 1, -1, 2, 1, 1],
    )
    # u-c: target (1 row); u-a: seen in train (1); v-b: +1 -1 +2 = 2 > 0: target (3 rows);
    # w-a: cold user (1); u-zz: cold item (1).
    t = build_targets(held, train, report, "test")
    assert t.counts == {"target": 4, "seen_in_train": 1, "cold_user": 1, "cold_item": 1, "cancelled_out": 0}
    users, items = train.users.ids.to_list(), train.items.ids.to_list()
    expected = np.zeros(train.shape, dtype=np.float32)
    expected[users.index("u"), items.index("c")] = 1.0
    expected[users.index("v"), items.index("b")] = 1.0
    np.testing.assert_array_equal(t.matrix.toarray(), expected)
    assert t.n_warm_users == 2 and t.cold_users.to_list() == ["w"]
    assert report.filtered == Counter({"test_seen_in_train": 1, "test_cold_user": 1, "test_cold_item": 1})
    assert report.kept == 4 + 4 and report.is_balanced()
    assert report.details["test_target_pairs"] == 2 and report.details["test_cold_users"] == 1


def test_build_targets_cancelled_pairs_and_empty_input():
    fit = frame(["u", "v"], ["a", "b"], [0, 1])
    report = RowReport(rows_read=4, kept=4)
    train = build_interactions(fit.drop("row"), IngestConfig(), report)
    held = frame(["u", "u"], ["b", "b"], [3, 4], [1, -1])  # bought and returned: net 0
    t = build_targets(held, train, report, "val")
    assert t.counts["cancelled_out"] == 2 and t.matrix.nnz == 0 and t.n_warm_users == 0
    assert report.filtered["val_cancelled_out"] == 2 and report.is_balanced()
    empty = build_targets(held.clear(), train, report, "test")
    assert empty.matrix.shape == train.shape and sum(empty.counts.values()) == 0


SPLITS = st.sampled_from(
    [
        SplitConfig(method="temporal", test_quantile=0.7, val_quantile=0.8),
        SplitConfig(method="last_n", last_n=2),
        SplitConfig(method="last_fraction", fraction=0.25),
        SplitConfig(method="random", fraction=0.3, val_quantile=None),
    ]
)


@FAST
@given(seed=st.integers(0, 10_000), cfg=SPLITS, min_user=st.integers(1, 3), string_ids=st.booleans())
def test_split_then_build_keeps_every_row_accounted_for(seed, cfg, min_user, string_ids):
    ev = synthetic(n=150, n_users=12, n_items=15, seed=seed)
    if string_ids:
        ev = ev.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    s = split_events(ev, cfg)
    assert_partition(ev, s)
    report = RowReport(rows_read=ev.height + 3, kept=ev.height, duplicates=3)
    try:
        train = build_interactions(s.fit, IngestConfig(min_user_interactions=min_user), report)
    except IngestError:  # everything filtered away: nothing more to check
        return
    target_rows = 0
    for label, part in (("val", s.val), ("test", s.test)):
        t = build_targets(part, train, report, label)
        assert sum(t.counts.values()) == part.height
        assert set(t.counts) == set(TARGET_BUCKETS)
        # targets never overlap train interactions and are 1.0
        assert t.matrix.multiply(train.matrix).nnz == 0 and np.all(t.matrix.data == 1.0)
        assert not set(t.cold_users.to_list()) & set(train.users.ids.to_list())
        target_rows += t.counts["target"]
    assert report.is_balanced()
    # kept = the rows behind the train matrix + the held-out rows that became targets
    assert report.kept == train.events.height + target_rows
