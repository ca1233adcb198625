"""Cold-start evaluation of the two-tower model on a real log: items never trained on, users who came later.

``cold_start_report`` does, from clean events and item texts:

1. The configured split (``split_events``). A seeded ``holdout_fraction`` of the fit period's items that
   have text is removed from training entirely (all their fit events), so the model never sees their IDs.
2. Two-tower is trained on what is left (validation as configured).
3. **Cold items.** The item universe is the train items plus the held-out items, the latter embedded from
   their text alone (``TwoTowerEncoder.item_vectors``). Targets: test-period purchases of held-out items by
   warm users. Reported twice: ranking the whole extended catalog (train-seen items excluded), and ranking
   the held-out items only. Baselines: popularity (held-out items have no train popularity, so it cannot
   rank them: 0 in the whole catalog, an arbitrary fixed order among themselves) and random (expected value).
4. **New users.** Users whose first event is after the fit period (validation or test period): their first
   visit (the events at their first timestamp) is the history given to the user tower
   (``TwoTowerEncoder.user_vectors``, held-out items embedded from text too); the items of their later visits
   are the targets, over the extended catalog with the history excluded. Baselines: popularity of the train
   period (the usual fallback) and random.

Run it: ``python -m recsys_embed.bench.cold_start --config configs/retail.yaml`` (logs a table, writes JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.config import PipelineConfig
from recsys_embed.evaluation.metrics import evaluate
from recsys_embed.models.popularity import item_popularity
from recsys_embed.types import Embeddings, IdMap, Interactions, RowReport

log = logging.getLogger(__name__)


def _report(n: int) -> RowReport:
    return RowReport(rows_read=n, kept=n)


def expected_random_recall(targets: sp.csr_matrix, seen: sp.csr_matrix, k: int) -> float:
    """Mean over users with targets of E[recall@k] for a uniformly random ranking of their unseen items:
    ``min(k, n_cand) * |T| / n_cand / min(|T|, k)`` with ``n_cand`` = items not seen by the user."""
    n_t = np.diff(sp.csr_matrix(targets).indptr).astype(np.float64)
    n_cand = targets.shape[1] - np.diff(sp.csr_matrix(seen).indptr).astype(np.float64)
    users = n_t > 0
    if not users.any():
        return float("nan")
    nc = np.maximum(n_cand[users], 1.0)
    per_user = np.minimum(k, nc) * n_t[users] / nc / np.minimum(n_t[users], k)
    return float(per_user.mean())


def _pick(metrics: dict[str, float], ks: Sequence[int]) -> dict[str, float]:
    keep = [f"{m}_at_{k}" for k in ks for m in ("recall", "ndcg", "hit_rate")] + ["n_users_evaluated"]
    return {k: round(float(metrics[k]), 5) for k in keep if k in metrics}


def cold_start_report(
    cfg: PipelineConfig,
    events: pl.DataFrame,
    item_text: pl.DataFrame,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    ks: Sequence[int] = (20,),
) -> dict[str, Any]:
    """Cold-item and new-user metrics of two-tower against popularity and random (module docstring).

    Args:
        cfg: the pipeline config (split, ingest and ``models.two_tower`` slices are used).
        events: clean events as ingest writes them (``user_id``, ``item_id``, ``ts``, ``weight``).
        item_text: ``item_id``, ``text`` for every item of the log.
        holdout_fraction: share of the fit period's items (with text) held out of training.
        ks: cut-offs.

    Returns:
        ``{"counts": ..., "cold_items_full_catalog": {model: metrics}, "cold_items_only": ...,
        "new_users": ..., "two_tower_info": ...}``.
    """
    from recsys_embed.data.interactions import build_interactions
    from recsys_embed.data.split import build_targets, split_events
    from recsys_embed.models.two_tower.encoder import TwoTowerEncoder
    from recsys_embed.models.two_tower.train import train_two_tower

    parts = split_events(events, cfg.split)
    fit_items = parts.fit.select(pl.col("item_id").unique().sort())["item_id"]
    with_text = item_text.filter(pl.col("text").is_not_null())["item_id"].cast(fit_items.dtype, strict=False)
    candidates = fit_items.filter(fit_items.is_in(with_text.implode()))
    rng = np.random.default_rng(seed)
    n_hold = round(holdout_fraction * fit_items.len())
    held = candidates.gather(np.sort(rng.choice(candidates.len(), n_hold, replace=False)))
    fit = parts.fit.filter(~pl.col("item_id").is_in(held.implode()))
    train = build_interactions(fit, cfg.ingest, _report(fit.height))
    val = build_targets(parts.val, train, _report(parts.val.height), "val").matrix if parts.val.height else None

    artifacts = cfg.models.two_tower.artifact_dir or tempfile.mkdtemp(prefix="recsys-cold-start-")
    tt_cfg = cfg.models.two_tower.model_copy(update={"artifact_dir": artifacts})
    emb = train_two_tower(train, tt_cfg, val, ks, item_text=item_text)
    enc = TwoTowerEncoder.load(emb.info["artifact_dir"])
    held_frame = pl.DataFrame({"item_id": held}).join(
        item_text.with_columns(pl.col("item_id").cast(held.dtype, strict=False)), on="item_id", how="left"
    )
    held_vec = enc.item_vectors(held_frame)

    n_users, n_train_items = train.shape
    ext_items = IdMap(pl.concat([train.items.ids, held.rename(train.items.ids.name)]).rename("id"))
    n_ext = len(ext_items)
    seen_ext = sp.csr_matrix(sp.hstack([train.matrix, sp.csr_matrix((n_users, n_hold), dtype=np.float32)]))
    train_ext = Interactions(seen_ext, train.users, ext_items, train.report, train.events)
    test = build_targets(parts.test, train_ext, _report(parts.test.height), "test").matrix
    cold_cols = np.zeros(n_ext, dtype=np.float32)
    cold_cols[n_train_items:] = 1.0
    cold_targets = sp.csr_matrix(test @ sp.diags(cold_cols))
    cold_targets.eliminate_zeros()

    item_vec_ext = np.vstack([emb.item_vectors, held_vec])
    pop = np.concatenate([item_popularity(train.matrix), np.zeros(n_hold, dtype=np.int64)]).astype(np.float32)
    kmax = max(ks)

    def score(
        users: IdMap, items: IdMap, u: np.ndarray, i: np.ndarray, seen: sp.csr_matrix, t: sp.csr_matrix
    ) -> dict[str, float]:
        return _pick(evaluate(Embeddings(u, i, users, items, "model"), seen, t, ks), ks)

    ones = np.ones((n_users, 1), dtype=np.float32)
    full = {
        "two_tower": score(train.users, ext_items, emb.user_vectors, item_vec_ext, seen_ext, cold_targets),
        "popularity": score(train.users, ext_items, ones, pop[:, None], seen_ext, cold_targets),
        f"random_recall_at_{kmax}": round(expected_random_recall(cold_targets, seen_ext, kmax), 5),
    }
    held_map = IdMap(held.rename("id"))
    only_targets = sp.csr_matrix(cold_targets[:, n_train_items:])
    no_seen = sp.csr_matrix(only_targets.shape, dtype=np.float32)
    only = {
        "two_tower": score(train.users, held_map, emb.user_vectors, held_vec, no_seen, only_targets),
        "popularity": score(train.users, held_map, ones, np.zeros((n_hold, 1), np.float32), no_seen, only_targets),
        f"random_recall_at_{kmax}": round(expected_random_recall(only_targets, no_seen, kmax), 5),
    }

    # new users: first seen after the fit period (validation or test); first visit = history, later = targets
    after = pl.concat([parts.val, parts.test]).filter(pl.col("weight") > 0)
    after = after.with_columns(pl.col("user_id").cast(train.users.dtype))
    new = after.filter(~pl.col("user_id").is_in(train.users.ids.implode()))
    new = new.with_columns((pl.col("ts") == pl.col("ts").min().over("user_id")).alias("first"))
    history = new.filter(pl.col("first"))
    later = new.filter(~pl.col("first")).with_columns(pl.col("item_id").cast(ext_items.dtype, strict=False))
    later = later.join(history.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
    later = later.filter(pl.col("item_id").is_in(ext_items.ids.implode()))
    users_map = IdMap(later["user_id"].unique().sort())
    history = history.filter(pl.col("user_id").is_in(users_map.ids.implode()))
    ids, u_vec = enc.user_vectors(history, ts_column="ts", weight_column="weight", new_items=held_frame)
    order = users_map.lookup(ids).to_numpy()
    user_vec = np.zeros((len(users_map), u_vec.shape[1]), dtype=np.float32)
    user_vec[order] = u_vec

    def _csr(frame: pl.DataFrame) -> sp.csr_matrix:
        r = users_map.lookup(frame["user_id"]).fill_null(-1).to_numpy()
        c = ext_items.lookup(frame["item_id"].cast(ext_items.dtype, strict=False)).fill_null(-1).to_numpy()
        ok = (r >= 0) & (c >= 0)
        m = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (r[ok], c[ok])), shape=(len(users_map), n_ext))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    new_seen, new_targets = _csr(history), _csr(later)
    new_ones = np.ones((len(users_map), 1), dtype=np.float32)
    new_users = {
        "two_tower": score(users_map, ext_items, user_vec, item_vec_ext, new_seen, new_targets),
        "popularity": score(users_map, ext_items, new_ones, pop[:, None], new_seen, new_targets),
        f"random_recall_at_{kmax}": round(expected_random_recall(new_targets, new_seen, kmax), 5),
    }
    counts = {
        "train_users": n_users,
        "train_items": n_train_items,
        "held_out_items": n_hold,
        "users_with_cold_item_targets": int((np.diff(cold_targets.indptr) > 0).sum()),
        "cold_item_target_pairs": int(cold_targets.nnz),
        "new_users": len(users_map),
        "new_user_history_items_mean": round(float(np.diff(new_seen.indptr).mean()), 2) if len(users_map) else 0.0,
        "new_user_target_pairs": int(new_targets.nnz),
    }
    info = {k: v for k, v in emb.info.items() if k in ("epochs_run", "best_epoch", "best_val_metric", "fit_seconds")}
    return {
        "counts": counts,
        "cold_items_full_catalog": full,
        "cold_items_only": only,
        "new_users": new_users,
        "two_tower_info": info,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m recsys_embed.bench.cold_start``: ingest (cached) -> ``cold_start_report`` -> JSON."""
    from recsys_embed.config import load_config
    from recsys_embed.pipeline import stages

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/retail.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results/cold_start.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    ingest = stages.run_ingest(cfg.ingest, Path(cfg.output_root) / cfg.name / "cache")
    if not (item_text := ingest.get("item_text")):
        raise SystemExit("the log has no item text (ingest.columns.item_text); cold items cannot be embedded")
    events = pl.read_parquet(ingest["events"])
    text = pl.read_parquet(item_text)
    report = cold_start_report(cfg, events, text, args.holdout, args.seed, cfg.eval.ks)
    from recsys_embed.io import write_json_atomic

    write_json_atomic(report, args.out)
    log.info("cold start report (%s):\n%s", args.out, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
