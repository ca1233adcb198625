"""Ingest benchmark: the pipeline's log -> CSR + ID maps against bare pandas on the same synthetic files.

- Candidate ("recsys-embed"): ``ingest.load_events(cfg)`` then ``interactions.build_interactions``; it also
  validates, accounts for every row, and keeps the event table for the split.
- Baseline ("pandas"): ``pd.read_parquet`` (pyarrow; event type read as a Categorical) of the same folder and
  columns, ``pd.factorize`` users and items, event weights via ``Series.map``,
  ``scipy.sparse.coo_matrix((w, (u, i))).tocsr()`` (duplicates summed).

Both produce a float32 CSR (users x items) plus the user and item ID arrays; the suite checks once, outside
the timings, that the two matrices agree entry by entry after mapping both back to the original IDs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_embed.bench.harness import BenchResult, Measurement, alternate
from recsys_embed.bench.memory import peak_memory
from recsys_embed.config import ColumnMap, IngestConfig, SourceConfig
from recsys_embed.data.generate import PRESETS, generate, read_spec

log = logging.getLogger(__name__)

EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "cart": 3.0, "purchase": 5.0}
COLUMNS = ["user_id", "item_id", "timestamp", "event_type"]
TARGET = "<= 1.5x (issue 2), <= 1.0x (issue 6)"


def ensure_data(size: str, data_dir: Path = Path("data/synthetic")) -> Path:
    """The generated table for preset ``size`` under ``data_dir/<size>``, generating it if missing or stale."""
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(PRESETS)}")
    folder = Path(data_dir) / size
    spec = PRESETS[size]
    if read_spec(folder) != spec.to_dict():
        log.info("ingest bench: generating preset %r into %s", size, folder)
        generate(spec, folder)
    return folder


def ingest_config(folder: Path) -> IngestConfig:
    """The ingest slice both sides are held to: the four columns, weights view 1 / cart 3 / purchase 5, no k-core."""
    return IngestConfig(
        source=SourceConfig(path=str(folder), format="parquet", hive_partitioning=True),
        columns=ColumnMap(user="user_id", item="item_id", timestamp="timestamp", event_type="event_type"),
        timestamp_unit="s",
        event_weights=dict(EVENT_WEIGHTS),
        min_user_interactions=1,
        min_item_interactions=1,
    )


def candidate(cfg: IngestConfig) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The pipeline's ingest: (CSR users x items float32, user IDs, item IDs) with row ``u`` = ``user_ids[u]``."""
    from recsys_embed.data.ingest import load_events
    from recsys_embed.data.interactions import build_interactions

    ev = load_events(cfg)
    inter = build_interactions(ev.events, cfg, ev.report)
    return inter.matrix, inter.users.ids.to_numpy(), inter.items.ids.to_numpy()


def baseline(folder: Path, weights: dict[str, float]) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Bare pandas + scipy: (CSR users x items float32, user IDs, item IDs); duplicate (user, item) pairs summed."""
    # read_dictionary: the low-cardinality event type arrives as a Categorical, the idiomatic pandas choice; as
    # plain strings, ``Series.map`` alone takes ~12 s at 20M rows and the baseline would be a straw man.
    df = pd.read_parquet(folder, columns=COLUMNS, engine="pyarrow", read_dictionary=["event_type"])
    u, user_ids = pd.factorize(df["user_id"])
    i, item_ids = pd.factorize(df["item_id"])
    w = df["event_type"].map(weights).to_numpy(dtype=np.float32)
    m = sp.coo_matrix((w, (u, i)), shape=(len(user_ids), len(item_ids))).tocsr()
    return m, np.asarray(user_ids), np.asarray(item_ids)


def _summary(out: tuple[sp.csr_matrix, np.ndarray, np.ndarray]) -> dict[str, Any]:
    m = out[0]
    return {"shape": [int(m.shape[0]), int(m.shape[1])], "nnz": int(m.nnz), "sum": float(m.sum())}


def candidate_summary(cfg: IngestConfig) -> dict[str, Any]:
    """Run the candidate and return only its size (for the isolated peak-memory run)."""
    return _summary(candidate(cfg))


def baseline_summary(folder: Path, weights: dict[str, float]) -> dict[str, Any]:
    """Run the baseline and return only its size (for the isolated peak-memory run)."""
    return _summary(baseline(folder, weights))


def same_output(
    a: tuple[sp.csr_matrix, np.ndarray, np.ndarray], b: tuple[sp.csr_matrix, np.ndarray, np.ndarray]
) -> bool:
    """True when both (CSR, user IDs, item IDs) hold the same entries keyed by original IDs (float32 tolerance)."""
    (ma, ua, ia), (mb, ub, ib) = a, b
    if ma.shape != mb.shape or ma.nnz != mb.nnz:
        return False
    ru, ci = np.argsort(ua), np.argsort(ia)
    rb, cb = np.argsort(ub), np.argsort(ib)
    if not (np.array_equal(ua[ru], ub[rb]) and np.array_equal(ia[ci], ib[cb])):
        return False
    pa = ma[ru][:, ci].tocsr()
    pb = mb[rb][:, cb].tocsr()
    diff = abs(pa - pb)
    return bool(diff.nnz == 0 or diff.max() <= 1e-4 * max(float(abs(pb).max()), 1.0))


def run(
    size: str = "20m", repeats: int = 3, data_dir: Path = Path("data/synthetic"), measure_memory: bool = True
) -> list[BenchResult]:
    """Time the pipeline's ingest against bare pandas on preset ``size`` (generated and cached if missing).

    One untimed warm-up of each side also checks that both produce the same matrix. Peak RSS of each side is
    measured in its own fresh process (``extra``) unless ``measure_memory`` is False.
    """
    folder = ensure_data(size, data_dir)
    cfg = ingest_config(folder)
    weights = dict(EVENT_WEIGHTS)

    cand_out = candidate(cfg)
    base_out = baseline(folder, weights)
    match = same_output(cand_out, base_out)
    extra: dict[str, Any] = {
        "rows": int(PRESETS[size].n_events),
        "shape": list(cand_out[0].shape),
        "nnz": int(cand_out[0].nnz),
        "outputs_match": match,
    }
    if not match:
        log.warning("ingest bench: candidate and baseline matrices differ (%s vs %s)", _summary(cand_out),
                    _summary(base_out))
    del cand_out, base_out

    c, b = alternate(lambda: candidate(cfg), lambda: baseline(folder, weights), repeats)
    if measure_memory:
        extra["peak_rss_mb_candidate"] = round(peak_memory(candidate_summary, cfg).peak_mb, 1)
        extra["peak_rss_mb_baseline"] = round(peak_memory(baseline_summary, folder, weights).peak_mb, 1)
    result = BenchResult(
        suite="ingest",
        size=size,
        candidate=Measurement("recsys-embed", c),
        baseline=Measurement("pandas", b),
        target=TARGET,
        extra=extra,
    )
    log.info("ingest bench %s: candidate %.3f s, pandas %.3f s, ratio %.2fx", size, result.candidate.median,
             result.baseline.median, result.ratio)
    return [result]
