"""One evaluation harness for every model: ranking metrics over held-out targets.

``evaluate`` is pure: it ranks with the shared scorer (``recsys_embed.evaluation.topk``), excludes train-seen
items, and returns a flat ``{metric_name: value}`` dict with MLflow-legal names (``recall_at_20``).
Something else (a flow, the tracking module) logs it.

Definitions, for a user ``u`` with target set ``T`` (``|T| >= 1``), ranked list ``r_1..r_k`` and
``hit_j = [r_j in T]``; every metric is the mean over evaluated users:

- ``recall_at_k``     = sum_j hit_j / min(|T|, k)   (so a perfect ranking scores 1 even when |T| > k)
- ``precision_at_k``  = sum_j hit_j / k
- ``ndcg_at_k``       = DCG / IDCG, DCG = sum_j hit_j / log2(j + 1), IDCG = sum_{j<=min(|T|,k)} 1 / log2(j + 1)
- ``map_at_k``        = sum_j hit_j * precision_at_j / min(|T|, k)
- ``mrr_at_k``        = 1 / (rank of the first hit), 0 without a hit in the top k
- ``hit_rate_at_k``   = 1 if any hit in the top k else 0
- ``coverage_at_k``   = distinct items recommended to the evaluated users / n_items
- ``popularity_bias_at_k`` = mean popularity percentile (0 = least, 1 = most popular item) over all
  recommended (user, item) slots; only when ``item_popularity`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.stats import rankdata

from recsys_embed.evaluation.topk import iter_topk
from recsys_embed.types import Embeddings

_PER_USER = ("recall", "precision", "ndcg", "map", "mrr", "hit_rate")


def selection_metrics(ks: Sequence[int]) -> list[str]:
    """Metric names ``evaluate`` returns for ``ks`` where higher is better (usable to pick a best model)."""
    return [f"{m}_at_{k}" for k in sorted(set(ks)) for m in (*_PER_USER, "coverage")]


def popularity_percentile(item_popularity: np.ndarray) -> np.ndarray:
    """Percentile in [0, 1] of each item's popularity; ties share their average rank.

    Args:
        item_popularity: (n_items,) counts (train interactions per item).

    Returns:
        float64 (n_items,): 0 for the least popular item, 1 for the most popular; all-tied -> 0.5.
    """
    pop = np.asarray(item_popularity, dtype=np.float64)
    n = pop.shape[0]
    if n <= 1:
        return np.full(n, 0.5)
    return (rankdata(pop, method="average") - 1.0) / (n - 1.0)


def _positive_csr(m: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Canonical CSR (sorted, no duplicate entries) whose stored entries are the strictly positive ones
    (a stored 0 is not a target)."""
    out = sp.csr_matrix(m)
    if not out.has_canonical_format:
        out = out.copy()
        out.sum_duplicates()
    if out.nnz and (out.data <= 0).any():
        out = out.copy()
        out.data = (out.data > 0).astype(np.float32)
        out.eliminate_zeros()
    return out


