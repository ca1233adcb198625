"""Figures for the MLflow run page. Pure: each returns a matplotlib ``Figure``; tracking logs it."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.figure import Figure


def metric_comparison(table: pl.DataFrame, metrics: list[str]) -> Figure:
    """Grouped bars: one group per metric, one bar per model (``table`` has a ``model`` column)."""
    metrics = [m for m in metrics if m in table.columns]
    models = table["model"].to_list()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(metrics) + 2), 4))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for j, model in enumerate(models):
        row = table.filter(pl.col("model") == model)
        vals = [float(row[m][0]) for m in metrics]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=model)
    ax.set_xticks(x, metrics, rotation=20, ha="right")
    ax.set_ylabel("test metric")
    ax.set_title("Models on the same split")
    ax.legend()
    fig.tight_layout()
    return fig


def popularity_bias(rec_counts: np.ndarray, item_popularity: np.ndarray, model: str) -> Figure:
    """How often each item is recommended against its train popularity (log-log); a diagonal = pop bias."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    mask = item_popularity > 0
    ax.scatter(item_popularity[mask], rec_counts[mask] + 1, s=4, alpha=0.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("item popularity in train (users)")
    ax.set_ylabel("times recommended + 1")
    ax.set_title(f"{model}: recommendation frequency vs popularity")
    fig.tight_layout()
    return fig


def item_projection(
    item_vectors: np.ndarray, item_popularity: np.ndarray, model: str, max_points: int = 5000
) -> Figure:
    """2-D PCA of item embeddings, coloured by log popularity (deterministic subsample when large)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    X = item_vectors
    idx = np.arange(X.shape[0])
    if X.shape[0] > max_points:
        idx = np.random.default_rng(0).choice(X.shape[0], max_points, replace=False)
    X = X[idx] - X[idx].mean(axis=0)
    if X.shape[1] >= 2 and X.shape[0] >= 2:
        if min(X.shape) > 256:  # wide vectors (EASE: one column per item): the top 2 directions only, not a full SVD
            from scipy.sparse.linalg import svds

            _, s, vt = svds(X.astype(np.float64), k=2, v0=np.full(X.shape[1], X.shape[1] ** -0.5))
            vt = vt[np.argsort(-s)]  # measured: 1.3 s instead of 93 s at 3.5k x 3.5k on a busy 2-core box
        else:
            _, _, vt = np.linalg.svd(X, full_matrices=False)
        P = X @ vt[:2].T
        sc = ax.scatter(P[:, 0], P[:, 1], c=np.log1p(item_popularity[idx]), s=4, cmap="viridis", alpha=0.7)
        fig.colorbar(sc, ax=ax, label="log(1 + popularity)")
    ax.set_title(f"{model}: item embeddings (PCA)")
    fig.tight_layout()
    return fig


def training_curves(history: list[dict[str, Any]], model: str) -> Figure:
    """Loss and validation metrics per iteration/epoch."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    keys = sorted({k for h in history for k in h if k not in ("iteration", "epoch", "step")})
    step_key = "iteration" if history and "iteration" in history[0] else "epoch"
    ax2 = None
    for k in keys:
        pts = [(h.get(step_key, i), h[k]) for i, h in enumerate(history) if k in h and h[k] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        if "loss" in k or k.startswith("train_"):
            ax.plot(xs, ys, label=k, color="tab:red")
        else:
            ax2 = ax2 or ax.twinx()
            ax2.plot(xs, ys, marker="o", label=k)
    ax.set_xlabel(step_key)
    ax.set_ylabel("loss")
    if ax2 is not None:
        ax2.set_ylabel("validation metric")
        ax2.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(f"{model}: training")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
