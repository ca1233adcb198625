"""The synthetic log generator, the peak-memory helper and the ingest benchmark suite."""

from __future__ import annotations

import dataclasses
import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_embed.bench.memory import peak_memory
from recsys_embed.data.generate import (
    PRESETS,
    GenerateSpec,
    generate,
    item_popularity,
    planted_factors,
    preset,
    read_spec,
)
from recsys_embed.io import SUCCESS_MARKER

SMALL = GenerateSpec(n_events=30_000, n_users=300, n_items=400, factors=8, seed=7, days=14)


def _read(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder, hive_partitioning=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    out = tmp_path_factory.mktemp("gen") / "small"
    generate(SMALL, out)
    return out, _read(out)


def test_same_seed_writes_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, n_events=5_000, chunk_events=2_000)
    generate(spec, tmp_path / "a")
    generate(spec, tmp_path / "b")
    generate(dataclasses.replace(spec, seed=8), tmp_path / "c")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a and a == b
    assert a != c
    assert _read(tmp_path / "a").equals(_read(tmp_path / "b"))
    assert not _read(tmp_path / "a").equals(_read(tmp_path / "c"))


@pytest.mark.parametrize("n_events, chunk_events", [(1_000, 2_000_000), (12_345, 1_000), (1, 10)])
def test_exact_row_count(tmp_path: Path, n_events: int, chunk_events: int) -> None:
    spec = dataclasses.replace(SMALL, n_events=n_events, chunk_events=chunk_events)
    summary = generate(spec, tmp_path / "t")
    assert summary["rows"] == n_events
    assert _read(tmp_path / "t").height == n_events


def test_schema_and_value_ranges(small: tuple[Path, pl.DataFrame]) -> None:
    folder, df = small
    one = pl.read_parquet(next(folder.rglob("*.parquet")))
    assert one.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "event_type": pl.String,
         "session_id": pl.Int64}
    )
    assert df["user_id"].min() >= 0 and df["user_id"].max() < SMALL.n_users  # type: ignore[operator]
    assert df["item_id"].min() >= 0 and df["item_id"].max() < SMALL.n_items  # type: ignore[operator]
    t0 = int(SMALL.start.timestamp())
    assert df["timestamp"].min() >= t0 and df["timestamp"].max() < t0 + SMALL.days * 86_400  # type: ignore[operator]
    shares = df["event_type"].value_counts(normalize=True)
    share = dict(zip(shares["event_type"].to_list(), shares["proportion"].to_list(), strict=True))
    assert set(share) == {"view", "cart", "purchase"}
    assert share["view"] == pytest.approx(0.80, abs=0.02) and share["purchase"] == pytest.approx(0.05, abs=0.01)


def test_day_partition_layout(small: tuple[Path, pl.DataFrame]) -> None:
    folder, _ = small
    assert (folder / SUCCESS_MARKER).exists()
    days = sorted(p.name for p in folder.iterdir() if p.is_dir())
    expected = [f"day={datetime(2024, 1, d + 1, tzinfo=UTC):%Y-%m-%d}" for d in range(SMALL.days)]
    assert days == expected
    for part in folder.rglob("*.parquet"):
        assert part.name.startswith("part-")
        day = datetime.strptime(part.parent.name.removeprefix("day="), "%Y-%m-%d").replace(tzinfo=UTC)
        ts = pl.read_parquet(part)["timestamp"]
        assert ts.min() >= day.timestamp() and ts.max() < day.timestamp() + 86_400  # type: ignore[operator]
        assert ts.is_sorted()
    assert not list(folder.parent.glob(".small.staging-*"))  # staging folder swapped in, none left behind


