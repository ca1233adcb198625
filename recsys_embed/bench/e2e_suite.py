"""End-to-end benchmark: log files -> top-k Parquet through the pipeline's stages against a hand-glued script.

- Candidate ("pipeline"): ``stages.run_ingest`` (validation, row accounting, dedup; a fresh cache folder every
  run, so nothing is reused) -> ``stages.run_split`` (temporal cutoff, train matrix, ID maps and test targets
  on disk) -> ``stages.run_train("als")`` -> ``export.export_topk`` (chunked scorer, seen items excluded,
  committed table with ``_SUCCESS``).
- Baseline ("hand-glued"): ``pd.read_parquet`` -> keep rows before the cutoff -> ``pd.factorize`` users and
  items -> ``scipy.sparse`` CSR (event weights summed per pair) -> implicit ALS ``fit`` -> implicit
  ``recommend`` for all users (seen items filtered, BLAS pinned to one thread as implicit asks) -> one
  ``DataFrame.to_parquet``.

Both sides read the same generated log (``data/synthetic/<size>``), hold out the same days (the last 20% of
the log's days), and fit the same ALS (factors, iterations, regularization, alpha, seed; no per-iteration loss
or validation on either side). They factorize IDs in sorted order, so the matrices are identical and so are the
fitted factors; one untimed run checks that both wrote the same top-k scores.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_embed.bench.harness import BenchResult, Measurement, alternate
from recsys_embed.bench.ingest_suite import COLUMNS, EVENT_WEIGHTS, ensure_data, ingest_config
from recsys_embed.bench.topk_suite import _cpu_timed
from recsys_embed.config import ALSConfig, EvalConfig, ExportConfig, IngestConfig, ModelsConfig, SplitConfig
from recsys_embed.data.generate import PRESETS
from recsys_embed.models.mf import use_gpu_backend

log = logging.getLogger(__name__)

TARGET = "reported (no target set)"
TEST_SHARE = 0.2  # the last 20% of the log's days are held out, as configs/synthetic.yaml does


def cutoff_of(size: str) -> datetime:
    """The first held-out day of preset ``size`` (UTC midnight): both sides fit on events before it."""
    spec = PRESETS[size]
    start = spec.start if spec.start.tzinfo else spec.start.replace(tzinfo=UTC)
    return start + timedelta(days=round(spec.days * (1 - TEST_SHARE)))


class Setup:
    """Everything both sides are held to for one preset."""

    def __init__(self, size: str, factors: int, iterations: int, k: int, data_dir: Path) -> None:
        self.size = size
        self.folder = ensure_data(size, data_dir)
        self.cutoff = cutoff_of(size)
        self.ingest: IngestConfig = ingest_config(self.folder)
        self.split = SplitConfig(method="temporal", cutoff=self.cutoff, val_quantile=None)
        als = ALSConfig(factors=factors, iterations=iterations, eval_every=0, training_loss=False)
        self.models = ModelsConfig(als=als, warm_start=False)
        self.eval = EvalConfig()
        self.export = ExportConfig(k=k)
        self.gpu = use_gpu_backend(als.use_gpu, "als")


def candidate(s: Setup, work: Path) -> dict[str, Any]:
    """The pipeline's stages into ``work``; returns the top-k table's path and rows and each stage's seconds."""
    from recsys_embed.pipeline import stages
    from recsys_embed.serving.export import export_topk
    from recsys_embed.store import load_csr, load_embeddings

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ingest = stages.run_ingest(s.ingest, work / "cache")
    seconds["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    split = stages.run_split(ingest, s.ingest, s.split, work / "split")
    seconds["split"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = stages.run_train("als", split, s.models, s.eval, work / "models")
    seconds["als_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = export_topk(
        load_embeddings(model["embeddings"]), load_csr(split["train"]), s.export, work / "exports", "bench"
    )
    seconds["topk_export"] = time.perf_counter() - t0
    return {"path": res.path, "rows": res.rows, "seconds": seconds}


def baseline(s: Setup, work: Path) -> dict[str, Any]:
    """The hand-glued script into ``work``; returns the Parquet file's path and rows and each step's seconds."""
    from implicit.als import AlternatingLeastSquares

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    df = pd.read_parquet(s.folder, columns=COLUMNS, engine="pyarrow", read_dictionary=["event_type"])
    df = df[df["timestamp"] < int(s.cutoff.timestamp())]
    u, user_ids = pd.factorize(df["user_id"], sort=True)
    i, item_ids = pd.factorize(df["item_id"], sort=True)
    w = df["event_type"].map(EVENT_WEIGHTS).to_numpy(dtype=np.float32)
    m = sp.coo_matrix((w, (u, i)), shape=(len(user_ids), len(item_ids))).tocsr()
    del df, u, i, w
    seconds["read_to_csr"] = time.perf_counter() - t0
    cfg = s.models.als
    t0 = time.perf_counter()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization, alpha=cfg.alpha,
                                        iterations=cfg.iterations, use_cg=cfg.use_cg, use_gpu=s.gpu,
                                        calculate_training_loss=False, random_state=cfg.seed)  # fmt: skip
        model.fit(m, show_progress=False)
        seconds["als_fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids, scores = model.recommend(np.arange(m.shape[0]), m, N=s.export.k, filter_already_liked_items=True)
    k = ids.shape[1]
    ok = (ids >= 0).ravel() & np.isfinite(scores).ravel()
    table = pd.DataFrame(
        {
            "user_id": np.repeat(np.asarray(user_ids), k)[ok],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(user_ids))[ok],
            "item_id": np.asarray(item_ids)[ids.ravel()[ok]],
            "score": scores.ravel()[ok].astype(np.float32),
        }
    )
    work.mkdir(parents=True, exist_ok=True)
    path = work / "topk.parquet"
    table.to_parquet(path, index=False)
    seconds["recommend_and_write"] = time.perf_counter() - t0
    return {"path": str(path), "rows": len(table), "seconds": seconds}


def same_scores(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """(every user's score list agrees within float tolerance, share of (user, rank) with the same item)."""
    cols = ["user_id", "rank", "item_id", "score"]
    ours = pl.read_parquet(f"{a['path']}/*.parquet", columns=cols).sort("user_id", "rank")
    theirs = pl.read_parquet(b["path"], columns=cols).sort("user_id", "rank")
    if ours.height != theirs.height:
        return False, 0.0
    scores = np.allclose(ours["score"].to_numpy(), theirs["score"].to_numpy(), rtol=1e-3, atol=1e-4)
    same = float((ours["item_id"].to_numpy() == theirs["item_id"].to_numpy()).mean())
    return bool(scores), same


def run(
    size: str = "1m",
    repeats: int = 3,
    factors: int = 64,
    iterations: int = 15,
    k: int = 20,
    data_dir: Path = Path("data/synthetic"),
) -> list[BenchResult]:
    """Time the pipeline's stages end to end against the hand-glued script on preset ``size``, alternating.

    Every run writes into its own fresh temporary folder (removed after it). One untimed run of each side
    warms up and checks that both produce the same top-k; extras give each side's per-step medians.
    """
    s = Setup(size, factors, iterations, k, data_dir)
    steps: dict[str, dict[str, list[float]]] = {"pipeline": {}, "hand-glued": {}}

    cpu: dict[str, list[float]] = {"pipeline": [], "hand-glued": []}

    def timed(side: str, fn: Any) -> Any:
        def call() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix=f"bench-e2e-{side}-") as tmp:
                out: dict[str, Any] = fn(s, Path(tmp))
            for step, sec in out["seconds"].items():
                steps[side].setdefault(step, []).append(sec)
            return out

        return _cpu_timed(call, cpu[side])  # CPU seconds too: on a shared box they show the work, not the wait

    with tempfile.TemporaryDirectory(prefix="bench-e2e-check-") as tmp:
        a, b = candidate(s, Path(tmp) / "a"), baseline(s, Path(tmp) / "b")
        match, same_items = same_scores(a, b)
        rows = (a["rows"], b["rows"])
    if not match:
        log.warning("e2e bench: the two sides' top-k scores differ (rows %s)", rows)
    c, base = alternate(timed("pipeline", candidate), timed("hand-glued", baseline), repeats)
    result = BenchResult(
        suite="e2e",
        size=size,
        candidate=Measurement("pipeline", c),
        baseline=Measurement("hand-glued", base),
        target=TARGET,
        extra={
            "problem": f"{PRESETS[size].n_events:,} events, fit before {s.cutoff.date()}, ALS factors={factors} "
            f"iterations={iterations}, top-{k} for every train user",
            "topk_rows (pipeline, hand-glued)": list(rows),
            "scores_match": match,
            "cpu_s (median: pipeline, hand-glued)": [round(statistics.median(v), 2) for v in cpu.values()],
            "cpu_ratio": round(statistics.median(cpu["pipeline"]) / statistics.median(cpu["hand-glued"]), 3),
            "same_item_fraction": round(same_items, 6),
            **{
                f"{side} steps (s, median)": {k_: round(statistics.median(v), 3) for k_, v in d.items()}
                for side, d in steps.items()
            },
        },
    )
    log.info("e2e bench %s: pipeline %.2f s, hand-glued %.2f s (%.2fx)", size, result.candidate.median,
             result.baseline.median, result.ratio)  # fmt: skip
    return [result]
