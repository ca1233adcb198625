"""From clean events to ``Interactions``: aggregate pairs, k-core, ID maps, CSR.

``build_interactions`` runs ``aggregate -> drop cancelled pairs -> k-core -> ID maps -> CSR`` on integer
codes (one per distinct ID, in sorted ID order), vectorised end to end; nothing loops over rows in Python:

- IDs are factorized once: a lookup table for dense integer IDs, a hash table otherwise (strings go through
  Polars' 64-bit hash, checked against a second independent hash; an exact join is the fallback).
- Pairs are summed by scipy's COO -> CSR conversion (an O(n) counting sort by user), which is also the CSR
  we return; row-level bookkeeping (cancelled rows, k-core attribution) only runs when something is dropped.
- ``aggregate_pairs`` / ``k_core`` are the same steps as standalone frame functions; ``radix_order`` (an LSD
  radix sort over Polars' parallel sort) groups rows where a per-row order is needed (pairs with row counts
  and last timestamps, per-user splits).

Every row that leaves is counted in the ``RowReport`` (``cancelled_out``, ``kcore_user``, ``kcore_item``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from recsys_embed.config import IngestConfig
from recsys_embed.errors import ConfigError, IngestError
from recsys_embed.types import INDEX_DTYPE, IdMap, Interactions, RowReport

log = logging.getLogger(__name__)

USER_MAP_FILE = "user_map.parquet"
ITEM_MAP_FILE = "item_map.parquet"

TS_DTYPE = pl.Datetime("us", "UTC")
_US_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TS_NULL = np.iinfo(np.int64).min
# A pair is "cancelled out" when its net confidence is <= this fraction of its gross (sum of |terms|):
# exact float cancellation (1 + 0.1 - 1.1) leaves ~1e-16 relative noise, real signal is far above 1e-9.
_CANCEL_RTOL = 1e-9
# Integer IDs whose value range is at most this many times the row count use a direct lookup table.
_DENSE_SPAN_FACTOR = 4
_HASH_SEEDS = (0x5EED_0001, 0x5EED_0002)
_F32_TINY = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------------------------
# Vectorised building blocks
# ----------------------------------------------------------------------------------------------------------


def factorize(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """Code every row by its ID's position among the sorted distinct IDs.

    Args:
        ids: (n,) IDs of any dtype, no nulls.

    Returns:
        ``(uniq, codes)``: ``uniq`` the sorted distinct IDs (same dtype as ``ids``, Polars sort order, so
        it equals ``ids.unique().sort()``), ``codes`` int64 (n,) with ``uniq[codes] == ids``.
    """
    n = ids.len()
    if ids.null_count():
        raise IngestError(
            f"column '{ids.name}' has {ids.null_count():,} null IDs; ingest must quarantine them before "
            "building interactions"
        )
    if n == 0:
        return ids.clear(), np.empty(0, dtype=np.int64)
    if ids.dtype.is_integer() and ids.dtype != pl.UInt64:
        return _factorize_int(ids)
    if ids.dtype == pl.Categorical or ids.dtype == pl.Enum:
        ids = ids.cast(pl.String)
    return _factorize_hashed(ids)


def _code_dtype(n_uniq: int) -> type[np.signedinteger]:
    return np.int32 if n_uniq < 2**31 - 1 else np.int64


def _factorize_int(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    x = ids.cast(pl.Int64).to_numpy()
    lo, hi = int(x.min()), int(x.max())
    if lo >= 0 and hi < _DENSE_SPAN_FACTOR * len(x) + 1024:
        lo, off = 0, x  # index the table by the ID itself: no shifted copy
    elif hi - lo < _DENSE_SPAN_FACTOR * len(x) + 1024:
        off = x - lo
    else:
        off = None
    if off is not None:
        # Dense range: presence table + cumulative sum is the sorted rank, O(n + span), no hashing.
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[off] = True
        n_uniq = int(present.sum())
        rank = np.cumsum(present, dtype=_code_dtype(n_uniq))
        rank -= 1
        codes = rank[off]
        uniq = np.flatnonzero(present).astype(np.int64)
        uniq += lo
        return pl.Series(ids.name, uniq).cast(ids.dtype), codes
    codes, uniq = pd.factorize(x, sort=False)
    order = np.argsort(uniq, kind="stable")
    rank = np.empty(len(order), dtype=_code_dtype(len(order)))
    rank[order] = np.arange(len(order), dtype=rank.dtype)
    return pl.Series(ids.name, uniq[order]).cast(ids.dtype), rank[codes]


def _factorize_hashed(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """Hash-table factorization of 64-bit Polars hashes; a second seed checks for collisions."""
    n = ids.len()
    h = ids.hash(seed=_HASH_SEEDS[0]).to_numpy()
    codes, uniq_h = pd.factorize(h, sort=False)
    del h
    rep = np.empty(len(uniq_h), dtype=np.int64)
    rep[codes] = np.arange(n, dtype=np.int64)  # any row of each code represents it
    h2 = ids.hash(seed=_HASH_SEEDS[1]).to_numpy()
    if not np.array_equal(h2, h2[rep][codes]):
        log.warning("64-bit hash collision while coding column '%s'; using the exact (slower) path", ids.name)
        return _factorize_exact(ids)
    del h2
    reps = ids.gather(rep)
    order = reps.arg_sort().to_numpy()
    rank = np.empty(len(order), dtype=_code_dtype(len(order)))
    rank[order] = np.arange(len(order), dtype=rank.dtype)
    return reps.gather(order), rank[codes]


def _factorize_exact(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """Join-based factorization: exact for any dtype, slower than the hashed path."""
    uniq = ids.unique().sort()
    table = pl.DataFrame({"id": uniq}).with_row_index("code")
    probe = pl.DataFrame({"id": ids})
    codes = probe.join(table, on="id", how="left", maintain_order="left")["code"]
    return uniq.rename(ids.name), codes.cast(pl.Int64).to_numpy().astype(_code_dtype(len(uniq)))


def _bits(n_values: int) -> int:
    """Bits needed for codes ``0..n_values-1``."""
    return max(int(n_values) - 1, 0).bit_length()


def radix_order(fields: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Row order that sorts by ``fields`` (most significant first), ties broken by row position.

    Args:
        fields: ``(values, bits)`` pairs; ``values`` non-negative int64 (n,) below ``2**bits``.

    Returns:
        int64 (n,) permutation: ``rows[order]`` is sorted. LSD radix sort: each pass sorts the unique
        int64 values ``digit << b | rank`` with Polars' parallel sort and reads the rank back.
    """
    return _radix_sort(fields)[0]


