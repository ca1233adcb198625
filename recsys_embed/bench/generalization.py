"""Generalization suite: ``init`` then ``run`` on logs of several shapes, as a new user would, each shipped table
scored on a part of the log held out before ``init`` saw it, beside two references trained on the same part.

Logs (``LOGS``; each one's file is a public log kept out of git, or generated):

- ``ratings``: MovieLens latest-small (``ratings.csv``: userId, movieId, rating, timestamp), one global clock over
  22 years; its last 10% of time holds fewer than 300 users. Held out: each user's last 20% of ratings by time.
- ``pairs``: the ``1m`` preset of ``recsys-embed generate`` (planted tastes) written as ``user,item`` pairs with no
  time. Held out: a seeded 20% of each user's rows.
- ``counts``: the HetRec 2011 last.fm log (``user_artists.dat``: userID, artistID, weight = plays). Held out: a
  seeded 20% of each user's artists.
- ``retail``: the shipped UCI Online Retail log; held out: everything in the last 60 days (the backtest's cut).

For each log: the kept part is written as a file in the log's own format and columns; ``recsys-embed init`` writes
a config for it and ``recsys-embed run`` runs that config unchanged, in a fresh process (its own Prefect server,
MLflow on SQLite in the work folder). The best shipped top-k table is scored against the held-out part by the
backtest's code (``backtest.build_truth`` / ``score_table``: a warm user's held-out positives on items new to that
user; a user without rows scores 0). References, trained on the same kept part:

- ``implicit ALS``: ``backtest.hand_glued_als_table``: library defaults on the binary matrix; on the count log
  also on BM25-weighted plays (``implicit ALS bm25``), as implicit's last.fm example does;
- ``EASE (optimistic)``: EASE on the binary matrix with lambda chosen *on the held-out part itself* from a log grid
  (a bound no honest pipeline can read, so >= 0.95x of it is the target).

Nothing here asserts: it prints measured ratios side by side and writes JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.evaluation import backtest
from recsys_embed.io import read_table
from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

K = 20
SEED = 42
HOLDOUT = 0.2
EXTERNAL = Path("data/external")
# lambda grid of the optimistic EASE: four decades, then a half-decade either side of the best
LAMBDAS = (10.0, 100.0, 1_000.0, 10_000.0)


@dataclass
class Prepared:
    """One log cut in two: the file ``init`` and ``run`` see, and both sides as ``user_id, item_id, weight``."""

    train_file: Path
    before: pl.DataFrame
    after: pl.DataFrame
    counts: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _per_user_holdout(frame: pl.DataFrame, user: str, order: str | None, seed: int) -> pl.Series:
    """True for the rows held out: each user's last ``floor(HOLDOUT x rows)`` rows by ``order`` (ties by row
    order), or a seeded random such share when ``order`` is None; every user keeps at least one row."""
    n = frame.height
    key = frame[order].cast(pl.Int64).to_numpy() if order else np.random.default_rng(seed).permutation(n)
    ranked = (
        pl.DataFrame({"u": frame[user], "k": key, "row": np.arange(n)})
        .sort("u", "k", "row")
        .with_columns(pl.int_range(pl.len()).over("u").alias("i"), pl.len().over("u").alias("n"))
        .with_columns(((pl.col("i") >= pl.col("n") - (pl.col("n") * HOLDOUT).floor()) & (pl.col("n") > 1))
                      .alias("held"))
        .sort("row")
    )
    return ranked["held"]


def _sides(frame: pl.DataFrame, held: pl.Series, user: str, item: str, weight: pl.Expr) -> tuple[Any, Any]:
    norm = frame.select(
        pl.col(user).cast(pl.String).alias("user_id"), pl.col(item).cast(pl.String).alias("item_id"),
        weight.cast(pl.Float64).alias("weight"),
    )  # fmt: skip
    return norm.filter(~held), norm.filter(held)


def prepare_ratings(src: Path, work: Path) -> Prepared:
    raw = pl.read_csv(src, infer_schema_length=0)
    held = _per_user_holdout(raw.with_columns(pl.col("timestamp").cast(pl.Int64)), "userId", "timestamp", SEED)
    out = work / "ratings.csv"
    raw.filter(~held).write_csv(out)
    before, after = _sides(raw, held, "userId", "movieId", pl.lit(1.0))
    ts = raw["timestamp"].cast(pl.Int64).to_numpy()
    last10 = raw.filter(pl.Series(ts >= ts.min() + 0.9 * (ts.max() - ts.min())))["userId"].n_unique()
    return Prepared(out, before, after, info={"users_in_last_10pct_of_time": last10})


def prepare_pairs(src: Path, work: Path) -> Prepared:
    if not (src / "_SUCCESS").exists():
        from recsys_embed.data.generate import generate, preset

        generate(preset("1m"), src)
    raw = pl.read_parquet(src / "**/*.parquet", hive_partitioning=True).select(
        pl.col("user_id").alias("user"), pl.col("item_id").alias("item")
    )
    held = _per_user_holdout(raw, "user", None, SEED)
    out = work / "pairs.csv"
    raw.filter(~held).write_csv(out)
    before, after = _sides(raw, held, "user", "item", pl.lit(1.0))
    return Prepared(out, before, after)


def prepare_counts(src: Path, work: Path) -> Prepared:
    raw = pl.read_csv(src, separator="\t", infer_schema_length=0)
    held = _per_user_holdout(raw, "userID", None, SEED)
    out = work / "user_artists.tsv"
    raw.filter(~held).write_csv(out, separator="\t")
    before, after = _sides(raw, held, "userID", "artistID", pl.col("weight").cast(pl.Float64))
    return Prepared(out, before, after, counts=True)


def prepare_retail(src: Path, work: Path) -> Prepared:
    raw = pl.read_parquet(src)
    ts = raw["timestamp"]
    cut = ts.max() - 60 * 86_400  # type: ignore[operator]
    held = (ts >= cut).fill_null(False)
    out = work / "retail.parquet"
    raw.filter(~held).write_parquet(out)
    weight = pl.when(pl.col("event_type") == "cancellation").then(-1.0).otherwise(1.0)
    keep = raw["user_id"].is_not_null()
    before, after = _sides(raw.filter(keep), held.filter(keep), "user_id", "item_id", weight)
    return Prepared(out, before, after, info={"cutoff_epoch_s": int(cut)})


LOGS: dict[str, tuple[Callable[[Path, Path], Prepared], Path]] = {
    "ratings": (prepare_ratings, EXTERNAL / "ml-latest-small" / "ratings.csv"),
    "pairs": (prepare_pairs, Path("data/synthetic/1m")),
    "counts": (prepare_counts, EXTERNAL / "hetrec2011-lastfm-2k" / "user_artists.dat"),
    "retail": (prepare_retail, Path("data/online-retail/events.parquet")),
}


# ----------------------------------------------------------------------------------------------------------
# References


def _binary(before: pl.DataFrame) -> tuple[sp.csr_matrix, IdMap, IdMap]:
    pairs = before.filter(pl.col("weight") > 0).select("user_id", "item_id").unique()
    users, items = IdMap.from_ids(pairs["user_id"]), IdMap.from_ids(pairs["item_id"])
    u, i = users.lookup(pairs["user_id"]).to_numpy(), items.lookup(pairs["item_id"]).to_numpy()
    return sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items))), users, items


def optimistic_ease(before: pl.DataFrame, truth: backtest.Truth) -> tuple[float, dict[str, float], float]:
    """EASE on the binary kept part with lambda picked on the held-out truth: (best lambda, its metrics, seconds)."""
    from recsys_embed.evaluation.topk import topk
    from recsys_embed.models import ease

    t0 = time.perf_counter()
    x, users, items = _binary(before)
    g = ease.gram(x)
    rows = users.lookup(truth.users.cast(users.dtype)).drop_nulls().to_numpy()
    asked = users.decode(rows)
    dense = x[rows].toarray()
    seen = sp.csr_matrix(x[rows])

    def score(lam: float) -> dict[str, float]:
        b = ease.weights(g, lam)
        emb = Embeddings(dense, np.ascontiguousarray(b.T), IdMap(asked.rename("id")), items, "ease")
        top = topk(emb, K, seen=seen)
        flat = top.items.ravel()
        table = pl.DataFrame({
            "user_id": asked.gather(np.repeat(np.arange(len(rows)), top.items.shape[1])),
            "rank": np.tile(np.arange(1, top.items.shape[1] + 1), len(rows)),
            "item_id": items.decode(np.maximum(flat, 0)).scatter(np.flatnonzero(flat < 0), None),
        }).drop_nulls()  # fmt: skip
        return backtest.score_table(table, truth, [K])

    tried: dict[float, dict[str, float]] = {lam: score(lam) for lam in LAMBDAS}
    best = max(tried, key=lambda lam: tried[lam][f"ndcg_at_{K}"])
    for lam in (best / 10**0.5, best * 10**0.5):
        tried[lam] = score(lam)
    best = max(tried, key=lambda lam: tried[lam][f"ndcg_at_{K}"])
    return best, tried[best], round(time.perf_counter() - t0, 1)


# ----------------------------------------------------------------------------------------------------------
# init + run, as a user would


def _cli(args: list[str], cwd: Path, out: Path) -> float:
    """Run ``recsys-embed ARGS`` in a fresh process in ``cwd``; its output goes to ``out``; wall seconds."""
    exe = Path(sys.executable).with_name("recsys-embed")
    t0 = time.perf_counter()
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ recsys-embed {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([str(exe), *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"recsys-embed {' '.join(args)} exited {proc.returncode}; see {out}")
    return round(time.perf_counter() - t0, 1)


def run_log(name: str, work_root: Path) -> dict[str, Any]:
    """Prepare, init, run, score one log; its row of the table."""
    prep_fn, src = LOGS[name]
    if name not in ("pairs",) and not src.exists():
        raise SystemExit(f"generalization: the {name} log '{src}' is missing; see docs/generalization.md")
    work = (work_root / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = prep_fn(src, work)
    pipeline = f"gen-{name}"
    cli_log = work / "cli.log"
    cli_log.write_text("", encoding="utf-8")
    t_init = _cli(["init", str(prep.train_file), "--name", pipeline, "--config-dir", "configs", "--force"], work,
                  cli_log)  # fmt: skip
    t_run = _cli(["-q", "run", "--config", f"configs/{pipeline}.yaml"], work, cli_log)
    latest = json.loads((work / "outputs" / pipeline / "latest.json").read_text(encoding="utf-8"))
    manifest = json.loads((Path(latest["run_dir"]) / "summary.json").read_text(encoding="utf-8"))
    best = manifest["best_model"]
    truth = backtest.build_truth(prep.before, prep.after)
    shipped = backtest.score_table(read_table(manifest["exports"][best]["topk"]), truth, [K])
    refs: dict[str, dict[str, float]] = {
        "implicit ALS": backtest.score_table(backtest.hand_glued_als_table(prep.before, truth.users, K, SEED),
                                             truth, [K]),
    }
    if prep.counts:
        refs["implicit ALS bm25"] = backtest.score_table(
            backtest.hand_glued_als_table(prep.before, truth.users, K, SEED, bm25=True), truth, [K]
        )
    lam, ease_metrics, ease_s = optimistic_ease(prep.before, truth)
    refs["EASE (optimistic)"] = ease_metrics
    row = {
        "log": name,
        "rows": prep.before.height + prep.after.height,
        "kept_rows": prep.before.height,
        "warm_users": truth.info["warm_users"],
        "target_pairs": truth.info["target_pairs"],
        "split": manifest["split"].get("rule", manifest["split"].get("method")),
        "shipped_model": best,
        "selection": manifest["selection"]["reason"],
        "shipped": shipped,
        "references": refs,
        "ease_lambda": lam,
        "ease_seconds": ease_s,
        "init_s": t_init,
        "run_s": t_run,
        "run_timing": manifest.get("timing"),
        "tuned": {m: r.get("params") for m, r in ((manifest.get("tuning") or {}).get("models") or {}).items()},
        **prep.info,
    }
    log.info("generalization %s: %s", name, row)
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The markdown table: the shipped table's NDCG@K / Recall@K and its ratio to each reference."""
    head = ("| log | rows | warm users | split | shipped | NDCG@20 | Recall@20 | vs implicit ALS (NDCG / Recall) "
            "| vs optimistic EASE (NDCG / Recall) | init + run s |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        s = r["shipped"]

        def ratio(ref: str, r: dict[str, Any] = r, s: dict[str, float] = s) -> str:
            m = r["references"][ref]
            return f"{s[f'ndcg_at_{K}'] / m[f'ndcg_at_{K}']:.2f}x / {s[f'recall_at_{K}'] / m[f'recall_at_{K}']:.2f}x"

        als = ratio("implicit ALS") + (f" (bm25: {ratio('implicit ALS bm25')})" if "implicit ALS bm25" in
                                       r["references"] else "")  # fmt: skip
        lines.append(
            f"| {r['log']} | {r['rows']:,} | {r['warm_users']:,} | {str(r['split']).split(' (')[0]} | "
            f"{r['shipped_model']} | {s[f'ndcg_at_{K}']:.4f} | {s[f'recall_at_{K}']:.4f} | {als} | "
            f"{ratio('EASE (optimistic)')} (λ {r['ease_lambda']:.3g}) | {r['init_s'] + r['run_s']:.0f} |"
        )
    return "\n".join(lines)


def main(logs: list[str], work_root: str, json_path: str | None) -> int:
    unknown = [n for n in logs if n not in LOGS]
    if unknown:
        raise SystemExit(f"unknown log(s) {unknown}; choose from {sorted(LOGS)}")
    rows = []
    for name in logs:
        rows.append(run_log(name, Path(work_root)))
        print(format_rows(rows[-1:]), flush=True)
    from recsys_embed.bench.harness import machine

    m = machine()
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB")
    print(format_rows(rows))
    if json_path:
        from recsys_embed.io import write_json_atomic

        print(f"results written to {write_json_atomic({'machine': m, 'rows': rows}, json_path)}")
    return 0
