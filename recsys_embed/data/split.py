"""Leakage-safe splits of clean events, and evaluation targets built against a train ``Interactions``.

``split_events`` partitions the events into fit / val / test *before* anything is learned from them:
ID maps, k-core and time-decay reference are then built from ``fit`` alone (``build_interactions``),
so nothing at or after a cutoff can reach a training artifact.

Methods (``SplitConfig.method``):

- ``temporal``: one global cutoff (``split.cutoff`` or the ``split.test_quantile`` quantile of ``ts``);
  test = ``ts >= cutoff``. Validation is carved from the pre-cutoff events the same way with
  ``split.val_quantile``, so ``max(fit.ts) < val_cutoff <= min(val.ts)`` and
  ``max(val.ts) < cutoff <= min(test.ts)``.
- ``last_n`` / ``last_fraction``: per user, the latest ``split.last_n`` events / ``floor(split.fraction * n)``
  events (by ``ts``, ties by input order) are held out; every user keeps at least one train event.
  Validation applies the same rule again to what is left.
- ``auto`` (default): ``temporal``; the split stage (``stages.run_split``) falls back to ``last_n`` when a temporal
  validation or test window would hold fewer than ``split.min_eval_users`` warm users (``evidence``).
- ``random``: per user, a seeded random ``floor(split.fraction * n)`` events (at least one stays in train).
  Works without timestamps.

``split.val_quantile`` set to null (or 0) disables validation for every method; for the per-user methods
any other value just turns it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.config import SplitConfig
from recsys_embed.data.interactions import (
    _EPOCH,
    _bits,
    _group_pairs,
    _micros,
    _weights,
    factorize,
    normalize_ts,
    radix_order,
)
from recsys_embed.errors import AccountingError, ConfigError
from recsys_embed.types import IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

TARGET_BUCKETS = ("target", "seen_in_train", "cold_user", "cold_item", "cancelled_out")
# floor(fraction * n) with a little slack so that e.g. 0.29 * 100 = 28.999999999999996 still holds out 29.
_FLOOR_EPS = 1e-9


@dataclass
class SplitEvents:
    """A partition of the events: every input row is in exactly one of ``fit``, ``val``, ``test``.

    Attributes:
        fit: events used to fit models (train minus validation).
        val: validation events, carved from train by the same method (empty when disabled).
        test: held-out events.
        info: ``method``, ``cutoff`` / ``val_cutoff`` (ISO strings, temporal only), ``rows_fit``,
            ``rows_val``, ``rows_test``, and method details.
    """

    fit: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Targets:
    """Held-out positives of warm users on warm items, unseen in train.

    Attributes:
        matrix: CSR float32 (n_train_users x n_train_items), 1.0 where the user has a held-out positive
            on an item they did not interact with in train.
        n_warm_users: train-known users with at least one target.
        cold_users: sorted original IDs of held-out users unknown to train (reported apart, never scored).
        counts: held-out rows per bucket: ``target``, ``seen_in_train``, ``cold_user``, ``cold_item``,
            ``cancelled_out`` (they add up to the held-out row count).
    """

    matrix: sp.csr_matrix
    n_warm_users: int
    cold_users: pl.Series
    counts: dict[str, int]


# ----------------------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------------------


def _iso(micros: int) -> str:
    return (_EPOCH + timedelta(microseconds=int(micros))).isoformat()


def _time_micros(events: pl.DataFrame, method: str) -> np.ndarray:
    """``ts`` as int64 microseconds; every row must have one."""
    if "ts" not in events.columns:
        raise ConfigError(f"split.method={method!r} needs a 'ts' column; use split.method=random for logs without time")
    ts = normalize_ts(events["ts"])
    n_null = ts.null_count()
    if n_null:
        raise ConfigError(
            f"split.method={method!r} needs a timestamp on every event, but {n_null:,} of {ts.len():,} have none; "
            "map ingest.columns.timestamp or use split.method=random"
        )
    return ts.to_physical().to_numpy()


def _val_enabled(cfg: SplitConfig) -> bool:
    return cfg.val_quantile is not None and cfg.val_quantile != 0


def _temporal(events: pl.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    t = _time_micros(events, "temporal")
    if cfg.cutoff is not None:
        cut, key = _micros(cfg.cutoff), f"split.cutoff={cfg.cutoff.isoformat()}"
    else:
        cut, key = int(np.quantile(t, cfg.test_quantile, method="higher")), f"split.test_quantile={cfg.test_quantile}"
    test = t >= cut
    n_test = int(test.sum())
    if n_test == len(t):
        raise ConfigError(
            f"{key} puts every event in test (cutoff {_iso(cut)}, first event {_iso(int(t.min()))}), leaving nothing "
            "to fit; set a later split.cutoff or a higher split.test_quantile"
        )
    if n_test == 0:
        raise ConfigError(
            f"{key} is after the last event ({_iso(int(t.max()))}): the test set is empty; set an earlier "
            "split.cutoff or unset it to use split.test_quantile"
        )
    info: dict[str, Any] = {"cutoff": _iso(cut)}
    val = np.zeros(len(t), dtype=bool)
    if _val_enabled(cfg):
        q = float(cfg.val_quantile)  # type: ignore[arg-type]
        if not 0.0 < q < 1.0:
            raise ConfigError(f"split.val_quantile must be in (0, 1) or null to disable validation, got {q}")
        train_t = t[~test]
        val_cut = int(np.quantile(train_t, q, method="higher"))
        val = ~test & (t >= val_cut)
        if int(val.sum()) == len(train_t):
            raise ConfigError(
                f"split.val_quantile={q} leaves nothing to fit: every pre-cutoff event is at or after "
                f"{_iso(val_cut)}; lower split.val_quantile or set it to null to disable validation"
            )
        info["val_cutoff"] = _iso(val_cut)
    return test, val, info


def _n_held(counts: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Events to hold out per user group of ``counts`` events; every user keeps at least one."""
    if cfg.method == "last_n":
        k = np.minimum(counts, cfg.last_n)
    else:
        k = np.floor(counts * cfg.fraction + _FLOOR_EPS).astype(np.int64)
    return np.minimum(k, counts - 1)