def _radix_sort(fields: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray | None]:
    """``radix_order`` plus, when all fields fit one 63-bit pass, the sorted composite key (else None).

    Allocation-aware: a one-pass sort allocates two int64 (n,) buffers besides Polars' sorted copy.
    """
    n = len(fields[0][0]) if fields else 0
    if n <= 1:
        return np.arange(n, dtype=np.int64), None
    b_n = _bits(n)
    room = 63 - b_n
    if room <= 0:
        raise ValueError(f"cannot sort {n:,} rows: too many for 63-bit packed keys")
    # Cut the composite key into digits of <= room bits, least significant first; each digit is a list of
    # (values, source shift, width, needs a mask) chunks, least significant first.
    digits: list[list[tuple[np.ndarray, int, int, bool]]] = []
    chunks: list[tuple[np.ndarray, int, int, bool]] = []
    free = room
    for values, bits in reversed(fields):
        if not 0 <= bits <= 63:
            raise ValueError(f"field width must be 0..63 bits, got {bits}")
        shift = 0
        while shift < bits:
            take = min(free, bits - shift)
            chunks.append((values, shift, take, take < bits - shift))
            shift += take
            free -= take
            if free == 0:
                digits.append(chunks)
                chunks, free = [], room
    if chunks:
        digits.append(chunks)
    if not digits:  # every field is constant
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    position = np.arange(n, dtype=np.int64)
    order: np.ndarray | None = None
    top: np.ndarray | None = None
    for d, chunk_list in enumerate(digits):
        last = d == len(digits) - 1
        packed: np.ndarray | None = None
        for values, shift, take, mask in reversed(chunk_list):  # most significant chunk first
            part = values >> shift if shift else values
            if mask:
                part = part & ((1 << take) - 1)
            if packed is None:
                packed = part.astype(np.int64)  # always a fresh buffer: never mutate the caller's array
            else:
                packed <<= take
                packed |= part
        assert packed is not None
        if order is not None:
            packed = packed[order]
        packed <<= b_n
        packed |= position
        ranked_s = pl.Series(packed).sort()
        ranked = ranked_s.to_numpy()
        low = np.bitwise_and(ranked, (1 << b_n) - 1, out=position if last else None)
        order = low if order is None else order[low]
        if last:
            top = np.right_shift(ranked, b_n, out=packed)  # Polars sorted into its own buffer: reuse ours
        del ranked, ranked_s
    assert order is not None
    return order, top if len(digits) == 1 else None


