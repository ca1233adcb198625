"""The registered recommender, standalone: this file *is* the model (MLflow models-from-code).

It imports only numpy, pandas, pyarrow, scipy and mlflow, never ``recsys_embed``, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` works in a virtualenv built from the model's own
``requirements.txt``. ``registry.log_recommender`` logs this file with ``mlflow.pyfunc.log_model`` and the
bundle below as its one artifact.

Bundle (folder, artifact ``bundle``), written by ``save_bundle``::

    meta.json          format, model, scoring, default_k, fold_in: how a ``history`` folds in, or null (below)
    user_ids.parquet   column ``id``: row u is user index u, in the export's ID type (Int64 or String)
    item_ids.parquet   column ``id``: row i is item index i
    user_factors.npy   float32 (n_users, d): the served scoring vectors (score = dot product); ``.npz`` (zlib,
                       array ``a``) instead when mostly zeros, e.g. EASE's rows of X
    item_factors.npy   float32 (n_items, d); ``.npz`` likewise
    seen.npz           CSR (n_users, n_items): stored entries are never recommended; values = confidence
    fallback.npy       bool (n_users,): True where the user's answers come from the popularity fallback
    popularity.npy     float64 (n_items,): the answer for users the model does not know
    admissible.npy     int64 sorted admissible item indices (the export's allow/deny lists); absent: all items
    item_texts.parquet column ``text``: row i is item i's text (the log's ``item_text``); absent: IDs only

Input (DataFrame):
    ``user_id``: ints or strings, either works (``12347`` and ``"12347"`` are the same user of an Int64 map).
    ``history`` (optional): a list of item IDs per row (None: none). Listed items are never recommended to that
    row. With ``meta.fold_in`` set, a row with a history (known user or not) is answered by the model
    (``source="model"``) from a user vector folded in over the model's own dimensions (``fold_in["dims"]``, default
    all; a served bundle's last one is the popularity fallback, which a folded-in user leaves at 0):

    - ``{"kind": "als", "alpha", "regularization"}`` (a ``fold_in`` without ``kind``, as bundles before EASE's
      fold-in wrote it, is ALS): the vector is recomputed from the user's stored train row (``seen.npz``'s
      confidence) plus the history (each listing adds 1 to the item's count), with implicit's
      ``recalculate_user`` math: ``c = alpha * r``, ``x = (YᵀY + λI + Yᵀ(C − I)Y)⁻¹ Yᵀ C p``.
    - ``{"kind": "ease", "binary"}``: the vector is a row of X (``n_items`` wide; the item vectors are B's
      columns, so ``score = x · B``): the user's stored row (zeros for a user the model does not know) with each
      listed item set to 1.0 (``binary`` true: a 0/1 X, and a recency-weighted X too, since a history carries no
      timestamps: its items count as bought now, ``0.5 ** (0 / half life) = 1.0``), or with 1 added per listing
      (``binary`` false: a confidence X).

    Without ``fold_in`` the stored vector stands (the two-tower fold-in needs torch: its entry point is
    ``TwoTowerEncoder.user_vectors`` + ``ServedRecommender.recommend_vectors``).
Params: ``k`` (default ``meta.default_k``).
Output: one row per input row: ``user_id`` (as given), ``item_ids`` (list, the export's item ID type, best first),
``scores`` (list of float), ``source`` (``model``, or ``fallback`` for a user flagged in ``fallback.npy`` or
unknown to the model: those get the popularity top-k, never an empty list), and ``item_texts`` (list of str or
None, beside ``item_ids``) when the bundle has ``item_texts.parquet``.

Ranking is the export's (``recsys_embed.evaluation.topk``): float32 dot products, train-seen and inadmissible items
excluded, scores descending, ties broken by the lower item index; a user with fewer than k admissible items
gets fewer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from mlflow.pyfunc import PythonModel

FORMAT = 1
SOURCE_MODEL, SOURCE_FALLBACK = "model", "fallback"
_CHUNK = 1024  # users scored per GEMM: bounds the score buffer at chunk x n_items x 4 bytes


def save_bundle(
    folder: str | Path,
    *,
    user_ids: pa.Array,
    item_ids: pa.Array,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    seen: sp.csr_matrix,
    fallback: np.ndarray,
    popularity: np.ndarray,
    admissible: np.ndarray | None,
    model: str,
    default_k: int,
    fold_in: dict[str, Any] | None = None,
    item_texts: pa.Array | None = None,
) -> Path:
    """Write the bundle that ``ServedRecommender`` loads (layout in the module doc); checks shapes first.

    ``item_texts``: one string (or null) per item index; the answers then carry them (``item_texts``)."""
    folder = Path(folder)
    n_users, n_items = len(user_ids), len(item_ids)
    uf = np.ascontiguousarray(user_factors, dtype=np.float32)
    itf = np.ascontiguousarray(item_factors, dtype=np.float32)
    kind = _fold_kind(fold_in)
    if kind == "ease":  # X rows against B's columns: the model's dimensions are the items (see _fold_dims)
        dims = _fold_dims(fold_in, n_items, uf.shape[1])
        if dims != n_items or uf.shape[1] not in (n_items, n_items + 1):
            raise ValueError(f"cannot bundle the {model} recommender: an EASE fold-in needs user vectors that are "
                             f"rows of X ({n_items} items wide, plus the fallback dimension), got {uf.shape[1]} "
                             f"columns and fold_in dims {dims}")  # fmt: skip
    checks = [
        (uf.shape[0] == n_users, f"user_factors has {uf.shape[0]} rows for {n_users} user IDs"),
        (itf.shape[0] == n_items, f"item_factors has {itf.shape[0]} rows for {n_items} item IDs"),
        (uf.shape[1] == itf.shape[1], f"user dim {uf.shape[1]} != item dim {itf.shape[1]}"),
        (seen.shape == (n_users, n_items), f"seen matrix {seen.shape} != (users, items) {(n_users, n_items)}"),
        (len(fallback) == n_users, f"fallback has {len(fallback)} entries for {n_users} users"),
        (len(popularity) == n_items, f"popularity has {len(popularity)} entries for {n_items} items"),
        (bool(np.isfinite(uf).all() and np.isfinite(itf).all()), "the factors hold NaN/inf values"),
        (item_texts is None or len(item_texts) == n_items,
         f"item_texts has {len(item_texts) if item_texts is not None else 0} entries for {n_items} items"),
    ]  # fmt: skip
    for ok, what in checks:
        if not ok:
            raise ValueError(f"cannot bundle the {model} recommender: {what}")
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": user_ids}), folder / "user_ids.parquet")
    pq.write_table(pa.table({"id": item_ids}), folder / "item_ids.parquet")
    _save_factors(folder / "user_factors", uf)
    _save_factors(folder / "item_factors", itf)
    sp.save_npz(folder / "seen.npz", sp.csr_matrix(seen, dtype=np.float32), compressed=True)
    np.save(folder / "fallback.npy", np.asarray(fallback, dtype=bool))
    np.save(folder / "popularity.npy", np.asarray(popularity, dtype=np.float64))
    if admissible is not None:
        np.save(folder / "admissible.npy", np.unique(np.asarray(admissible, dtype=np.int64)))
    if item_texts is not None:
        pq.write_table(pa.table({"text": pa.array(item_texts, type=pa.string())}), folder / "item_texts.parquet")
    meta = {"format": FORMAT, "model": model, "scoring": "dot", "default_k": int(default_k), "fold_in": fold_in}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def _save_factors(stem: Path, a: np.ndarray) -> None:
    """``stem.npy``, or ``stem.npz`` (zlib) when most entries are 0: EASE's user vectors are rows of X, which
    compress ~50x, and an uncompressed copy would be the largest file of the registered model."""
    if a.size and np.count_nonzero(a) * 2 < a.size:
        np.savez_compressed(stem.with_suffix(".npz"), a=a)
    else:
        np.save(stem.with_suffix(".npy"), a)


def _load_factors(stem: Path) -> np.ndarray:
    npy = stem.with_suffix(".npy")
    if npy.exists():
        return np.load(npy)
    with np.load(stem.with_suffix(".npz")) as z:
        return np.asarray(z["a"])


def rank(
    user_vectors: np.ndarray,
    items_t: np.ndarray,
    k: int,
    exclude: list[np.ndarray],
    cols: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``user_vectors`` against the candidate items, ranked as ``evaluation.topk`` does.

    Args:
        user_vectors: float32 (n, d).
        items_t: float32 (d, m), C-contiguous: the candidate items' vectors, transposed.
        k: items per row.
        exclude: per row, item indices (into the full catalog) never to return.
        cols: full-catalog index of each candidate column (None: column j is item j).

    Returns:
        (items int64 (n, k), scores float32 (n, k)); scores descending, ties by the lower item index; slots
        without an admissible item hold item -1 and score -inf.
    """
    n, m = user_vectors.shape[0], items_t.shape[1]
    k_eff = min(k, m)
    out_items = np.full((n, k_eff), -1, dtype=np.int64)
    out_scores = np.full((n, k_eff), -np.inf, dtype=np.float32)
    if n == 0 or m == 0:
        return out_items, out_scores
    pos = None
    if cols is not None:
        pos = np.full(int(cols.max()) + 1, -1, dtype=np.int64)
        pos[cols] = np.arange(m)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        s = np.matmul(np.ascontiguousarray(user_vectors[lo:hi], dtype=np.float32), items_t)
        for r in range(hi - lo):
            ex = np.asarray(exclude[lo + r], dtype=np.int64)
            if pos is not None and ex.size:
                ex = ex[ex < len(pos)]
                ex = pos[ex]
                ex = ex[ex >= 0]
            s[r, ex] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k_eff]  # stable: equal scores keep column order
        top = np.take_along_axis(s, order, axis=1)
        idx = order if cols is None else cols[order]
        finite = np.isfinite(top)
        out_items[lo:hi] = np.where(finite, idx, -1)
        out_scores[lo:hi] = np.where(finite, top, -np.inf)
    return out_items, out_scores