def test_small_chunks_and_n_partitions_write_several_parts_per_day(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, n_events=6_000, days=3, chunk_events=1_500, n_partitions=2)
    summary = generate(spec, tmp_path / "t")
    per_day = {p.name: len(list(p.glob("*.parquet"))) for p in (tmp_path / "t").iterdir() if p.is_dir()}
    assert len(per_day) == 3 and all(n >= 2 * 2 for n in per_day.values())  # >= 2 chunks x 2 parts per day
    assert summary["files"] == sum(per_day.values())
    df = _read(tmp_path / "t")
    assert df.height == 6_000 and df["session_id"].n_unique() == df["session_id"].max() + 1  # type: ignore[operator]


def test_chunks_hold_whole_days_so_each_day_is_one_file(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, n_events=6_000, days=6, chunk_events=2_500)  # ~1,000 events a day
    generate(spec, tmp_path / "t")
    per_day = {p.name: sorted(x.name for x in p.glob("*.parquet")) for p in (tmp_path / "t").iterdir() if p.is_dir()}
    assert len(per_day) == 6 and all(len(v) == 1 for v in per_day.values())
    assert len({v[0] for v in per_day.values()}) >= 3  # written by at least three chunks


def test_no_two_events_share_user_item_and_second(tmp_path: Path) -> None:
    # 3 users x 50 items in one day: without the re-draw ~300 rows would collide on (user, item, second)
    spec = GenerateSpec(n_events=20_000, n_users=3, n_items=50, factors=2, days=1)
    generate(spec, tmp_path / "t")
    df = _read(tmp_path / "t")
    assert df.height == 20_000
    assert df.select(pl.struct("user_id", "item_id", "timestamp").is_duplicated().any()).item() is False


def test_sessions_are_short_single_user_bursts(small: tuple[Path, pl.DataFrame]) -> None:
    _, df = small
    s = df.group_by("session_id").agg(
        pl.col("user_id").n_unique().alias("users"),
        (pl.col("timestamp").max() - pl.col("timestamp").min()).alias("span"),
        pl.len().alias("n"),
    )
    assert s["users"].max() == 1
    assert s["span"].max() < 86_400  # type: ignore[operator]
    assert s["n"].mean() == pytest.approx(5.0, rel=0.15)  # mean session length planted at 5 events
    assert s["n"].max() > 10


