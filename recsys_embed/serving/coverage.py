"""What users consume covers every user with history: the served embeddings, the history filter, the fallback.

The production refit (``stages.run_full`` / ``stages.run_refit``) fits the shipped models on every kept event. Its
ID maps still leave some users without a model vector: a user whose every purchase was cancelled (no positive
pair), a user k-core removed, a user whose rows all cancel out in the refit matrix. Such users still have a
history, so they still get ``k`` rows: from the popularity ranking of the same refit, flagged as the fallback.

``served_embeddings`` folds both sources into one ``Embeddings`` (dot scoring) that the shared top-k scorer, the
export, the sharded export and the registered recommender all use unchanged:

- users: every user with at least one kept event (the refit user map, then the history-only users appended, so
  no existing index moves);
- vectors: ``[model vector, 0]`` for a user the model serves, ``[0, ..., 0, 1]`` for a fallback user; items get
  ``[model vector, popularity]``. A model user's score is the model's score exactly; a fallback user's score is
  the item's popularity (distinct refit users per item);
- ``info["fallback_dim"] = True`` marks the last dimension, so ``fallback_mask`` tells the source of every user
  without any side table.

``history_matrix`` is the seen filter: every (user, item) pair with any kept event, cancellations included, so no
shipped row recommends an item in the user's kept history.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

FALLBACK_DIM = "fallback_dim"


def served_users(events: pl.DataFrame, model_users: IdMap) -> IdMap:
    """Every user with a kept event: ``model_users`` (indices kept) with the other users appended (sorted)."""
    return IdMap.from_ids(events["user_id"], previous=model_users)


def history_matrix(events: pl.DataFrame, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """Binary CSR (len(users) x len(items)): 1 where the user has any kept event on the item (any weight).

    Items outside ``items`` (the model cannot recommend them anyway) are left out.
    """
    pairs = events.select("user_id", "item_id").unique()
    u = users.lookup(pairs["user_id"]).to_numpy()
    i = items.lookup(pairs["item_id"])
    ok = i.is_not_null().to_numpy()
    rows = u[ok].astype(np.int64)
    cols = i.to_numpy()[ok].astype(np.int64)
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(items)))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def served_embeddings(
    model: Embeddings, popularity: np.ndarray, users: IdMap, matrix: sp.csr_matrix | None = None
) -> Embeddings:
    """``model`` extended to every user of ``users`` with the popularity fallback (see the module docstring).

    Args:
        model: the refit model (its users must be a prefix of ``users``: ``served_users`` builds it so).
        popularity: (n_items,) fallback score per item of ``model.items`` (distinct refit users per item).
        users: every user with a kept event.
        matrix: the refit confidence matrix (model users x items); a user whose row is empty there has no
            trained preference (everything cancelled out), so the fallback serves them too. None: only users
            outside the model's map fall back.

    Returns:
        ``Embeddings`` (dot scoring, dim + 1) over ``users`` x ``model.items`` with ``info["fallback_dim"]``,
        ``info["fallback_users"]`` and ``info["model_users"]``. A popularity model is returned over ``users`` as is
        (it serves everyone the same way; nothing falls back).
    """
    n_model = len(model.users)
    if len(users) < n_model or not users.ids.head(n_model).equals(model.users.ids):
        raise ValueError(
            f"{model.model}: the served user map must start with the model's {n_model:,} users in the same order; "
            "build it with coverage.served_users(events, model.users)"
        )
    pop = np.asarray(popularity, dtype=np.float32).ravel()
    if pop.shape != (len(model.items),):
        raise ValueError(f"popularity has shape {pop.shape}, expected ({len(model.items)},) for {model.model}")
    if model.model == "popularity":
        vec = np.ones((len(users), 1), dtype=np.float32)
        return Embeddings(vec, pop[:, None], users, model.items, model="popularity", scoring="dot",
                          info={**model.info, "fallback_users": 0, "model_users": len(users)})  # fmt: skip
    uvec, ivec = model.scoring_vectors()
    d = uvec.shape[1]
    served = np.ones(n_model, dtype=bool)
    if matrix is not None:
        served &= np.diff(sp.csr_matrix(matrix).indptr) > 0
    u = np.zeros((len(users), d + 1), dtype=np.float32)
    u[:n_model, :d] = uvec
    u[:n_model, d] = np.where(served, 0.0, 1.0)
    u[:n_model][~served, :d] = 0.0
    u[n_model:, d] = 1.0
    i = np.empty((len(model.items), d + 1), dtype=np.float32)
    i[:, :d] = ivec
    i[:, d] = pop
    n_fallback = len(users) - int(served.sum())
    log.info("coverage: %s serves %d users; %d fall back to popularity (%d outside its map, %d with no refit row)",
             model.model, int(served.sum()), n_fallback, len(users) - n_model, int((~served).sum()))  # fmt: skip
    info = {**model.info, FALLBACK_DIM: True, "fallback_users": n_fallback, "model_users": int(served.sum())}
    return Embeddings(u, i, users, model.items, model=model.model, scoring="dot", info=info)


def fallback_mask(emb: Embeddings) -> np.ndarray | None:
    """(n_users,) bool: True where the user's rows come from the popularity fallback; None for embeddings that
    ``served_embeddings`` did not build."""
    if not emb.info.get(FALLBACK_DIM):
        return None
    return emb.user_vectors[:, -1] > 0