def fold_in(item_factors: np.ndarray, yty: np.ndarray, items: np.ndarray, r: np.ndarray, alpha: float,
            regularization: float) -> np.ndarray:  # fmt: skip
    """One user's ALS vector from its interactions, as implicit's ``recalculate_user`` (Cholesky) computes it.

    ``c = alpha * r``; ``x = (YᵀY + λI + Σᵢ (cᵢ − 1) yᵢ yᵢᵀ)⁻¹ Σᵢ cᵢ yᵢ`` over the user's items i (r > 0).

    Args:
        item_factors: Y, float32 (n_items, d).
        yty: YᵀY, float64 (d, d).
        items, r: the user's item indices and their confidence before ``alpha`` (e.g. counts).
        alpha, regularization: the model's.

    Returns:
        float32 (d,); zeros when the user has no interaction.
    """
    d = item_factors.shape[1]
    keep = r > 0
    items, c = np.asarray(items, dtype=np.int64)[keep], alpha * np.asarray(r, dtype=np.float64)[keep]
    if items.size == 0:
        return np.zeros(d, dtype=np.float32)
    y = item_factors[items].astype(np.float64)
    a = yty + regularization * np.eye(d) + (y.T * (c - 1.0)) @ y
    b = y.T @ c
    return np.linalg.solve(a, b).astype(np.float32)


