"""Most-popular baseline, expressed as ``Embeddings`` so it goes through evaluation and export unchanged.

Every user vector is ``[1.0]`` and item ``i``'s vector is ``[n_i]``, the number of distinct train users
who interacted with item ``i``; the dot-product score is therefore the item's train popularity, and
the shared top-k (with train-seen items excluded) recommends the most popular unseen items.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from recsys_embed.types import Embeddings, Interactions

log = logging.getLogger(__name__)


def item_popularity(matrix: sp.csr_matrix) -> np.ndarray:
    """Distinct users per item: int64 (n_items,), counting stored entries with a positive value.

    ``Interactions.matrix`` holds one entry per (user, item), so this is the train interaction count
    per item that ``evaluate(item_popularity=...)`` expects.
    """
    m = sp.csr_matrix(matrix)
    cols = m.indices[m.data > 0] if m.nnz else m.indices
    return np.bincount(cols, minlength=m.shape[1]).astype(np.int64)


def train_popularity(train: Interactions) -> Embeddings:
    """Popularity "model" from the train matrix only.

    Returns:
        ``Embeddings`` with user vectors ones (n_users, 1), item vectors (n_items, 1) = distinct train
        users per item (float32), ``model="popularity"``, ``scoring="dot"``.
    """
    counts = item_popularity(train.matrix)
    n_users, n_items = train.shape
    log.info(
        "popularity: %d items, %d with no train user; most popular has %d users",
        n_items,
        int((counts == 0).sum()),
        int(counts.max()) if n_items else 0,
    )
    return Embeddings(
        user_vectors=np.ones((n_users, 1), dtype=np.float32),
        item_vectors=counts.astype(np.float32)[:, None],
        users=train.users,
        items=train.items,
        model="popularity",
        scoring="dot",
        info={"backend": "numpy", "n_items_with_users": int((counts > 0).sum())},
    )
