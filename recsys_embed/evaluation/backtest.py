"""Backtest: the product's own measure. Do the tables the pipeline ships beat gluing ``implicit`` by hand?

The log is cut at a cutoff (``ingest.until``); the whole production pipeline runs on the events before it
(``flows/backtest.py`` calls the main flow); its exported top-k tables are then scored on what happened after,
side by side with two baselines trained on every pre-cutoff kept event:

- ``baseline_popularity``: the items with the most distinct pre-cutoff buyers, the user's history excluded;
- ``baseline_implicit_als``: what a user gets by calling implicit by hand: ``AlternatingLeastSquares()`` with the
  library's defaults (seeded) on the binary user x item purchase matrix, then ``recommend(...,
  filter_already_liked_items=True)``.

Truth, per user: the items the user bought after the cutoff (kept events with a positive weight) that are not in
the user's pre-cutoff kept history (any event, any weight). Warm users: a pre-cutoff kept event and at least one
such item; users first seen after the cutoff are counted apart. Items new to the whole catalog stay in the truth
(what people bought; no table can hold them, so they lower every contender alike) and are counted.

Every contender is a table ``user_id, rank, item_id`` read the same way and scored by ``evaluate.evaluate_ranked``
(the harness's metric code). A warm user without a row in a table scores zero; no user is ever dropped.

Everything here is a function over Polars frames; ``run_scoring`` reads the files, ``write_results`` writes
``backtest.json`` / ``backtest.md`` atomically and ``log_results`` logs through ``tracking.Tracker``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.errors import ConfigError, RecsysEmbedError
from recsys_embed.evaluation.metrics import evaluate_ranked
from recsys_embed.io import read_table, write_json_atomic, write_text_atomic
from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

BASELINE = "baseline_implicit_als"
"""The contender every ratio is taken against."""
BASELINE_BM25 = "baseline_implicit_als_bm25"
"""The same hand-glued script on BM25-weighted counts, as implicit's last.fm example (logs of counts only)."""
POPULARITY = "baseline_popularity"
HEADLINE = ("recall", "ndcg", "hit_rate")
"""The metrics printed side by side (at ``k``)."""
_LABEL = {"recall": "Recall", "ndcg": "NDCG", "hit_rate": "HitRate"}


class BacktestError(RecsysEmbedError):
    """A backtest cannot be run as asked (names the cause and the fix)."""


# ----------------------------------------------------------------------------------------------------------
# The cutoff and the backtest's own pipeline


def as_utc(t: datetime, timezone: str = "UTC") -> datetime:
    """``t`` as an aware UTC datetime; a naive ``t`` is read in ``timezone`` (as ingest reads naive times)."""
    return (t if t.tzinfo is not None else t.replace(tzinfo=ZoneInfo(timezone))).astimezone(UTC)


def resolve_cutoff(
    first_event: datetime, last_event: datetime, holdout_days: int | None, cutoff: datetime | None
) -> datetime:
    """The cutoff: ``cutoff`` itself, or ``last_event - holdout_days`` days. Exactly one must be given.

    Raises:
        BacktestError: neither or both given, or a cutoff that leaves no event before or none after it.
    """
    if (holdout_days is None) == (cutoff is None):
        raise BacktestError("give exactly one of --holdout-days N or --cutoff DATE")
    if holdout_days is not None:
        if holdout_days < 1:
            raise BacktestError(f"--holdout-days must be at least 1, got {holdout_days}")
        cut = last_event - timedelta(days=holdout_days)
    else:
        assert cutoff is not None
        cut = cutoff
    span = f"the log's kept events run from {first_event.isoformat()} to {last_event.isoformat()}"
    if cut <= first_event:
        raise BacktestError(f"cutoff {cut.isoformat()} leaves no event before it ({span}); choose a later cutoff "
                            "or fewer --holdout-days")  # fmt: skip
    if cut > last_event:
        raise BacktestError(f"cutoff {cut.isoformat()} leaves no event after it ({span}); choose an earlier cutoff")
    return cut