def als_confidence(r: np.ndarray, how: str, item_length: np.ndarray | None = None, k1: float = 100.0,
                   b: float = 0.8) -> np.ndarray:  # fmt: skip
    """One user's summed confidence ``r`` (over their items) as the ALS model was fitted on it
    (``models.als.confidence``, the same formulas as ``recsys_embed.models.mf.transform_confidence``).

    Args:
        r: float64 (n_items,), 0 where the user has nothing.
        how: "none", "log1p" or "bm25".
        item_length: bm25 only: float64 (n_items,), each item's summed confidence over all users.
        k1, b: BM25's K1 and B.
    """
    if how in (None, "none"):
        return r
    out = np.zeros_like(r)
    nz = r > 0
    if how == "log1p":
        out[nz] = np.log1p(r[nz])
        return out
    if how != "bm25" or item_length is None:
        raise ValueError(f"ALS confidence {how!r} cannot be folded in (none, log1p or bm25 with item lengths)")
    norm = (1.0 - b) + b * item_length / max(float(item_length.mean()), 1e-12)
    idf = np.log(len(r)) - np.log1p(int(nz.sum()))
    out[nz] = np.maximum(r[nz] * (k1 + 1.0) / (k1 * norm[nz] + r[nz]) * idf, 1e-6)
    return out