def normalize_ts(ts: pl.Series) -> pl.Series:
    """``ts`` as Datetime[us, UTC] (naive datetimes are taken as UTC; an all-null column stays null)."""
    dtype = ts.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            ts = ts.dt.replace_time_zone("UTC")
        return ts.cast(TS_DTYPE)
    if dtype == pl.Null:
        return ts.cast(TS_DTYPE)
    raise IngestError(f"events column '{ts.name}' must be Datetime('us', 'UTC'), got {dtype}; ingest converts it")


def _ts_micros(ts: pl.Series) -> tuple[np.ndarray, np.ndarray | None]:
    """Int64 microseconds since the epoch of a normalized ``ts``, and its null mask (None: no nulls)."""
    phys = ts.to_physical()
    if phys.null_count():
        return phys.fill_null(_TS_NULL).to_numpy(), phys.is_null().to_numpy()
    return phys.to_numpy(), None


def _micros(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // timedelta(microseconds=1)


def _ts_series(name: str, micros: np.ndarray, null: np.ndarray | None) -> pl.Series:
    s = pl.Series(name, micros, dtype=pl.Int64)
    if null is not None and null.any():
        s = s.scatter(np.flatnonzero(null), None)
    return s.cast(TS_DTYPE)


@dataclass
class _Pairs:
    """Rows grouped by (user code, item code); arrays of length n_pairs unless stated."""

    user: np.ndarray  # int64 user code
    item: np.ndarray  # int64 item code
    n_rows: np.ndarray  # int64 rows per pair
    confidence: np.ndarray  # float64 net (decayed) weight
    positive: np.ndarray  # bool: confidence > 0 beyond float noise
    last_ts: np.ndarray | None  # int64 microseconds (_TS_NULL where the pair has no timestamp)


def _group_pairs(
    user: np.ndarray,
    item: np.ndarray,
    n_users: int,
    n_items: int,
    terms: np.ndarray,
    ts_us: np.ndarray | None = None,
) -> _Pairs:
    """Aggregate rows per (user, item) code pair: sum of ``terms``, row count, latest ``ts_us`` (if given).

    Pairs come out sorted by (user, item) code.
    """
    n = len(user)
    if n == 0:
        e_i = np.empty(0, np.int64)
        return _Pairs(e_i, e_i, e_i, np.empty(0, np.float64), np.empty(0, bool), None)
    b_u, b_i = _bits(n_users), _bits(n_items)
    order, key = _radix_sort([(user, b_u), (item, b_i)])
    new_pair = np.empty(n, dtype=bool)
    new_pair[0] = True
    if key is None:  # the pair key did not fit one pass: compare both codes
        u_s, i_s = user[order], item[order]
        np.not_equal(u_s[1:], u_s[:-1], out=new_pair[1:])
        new_pair[1:] |= i_s[1:] != i_s[:-1]
        pair_user, pair_item = u_s[new_pair], i_s[new_pair]
        del u_s, i_s
        group = np.cumsum(new_pair, dtype=np.int64)
    else:
        np.not_equal(key[1:], key[:-1], out=new_pair[1:])
        pair_user = key[new_pair]
        pair_item = pair_user & ((1 << b_i) - 1)
        pair_user >>= b_i
        group = np.cumsum(new_pair, dtype=np.int64, out=key)  # the sorted keys are no longer needed
    group -= 1
    n_pairs = len(pair_user)
    n_rows = np.bincount(group, minlength=n_pairs)
    lo, hi = (float(terms.min()), float(terms.max()))
    confidence: np.ndarray
    if lo == hi:  # every event weighs the same (no event weights, no decay): no gather needed
        confidence = n_rows * lo
        positive = np.full(n_pairs, lo > 0.0)
    else:
        terms_s = terms[order]
        confidence = np.bincount(group, weights=terms_s, minlength=n_pairs)
        positive = confidence > 0.0
        if lo < 0.0:
            # Pairs with a negative term may cancel to float noise: compare the net with the gross
            # (sum of |terms| = net - 2 * negative part), computed on the (few) negative rows only.
            neg_rows = np.flatnonzero(terms_s < 0.0)
            g_neg = group[neg_rows]
            first = np.flatnonzero(np.r_[True, g_neg[1:] != g_neg[:-1]])
            neg_sum = np.add.reduceat(terms_s[neg_rows], first)
            g = g_neg[first]
            positive[g] = confidence[g] > _CANCEL_RTOL * (confidence[g] - 2.0 * neg_sum)
        del terms_s
    last_ts = None
    if ts_us is not None:
        last_ts = np.maximum.reduceat(ts_us[order], np.flatnonzero(new_pair))
    return _Pairs(pair_user, pair_item, n_rows, confidence, positive, last_ts)


def _decayed(
    weight: np.ndarray, ts_us: np.ndarray, ts_null: np.ndarray | None, half_life_days: float | None,
    reference_us: int | None,
) -> np.ndarray:  # fmt: skip
    """Per-row confidence terms: ``weight * 0.5 ** (age_days / half_life_days)`` (``weight`` if no decay)."""
    if half_life_days is None or len(weight) == 0:
        return weight
    if ts_null is not None:
        raise ConfigError(
            f"ingest.time_decay_half_life_days={half_life_days} needs a timestamp on every event, but "
            f"{int(ts_null.sum()):,} of {len(weight):,} events have none; set it to null or map "
            "ingest.columns.timestamp"
        )
    ref = int(ts_us.max()) if reference_us is None else reference_us
    age_days = (ref - ts_us).astype(np.float64)
    age_days /= _US_PER_DAY
    n_future = int((age_days < 0).sum())
    if n_future:
        log.warning("%d events are newer than the decay reference time; their age is clipped to 0", n_future)
        np.maximum(age_days, 0.0, out=age_days)
    age_days *= -1.0 / half_life_days
    terms = np.exp2(age_days, out=age_days)
    terms *= weight
    return terms


_NEVER = np.iinfo(np.int32).max


def _k_core_codes(
    user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, min_user: int, min_item: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Iterative k-core over (user, item) code pairs.

    Returns:
        ``(alive, death_user, death_item, stats)``: ``alive`` marks surviving pairs; ``death_*[code]`` is the
        step that removed the user/item (pass ``p``: user step ``2p``, item step ``2p + 1``; ``_NEVER`` if it
        survived or had no pair), so a pair died at ``min(death_user[u], death_item[i])`` and the parity says
        which rule removed it. ``stats``: ``users_removed``, ``items_removed``, ``iterations``.
    """
    death_u = np.full(n_users, _NEVER, dtype=np.int32)
    death_i = np.full(n_items, _NEVER, dtype=np.int32)
    stats = {"users_removed": 0, "items_removed": 0, "iterations": 0}
    if min_user <= 1 and min_item <= 1:
        return np.ones(len(user), dtype=bool), death_u, death_i, stats
    idx = np.arange(len(user))  # positions of the still-alive pairs (shrinks every pass)
    u, i = user, item
    step = 0
    while True:
        removed = False
        if min_user > 1:
            cnt = np.bincount(u, minlength=n_users)
            thin = (cnt > 0) & (cnt < min_user)
            if thin.any():
                death_u[thin] = step
                stats["users_removed"] += int(thin.sum())
                keep = ~thin[u]
                idx, u, i = idx[keep], u[keep], i[keep]
                removed = True
        if min_item > 1:  # counted on what the user step left
            cnt = np.bincount(i, minlength=n_items)
            thin = (cnt > 0) & (cnt < min_item)
            if thin.any():
                death_i[thin] = step + 1
                stats["items_removed"] += int(thin.sum())
                keep = ~thin[i]
                idx, u, i = idx[keep], u[keep], i[keep]
                removed = True
        if not removed:
            break
        step += 2
        stats["iterations"] += 1
    alive = np.zeros(len(user), dtype=bool)
    alive[idx] = True
    return alive, death_u, death_i, stats


def _k_core_rows(died_user: np.ndarray, died_item: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, int]:
    """(rows removed by the user rule, rows removed by the item rule) from per-pair or per-row death steps."""
    first = np.minimum(died_user, died_item)
    dead = first != _NEVER
    by_user = dead & (first % 2 == 0)
    by_item = dead & ~by_user
    if weights is None:
        return int(by_user.sum()), int(by_item.sum())
    return int(weights[by_user].sum()), int(weights[by_item].sum())


def _weights(events: pl.DataFrame) -> np.ndarray:
    weight = events["weight"].cast(pl.Float64).to_numpy()
    if not np.isfinite(weight.sum()) and not np.isfinite(weight).all():  # the sum is the cheap check
        raise IngestError("events column 'weight' has null/NaN/inf values; ingest must quarantine or fill them")
    return weight


def _require_columns(frame: pl.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise IngestError(f"{what} lacks column(s) {missing} (found: {frame.columns}); ingest produces them")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def aggregate_pairs(
    events: pl.DataFrame, half_life_days: float | None, reference_time: datetime | None = None
) -> tuple[pl.DataFrame, int]:
    """Net confidence per (user, item) pair; pairs whose net is <= 0 are dropped.

    Each event contributes ``weight * 0.5 ** (age_days / half_life_days)`` (``weight`` alone when
    ``half_life_days`` is None), with ``age_days`` measured back from ``reference_time`` (default: the
    latest ``ts`` of *these* events, so nothing later can leak in; naive datetimes are taken as UTC).

    Args:
        events: ``user_id``, ``item_id``, ``ts`` (Datetime[us, UTC], may be null without decay),
            ``weight`` (Float64, signed: negative = return/cancellation).

    Returns:
        ``(pairs, n_cancelled_rows)``: ``pairs`` has ``user_id``, ``item_id``, ``confidence`` (Float64,
        > 0), ``n_rows`` (Int64), ``last_ts`` (latest event of the pair), sorted by (user_id, item_id).
        ``n_cancelled_rows`` counts the rows of dropped pairs (returns that cancel earlier purchases).
    """
    _require_columns(events, ["user_id", "item_id", "ts", "weight"], "events")
    uniq_u, uc = factorize(events["user_id"])
    uniq_i, ic = factorize(events["item_id"])
    ts_us, ts_null = _ts_micros(normalize_ts(events["ts"]))
    ref = None if reference_time is None else _micros(reference_time)
    terms = _decayed(_weights(events), ts_us, ts_null, half_life_days, ref)
    p = _group_pairs(uc, ic, len(uniq_u), len(uniq_i), terms, ts_us)
    keep = p.positive
    assert p.last_ts is not None
    last = p.last_ts[keep]
    pairs = pl.DataFrame(
        {
            "user_id": uniq_u.gather(p.user[keep]).rename("user_id"),
            "item_id": uniq_i.gather(p.item[keep]).rename("item_id"),
            "confidence": pl.Series(p.confidence[keep], dtype=pl.Float64),
            "n_rows": pl.Series(p.n_rows[keep], dtype=pl.Int64),
            "last_ts": _ts_series("last_ts", last, last == _TS_NULL),
        }
    )
    return pairs, int(p.n_rows[~keep].sum())


def k_core(pairs: pl.DataFrame, min_user: int, min_item: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """Iteratively drop users with < ``min_user`` items and items with < ``min_item`` users, to a fixpoint.

    Each pass removes thin users, then thin items (counted on what is left), until a pass removes nothing.

    Args:
        pairs: one row per (user_id, item_id) with ``n_rows`` (events behind the pair; 1 if absent).

    Returns:
        ``(kept_pairs, stats)``: stats has ``kcore_user`` / ``kcore_item`` (event rows removed, i.e. the sum
        of ``n_rows``), ``users_removed`` / ``items_removed`` and ``iterations`` (passes that removed
        something; 0 when nothing was removed or both minimums are 1).
    """
    _require_columns(pairs, ["user_id", "item_id"], "pairs")
    uniq_u, uc = factorize(pairs["user_id"])
    uniq_i, ic = factorize(pairs["item_id"])
    n_rows = (
        pairs["n_rows"].cast(pl.Int64).to_numpy()
        if "n_rows" in pairs.columns
        else np.ones(pairs.height, dtype=np.int64)
    )
    alive, death_u, death_i, info = _k_core_codes(uc, ic, len(uniq_u), len(uniq_i), min_user, min_item)
    user_rows, item_rows = _k_core_rows(death_u[uc], death_i[ic], n_rows)
    stats = {"kcore_user": user_rows, "kcore_item": item_rows, **info}
    return pairs.filter(pl.Series(alive)), stats


def _code_to_index(
    uniq: pl.Series, used: np.ndarray, previous: IdMap | None, what: str
) -> tuple[IdMap, np.ndarray | None, bool]:
    """Final ID map for the codes marked ``used``.

    Returns:
        ``(map, remap, monotone)``: ``remap[code]`` is the final index (-1 for unused codes), None when it
        is the identity; ``monotone`` when it preserves code order (so sorted pairs stay sorted).
    """
    if previous is not None and previous.dtype != uniq.dtype:
        raise IngestError(
            f"the previous {what} ID map holds {previous.dtype} IDs but this log's {what}_id is {uniq.dtype}; "
            f"map the same column with the same type (ingest.columns.{what}) or unset ingest.id_maps_from"
        )
    all_used = bool(used.all())
    kept = uniq if all_used else uniq.filter(pl.Series(used))
    if previous is None:
        id_map = IdMap(kept.rename("id"))
        if all_used:
            return id_map, None, True
        remap = np.full(len(uniq), -1, dtype=_code_dtype(len(uniq)))
        remap[used] = np.arange(len(kept), dtype=remap.dtype)
        return id_map, remap, True
    id_map = IdMap.from_ids(kept, previous=previous)
    idx = id_map.lookup(kept).to_numpy()
    remap = np.full(len(uniq), -1, dtype=_code_dtype(len(id_map)))
    remap[used] = idx
    return id_map, remap, bool(np.all(np.diff(idx) > 0))


def summed_csr(data: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR (sorted indices, duplicates summed in input order) from COO triples in O(nnz).

    Two stable counting sorts -- COO -> CSR of the transpose (by column), then CSR -> CSC (by row) -- leave
    every row's columns sorted, so no per-row comparison sort is needed (scipy's ``tocsr`` + sort costs
    about 2x this at 20M entries). Pairs that sum to exactly 0 stay as explicit entries.
    """
    from scipy.sparse import _sparsetools

    n_rows, n_cols = shape
    nnz = len(data)
    idx = np.int32 if max(n_rows, n_cols, nnz) < np.iinfo(np.int32).max else np.int64
    rows = np.asarray(rows).astype(idx, copy=False)
    cols = np.asarray(cols).astype(idx, copy=False)
    data = np.asarray(data)
    t_indptr, t_indices, t_data = np.empty(n_cols + 1, idx), np.empty(nnz, idx), np.empty(nnz, data.dtype)
    _sparsetools.coo_tocsr(n_cols, n_rows, nnz, cols, rows, data, t_indptr, t_indices, t_data)
    indptr, indices, out = np.empty(n_rows + 1, idx), np.empty(nnz, idx), np.empty(nnz, data.dtype)
    _sparsetools.csr_tocsc(n_cols, n_rows, t_indptr, t_indices, t_data, indptr, indices, out)
    m = sp.csr_matrix((out, indices, indptr), shape=shape)
    m.has_sorted_indices = True
    m.sum_duplicates()
    return m


def _csr_rows(m: sp.csr_matrix) -> np.ndarray:
    """int64 row index of every stored entry of a CSR matrix."""
    return np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))