def backtest_tag(holdout_days: int | None, cutoff: datetime | None) -> str:
    """``60d`` for ``--holdout-days 60``; the cutoff's date (``2011-10-10``, with ``T%H%M%S`` when not midnight)."""
    if holdout_days is not None:
        return f"{holdout_days}d"
    if cutoff is None:
        raise BacktestError("give exactly one of --holdout-days N or --cutoff DATE")
    midnight = (cutoff.hour, cutoff.minute, cutoff.second, cutoff.microsecond) == (0, 0, 0, 0)
    return cutoff.strftime("%Y-%m-%d" if midnight else "%Y-%m-%dT%H%M%S")


def backtest_name(name: str, tag: str) -> str:
    """The backtest's own pipeline name (and output folder): ``<name>-backtest-<tag>``."""
    return f"{name}-backtest-{tag}"


PER_MODEL_OVERRIDES = ["export.models=[all]"]
"""``--per-model``: both pipeline runs ship every model they trained (not only the best and popularity)."""
DEFAULTS_OVERRIDES = ["tuning.enabled=false"]
"""``--per-model``: the second pipeline run keeps every model's configured hyperparameters."""


def defaults_name(name: str) -> str:
    """The output folder of ``--per-model``'s run with the search off: ``<name>-backtest-<tag>-defaults``."""
    return f"{name}-defaults"


def pipeline_overrides(name: str, cutoff: datetime) -> list[str]:
    """``--set`` overrides that turn the main job into its backtest: its own output folder, the log cut at the
    cutoff, and nothing shared touched (no registry, no database, no incremental state)."""
    return [
        f"name={name}",
        f"ingest.until={cutoff.isoformat()}",
        "registry.enabled=false",
        "export.database.enabled=false",
        "incremental.enabled=false",
    ]


def event_span(events: pl.DataFrame) -> tuple[datetime, datetime]:
    """(first, last) kept event time (aware UTC)."""
    ts = events["ts"].drop_nulls()
    if ts.len() == 0:
        raise BacktestError("the log has no timed kept event; a backtest needs ingest.columns.timestamp")
    first, last = ts.min(), ts.max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    return as_utc(first), as_utc(last)


# ----------------------------------------------------------------------------------------------------------
# Truth


@dataclass(frozen=True)
class Truth:
    """What happened after the cutoff, against what was known before it.

    Attributes:
        history: distinct ``user_id, item_id`` pairs of every pre-cutoff kept event (any weight).
        targets: distinct ``user_id, item_id``: a warm user's post-cutoff purchases of items new to that user.
        users: the warm users (sorted): a pre-cutoff kept event and at least one target.
        items: every item ID known here (pre-cutoff items, then target items new to the catalog), the index
            space of the scorer.
        info: counts (``warm_users``, ``target_pairs``, ``target_pairs_new_to_catalog``, ``users_before``,
            ``buyers_after``, ``cold_buyers_after``, ``events_before``, ``events_after``).
    """

    history: pl.DataFrame
    targets: pl.DataFrame
    users: pl.Series
    items: IdMap
    info: dict[str, int]