def fold_in_ease(stored: np.ndarray | None, items: np.ndarray, n_items: int, binary: bool) -> np.ndarray:
    """One user's EASE query row (a row of X, scored as ``x · B``) from its stored row and a history.

    Args:
        stored: the user's stored row of X (n_items,), or None for a user the model does not know (zeros).
        items: item indices of the history, one per listing (repeats allowed).
        n_items: the catalog size.
        binary: True: each listed item is set to 1.0 (a 0/1 X, or a recency-weighted one: a history has no
            timestamps, so its items count as bought now, weight 1.0); False: 1 is added per listing (confidence).

    Returns:
        float32 (n_items,).
    """
    x = np.zeros(n_items, dtype=np.float32) if stored is None else np.array(stored[:n_items], dtype=np.float32)
    items = np.asarray(items, dtype=np.int64)
    if binary:
        x[items] = 1.0
    else:
        np.add.at(x, items, np.float32(1.0))
    return x


def _fold_kind(fold: dict[str, Any] | None) -> str | None:
    """The fold-in's kind (a ``fold_in`` without one is ALS's, as bundles before EASE's fold-in wrote it)."""
    if fold is None:
        return None
    kind = str(fold.get("kind", "als"))
    if kind not in ("als", "ease"):
        raise ValueError(f"fold_in kind {kind!r} is unknown; this model folds in 'als' and 'ease' histories (or "
                         "set fold_in to null)")  # fmt: skip
    return kind


def _fold_dims(fold: dict[str, Any] | None, n_items: int, d: int) -> int:
    """How many leading dimensions a fold-in rewrites: ``fold_in["dims"]``, else EASE's n_items (X's width), else d."""
    if fold is None:
        return 0
    default = n_items if _fold_kind(fold) == "ease" else d
    return int(fold.get("dims", default))


