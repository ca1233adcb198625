"""The two towers: plain ``nn.Module``s that map features to L2-normalised vectors (no loss, no Lightning).

- ``ItemTower``: item-ID embedding (+ an "unknown item" row) ++ mean of hashed text-token embeddings
  (``EmbeddingBag``) ++ categorical embeddings ++ a linear map of numeric features ++ an optional fixed
  sentence embedding -> 2-layer MLP -> L2 norm. An item that was never interacted with uses the unknown
  row and is embedded from its content.
- ``UserTower``: user-ID embedding (+ an "unknown user" row) ++ weighted mean of the user's history-item
  vectors (the item tower's output, so content reaches the user side) ++ optional user features ->
  2-layer MLP -> L2 norm. A user unseen at training time uses the unknown row and is embedded from history.

ID dropout (training only) swaps an ID for the unknown row with probability ``id_dropout``, which trains
exactly the path that new users and items take at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _drop_ids(ids: Tensor, unknown: int, p: float, training: bool) -> Tensor:
    if not training or p <= 0.0:
        return ids
    drop = torch.rand(ids.shape, device=ids.device) < p
    return torch.where(drop, torch.full_like(ids, unknown), ids)


class _Tabular(nn.Module):
    """Categorical codes (0 = unknown) and standardised numerics -> a list of (B, d) parts."""

    def __init__(self, cardinalities: list[int], n_numeric: int, dim: int) -> None:
        super().__init__()
        self.cat = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.num = nn.Linear(n_numeric, dim) if n_numeric else None

    @property
    def n_parts(self) -> int:
        return len(self.cat) + (1 if self.num is not None else 0)

    def forward(self, codes: Tensor, values: Tensor) -> list[Tensor]:
        parts = [emb(codes[:, j]) for j, emb in enumerate(self.cat)]
        if self.num is not None:
            parts.append(self.num(values))
        return parts


class ItemTower(nn.Module):
    """Item features -> (B, dim) unit vectors.

    Args:
        n_items: known items; index ``n_items`` is the unknown/new item.
        text_buckets: hashed-token vocabulary; token id ``text_buckets`` is padding (0 = no text tower).
        cardinalities, n_numeric: categorical embedding sizes (unknown slot included) and numeric width.
        sentence_dim: width of a fixed precomputed text embedding (0 = none).
    """

    def __init__(
        self,
        n_items: int,
        dim: int,
        hidden: int,
        text_buckets: int,
        cardinalities: list[int] | None = None,
        n_numeric: int = 0,
        sentence_dim: int = 0,
        id_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.unknown, self.id_dropout = n_items, id_dropout
        self.ids = nn.Embedding(n_items + 1, dim)
        self.text = (
            nn.EmbeddingBag(text_buckets + 1, dim, mode="mean", padding_idx=text_buckets) if text_buckets else None
        )
        self.tab = _Tabular(cardinalities or [], n_numeric, dim)
        self.sentence = nn.Linear(sentence_dim, dim) if sentence_dim else None
        n_parts = 1 + (self.text is not None) + self.tab.n_parts + (self.sentence is not None)
        self.mlp = _mlp(n_parts * dim, hidden, dim)
        nn.init.normal_(self.ids.weight, std=0.05)

    def forward(
        self, ids: Tensor, tokens: Tensor, codes: Tensor, values: Tensor, sentence: Tensor | None = None
    ) -> Tensor:
        """ids (B,) int64 (``n_items`` = unknown), tokens (B, T), codes (B, C), values (B, N),
        sentence (B, S) -> (B, dim) unit vectors."""
        parts = [self.ids(_drop_ids(ids, self.unknown, self.id_dropout, self.training))]
        if self.text is not None:
            parts.append(self.text(tokens))
        parts += self.tab(codes, values)
        if self.sentence is not None and sentence is not None:
            parts.append(self.sentence(sentence))
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class UserTower(nn.Module):
    """User ID + pooled history (+ features) -> (B, dim) unit vectors.

    Args:
        n_users: known users; index ``n_users`` is the unknown/new user.
    """

    def __init__(
        self,
        n_users: int,
        dim: int,
        hidden: int,
        cardinalities: list[int] | None = None,
        n_numeric: int = 0,
        id_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.unknown, self.id_dropout = n_users, id_dropout
        self.ids = nn.Embedding(n_users + 1, dim)
        self.tab = _Tabular(cardinalities or [], n_numeric, dim)
        self.mlp = _mlp((2 + self.tab.n_parts) * dim, hidden, dim)
        nn.init.normal_(self.ids.weight, std=0.05)

    @staticmethod
    def pool(item_vectors: Tensor, hist_index: Tensor, hist_weights: Tensor) -> Tensor:
        """Weighted mean of history vectors without materialising (B, L, d): ``EmbeddingBag`` sum over rows
        ``hist_index`` (B, L) of ``item_vectors`` (U, d) with weights ``hist_weights`` (B, L) / row sum.
        Zero weights (padding) contribute nothing; an empty history pools to zeros."""
        w = hist_weights.float()
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return F.embedding_bag(hist_index, item_vectors, per_sample_weights=w.to(item_vectors.dtype), mode="sum")

    def forward(self, ids: Tensor, pooled: Tensor, codes: Tensor, values: Tensor) -> Tensor:
        """ids (B,) (``n_users`` = unknown), pooled (B, d) history (``pool``), codes (B, C), values (B, N)
        -> (B, dim) unit vectors."""
        parts = [
            self.ids(_drop_ids(ids, self.unknown, self.id_dropout, self.training)),
            pooled.to(self.ids.weight.dtype),
        ]
        parts += self.tab(codes, values)
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)