def split_at(events: pl.DataFrame, cutoff: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events before ``cutoff``, events at or after it): the same cut as ``ingest.until``."""
    after = (events["ts"] >= cutoff).fill_null(False)
    return events.filter(~after), events.filter(after)


def build_truth(before: pl.DataFrame, after: pl.DataFrame) -> Truth:
    """Targets and warm users from the kept events on each side of the cutoff (columns ``user_id``,
    ``item_id``, ``weight``)."""
    history = before.select("user_id", "item_id").unique().sort("user_id", "item_id")
    bought = after.filter(pl.col("weight") > 0).select("user_id", "item_id").unique()
    known_users = history.select("user_id").unique()
    warm_bought = bought.join(known_users, on="user_id", how="semi")
    targets = warm_bought.join(history, on=["user_id", "item_id"], how="anti").sort("user_id", "item_id")
    users = targets["user_id"].unique().sort()
    catalog = history["item_id"].unique()
    new_items = targets.filter(~pl.col("item_id").is_in(catalog.implode()))["item_id"].unique()
    items = IdMap(pl.concat([catalog.sort(), new_items.sort()]).rename("id"))
    info = {
        "events_before": before.height,
        "events_after": after.height,
        "users_before": known_users.height,
        "buyers_after": bought["user_id"].n_unique(),
        "cold_buyers_after": bought.join(known_users, on="user_id", how="anti")["user_id"].n_unique(),
        "warm_users": users.len(),
        "target_pairs": targets.height,
        "target_pairs_new_to_catalog": targets.filter(pl.col("item_id").is_in(new_items.implode())).height,
    }
    log.info(
        "backtest truth: %s warm users, %s target pairs (%s on items new to the catalog); %s buyers after the "
        "cutoff had no history and are counted apart",
        f"{info['warm_users']:,}", f"{info['target_pairs']:,}", f"{info['target_pairs_new_to_catalog']:,}",
        f"{info['cold_buyers_after']:,}",
    )  # fmt: skip
    return Truth(history=history, targets=targets, users=users, items=items, info=info)


# ----------------------------------------------------------------------------------------------------------
# Scoring a table


def _same_ids(table: pl.DataFrame, truth: Truth) -> pl.DataFrame:
    """``table`` with ``user_id`` / ``item_id`` cast to the log's ID dtypes; IDs that do not cast are an error."""
    out = table
    for col, dtype in (("user_id", truth.users.dtype), ("item_id", truth.items.dtype)):
        if out[col].dtype != dtype:
            cast = out[col].cast(dtype, strict=False)
            if cast.null_count() > out[col].null_count():
                raise BacktestError(
                    f"top-k table column '{col}' holds {out[col].dtype} IDs that do not read as the log's {dtype} "
                    "IDs; was it exported from another log?"
                )
            out = out.with_columns(cast)
    return out


def ranked_items(table: pl.DataFrame, truth: Truth, k: int) -> tuple[np.ndarray, dict[str, int]]:
    """The ranked item-index matrix of ``table`` for the warm users.

    Args:
        table: ``user_id, rank, item_id`` (an exported top-k table or a baseline's).
        truth: gives the warm users (rows, in ``truth.users`` order) and the item index.
        k: slots per user; rows beyond rank order position k are ignored, a repeated item keeps its best rank.

    Returns:
        (int64 (n_warm_users, k) item indices, -1 = empty slot; counts ``users_without_rows`` (warm users with
        no row: they score zero), ``rows_scored``, ``seen_rows`` (scored rows naming an item already in the
        user's pre-cutoff history), ``rows_unknown_item`` (items the log never had before the cutoff)).
    """
    users = pl.DataFrame({"user_id": truth.users}).with_row_index("_u")
    rows = (
        _same_ids(table.select("user_id", "rank", "item_id"), truth)
        .join(users, on="user_id", how="inner")
        .sort("_u", "rank")
        .unique(["_u", "item_id"], keep="first", maintain_order=True)
        .with_columns(pl.int_range(pl.len()).over("_u").alias("_slot"))
        .filter(pl.col("_slot") < k)
    )
    idx = truth.items.lookup(rows["item_id"])
    out = np.full((users.height, k), -1, dtype=np.int64)
    known = idx.is_not_null().to_numpy()
    out[rows["_u"].to_numpy()[known], rows["_slot"].to_numpy()[known]] = idx.to_numpy()[known]
    seen = rows.join(truth.history, on=["user_id", "item_id"], how="semi").height
    counts = {
        "users_without_rows": users.height - rows["_u"].n_unique(),
        "rows_scored": rows.height,
        "seen_rows": seen,
        "rows_unknown_item": int((~known).sum()),
    }
    return out, counts