def _remapped(remap: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    return codes if remap is None else remap[codes]


def build_interactions(
    events: pl.DataFrame,
    cfg: IngestConfig,
    report: RowReport,
    previous: tuple[IdMap, IdMap] | None = None,
) -> Interactions:
    """Clean events -> ``Interactions`` (CSR users x items of float32 confidence, ID maps, report, events).

    Steps: aggregate pairs (``cfg.time_decay_half_life_days``, reference = latest ts of these events)
    -> drop cancelled pairs (``report.filtered["cancelled_out"]``) -> k-core with
    ``cfg.min_user_interactions`` / ``cfg.min_item_interactions`` (``kcore_user`` / ``kcore_item``) ->
    ID maps (sorted IDs; with ``previous`` its indices are kept and new IDs appended, and every user/item of
    the extended maps gets a row/column, empty when absent here) -> CSR with sorted indices.

    Args:
        events: clean events (``user_id``, ``item_id``, ``ts``, ``weight``); its rows are in ``report.kept``.
        cfg: the ingest slice.
        report: mutated: rows removed here move out of ``kept``; ``details`` gets users, items, nnz, density.
        previous: ``(user_map, item_map)`` of an earlier run to extend.

    Returns:
        ``Interactions`` whose ``events`` are the kept rows (input order) as ``user_idx``, ``item_idx``
        (Int64), ``ts``, ``weight``.
    """
    _require_columns(events, ["user_id", "item_id", "ts", "weight"], "events")
    if report.kept < events.height:
        raise IngestError(
            f"report.kept={report.kept:,} is below the {events.height:,} events passed in; pass the report "
            "that counted these events"
        )
    if events.height == 0:
        raise IngestError("there are no events to build interactions from; check the ingest report and split")
    uniq_u, uc = factorize(events["user_id"])
    uniq_i, ic = factorize(events["item_id"])
    n_u0, n_i0 = len(uniq_u), len(uniq_i)
    ts = normalize_ts(events["ts"])
    ts_us, ts_null = _ts_micros(ts)
    weight = _weights(events)
    terms = _decayed(weight, ts_us, ts_null, cfg.time_decay_half_life_days, None)
    del ts_us

    # 1. Sum per (user, item) (see summed_csr), keeping
    #    pairs that sum to exactly 0 as explicit entries, so cancellations stay visible.
    summed = summed_csr(terms, uc, ic, (n_u0, n_i0))
    net = summed.data
    positive = net > 0.0
    entry_user: np.ndarray | None = None  # user code of every entry (CSR row), built only when needed
    if float(terms.min()) < 0.0:
        # A pair with a negative term may cancel to float noise: compare its net with its gross
        # (sum of |terms| = net - 2 * negative part), computed from the (few) negative rows only.
        neg = np.flatnonzero(terms < 0.0)
        neg_m = summed_csr(terms[neg], uc[neg], ic[neg], (n_u0, n_i0))
        entry_user = _csr_rows(summed)
        at = np.searchsorted(entry_user * n_i0 + summed.indices, _csr_rows(neg_m) * n_i0 + neg_m.indices)
        positive[at] = net[at] > _CANCEL_RTOL * (net[at] - 2.0 * neg_m.data)
        del neg, neg_m, at
    del terms

    # 2. Rows of cancelled pairs (net <= 0) leave. Only rows of users with a cancelled pair are candidates;
    #    their pair keys are looked up in a hash set of the cancelled keys.
    row_gone: np.ndarray | None = None
    n_cancelled = 0
    if not positive.all():
        entry_user = _csr_rows(summed) if entry_user is None else entry_user
        gone = ~positive
        gone_keys = pl.Series(entry_user[gone] * n_i0 + summed.indices[gone], dtype=pl.Int64)
        user_has_gone = np.zeros(n_u0, dtype=bool)
        user_has_gone[entry_user[gone]] = True
        cand = np.flatnonzero(user_has_gone[uc])
        cand_keys = pl.Series(uc[cand], dtype=pl.Int64) * n_i0 + pl.Series(ic[cand], dtype=pl.Int64)
        row_gone = np.zeros(len(uc), dtype=bool)
        row_gone[cand[cand_keys.is_in(gone_keys.implode()).to_numpy()]] = True
        n_cancelled = int(row_gone.sum())
        del gone, gone_keys, user_has_gone, cand, cand_keys
    report.filter_out("cancelled_out", n_cancelled)

    # 3. k-core on the surviving pairs; rows are attributed to the rule that removed their pair first.
    keep_entry = positive
    kstats = {"kcore_user": 0, "kcore_item": 0, "iterations": 0}
    if cfg.min_user_interactions > 1 or cfg.min_item_interactions > 1:
        entry_user = _csr_rows(summed) if entry_user is None else entry_user
        pos = np.flatnonzero(positive)
        alive, death_u, death_i, info = _k_core_codes(
            entry_user[pos], summed.indices[pos], n_u0, n_i0, cfg.min_user_interactions, cfg.min_item_interactions
        )
        kstats["iterations"] = info["iterations"]
        if not alive.all():
            keep_entry = np.zeros(len(net), dtype=bool)
            keep_entry[pos[alive]] = True
            died_u, died_i = death_u[uc], death_i[ic]
            if row_gone is not None:  # cancelled rows are already counted
                died_u[row_gone] = _NEVER
                died_i[row_gone] = _NEVER
            kstats["kcore_user"], kstats["kcore_item"] = _k_core_rows(died_u, died_i)
            killed = np.minimum(died_u, died_i) != _NEVER
            row_gone = killed if row_gone is None else row_gone | killed
            del died_u, died_i, killed
    report.filter_out("kcore_user", kstats["kcore_user"])
    report.filter_out("kcore_item", kstats["kcore_item"])
    all_kept = bool(keep_entry.all())

    # 4. ID maps of the users/items that kept a pair (extending ``previous`` when given).
    used_u = np.diff(summed.indptr) > 0
    used_i = np.bincount(summed.indices, minlength=n_i0) > 0
    if not all_kept:
        entry_user = _csr_rows(summed) if entry_user is None else entry_user
        used_u = np.bincount(entry_user[keep_entry], minlength=n_u0) > 0
        used_i = np.bincount(summed.indices[keep_entry], minlength=n_i0) > 0
    prev_u, prev_i = previous if previous is not None else (None, None)
    users, remap_u, mono_u = _code_to_index(uniq_u, used_u, prev_u, "user")
    items, remap_i, mono_i = _code_to_index(uniq_i, used_i, prev_i, "item")
    n_users, n_items = len(users), len(items)

    # 5. The float32 CSR in final index space.
    data = (net if all_kept else net[keep_entry]).astype(np.float32)
    np.maximum(data, _F32_TINY, out=data)  # a decayed confidence below float32 range must stay > 0
    if all_kept and remap_u is None and remap_i is None:
        matrix = sp.csr_matrix((data, summed.indices, summed.indptr), shape=(n_users, n_items))
    else:
        entry_user = _csr_rows(summed) if entry_user is None else entry_user
        rows = _remapped(remap_u, entry_user if all_kept else entry_user[keep_entry])
        cols = _remapped(remap_i, summed.indices if all_kept else summed.indices[keep_entry])
        if mono_u and mono_i:  # the maps keep code order: entries stay sorted, build the CSR directly
            indptr = np.zeros(n_users + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
            matrix = sp.csr_matrix((data, cols, indptr), shape=(n_users, n_items))
        else:
            matrix = sp.csr_matrix((data, (rows, cols)), shape=(n_users, n_items))
            matrix.sort_indices()
        del rows, cols
    matrix.has_sorted_indices = True
    del summed, net, data, entry_user

    # 6. The kept events, in input order.
    kept_events = pl.DataFrame(
        {
            "user_idx": _remapped(remap_u, uc),
            "item_idx": _remapped(remap_i, ic),
            "ts": ts,
            "weight": pl.Series(weight, dtype=pl.Float64),
        }
    )
    if row_gone is not None:
        kept_events = kept_events.filter(~pl.Series(row_gone))
    kept_events = kept_events.with_columns(pl.col("user_idx", "item_idx").cast(INDEX_DTYPE))

    report.details.update(
        users=n_users,
        items=n_items,
        nnz=int(matrix.nnz),
        density=float(matrix.nnz) / float(max(n_users * n_items, 1)),
        kcore_iterations=kstats["iterations"],
    )
    report.check()
    if matrix.nnz == 0:
        raise IngestError(
            f"no interactions left out of {events.height:,} events ({n_cancelled:,} cancelled out, k-core removed "
            f"{kstats['kcore_user'] + kstats['kcore_item']:,}); lower ingest.min_user_interactions / "
            "ingest.min_item_interactions or check ingest.event_weights"
        )
    log.info(
        "interactions: %s users x %s items, nnz %s (density %.2e); %s rows cancelled out, k-core removed "
        "%s user rows / %s item rows in %d passes",
        f"{n_users:,}", f"{n_items:,}", f"{matrix.nnz:,}", report.details["density"], f"{n_cancelled:,}",
        f"{kstats['kcore_user']:,}", f"{kstats['kcore_item']:,}", kstats["iterations"],
    )  # fmt: skip
    return Interactions(matrix=matrix, users=users, items=items, report=report, events=kept_events)


def save_id_maps(users: IdMap, items: IdMap, folder: str | Path) -> None:
    """Write ``user_map.parquet`` and ``item_map.parquet`` (columns ``index``, ``id``) atomically."""
    folder = Path(folder)
    users.save(folder / USER_MAP_FILE)
    items.save(folder / ITEM_MAP_FILE)


def load_id_maps(folder: str | Path) -> tuple[IdMap, IdMap]:
    """Read the ``(user_map, item_map)`` written by ``save_id_maps``.

    ``build_interactions(previous=...)`` then checks that their ID dtypes match the new log's.
    """
    folder = Path(folder)
    out = []
    for name in (USER_MAP_FILE, ITEM_MAP_FILE):
        path = folder / name
        if not path.is_file():
            raise IngestError(
                f"ID map '{path}' does not exist; point ingest.id_maps_from at a run folder holding "
                f"{USER_MAP_FILE} and {ITEM_MAP_FILE}, or unset it"
            )
        out.append(IdMap.load(path))
    return out[0], out[1]
