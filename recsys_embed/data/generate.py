"""Synthetic interaction logs with planted structure, written as day-partitioned Parquet.

The generative story (every step vectorised over a chunk of events, never a Python loop per event):

1. Planted tastes (``planted_factors``): ``factors`` topics. Each item belongs to one topic (round-robin over
   a seeded permutation, so every topic has items) and has a power-law popularity ``pop_i = rank_i^-zipf_a``.
   Each user has a topic mixture ``theta_u ~ Dirichlet(0.1)`` (mass on one to three topics).
2. Users get a log-normal activity level; days get a weight with weekly seasonality and mild growth, and
   the ``n_events`` are spread over days by a multinomial draw.
3. Events come in sessions: a new session starts with probability 1/5 per event (and at every day boundary).
   A session has one user (drawn by activity) and one topic (drawn from ``theta_u``), events 1-120 s
   apart, a start time uniform within its day.
4. Each event's item: with probability 0.9 drawn from the session's topic by popularity, else from the
   global popularity. So ``P(i | u) ∝ pop_i x affinity(u, i)`` with
   ``affinity = 0.9 * theta_u[topic_i] / W_topic_i + 0.1 / W`` (``W_t``: the popularity mass of topic ``t``).
5. Event types are drawn i.i.d. from ``event_types``. No two events share (user, item, timestamp): the rare
   collision (two sessions of one user, same item, same second) gets its item re-drawn, so ingest finds no
   exact duplicates and its output equals a naive pivot of the files.

Output: ``out_dir/day=<YYYY-MM-DD>/part-<chunk>[-<j>].parquet`` with columns ``user_id``, ``item_id``,
``timestamp`` (epoch seconds), ``event_type`` (String) and ``session_id``, the others Int64; rows sorted by
time within a file. The table is staged and swapped in atomically (``_SUCCESS`` marker); every part file carries the
spec as JSON in its Parquet key-value metadata (``read_spec``; no side file, which Polars' directory scan would
reject). Memory is bounded by ``chunk_events`` (~250 bytes per event of a chunk, plus the planted factors),
not by ``n_events``: the default 2M-event chunks peak well under 1 GB.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_embed.io import staged_table

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
SPEC_METADATA_KEY = "recsys_embed.data.generate.spec"
# Bumped whenever the same spec would produce different data, so cached tables are regenerated.
GENERATOR_VERSION = 2
# Mean session length in events (geometric): a new session starts with probability 1 / this per event.
_MEAN_SESSION_EVENTS = 5.0
# Share of events whose item follows the session's topic; the rest follow global popularity (exploration).
_TOPIC_SHARE = 0.9
# Dirichlet concentration of user topic mixtures: 0.1 puts most mass on one to three topics.
_USER_CONCENTRATION = 0.1
# Sigma of the log-normal user activity: mean/median ~1.65, close to MovieLens' ratings per user.
_ACTIVITY_SIGMA = 1.0
# Seconds between consecutive events of a session: uniform integer in [1, 120] (strictly increasing times).
_MAX_GAP_S = 120


def _default_event_types() -> dict[str, float]:
    return {"view": 0.80, "cart": 0.15, "purchase": 0.05}


@dataclass
class GenerateSpec:
    """What to generate. The same spec (seed included) always produces byte-identical files.

    Attributes:
        n_events: exact number of rows written.
        n_users, n_items: ID universe sizes (IDs ``0..n-1``); rare users/items may never appear.
        factors: planted latent dimension = number of topics; must be <= ``n_items``.
        seed: the only source of randomness.
        zipf_a: exponent of the power-law item popularity (``pop ∝ rank^-zipf_a``).
        n_partitions: ``None`` writes one part file per day (more for a day with over ``chunk_events`` events);
            ``N`` splits each of those into ``N`` part files (mimics logs landed as many small files).
        start: first day (UTC midnight of this date); naive datetimes are taken as UTC.
        days: number of days the log spans.
        event_types: event type -> probability (normalised; must be non-negative with a positive sum).
        chunk_events: most events generated and written per chunk (chunks hold whole days); bounds peak
            memory at ~250 B per event.
    """

    n_events: int
    n_users: int
    n_items: int
    factors: int = 16
    seed: int = 0
    zipf_a: float = 1.1
    n_partitions: int | None = None
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC)
    days: int = 90
    event_types: dict[str, float] = field(default_factory=_default_event_types)
    chunk_events: int = 2_000_000

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and the fix."""
        for name in ("n_events", "n_users", "n_items", "factors", "days", "chunk_events"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GenerateSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.factors > self.n_items:
            raise ValueError(
                f"GenerateSpec.factors={self.factors} exceeds n_items={self.n_items}: every topic needs an item; "
                "lower factors or raise n_items"
            )
        if not self.zipf_a > 0:
            raise ValueError(f"GenerateSpec.zipf_a must be > 0, got {self.zipf_a}")
        if self.n_partitions is not None and self.n_partitions < 1:
            raise ValueError(f"GenerateSpec.n_partitions must be None or >= 1, got {self.n_partitions}")
        probs = list(self.event_types.values())
        if not probs or any(not p >= 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(
                f"GenerateSpec.event_types must map names to non-negative probabilities with a positive sum, "
                f"got {self.event_types}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``generator_version`` (what a generated table records)."""
        d = dataclasses.asdict(self)
        d["start"] = _utc(self.start).isoformat()
        d["generator_version"] = GENERATOR_VERSION
        return d


PRESETS: dict[str, GenerateSpec] = {
    "tiny": GenerateSpec(n_events=50_000, n_users=1_000, n_items=500),
    # MovieLens-1M shape.
    "1m": GenerateSpec(n_events=1_000_000, n_users=6_040, n_items=3_706),
    # MovieLens-20M shape.
    "20m": GenerateSpec(n_events=20_000_000, n_users=138_000, n_items=27_000),
    "100m": GenerateSpec(n_events=100_000_000, n_users=700_000, n_items=120_000, factors=32),
}


def preset(name: str, **overrides: Any) -> GenerateSpec:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied (e.g. ``seed=3``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _rng(spec: GenerateSpec, *stream: int) -> np.random.Generator:
    # Independent, reproducible streams: planted factors, the day plan, and one per chunk.
    return np.random.default_rng([spec.seed, *stream])


def _item_structure(spec: GenerateSpec) -> tuple[np.ndarray, np.ndarray]:
    """(item_topic int64 (n_items,), popularity float64 (n_items,), unnormalised)."""
    rng = _rng(spec, 0, 1)
    item_topic = rng.permutation(spec.n_items) % spec.factors
    rank = rng.permutation(spec.n_items) + 1
    popularity = rank.astype(np.float64) ** -spec.zipf_a
    return item_topic.astype(np.int64), popularity


def planted_factors(spec: GenerateSpec) -> tuple[np.ndarray, np.ndarray]:
    """The planted tastes behind ``generate(spec, ...)``.

    Returns:
        ``(user_factors, item_factors)``: float64 ``(n_users, factors)`` topic mixtures (rows sum to 1) and
        float64 ``(n_items, factors)`` one-hot topic memberships; ``item_factors.argmax(1)`` is each item's topic.
        Row ``u`` / ``i`` belongs to ``user_id == u`` / ``item_id == i``.
    """
    spec.validate()
    rng = _rng(spec, 0, 0)
    theta = rng.dirichlet(np.full(spec.factors, _USER_CONCENTRATION), size=spec.n_users)
    # Tiny concentrations can underflow to an all-zero row; give such users a single random topic.
    bad = ~(theta.sum(axis=1) > 0.5)
    if bad.any():
        theta[bad] = np.eye(spec.factors)[rng.integers(0, spec.factors, int(bad.sum()))]
    theta /= theta.sum(axis=1, keepdims=True)
    item_topic, _ = _item_structure(spec)
    items = np.zeros((spec.n_items, spec.factors))
    items[np.arange(spec.n_items), item_topic] = 1.0
    return theta, items


def item_popularity(spec: GenerateSpec) -> np.ndarray:
    """Planted popularity weights, float64 ``(n_items,)``, normalised to sum to 1."""
    _, pop = _item_structure(spec)
    return pop / pop.sum()


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    c /= c[-1]
    c[-1] = 1.0
    return c


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: index ``k`` with probability ``cdf[k] - cdf[k-1]`` for uniforms ``u`` in [0, 1)."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


@dataclass
class _Plan:
    """Everything shared by all chunks (computed once, small: O(users x factors + items + days))."""

    user_topic_cdf: np.ndarray  # (n_users, factors)
    user_cdf: np.ndarray  # (n_users,) activity
    item_cdf: np.ndarray  # (n_items,) global popularity
    topic_cdf_flat: np.ndarray  # (n_items,) topic t + within-topic cdf, items ordered by topic
    topic_items: np.ndarray  # (n_items,) item IDs in that order
    day_end: np.ndarray  # (days,) exclusive cumulative event count per day
    day_start_s: np.ndarray  # (days,) epoch seconds of each day's midnight
    type_cdf: np.ndarray
    type_names: list[str]


def _plan(spec: GenerateSpec) -> _Plan:
    theta, _ = planted_factors(spec)
    user_topic_cdf = np.cumsum(theta, axis=1)
    user_topic_cdf[:, -1] = 1.0
    item_topic, pop = _item_structure(spec)
    order = np.lexsort((np.arange(spec.n_items), item_topic))  # by topic, then item ID
    t_sorted = item_topic[order]
    p_sorted = pop[order]
    cum = np.cumsum(p_sorted)
    topic_end = np.searchsorted(t_sorted, np.arange(spec.factors), side="right") - 1  # last index per topic
    topic_begin_cum = np.concatenate([[0.0], cum[topic_end[:-1]]])
    topic_mass = cum[topic_end] - topic_begin_cum
    within = (cum - topic_begin_cum[t_sorted]) / topic_mass[t_sorted]
    within[topic_end] = 1.0
    topic_cdf_flat = t_sorted + within

    rng = _rng(spec, 1)
    activity = rng.lognormal(0.0, _ACTIVITY_SIGMA, spec.n_users)
    d = np.arange(spec.days)
    weekday = (_utc(spec.start).weekday() + d) % 7
    day_w = (1.0 + 0.3 * d / max(spec.days - 1, 1)) * np.where(weekday >= 5, 1.2, 1.0)
    day_counts = rng.multinomial(spec.n_events, day_w / day_w.sum())
    start = _utc(spec.start).replace(hour=0, minute=0, second=0, microsecond=0)
    names = list(spec.event_types)
    return _Plan(
        user_topic_cdf=user_topic_cdf,
        user_cdf=_cdf(activity),
        item_cdf=_cdf(pop),
        topic_cdf_flat=topic_cdf_flat,
        topic_items=order.astype(np.int64),
        day_end=np.cumsum(day_counts),
        day_start_s=int(start.timestamp()) + d.astype(np.int64) * SECONDS_PER_DAY,
        type_cdf=_cdf(np.array([spec.event_types[n] for n in names], dtype=np.float64)),
        type_names=names,
    )


def _chunk_ranges(day_end: np.ndarray, chunk_events: int) -> list[tuple[int, int]]:
    """Split the day-ordered event sequence into ``[lo, hi)`` chunks of whole days, each at most ``chunk_events``
    long; a day with more events than that is cut into chunks of its own."""
    ranges: list[tuple[int, int]] = []
    lo = 0
    day_lo = 0
    for end in day_end.tolist():
        if end - lo > chunk_events and day_lo > lo:  # the day does not fit: close the chunk before it
            ranges.append((lo, day_lo))
            lo = day_lo
        while end - lo > chunk_events:  # a day larger than a chunk
            ranges.append((lo, lo + chunk_events))
            lo += chunk_events
        day_lo = end
    if day_lo > lo:
        ranges.append((lo, day_lo))
    return ranges


def _redraw_duplicates(
    plan: _Plan, rng: np.random.Generator, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray
) -> None:
    """Re-draw (in place, from global popularity) the item of any event repeating an earlier event's
    (user, item, timestamp), so that no two rows of a chunk are exact duplicates. Rare: a user's two sessions
    must hit the same item in the same second."""
    for _ in range(100):
        keys = pl.DataFrame({"u": user, "i": item, "t": timestamp})
        dup = (~keys.select(pl.struct("u", "i", "t").is_first_distinct()).to_series()).to_numpy()
        n_dup = int(dup.sum())
        if n_dup == 0:
            return
        item[dup] = _draw(plan.item_cdf, rng.random(n_dup))
    raise RuntimeError("generate: could not remove duplicate events after 100 redraws; this is a bug")


def _chunk(spec: GenerateSpec, plan: _Plan, k: int, lo: int, hi: int, session_offset: int) -> pl.DataFrame:
    """Events ``lo..hi-1`` of the day-ordered event sequence; rows sorted by (timestamp, session_id).

    No two rows share (user_id, item_id, timestamp); across chunks that holds because chunks hold whole days
    (unless one day has more than ``chunk_events`` events)."""
    rng = _rng(spec, 2, k)
    n = hi - lo
    day = np.searchsorted(plan.day_end, np.arange(lo, hi), side="right")
    # Session boundaries: Bernoulli per event, forced at the chunk start and at every day change.
    new = rng.random(n) < 1.0 / _MEAN_SESSION_EVENTS
    new[0] = True
    new[1:] |= day[1:] != day[:-1]
    sess = np.cumsum(new) - 1  # local session index per event
    first = np.flatnonzero(new)
    del new
    session_day = day[first]
    del day
    n_sess = len(first)

    # Time: per-event gaps within a session, session start uniform in its day such that it ends in the day.
    offset = rng.integers(1, _MAX_GAP_S + 1, n)
    offset[first] = 0
    np.cumsum(offset, out=offset)
    offset -= offset[first][sess]
    np.minimum(offset, SECONDS_PER_DAY - 1, out=offset)
    duration = offset[np.concatenate([first[1:] - 1, [n - 1]])]
    session_start = plan.day_start_s[session_day] + (rng.random(n_sess) * (SECONDS_PER_DAY - duration)).astype(np.int64)
    timestamp = session_start[sess] + offset
    del offset, session_start

    # Who and what: user by activity, topic by the user's mixture, item by popularity within the topic.
    user = _draw(plan.user_cdf, rng.random(n_sess))
    r = rng.random(n_sess)
    topic = np.minimum((plan.user_topic_cdf[user] <= r[:, None]).sum(axis=1), spec.factors - 1)
    pos = np.searchsorted(plan.topic_cdf_flat, topic[sess] + rng.random(n), side="right")
    item = plan.topic_items[np.minimum(pos, spec.n_items - 1, out=pos)]
    del pos
    explore = rng.random(n) >= _TOPIC_SHARE
    item[explore] = _draw(plan.item_cdf, rng.random(int(explore.sum())))
    del explore
    etype = _draw(plan.type_cdf, rng.random(n))
    ev_user = user[sess]
    _redraw_duplicates(plan, rng, ev_user, item, timestamp)

    order = np.lexsort((sess, timestamp))  # by time, then session
    return pl.DataFrame(
        {
            "user_id": ev_user[order],
            "item_id": item[order],
            "timestamp": timestamp[order],
            "event_type": pl.Series(plan.type_names, dtype=pl.String).gather(etype[order]),
            "session_id": sess[order] + session_offset,
        },
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Int64,
            "event_type": pl.String,
            "session_id": pl.Int64,
        },
    )


def _write_chunk(frame: pl.DataFrame, stage: Path, k: int, n_partitions: int | None, spec_json: str) -> list[Path]:
    """Split a time-sorted chunk by UTC day and write its part files; returns the paths written."""
    ts = frame["timestamp"].to_numpy()
    day_no = ts // SECONDS_PER_DAY
    bounds = np.flatnonzero(np.diff(day_no)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(ts)]])
    written: list[Path] = []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        label = (epoch + timedelta(days=int(day_no[a]))).strftime("%Y-%m-%d")
        folder = stage / f"day={label}"
        folder.mkdir(exist_ok=True)
        pieces = 1 if n_partitions is None else n_partitions
        cuts = np.linspace(a, b, pieces + 1).astype(np.int64)
        for j in range(pieces):
            name = f"part-{k:05d}.parquet" if n_partitions is None else f"part-{k:05d}-{j:04d}.parquet"
            path = folder / name
            frame.slice(int(cuts[j]), int(cuts[j + 1] - cuts[j])).write_parquet(
                path, compression="zstd", statistics=True, metadata={SPEC_METADATA_KEY: spec_json}
            )
            written.append(path)
    return written


def generate(spec: GenerateSpec, out_dir: Path) -> dict[str, Any]:
    """Generate ``spec.n_events`` events into the hive-partitioned Parquet table ``out_dir`` (replaced atomically).

    Deterministic: the same spec writes byte-identical files. Peak memory is bounded by ``spec.chunk_events``.

    Returns:
        A summary: ``out_dir``, ``rows``, ``files``, ``days`` (day partitions written), ``bytes``, ``seconds``.
    """
    spec.validate()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    plan = _plan(spec)
    files: list[Path] = []
    rows = 0
    session_offset = 0
    ranges = _chunk_ranges(plan.day_end, spec.chunk_events)
    n_chunks = len(ranges)
    spec_json = json.dumps(spec.to_dict(), sort_keys=True)
    with staged_table(out_dir) as stage:
        for k, (lo, hi) in enumerate(ranges):
            frame = _chunk(spec, plan, k, lo, hi, session_offset)
            session_offset = int(frame["session_id"].max()) + 1  # type: ignore[arg-type]
            files += _write_chunk(frame, stage, k, spec.n_partitions, spec_json)
            rows += frame.height
            log.info("generate: chunk %d/%d, %d rows", k + 1, n_chunks, rows)
            del frame
        n_bytes = sum(p.stat().st_size for p in files)
        days = len({p.parent.name for p in files})
    seconds = time.perf_counter() - t0
    log.info("generate: %d rows in %d files over %d days in %.1f s -> %s", rows, len(files), days, seconds, out_dir)
    return {
        "out_dir": str(out_dir),
        "rows": rows,
        "files": len(files),
        "days": days,
        "bytes": n_bytes,
        "seconds": seconds,
    }


def read_spec(out_dir: Path) -> dict[str, Any] | None:
    """The spec (as ``GenerateSpec.to_dict``) a committed generated table was made from; ``None`` if ``out_dir``
    is missing, uncommitted, or was not written by ``generate``."""
    from recsys_embed.io import is_complete_table

    out_dir = Path(out_dir)
    if not is_complete_table(out_dir):
        return None
    part = next(iter(sorted(out_dir.glob("day=*/*.parquet"))), None)
    if part is None:
        return None
    raw = pl.read_parquet_metadata(part).get(SPEC_METADATA_KEY)
    return None if raw is None else dict(json.loads(raw))