def target_matrix(truth: Truth) -> sp.csr_matrix:
    """CSR (n_warm_users x n_items) of 1.0 at each target, rows in ``truth.users`` order."""
    users = pl.DataFrame({"user_id": truth.users}).with_row_index("_u")
    t = truth.targets.join(users, on="user_id", how="inner")
    cols = truth.items.lookup(t["item_id"]).to_numpy()
    shape = (truth.users.len(), len(truth.items))
    return sp.csr_matrix((np.ones(t.height, dtype=np.float32), (t["_u"].to_numpy(), cols)), shape=shape)


def score_table(table: pl.DataFrame, truth: Truth, ks: Sequence[int]) -> dict[str, float]:
    """The harness's metrics (``evaluate.evaluate_ranked``) of ``table`` on ``truth`` at ``ks``, plus the counts
    of ``ranked_items``. Every warm user is evaluated; one without rows scores zero."""
    kmax = max(ks)
    items, counts = ranked_items(table, truth, kmax)
    metrics = evaluate_ranked(items, target_matrix(truth), ks)
    return {**metrics, **{k: float(v) for k, v in counts.items()}}


# ----------------------------------------------------------------------------------------------------------
# Baselines, both trained on every pre-cutoff kept event


def _purchases(before: pl.DataFrame) -> pl.DataFrame:
    return before.filter(pl.col("weight") > 0).select("user_id", "item_id").unique()


def _table(users: pl.Series, items: pl.Series, n_rows: int, k: int, model: str) -> pl.DataFrame:
    """``user_id, rank, item_id, model`` from row-major (n_rows x k) decoded lists; null items dropped."""
    return (
        pl.DataFrame(
            {
                "user_id": users,
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), n_rows),
                "item_id": items,
            }
        )
        .filter(pl.col("item_id").is_not_null())
        .with_columns(pl.lit(model).alias("model"))
    )


def popularity_table(before: pl.DataFrame, users: pl.Series, k: int) -> pl.DataFrame:
    """Top-k most popular items (distinct pre-cutoff buyers) per user in ``users``, the user's pre-cutoff kept
    history excluded; ties by the lower item ID. Users without history get the plain top k.

    Returns:
        ``user_id, rank, item_id, model`` (``model = "baseline_popularity"``).
    """
    from recsys_embed.evaluation.topk import topk

    history = before.select("user_id", "item_id").unique()
    item_map = IdMap.from_ids(history["item_id"])
    user_map = IdMap.from_ids(pl.concat([history["user_id"], users.cast(history["user_id"].dtype)]))
    counts = _purchases(before).group_by("item_id").len()
    pop = np.zeros(len(item_map), dtype=np.float32)
    pop[item_map.lookup(counts["item_id"]).to_numpy()] = counts["len"].to_numpy()
    seen = sp.csr_matrix(
        (
            np.ones(history.height, dtype=np.float32),
            (user_map.lookup(history["user_id"]).to_numpy(), item_map.lookup(history["item_id"]).to_numpy()),
        ),
        shape=(len(user_map), len(item_map)),
    )
    emb = Embeddings(np.ones((len(user_map), 1)), pop[:, None], user_map, item_map, POPULARITY)
    rows = user_map.lookup(users).to_numpy()
    top = topk(emb, k, users=rows, seen=seen)
    kk = top.items.shape[1]
    flat = top.items.ravel()
    item_ids = item_map.decode(np.maximum(flat, 0)).scatter(np.flatnonzero(flat < 0), None)
    return _table(users.gather(np.repeat(np.arange(len(rows)), kk)), item_ids, len(rows), kk, POPULARITY)