def _row_keys(m: sp.csr_matrix, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """Sorted int64 keys ``local_row * n_cols + col`` of the entries in ``rows`` (ascending rows)."""
    sub = m[rows]
    lens = np.diff(sub.indptr)
    local = np.repeat(np.arange(len(rows), dtype=np.int64), lens)
    return local * n_cols + sub.indices.astype(np.int64)


def _hits(items: np.ndarray, target_keys: np.ndarray, n_items: int) -> np.ndarray:
    """Boolean (n, k): ``items[r, j]`` is in row r's target set (slots with item -1 never hit)."""
    n, k = items.shape
    keys = np.arange(n, dtype=np.int64)[:, None] * n_items + items
    pos = np.searchsorted(target_keys, keys)
    pos = np.minimum(pos, max(len(target_keys) - 1, 0))
    found = target_keys[pos] == keys if len(target_keys) else np.zeros((n, k), dtype=bool)
    return found & (items >= 0)


def evaluate(
    emb: Embeddings,
    seen: sp.csr_matrix,
    targets: sp.csr_matrix,
    ks: Sequence[int],
    item_popularity: np.ndarray | None = None,
    batch_users: int = 4096,
) -> dict[str, float]:
    """Ranking metrics of ``emb`` on held-out ``targets``: ``evaluate_users`` without the per-user values."""
    return evaluate_users(emb, seen, targets, ks, item_popularity, batch_users)[0]


def evaluate_users(
    emb: Embeddings,
    seen: sp.csr_matrix,
    targets: sp.csr_matrix,
    ks: Sequence[int],
    item_popularity: np.ndarray | None = None,
    batch_users: int = 4096,
    per_user: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Ranking metrics of ``emb`` on held-out ``targets`` (definitions in the module docstring).

    Args:
        emb: any model's embeddings, indexed by the train ID maps.
        seen: CSR (n_users x n_items); its nonzeros (train-seen items) are never recommended.
        targets: CSR (n_users x n_items); a positive entry is a held-out positive. Users with no target
            are not evaluated. Targets that are also ``seen`` can never be hit (split excludes them).
        ks: cut-offs, each >= 1; ranking is done once at ``max(ks)``.
        item_popularity: (n_items,) train interaction counts per item; enables ``popularity_bias_at_k``.
        batch_users: users scored per chunk (memory ``batch_users x n_items x 4`` bytes).

        per_user: per-user metrics to return as well (e.g. ``["ndcg_at_20"]``), for standard errors and paired
            comparisons (``recsys_embed.evaluation.selection``).

    Returns:
        ``({"recall_at_10": ..., ..., "n_users_evaluated": n}, {metric: (n,) float64})``: the means (floats; with
        no evaluable user every metric is NaN and ``n_users_evaluated`` is 0), and for each ``per_user`` metric
        its value for every evaluated user, in ascending user index (the users with a target).
    """
    n_users, n_items = len(emb.users), len(emb.items)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}; use e.g. ks=[10, 20]")
    for name, m in (("seen", seen), ("targets", targets)):
        if m.shape != (n_users, n_items):
            raise ValueError(
                f"{name} matrix shape {m.shape} != (users, items) {(n_users, n_items)} of the "
                f"'{emb.model}' embeddings; build it over the same train ID maps"
            )
    if item_popularity is not None and np.shape(item_popularity) != (n_items,):
        raise ValueError(f"item_popularity shape {np.shape(item_popularity)} != (n_items,) = ({n_items},)")
    tgt = _positive_csr(targets)
    n_targets = np.diff(tgt.indptr)
    eval_users = np.flatnonzero(n_targets > 0)
    sums = _MetricSums(ks, n_items, item_popularity, per_user)
    for chunk in iter_topk(emb, ks[-1], users=eval_users, seen=seen, chunk_users=batch_users):
        sums.add(chunk.items, _row_keys(tgt, chunk.users, n_items), n_targets[chunk.users])
    return sums.result(len(eval_users)), sums.user_values()


def evaluate_ranked(items: np.ndarray, targets: sp.csr_matrix, ks: Sequence[int]) -> dict[str, float]:
    """The metrics of ``evaluate`` (same definitions, same code) for ranked lists made elsewhere, e.g. read
    back from an exported top-k table.

    Args:
        items: int (n_users, width) item indices in rank order; -1 marks an empty slot (a user with no
            list at all is a row of -1s and scores 0 on every per-user metric, never dropped).
        targets: CSR (n_users x n_items); row ``r`` holds user ``r``'s held-out positives. Users without a
            target are not evaluated. ``coverage_at_k`` is over these ``n_items``.
        ks: cut-offs; a list shorter than k simply has fewer chances to hit.

    Returns:
        ``{"recall_at_20": ..., ..., "n_users_evaluated": n}`` as ``evaluate`` (no ``popularity_bias``).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}; use e.g. ks=[10, 20]")
    items = np.asarray(items, dtype=np.int64)
    n_items = targets.shape[1]
    if items.ndim != 2 or items.shape[0] != targets.shape[0]:
        raise ValueError(f"items shape {items.shape} must be (n_users, width) with n_users = {targets.shape[0]}")
    if items.size and (items.max() >= n_items or items.min() < -1):
        raise ValueError(f"items must hold indices in [0, {n_items}) or -1 for an empty slot")
    if items.shape[1] < ks[-1]:  # pad: the metric code reads k slots
        pad = np.full((items.shape[0], ks[-1] - items.shape[1]), -1, dtype=np.int64)
        items = np.concatenate([items, pad], axis=1)
    tgt = _positive_csr(targets)
    n_targets = np.diff(tgt.indptr)
    eval_users = np.flatnonzero(n_targets > 0)
    sums = _MetricSums(ks, n_items, None)
    sums.add(items[eval_users, : ks[-1]], _row_keys(tgt, eval_users, n_items), n_targets[eval_users])
    return sums.result(len(eval_users))


class _MetricSums:
    """Per-user metric sums over chunks of ranked lists; the one implementation of the module's definitions."""

    def __init__(
        self, ks: list[int], n_items: int, item_popularity: np.ndarray | None, per_user: Sequence[str] = ()
    ) -> None:
        self.ks, self.n_items = ks, n_items
        for name in per_user:
            base, _, cut = name.rpartition("_at_")
            if base not in _PER_USER or not cut.isdigit() or int(cut) not in ks:
                raise ValueError(f"per_user metric {name!r} is not a per-user metric at one of ks={ks}")
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in per_user}
        kmax = ks[-1]
        # discount[j] = 1 / log2(j + 2) for 0-based rank j; idcg[m] = sum of the first m discounts
        self.discount = 1.0 / np.log2(np.arange(kmax, dtype=np.float64) + 2.0)
        self.idcg = np.concatenate([[0.0], np.cumsum(self.discount)])
        self.ranks = np.arange(1, kmax + 1, dtype=np.float64)
        self.sums = {(m, k): 0.0 for m in _PER_USER for k in ks}
        self.recommended = {k: np.zeros(n_items, dtype=bool) for k in ks}
        self.pct = popularity_percentile(item_popularity) if item_popularity is not None else None
        self.pop_sum = dict.fromkeys(ks, 0.0)
        self.pop_n = dict.fromkeys(ks, 0)

    def add(self, items: np.ndarray, target_keys: np.ndarray, n_targets: np.ndarray) -> None:
        """Add a chunk: ``items`` (n, k_eff) ranked item indices (-1 = no candidate), ``target_keys`` the
        chunk's sorted ``_row_keys``, ``n_targets`` (n,) targets per user (>= 1)."""
        k_eff = items.shape[1]
        hits = _hits(items, target_keys, self.n_items).astype(np.float64)
        n_t = n_targets.astype(np.float64)
        cum_hits = np.cumsum(hits, axis=1)
        # hit_j * precision@j, summed later per cut-off
        ap_terms = hits * cum_hits / self.ranks[:k_eff]
        dcg_terms = hits * self.discount[:k_eff]
        has_hit = hits.any(axis=1)
        first = np.where(has_hit, hits.argmax(axis=1), k_eff)  # 0-based rank of the first hit
        sums = self.sums
        for k in self.ks:
            kk = min(k, k_eff)
            denom = np.minimum(n_t, k)
            n_hit = cum_hits[:, kk - 1] if kk else np.zeros(len(n_t))
            in_k = first < kk
            user_values = {
                "recall": n_hit / denom,
                "precision": n_hit / k,
                "ndcg": dcg_terms[:, :kk].sum(axis=1) / self.idcg[denom.astype(np.int64)],
                "map": ap_terms[:, :kk].sum(axis=1) / denom,
                "mrr": np.where(in_k, 1.0 / (first + 1.0), 0.0),
                "hit_rate": in_k.astype(np.float64),
            }
            for m, v in user_values.items():
                sums[m, k] += float(v.sum())
                if f"{m}_at_{k}" in self.values:
                    self.values[f"{m}_at_{k}"].append(v)
            rec = items[:, :kk]
            rec = rec[rec >= 0]
            self.recommended[k][rec] = True
            if self.pct is not None:
                self.pop_sum[k] += float(self.pct[rec].sum())
                self.pop_n[k] += int(rec.size)

    def user_values(self) -> dict[str, np.ndarray]:
        """The requested per-user metrics, one value per evaluated user in the order they were added."""
        return {name: np.concatenate(v) if v else np.zeros(0) for name, v in self.values.items()}

    def result(self, n_eval: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.ks:
            for m in _PER_USER:
                out[f"{m}_at_{k}"] = self.sums[m, k] / n_eval if n_eval else float("nan")
            covered = float(self.recommended[k].sum()) / self.n_items
            out[f"coverage_at_{k}"] = covered if n_eval and self.n_items else float("nan")
            if self.pct is not None:
                out[f"popularity_bias_at_{k}"] = self.pop_sum[k] / self.pop_n[k] if self.pop_n[k] else float("nan")
        out["n_users_evaluated"] = float(n_eval)
        return out


def metrics_table(results: dict[str, dict[str, float]]) -> pl.DataFrame:
    """One row per model (column ``model`` first), one Float64 column per metric (null where absent).

    Metric columns keep the order in which they first appear across ``results``.
    """
    columns: list[str] = []
    for metrics in results.values():
        columns.extend(c for c in metrics if c not in columns)
    data: dict[str, list[object]] = {"model": list(results)}
    for c in columns:
        data[c] = [None if c not in m else float(m[c]) for m in results.values()]
    schema: dict[str, type[pl.DataType]] = {"model": pl.String, **dict.fromkeys(columns, pl.Float64)}
    return pl.DataFrame(data, schema=schema)