def test_item_popularity_is_heavy_tailed(small: tuple[Path, pl.DataFrame]) -> None:
    _, df = small
    counts = np.sort(df["item_id"].value_counts()["count"].to_numpy())[::-1]
    top10 = counts[: SMALL.n_items // 10].sum() / df.height
    assert top10 > 0.45  # uniform popularity would give ~0.10
    pop = item_popularity(SMALL)
    assert pop.shape == (SMALL.n_items,) and pop.sum() == pytest.approx(1.0)
    # the planted most-popular items are the observed ones
    top_planted = set(np.argsort(pop)[::-1][:20].tolist())
    top_seen = set(df["item_id"].value_counts().sort("count", descending=True)["item_id"][:20].to_list())
    assert len(top_planted & top_seen) >= 12


def test_planted_topics_are_recoverable(small: tuple[Path, pl.DataFrame]) -> None:
    _, df = small
    users, items = planted_factors(SMALL)
    assert users.shape == (SMALL.n_users, SMALL.factors) and items.shape == (SMALL.n_items, SMALL.factors)
    np.testing.assert_allclose(users.sum(axis=1), 1.0)
    assert (items.sum(axis=1) == 1).all() and (items.sum(axis=0) > 0).all()  # one-hot, every topic has items
    topic = items.argmax(axis=1)
    u = df["user_id"].to_numpy()
    t = topic[df["item_id"].to_numpy()]
    hist = np.zeros((SMALL.n_users, SMALL.factors))
    np.add.at(hist, (u, t), 1.0)
    active = hist.sum(axis=1) >= 30
    assert active.sum() > 100
    hist = hist[active] / hist[active].sum(axis=1, keepdims=True)
    theta = users[active]
    # share of a user's events on their planted top topic, vs 1/factors by chance
    on_top = hist[np.arange(len(hist)), theta.argmax(axis=1)].mean()
    assert on_top > 4.0 / SMALL.factors
    # the empirical topic histogram points the same way as the planted mixture
    cos = (hist * theta).sum(1) / (np.linalg.norm(hist, axis=1) * np.linalg.norm(theta, axis=1))
    assert np.median(cos) > 0.85
    # and far better than a shuffled user assignment
    cos_shuffled = (hist * theta[::-1]).sum(1) / (np.linalg.norm(hist, axis=1) * np.linalg.norm(theta, axis=1))
    assert np.median(cos) > np.median(cos_shuffled) + 0.4


def test_planted_factors_are_deterministic_and_seeded() -> None:
    a_u, a_i = planted_factors(SMALL)
    b_u, b_i = planted_factors(dataclasses.replace(SMALL))
    c_u, _ = planted_factors(dataclasses.replace(SMALL, seed=1))
    assert np.array_equal(a_u, b_u) and np.array_equal(a_i, b_i)
    assert not np.array_equal(a_u, c_u)


def test_read_spec_round_trips_and_presets_are_sane(small: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    folder, _ = small
    assert read_spec(folder) == SMALL.to_dict()
    assert read_spec(tmp_path / "missing") is None
    assert PRESETS["20m"].n_users == 138_000 and PRESETS["20m"].n_items == 27_000
    assert PRESETS["20m"].n_events == 20_000_000
    assert preset("tiny", seed=3).seed == 3 and PRESETS["tiny"].seed == 0


@pytest.mark.parametrize(
    "change, culprit",
    [({"factors": 600}, "factors"), ({"n_events": 0}, "n_events"), ({"event_types": {"view": -1.0}}, "event_types")],
)
def test_invalid_spec_names_the_field(tmp_path: Path, change: dict[str, object], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        generate(dataclasses.replace(SMALL, **change), tmp_path / "t")  # type: ignore[arg-type]
    assert not (tmp_path / "t").exists()


def _allocate(mb: int) -> int:
    block = np.ones(mb * 2**20 // 8)
    return int(block.size)


def test_peak_memory_sees_an_allocation_in_the_child() -> None:
    res = peak_memory(_allocate, 300)
    assert res.value == 300 * 2**20 // 8
    assert res.stage_bytes > 250 * 2**20
    assert res.peak_bytes >= res.start_bytes > 0


def _noop() -> int:
    return 1


def test_peak_memory_does_not_bill_the_parents_memory_to_the_child() -> None:
    # Regression: ru_maxrss survives execve, so a spawned child "peaked" at the parent's RSS.
    held = np.ones(1024 * 2**20 // 8)  # the parent holds 1 GiB while the child runs
    res = peak_memory(_noop)
    assert res.value == 1 and held[-1] == 1.0
    assert res.peak_bytes < 700 * 2**20  # the child imports numpy/polars (~150-250 MB), nothing near 1 GiB


def _ingest_ready() -> bool:
    modules = ("recsys_embed.data.ingest", "recsys_embed.data.interactions")
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _ingest_ready(), reason="data.ingest / data.interactions not written yet")
def test_ingest_suite_runs_at_tiny_size(tmp_path: Path) -> None:
    from recsys_embed.bench import ingest_suite

    (res,) = ingest_suite.run(size="tiny", repeats=1, data_dir=tmp_path)
    assert res.suite == "ingest" and res.size == "tiny"
    assert res.candidate.name == "recsys-embed" and res.baseline.name == "pandas"
    assert len(res.candidate.values) == 1 and len(res.baseline.values) == 1
    assert res.ratio > 0
    assert res.extra["outputs_match"] is True
    assert res.extra["peak_rss_mb_candidate"] > 0 and res.extra["peak_rss_mb_baseline"] > 0
    assert read_spec(tmp_path / "tiny") == PRESETS["tiny"].to_dict()  # cached for the next run