def hand_glued_als_table(
    before: pl.DataFrame, users: pl.Series, k: int, seed: int, bm25: bool = False, name: str = BASELINE
) -> pl.DataFrame:
    """What a user gets by calling implicit by hand, written the way such a user would.

    ``implicit.als.AlternatingLeastSquares(random_state=seed)`` (every other argument the library's default) is
    fitted on the binary user x item matrix of pre-cutoff purchases, then ``recommend(userids,
    user_items[userids], N=k, filter_already_liked_items=True)`` answers every user in ``users`` that the matrix
    knows (a user with no pre-cutoff purchase gets no row). BLAS is single-threaded around implicit, as
    implicit asks (threadpoolctl).

    With ``bm25`` (a log of counts: plays, clicks), the matrix holds each pair's summed positive weight weighed
    as implicit's own last.fm example does: ``bm25_weight(item_user_counts, K1=100, B=0.8)``, transposed.

    Returns:
        ``user_id, rank, item_id, model`` (``model = name``).
    """
    import implicit.als
    from threadpoolctl import threadpool_limits

    from recsys_embed import progress

    positive = before.filter(pl.col("weight") > 0)
    bought = positive.group_by("user_id", "item_id").agg(pl.col("weight").sum())
    user_ids = bought["user_id"].unique().sort()
    item_ids = bought["item_id"].unique().sort()
    u = IdMap(user_ids.rename("id")).lookup(bought["user_id"]).to_numpy()
    i = IdMap(item_ids.rename("id")).lookup(bought["item_id"]).to_numpy()
    values = bought["weight"].to_numpy().astype(np.float32) if bm25 else np.ones(len(u), dtype=np.float32)
    user_items = sp.csr_matrix((values, (u, i)), shape=(user_ids.len(), item_ids.len()))
    if bm25:
        from implicit.nearest_neighbours import bm25_weight

        user_items = bm25_weight(user_items.T.tocoo(), K1=100, B=0.8).T.tocsr().astype(np.float32)
    asked = users.cast(user_ids.dtype).filter(users.cast(user_ids.dtype).is_in(user_ids.implode()))
    userids = IdMap(user_ids.rename("id")).lookup(asked).to_numpy()
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(random_state=seed)
        model.fit(user_items, show_progress=progress.enabled())
        ids, _scores = model.recommend(userids, user_items[userids], N=k, filter_already_liked_items=True)
    ids = np.asarray(ids, dtype=np.int64).reshape(len(userids), -1)
    kk = ids.shape[1]
    flat = ids.ravel()
    items = item_ids.gather(np.maximum(flat, 0)).scatter(np.flatnonzero(flat < 0), None)
    return _table(asked.gather(np.repeat(np.arange(len(userids)), kk)), items, len(userids), kk, name)


# ----------------------------------------------------------------------------------------------------------
# Which tables, the comparison, the result


