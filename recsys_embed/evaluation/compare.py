"""Score another run's embeddings on this run's split: the champion and the challenger on the same test window.

A registered champion was evaluated on its own run's test window. After an incremental run the window has moved
(and users and items were added), so comparing the new model's metric with the champion's stored one would compare
two different exams. ``rescore`` instead re-indexes the champion's vectors to this run's ID maps and evaluates
them with this run's seen matrix and test targets, exactly as the new model was evaluated.

Re-indexing: a user or item is matched by its original ID. A user the champion never saw gets a zero vector (it
cannot personalise for them: every item scores 0). An item the champion never saw can never be recommended by it:
one extra dimension gives it a score of -1e30, below every real score, so it only fills lists that have no other
candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from recsys_embed.types import Embeddings, IdMap

log = logging.getLogger(__name__)

_UNKNOWN_ITEM_SCORE = np.float32(-1e30)


def _rows(source: IdMap, target: IdMap) -> np.ndarray:
    """For each ID of ``target`` (in index order), its row in ``source``, or -1 when ``source`` lacks it."""
    idx = source.lookup(target.ids).fill_null(-1).to_numpy().astype(np.int64)
    return idx


def reindex(emb: Embeddings, users: IdMap, items: IdMap) -> Embeddings:
    """``emb``'s vectors re-indexed to ``users`` x ``items`` (dot scoring; cosine models are normalised first).

    Unknown users get zero vectors, unknown items a score far below any real one (see the module docstring).
    """
    uvec, ivec = emb.scoring_vectors()
    d = uvec.shape[1]
    urow, irow = _rows(emb.users, users), _rows(emb.items, items)
    u = np.zeros((len(users), d + 1), dtype=np.float32)
    known_u = urow >= 0
    u[known_u, :d] = uvec[urow[known_u]]
    u[:, d] = 1.0
    i = np.zeros((len(items), d + 1), dtype=np.float32)
    known_i = irow >= 0
    i[known_i, :d] = ivec[irow[known_i]]
    i[~known_i, d] = _UNKNOWN_ITEM_SCORE
    log.info("compare: %s re-indexed; %d of %d users and %d of %d items are known to it", emb.model,
             int(known_u.sum()), len(users), int(known_i.sum()), len(items))  # fmt: skip
    info = {**emb.info, "reindexed_known_users": int(known_u.sum()), "reindexed_known_items": int(known_i.sum())}
    return Embeddings(u, i, users, items, model=emb.model, scoring="dot", info=info)


def rescore(
    emb: Embeddings,
    users: IdMap,
    items: IdMap,
    seen: sp.csr_matrix,
    targets: sp.csr_matrix,
    ks: Sequence[int],
    batch_users: int = 4096,
) -> dict[str, float]:
    """``evaluate`` of ``emb`` (from any run) on this run's ``seen`` / ``targets`` (``users`` x ``items``)."""
    from recsys_embed.evaluation.metrics import evaluate

    popularity = np.asarray((seen > 0).sum(axis=0)).ravel()
    return evaluate(reindex(emb, users, items), seen, targets, ks, popularity, batch_users)
