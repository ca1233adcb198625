"""Figures for the MLflow run page. Pure: each returns a matplotlib ``Figure``; tracking logs it."""

from __future__ import annotations

import itertools
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

            n = min(X.shape)  # svds starts from a vector of the smaller side (EASE past 5,000 items: sampled rows)
            _, s, vt = svds(X.astype(np.float64), k=2, v0=np.full(n, n**-0.5))
            vt = vt[np.argsort(-s)]  # measured: 1.3 s instead of 93 s at 3.5k x 3.5k on a busy 2-core box
        else:
            _, _, vt = np.linalg.svd(X, full_matrices=False)
        P = X @ vt[:2].T
        sc = ax.scatter(P[:, 0], P[:, 1], c=np.log1p(item_popularity[idx]), s=4, cmap="viridis", alpha=0.7)
        fig.colorbar(sc, ax=ax, label="log(1 + popularity)")
    ax.set_title(f"{model}: item embeddings (PCA)")
    fig.tight_layout()
    return fig


_STEP_KEYS = ("iteration", "epoch", "step")
# Not curves of quality: wall time and counts would flatten every [0, 1] metric sharing their axis.
_NOT_PLOTTED = ("seconds", "n_users_evaluated", "n_users", "samples")
_VAL_SHOWN = ("val_recall_at_", "val_ndcg_at_")


def _series(history: list[dict[str, Any]], key: str, step_key: str) -> tuple[list[float], list[float]]:
    pts = [(float(h.get(step_key, i + 1)), float(h[key])) for i, h in enumerate(history)
           if h.get(key) is not None and np.isfinite(h[key])]  # fmt: skip
    return ([x for x, _ in pts], [y for _, y in pts]) if pts else ([], [])


def _signal_label(keys: list[str]) -> str:
    """The y label of the training-signal panel, from what it holds (loss, AUC, accuracy)."""
    names = {k.removeprefix("train_").replace("_", " ") for k in keys}
    if names == {"auc"}:
        return "train AUC (sampled pairs ranked right)"
    if names == {"loss"}:
        return "train loss"
    return "training signal"


def training_curves(history: list[dict[str, Any]], model: str) -> Figure:
    """Training signal and validation metrics per iteration/epoch, on two panels with their own axes.

    Left: ``train_*`` keys (ALS loss, BPR sampled AUC, two-tower loss), labelled by what they are. Right: the
    validation recall and NDCG at each k (in [0, 1]); wall time, counts and the other validation metrics are left
    out (MLflow charts every logged metric). Every series has its own colour and the legends sit below the panels,
    never over the curves or the axis labels.
    """
    step_key = next((k for k in _STEP_KEYS if history and k in history[0]), "iteration")
    keys = sorted({k for h in history for k in h if k not in _STEP_KEYS})
    keys = [k for k in keys if not k.endswith(_NOT_PLOTTED)]
    train_keys = [k for k in keys if not k.startswith("val_")]
    # the ranking metrics that select the best iteration; the rest (map, mrr, coverage, ...) stay in MLflow's charts
    val_keys = [k for k in keys if k.startswith(_VAL_SHOWN)]
    panels = [p for p in ((train_keys, _signal_label(train_keys)), (val_keys, "validation metric")) if p[0]]
    # constrained layout makes room for the legends below the panels (tight_layout would let them cover the labels)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.2), squeeze=False,
                             layout="constrained")  # fmt: skip
    # a distinct colour per series across both panels (tab10's ten, then Dark2's eight)
    colours = itertools.cycle([plt.get_cmap(c)(i) for c, n in (("tab10", 10), ("Dark2", 8)) for i in range(n)])
    for ax, (group, label) in zip(axes[0], panels, strict=False):
        for k in group:
            xs, ys = _series(history, k, step_key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=4, label=k, color=next(colours), lw=1.6)
        ax.set_xlabel(step_key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no training history", ha="center", va="center")
    fig.suptitle(f"{model}: training")
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