class ServedRecommender(PythonModel):
    """Top-k recommender over the bundle (see the module doc for the input, params and output)."""

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["bundle"])

    def load(self, folder: str | Path) -> ServedRecommender:
        """Read a bundle folder (``load_context`` does this from the model's artifact)."""
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"bundle '{folder}' has format {self.meta.get('format')}, this model reads {FORMAT}")
        self.user_ids = pq.read_table(folder / "user_ids.parquet").column("id").combine_chunks()
        self.item_ids = pq.read_table(folder / "item_ids.parquet").column("id").combine_chunks()
        self.user_factors = _load_factors(folder / "user_factors")
        self.item_factors = _load_factors(folder / "item_factors")
        self.seen = sp.csr_matrix(sp.load_npz(folder / "seen.npz"))
        self.fallback = np.load(folder / "fallback.npy")
        self.popularity = np.load(folder / "popularity.npy")
        adm = folder / "admissible.npy"
        self.cols = np.load(adm) if adm.exists() else None
        texts = folder / "item_texts.parquet"
        self.item_texts: np.ndarray | None = (
            np.asarray(pq.read_table(texts).column("text").to_pylist(), dtype=object) if texts.exists() else None
        )
        self.default_k = int(self.meta["default_k"])
        self.user_int = pa.types.is_integer(self.user_ids.type)
        self.item_int = pa.types.is_integer(self.item_ids.type)
        self.user_index = pd.Index(self.user_ids.to_pandas())
        self.item_index = pd.Index(self.item_ids.to_pandas())
        self.item_values = np.asarray(self.item_ids.to_pylist(), dtype=object)
        cand = self.item_factors if self.cols is None else self.item_factors[self.cols]
        self.items_t = np.ascontiguousarray(cand.T, dtype=np.float32)
        # popularity order over admissible items: descending, ties by the lower index (the scorer's rule)
        cand_idx = np.arange(len(self.popularity)) if self.cols is None else self.cols
        self.pop_order = cand_idx[np.argsort(-self.popularity[cand_idx], kind="stable")]
        self.fold: dict[str, Any] | None = self.meta.get("fold_in")
        self.fold_kind = _fold_kind(self.fold)
        # fold-in runs over the model's own dimensions: a served bundle's last one is the popularity fallback
        # (fold_in["dims"]), which a folded-in user leaves at 0
        self.fold_dims = _fold_dims(self.fold, len(self.item_ids), self.item_factors.shape[1])
        self.yty: np.ndarray | None = None
        self.item_length: np.ndarray | None = None
        if self.fold_kind == "als":  # EASE needs no Gram matrix (it would be items^2)
            y64 = self.item_factors[:, : self.fold_dims].astype(np.float64)
            self.yty = y64.T @ y64
            if (self.fold or {}).get("confidence") == "bm25":  # BM25's item lengths, from the stored confidence
                positive = self.seen.multiply(self.seen > 0)
                self.item_length = np.asarray(positive.sum(axis=0), dtype=np.float64).ravel()
        return self

    # -- IDs -------------------------------------------------------------------------------------------

    def user_indices(self, values: Any) -> np.ndarray:
        """Index of each user ID (ints or strings), -1 where unknown."""
        return self.user_index.get_indexer(_as_keys(values, self.user_int))

    def item_indices(self, values: Any) -> np.ndarray:
        return self.item_index.get_indexer(_as_keys(values, self.item_int))

    # -- predict ---------------------------------------------------------------------------------------

    # model_input is annotated pd.DataFrame: a hint MLflow does not turn into a schema (the signature is explicit)
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.recommend(model_input, (params or {}).get("k"))

    def recommend(self, model_input: Any, k: int | None = None) -> pd.DataFrame:
        """The answers for ``model_input`` (a DataFrame with ``user_id`` and optionally ``history``)."""
        frame = pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError(f"the input lacks column 'user_id' (found: {list(frame.columns)}); pass "
                             "pd.DataFrame({'user_id': [...]}) with one user ID per row")  # fmt: skip
        k = int(k) if k is not None else self.default_k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(frame)
        users = self.user_indices(frame["user_id"])
        histories = [_history(h) for h in frame["history"]] if "history" in frame.columns else [None] * n
        vectors = np.zeros((n, self.user_factors.shape[1]), dtype=np.float32)
        exclude: list[np.ndarray] = []
        scored = np.zeros(n, dtype=bool)  # rows answered by the model's vectors
        folded = np.zeros(n, dtype=bool)  # rows whose vector was folded in from their history
        for row in range(n):
            u, hist = int(users[row]), histories[row]
            items = self.item_indices(hist) if hist else np.empty(0, dtype=np.int64)
            items = items[items >= 0]
            stored = self.seen.indices[self.seen.indptr[u] : self.seen.indptr[u + 1]] if u >= 0 else items[:0]
            exclude.append(np.union1d(stored, items).astype(np.int64))
            if self.fold is not None and items.size:
                vectors[row, : self.fold_dims] = self._fold_in(u, items)
                scored[row] = folded[row] = True
            elif u >= 0:
                vectors[row] = self.user_factors[u]
                scored[row] = True
        out_items = np.full((n, min(k, self.items_t.shape[1])), -1, dtype=np.int64)
        out_scores = np.full(out_items.shape, -np.inf, dtype=np.float32)
        rows = np.flatnonzero(scored)
        if rows.size:
            it, sc = rank(vectors[rows], self.items_t, k, [exclude[r] for r in rows], self.cols)
            out_items[rows], out_scores[rows] = it, sc
        source = np.where(scored, SOURCE_MODEL, SOURCE_FALLBACK).astype(object)
        known = users >= 0
        source[known & ~folded & self.fallback[np.maximum(users, 0)]] = SOURCE_FALLBACK
        item_lists, text_lists, score_lists = [], [], []
        for row in range(n):
            if scored[row]:
                ok = out_items[row] >= 0
                idx, sc = out_items[row][ok], out_scores[row][ok]
            else:
                idx = self._popular(k, exclude[row])
                sc = self.popularity[idx]
            item_lists.append(self.item_values[idx].tolist())
            if self.item_texts is not None:
                text_lists.append(self.item_texts[idx].tolist())
            score_lists.append([float(x) for x in sc])
        columns = {"user_id": frame["user_id"].tolist(), "item_ids": item_lists,
                   **({"item_texts": text_lists} if self.item_texts is not None else {}), "scores": score_lists}
        return pd.DataFrame({**columns, "source": source.tolist()})

    def _fold_in(self, u: int, items: np.ndarray) -> np.ndarray:
        """The folded-in vector (``fold_dims``,) of user index ``u`` (-1: unknown) with history ``items``."""
        assert self.fold is not None
        if self.fold_kind == "ease":
            stored = self.user_factors[u] if u >= 0 else None
            return fold_in_ease(stored, items, self.fold_dims, bool(self.fold.get("binary", True)))
        r = np.bincount(items, minlength=len(self.item_ids)).astype(np.float64)
        if u >= 0:
            lo, hi = self.seen.indptr[u], self.seen.indptr[u + 1]
            np.add.at(r, self.seen.indices[lo:hi], self.seen.data[lo:hi])
        r = als_confidence(r, self.fold.get("confidence", "none"), self.item_length,
                           float(self.fold.get("bm25_k1", 100.0)), float(self.fold.get("bm25_b", 0.8)))  # fmt: skip
        nz = np.flatnonzero(r)
        assert self.yty is not None
        return fold_in(self.item_factors[:, : self.fold_dims], self.yty, nz, r[nz], float(self.fold["alpha"]),
                       float(self.fold["regularization"]))  # fmt: skip

    def recommend_vectors(self, vectors: np.ndarray, k: int | None = None, histories: list[Any] | None = None
                          ) -> pd.DataFrame:  # fmt: skip
        """Top-k for user vectors computed elsewhere, in this model's space: the two-tower fold-in entry point
        (``TwoTowerEncoder.user_vectors(history)`` embeds users from their history with torch; this ranks them
        with the served items, filters and tie rule). ``histories``: item IDs per row, never recommended.

        Returns:
            ``item_ids`` (and ``item_texts`` when the bundle has them) and ``scores`` per row (``source`` is
            ``model``).
        """
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.item_factors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[1]} columns, the {self.meta['model']} model's items have "
                             f"{self.item_factors.shape[1]}; embed them with the same model's encoder")  # fmt: skip
        k = int(k) if k is not None else self.default_k
        hist = histories if histories is not None else [None] * len(vectors)
        exclude = []
        for h in hist:
            idx = self.item_indices(_history(h) or [])
            exclude.append(idx[idx >= 0])
        items, scores = rank(vectors, self.items_t, k, exclude, self.cols)
        ok = items >= 0
        texts = self.item_texts
        return pd.DataFrame({
            "item_ids": [self.item_values[items[r][ok[r]]].tolist() for r in range(len(items))],
            **({"item_texts": [texts[items[r][ok[r]]].tolist() for r in range(len(items))]}
               if texts is not None else {}),
            "scores": [[float(x) for x in scores[r][ok[r]]] for r in range(len(items))],
            "source": [SOURCE_MODEL] * len(items),
        })

    def _popular(self, k: int, exclude: np.ndarray) -> np.ndarray:
        """The popularity top-k (admissible items, minus ``exclude``)."""
        order = self.pop_order
        if exclude.size:
            order = order[~np.isin(order, exclude)]
        return order[:k]


def _as_keys(values: Any, integer: bool) -> pd.Index:
    """IDs as lookup keys of the map's type: ints (from ints, whole floats or digit strings) or strings."""
    vals = list(values)
    if not integer:
        return pd.Index([_as_str(v) for v in vals], dtype=object)
    return pd.Index([_as_int(v) for v in vals], dtype=object)


def _as_str(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _as_int(v: Any) -> Any:
    """An int for an ID that names one exactly; None otherwise (unknown user)."""
    if isinstance(v, bool | np.bool_) or v is None:
        return None
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return int(v) if np.isfinite(v) and float(v).is_integer() else None
    try:
        return int(str(v).strip())
    except ValueError:
        return None


def _history(h: Any) -> list[Any] | None:
    """A history cell as a list of item IDs (None, NaN or an empty list: no history)."""
    if h is None:
        return None
    if isinstance(h, float) and np.isnan(h):
        return None
    if isinstance(h, str):
        raise ValueError(f"history must be a list of item IDs per row, got the string {h!r}; pass [{h!r}]")
    items = list(h)
    return items or None


mlflow.models.set_model(ServedRecommender())