def _take_last(user_sorted: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Mask over rows sorted by (user, order key): True for each user's last ``_n_held`` rows."""
    n = len(user_sorted)
    if n == 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, user_sorted[1:] != user_sorted[:-1]])
    counts = np.diff(np.r_[starts, n])
    first_held = starts + counts - _n_held(counts, cfg)
    return np.arange(n) >= np.repeat(first_held, counts)


def _per_user(events: pl.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    n = events.height
    uniq_u, uc = factorize(events["user_id"])
    if cfg.method == "random":
        rank = np.random.default_rng(cfg.seed).permutation(n)
        order = radix_order([(uc, _bits(len(uniq_u))), (rank, _bits(n))])
    else:
        t = _time_micros(events, cfg.method)
        t_off = t - t.min()
        order = radix_order([(uc, _bits(len(uniq_u))), (t_off, int(t_off.max()).bit_length())])
    held = _take_last(uc[order], cfg)
    test = np.zeros(n, dtype=bool)
    test[order] = held
    val = np.zeros(n, dtype=bool)
    if _val_enabled(cfg):
        rest = order[~held]  # train rows, still sorted by (user, order key)
        val[rest] = _take_last(uc[rest], cfg)
    if not test.any():
        knob = f"split.last_n={cfg.last_n}" if cfg.method == "last_n" else f"split.fraction={cfg.fraction}"
        raise ConfigError(
            f"split.method={cfg.method!r} with {knob} holds out nothing: no user has enough events (every user "
            "keeps at least one in train); raise split.fraction, or use split.method=last_n or temporal"
        )
    info: dict[str, Any] = {"users_held_out": int(np.unique(uc[test]).size)}
    if cfg.method == "random":
        info["seed"] = cfg.seed
    return test, val, info


def split_events(events: pl.DataFrame, cfg: SplitConfig) -> SplitEvents:
    """Partition clean events into fit / val / test by ``cfg.method`` (see the module docstring).

    Args:
        events: clean events (``user_id``, ``item_id``, ``ts``, ``weight``, ...); row order is kept in
            every part.
        cfg: the split slice.

    Returns:
        ``SplitEvents`` whose parts are disjoint and together exactly ``events``.

    Raises:
        ConfigError: naming the key to change when a part the method needs would be empty, or when the
            method needs timestamps the events lack.
    """
    if events.height == 0:
        raise ConfigError("split: there are no events to split; check the ingest report")
    if cfg.method in ("temporal", "auto"):  # auto starts temporal; the split stage may fall back to last_n
        test, val, info = _temporal(events, cfg)
    else:
        test, val, info = _per_user(events, cfg)
    fit_mask = ~(test | val)
    out = SplitEvents(
        fit=events.filter(pl.Series(fit_mask)),
        val=events.filter(pl.Series(val)),
        test=events.filter(pl.Series(test)),
        info={"method": cfg.method, **info},
    )
    if (test & val).any() or out.fit.height + out.val.height + out.test.height != events.height:
        raise AccountingError("split lost or duplicated rows; this is a bug in recsys-embed, please report it")
    out.info.update(rows_fit=out.fit.height, rows_val=out.val.height, rows_test=out.test.height)
    if _val_enabled(cfg) and out.val.height == 0:
        log.warning("split: the validation set is empty (too few events per user); early stopping is disabled")
    log.info(
        "split %s: fit %s / val %s / test %s rows",
        cfg.method, f"{out.fit.height:,}", f"{out.val.height:,}", f"{out.test.height:,}",
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation targets
# ----------------------------------------------------------------------------------------------------------


def _train_index(ids: pl.Series, id_map: IdMap) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """(distinct IDs, per-row train index or -1, per-distinct known mask)."""
    uniq, codes = factorize(ids)
    idx = id_map.lookup(uniq).fill_null(-1).to_numpy().astype(np.int64)
    return uniq, idx[codes], idx >= 0


def build_targets(events: pl.DataFrame, train: Interactions, report: RowReport, label: str) -> Targets:
    """Evaluation targets from held-out events, in the train index space.

    Every held-out row lands in exactly one bucket, checked in this order: ``cold_user`` (user not in the
    train ID map), ``cold_item`` (item not in it), ``cancelled_out`` (the pair's net weight is <= 0; no
    time decay), ``seen_in_train`` (a positive on an item the user already has in train: seen items are
    never recommended), ``target``. Rows of every bucket except ``target`` move out of ``report.kept``
    into ``report.filtered[f"{label}_{bucket}"]``; the report stays balanced.

    Args:
        events: held-out events (``user_id``, ``item_id``, ``weight``) whose rows are in ``report.kept``.
        train: the ``Interactions`` built from the fit events.
        report: mutated as described; ``details`` gets ``{label}_target_pairs``, ``{label}_warm_users``,
            ``{label}_cold_users``.
        label: ``"val"`` or ``"test"`` (prefixes the report rules).

    Returns:
        ``Targets`` with a (n_train_users x n_train_items) float32 CSR of 1.0s.
    """
    n_users, n_items = train.shape
    n = events.height
    counts = dict.fromkeys(TARGET_BUCKETS, 0)
    if n == 0:
        empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
        return Targets(empty, 0, pl.Series("user_id", [], dtype=train.users.dtype), counts)
    if report.kept < n:
        raise AccountingError(
            f"report.kept={report.kept:,} is below the {n:,} {label} events; pass the report that counted them"
        )
    uniq_u, u_idx, u_known = _train_index(events["user_id"], train.users)
    _, i_idx, _ = _train_index(events["item_id"], train.items)
    cold_user = u_idx < 0
    cold_item = ~cold_user & (i_idx < 0)
    warm = ~(cold_user | cold_item)
    counts["cold_user"] = int(cold_user.sum())
    counts["cold_item"] = int(cold_item.sum())

    weight = _weights(events)
    p = _group_pairs(u_idx[warm], i_idx[warm], n_users, n_items, weight[warm])
    counts["cancelled_out"] = int(p.n_rows[~p.positive].sum())
    pu, pi, pr = p.user[p.positive], p.item[p.positive], p.n_rows[p.positive]
    seen = np.asarray(train.matrix[pu, pi]).ravel() != 0 if len(pu) else np.zeros(0, dtype=bool)
    counts["seen_in_train"] = int(pr[seen].sum())
    tu, ti = pu[~seen], pi[~seen]
    counts["target"] = int(pr[~seen].sum())
    if sum(counts.values()) != n:
        raise AccountingError(f"{label} targets lost rows: {counts} != {n:,}; this is a bug in recsys-embed")

    # Pairs come sorted by (user, item) in the train index space: build the CSR directly.
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(tu, minlength=n_users), out=indptr[1:])
    matrix = sp.csr_matrix((np.ones(len(tu), dtype=np.float32), ti, indptr), shape=(n_users, n_items))
    matrix.has_sorted_indices = True
    n_warm_users = int(np.count_nonzero(np.diff(indptr)))
    cold_users = uniq_u.filter(pl.Series(~u_known)).rename("user_id")

    for bucket in TARGET_BUCKETS[1:]:
        report.filter_out(f"{label}_{bucket}", counts[bucket])
    report.details.update(
        {
            f"{label}_target_pairs": int(matrix.nnz),
            f"{label}_warm_users": n_warm_users,
            f"{label}_cold_users": cold_users.len(),
        }
    )
    report.check()
    log.info(
        "%s targets: %s pairs for %s warm users; rows %s; %s cold users reported apart",
        label, f"{matrix.nnz:,}", f"{n_warm_users:,}", counts, f"{cold_users.len():,}",
    )  # fmt: skip
    return Targets(matrix=matrix, n_warm_users=n_warm_users, cold_users=cold_users, counts=counts)


def evidence(label: str, n_warm_users: int, min_users: int) -> str | None:
    """Why a window of ``n_warm_users`` warm users is too small to choose on (None when it is enough).

    The standard error of a mean NDCG@k over n users is about 0.3 / sqrt(n) on implicit-feedback logs (per-user
    NDCG is mostly 0 with a few hits), so 300 users give about +-0.017: below that, two models' gap is noise.
    """
    if n_warm_users >= min_users:
        return None
    se = 0.3 / max(n_warm_users, 1) ** 0.5
    return (
        f"the {label} window holds {n_warm_users:,} warm users{' to choose on' if label == 'val' else ''}, fewer "
        f"than split.min_eval_users={min_users:,} "
        f"(NDCG's standard error is about {se:.3f} at that size)"
    )