def shipped_tables(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Model -> top-k table path of what a pipeline run ships, its best model first.

    Reads ``manifest["exports"][model]["topk"]``: the shipped tables (``export.models``; the production refits
    unless ``export.refit`` is off).
    """
    source = manifest.get("exports") or {}
    paths = {m: str(rec["topk"]) for m, rec in source.items() if isinstance(rec, dict) and rec.get("topk")}
    if not paths:
        raise BacktestError(f"the pipeline run {manifest.get('run_dir')} exported no top-k table; enable a model")
    best = manifest.get("best_model")
    return {m: paths[m] for m in sorted(paths, key=lambda m: (m != best, m))}


def ratios(metrics: dict[str, float], baseline: dict[str, float], k: int) -> dict[str, float]:
    """``<metric>_at_k_ratio``: each headline metric over the baseline's (NaN when the baseline's is 0)."""
    out: dict[str, float] = {}
    for m in HEADLINE:
        name = f"{m}_at_{k}"
        base = baseline.get(name, math.nan)
        out[f"{name}_ratio"] = metrics[name] / base if base and math.isfinite(base) else math.nan
    return out


@dataclass
class Contender:
    """One row of the comparison: a shipped table or a baseline, its metrics and ratios to ``BASELINE``."""

    name: str
    kind: str  # "shipped" | "tuned" | "defaults" (``--per-model``: every model, each way) | "baseline"
    metrics: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)
    table: str | None = None  # the table's path (shipped) or None (baselines are built in memory)
    best: bool = False
    seconds: float | None = None
    model: str | None = None  # the model family behind a pipeline table (None for baselines)
    params: dict[str, Any] = field(default_factory=dict)  # its hyperparameters as refitted (searched ones)


@dataclass
class BacktestResult:
    """Everything the backtest measured; ``to_dict`` is ``backtest.json``."""

    name: str
    cutoff: str
    holdout_days: int | None
    first_event: str
    last_event: str
    k: int
    ks: list[int]
    truth: dict[str, int]
    contenders: list[Contender]
    pipeline: dict[str, Any]
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> run facts (``--per-model``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def contender(self, name: str) -> Contender:
        return next(c for c in self.contenders if c.name == name)


def compare(contenders: list[Contender], k: int) -> list[Contender]:
    """Fill each contender's ratios to ``BASELINE``'s metrics (in place; returned for chaining)."""
    base = next((c for c in contenders if c.name == BASELINE), None)
    if base is None:
        raise BacktestError(f"no '{BASELINE}' contender to take ratios against")
    for c in contenders:
        c.ratios = ratios(c.metrics, base.metrics, k)
    return contenders


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(result: BacktestResult) -> str:
    """The comparison as a Markdown table with a short header (printed by the CLI, kept as backtest.md)."""
    k = result.k
    t = result.truth
    cols = [f"{_LABEL[m]}@{k}" for m in HEADLINE]
    head = ["table", "kind", *cols, *(f"{c} ratio" for c in cols), "users without rows", "seen rows"]
    lines = [
        f"Backtest {result.name}: cutoff {result.cutoff}"
        + (f" (last kept event {result.last_event} - {result.holdout_days} days)" if result.holdout_days else ""),
        "",
        f"{t['warm_users']:,} warm users (a pre-cutoff kept event and a purchase of an item new to them after it), "
        f"{t['target_pairs']:,} target pairs ({t['target_pairs_new_to_catalog']:,} on items new to the catalog); "
        f"{t['cold_buyers_after']:,} buyers after the cutoff had no history (counted apart). Ratios are to "
        f"{BASELINE}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for c in result.contenders:
        name = f"**{c.name}** (best)" if c.best else c.name
        cells = [name, c.kind]
        cells += [_fmt(c.metrics[f"{m}_at_{k}"]) for m in HEADLINE]
        cells += [_fmt(c.ratios[f"{m}_at_{k}_ratio"], 2) + "x" for m in HEADLINE]
        cells += [f"{int(c.metrics['users_without_rows']):,}", f"{int(c.metrics['seen_rows']):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    per_model = defaults_vs_tuned(result)
    if per_model:
        lines += ["", f"Per model, refitted on every pre-cutoff event: configured defaults against the validation "
                  f"search's parameters (NDCG@{k}; ratios to {BASELINE}).", "",
                  f"| model | defaults NDCG@{k} | tuned NDCG@{k} | tuned / defaults | defaults ratio | tuned ratio "
                  "| tuned parameters |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in per_model:
            lines.append(
                f"| {row['model']} | {_fmt(row['defaults'])} | {_fmt(row['tuned'])} | {_fmt(row['gain'], 3)}x "
                f"| {_fmt(row['defaults_ratio'], 2)}x | {_fmt(row['tuned_ratio'], 2)}x | {row['params']} |"
            )
    return "\n".join(lines) + "\n"


def _params_text(params: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return text or "(not searched)"


def defaults_vs_tuned(result: BacktestResult) -> list[dict[str, Any]]:
    """One row per model scored both ways (``--per-model``): NDCG@k of its defaults and tuned tables, their
    ratio, each one's ratio to ``BASELINE``, and the tuned parameters. Empty for a plain backtest."""
    k = result.k
    metric = f"ndcg_at_{k}"
    tuned = {c.model: c for c in result.contenders if c.kind == "tuned"}
    rows = []
    for c in result.contenders:
        if c.kind != "defaults" or c.model not in tuned:
            continue
        t = tuned[c.model]
        d_val, t_val = c.metrics[metric], t.metrics[metric]
        rows.append({
            "model": c.model,
            "defaults": d_val,
            "tuned": t_val,
            "gain": t_val / d_val if d_val else math.nan,
            "defaults_ratio": c.ratios[f"{metric}_ratio"],
            "tuned_ratio": t.ratios[f"{metric}_ratio"],
            "params": _params_text(t.params),
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------
# Edges: read, score, write, log


def _pipeline_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_dir": manifest.get("run_dir"),
        "mlflow_run_id": (manifest.get("mlflow") or {}).get("run_id"),
        "best_model": manifest.get("best_model"),
        "tables_from": "shipped" if manifest.get("shipped") else "exports",
        "split": manifest.get("split"),
    }


def searched_params(manifest: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The hyperparameters of ``model`` that a run's search covered, as the run refitted them: the tuned values
    when it searched, else the configured ones of the same names (read from the run's ``tuning`` record)."""
    rec = ((manifest.get("tuning") or {}).get("models") or {}).get(model) or {}
    return dict(rec.get("params") or {})


def run_scoring(
    events_path: str | Path,
    cutoff: datetime,
    manifest: Mapping[str, Any],
    *,
    name: str,
    k: int,
    ks: Sequence[int],
    seed: int,
    holdout_days: int | None = None,
    defaults: Mapping[str, Any] | None = None,
    counts: bool = False,
) -> BacktestResult:
    """Score a backtest pipeline run's shipped tables and both baselines against the events after ``cutoff``.

    Args:
        events_path: the whole log's clean events (the ingest's ``events.parquet``; at least ``user_id``,
            ``item_id``, ``ts``, ``weight``).
        cutoff: aware datetime; the pipeline run saw only events before it.
        manifest: the pipeline run's manifest (``summary.json``); ``shipped_tables`` picks the tables.
        name: the backtest's name (``<name>-backtest-<tag>``).
        k: the headline cut-off (the export's k); ``ks`` the cut-offs computed (those above k are dropped).
        seed: ``random_state`` of the hand-glued ALS.
        holdout_days: recorded when the cutoff came from ``--holdout-days``.
        defaults: ``--per-model``: the manifest of the same pipeline run with its search off (every model at
            its configured hyperparameters); ``manifest`` is then the tuned run, and every table of both is
            scored (contender kinds "tuned" and "defaults", the latter named ``<model> (defaults)``).
        counts: the log's weights are counts (``ingest.columns.weight`` is mapped): a user of implicit weighs
            them with BM25, so ``baseline_implicit_als_bm25`` (``hand_glued_als_table(bm25=True)``) is scored too.
    """
    if k < 1:
        raise ConfigError(f"export.k must be >= 1 for a backtest, got {k}")
    ks = sorted({int(x) for x in ks if int(x) <= k} | {k})
    events = pl.read_parquet(events_path, columns=["user_id", "item_id", "ts", "weight"])
    first, last = event_span(events)
    before, after = split_at(events, cutoff)
    truth = build_truth(before, after)
    if truth.users.len() == 0:
        raise BacktestError(
            f"no warm user after cutoff {cutoff.isoformat()}: nobody with a pre-cutoff event bought a new item "
            f"({truth.info['events_after']:,} events after it); choose an earlier cutoff or more --holdout-days"
        )
    contenders: list[Contender] = []
    best = manifest.get("best_model")
    runs = {"shipped": manifest} if defaults is None else {"tuned": manifest, "defaults": defaults}
    for kind, run in runs.items():
        for model, path in shipped_tables(run).items():
            metrics = score_table(read_table(path), truth, ks)
            label = f"{model} (defaults)" if kind == "defaults" else model
            contenders.append(Contender(label, kind, metrics, table=path, best=kind != "defaults" and model == best,
                                        model=model, params=searched_params(run, model)))  # fmt: skip
    builds = [
        (POPULARITY, lambda: popularity_table(before, truth.users, k)),
        (BASELINE, lambda: hand_glued_als_table(before, truth.users, k, seed)),
    ]
    if counts:
        builds.append((BASELINE_BM25, lambda: hand_glued_als_table(before, truth.users, k, seed, bm25=True,
                                                                   name=BASELINE_BM25)))  # fmt: skip
    for cname, build in builds:
        t0 = time.perf_counter()
        table = build()
        seconds = round(time.perf_counter() - t0, 3)
        contenders.append(Contender(cname, "baseline", score_table(table, truth, ks), seconds=seconds))
    compare(contenders, k)
    for c in contenders:
        log.info("backtest %s: %s", c.name, ", ".join(f"{m}_at_{k} {c.metrics[f'{m}_at_{k}']:.4f}" for m in HEADLINE))
    return BacktestResult(
        name=name,
        cutoff=cutoff.isoformat(),
        holdout_days=holdout_days,
        first_event=first.isoformat(),
        last_event=last.isoformat(),
        k=k,
        ks=ks,
        truth=truth.info,
        contenders=contenders,
        pipeline=_pipeline_facts(manifest),
        pipelines={kind: _pipeline_facts(run) for kind, run in runs.items()},
    )


def write_results(result: BacktestResult, folder: str | Path) -> dict[str, str]:
    """``backtest.json`` and ``backtest.md`` under ``folder``, each written atomically; returns their paths."""
    folder = Path(folder)
    js = write_json_atomic(result.to_dict(), folder / "backtest.json")
    md = write_text_atomic(markdown(result), folder / "backtest.md")
    return {"json": str(js.resolve()), "markdown": str(md.resolve())}


def log_results(tracker: Any, result: BacktestResult, tags: dict[str, str]) -> str:
    """One MLflow run ``backtest-<tag>`` in the tracker's experiment: params (cutoff, k, truth counts), metrics
    ``<contender>.<metric>`` and ``<contender>.<metric>_ratio``, and ``backtest.md`` / ``backtest.json`` as
    artifacts. Returns the run id.

    Args:
        tracker: a ``tracking.Tracker``.
        tags: extra run tags (e.g. ``pipeline`` and ``output_root`` of the backtest's folder).
    """
    run_id: str = tracker.start_run(
        f"backtest-{result.name.rsplit('-backtest-', 1)[-1]}",
        tags={**tags, "kind": "backtest", "cutoff": result.cutoff,
              "pipeline_run_id": str(result.pipeline.get("mlflow_run_id"))},
    )  # fmt: skip
    try:
        tracker.log_params(run_id, {"cutoff": result.cutoff, "holdout_days": result.holdout_days, "k": result.k,
                                    "best_model": result.pipeline.get("best_model"),
                                    **{f"truth.{k}": v for k, v in result.truth.items()}})  # fmt: skip
        metrics: dict[str, float] = {}
        for c in result.contenders:
            metrics.update({f"{c.name}.{m}": v for m, v in c.metrics.items() if math.isfinite(v)})
            metrics.update({f"{c.name}.{m}": v for m, v in c.ratios.items() if math.isfinite(v)})
        metrics.update({f"truth.{k}": float(v) for k, v in result.truth.items()})
        tracker.log_metrics(run_id, metrics)
        tracker.log_text(run_id, markdown(result), "backtest.md")
        tracker.log_dict(run_id, result.to_dict(), "backtest.json")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return run_id
