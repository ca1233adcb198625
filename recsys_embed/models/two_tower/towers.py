"""The two towers: plain ``nn.Module``s that map features to L2-normalised vectors (no loss, no Lightning).

- ``ItemTower``: item-ID embedding (+ an "unknown item" row) ++ mean of hashed text-token embeddings
  (``EmbeddingBag``) ++ categorical embeddings ++ a linear map of numeric features ++ an optional fixed
  sentence embedding -> 2-layer MLP -> L2 norm. An item that was never interacted with uses the unknown
  row and is embedded from its content.
- ``UserTower``: user-ID embedding (+ an "unknown user" row) ++ weighted mean of the user's history-item
  vectors (the item tower's output, so content reaches the user side) ++ optionally a ``HistoryAttention``
  read of the most recent items (multi-head attention, recency-rank aware) ++ optional user
  features -> 2-layer MLP -> L2 norm. A user unseen at training time uses the unknown row and is embedded
  from history.

ID dropout (training only) swaps an ID for the unknown row with probability ``id_dropout``, which trains
exactly the path that new users and items take at inference.
"""

from __future__ import annotations

import math

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


class HistoryAttention(nn.Module):
    """Multi-head attention over the most recent ``length`` history vectors -> (B, dim), recency aware.

    Keys are the item vectors plus a learned embedding of their recency rank (0 = newest); values are the item
    vectors; each head's query is a linear map of the pooled history mean (what the user likes overall picks
    which recent items matter). A learned "null" key with value zero takes the attention of padding and of an
    empty history. No per-item projections: the cost is O(B * length * dim), a few percent of a step (a
    1-layer ``nn.TransformerEncoder`` over 20 items cost 6x the whole pooled step on one CPU thread).

    Args:
        dim: item vector width; ``heads`` must divide it.
        length: items read (the first ``length`` columns of a most-recent-first history).
    """

    def __init__(self, dim: int, length: int, heads: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention_heads ({heads}) must divide embedding_dim ({dim})")
        self.length, self.heads = length, heads
        self.position = nn.Embedding(length, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.query = nn.Linear(dim, dim)
        self.null = nn.Parameter(torch.zeros(heads))
        self.out = nn.Linear(dim, dim)

    def forward(self, item_vectors: Tensor, hist_index: Tensor, hist_weights: Tensor, context: Tensor) -> Tensor:
        """item_vectors (U, d), hist_index (B, L) rows of it (most recent first), hist_weights (B, L) (0 =
        padding), context (B, d) the pooled history -> (B, d)."""
        n = min(self.length, int(hist_index.shape[1]))
        b, d = hist_index.shape[0], item_vectors.shape[1]
        e = d // self.heads
        values = item_vectors[hist_index[:, :n]]  # (B, n, d)
        keys = (values + self.position.weight[:n].to(values.dtype)).view(b, n, self.heads, e)
        q = self.query(context.to(self.query.weight.dtype)).view(b, self.heads, e)
        scores = torch.einsum("bhe,bnhe->bhn", q, keys.to(q.dtype)) / math.sqrt(e)
        scores = scores.masked_fill((hist_weights[:, :n] <= 0)[:, None, :], float("-inf"))
        scores = torch.cat([self.null.to(scores.dtype).expand(b, -1)[:, :, None], scores], dim=2)
        attn = torch.softmax(scores.float(), dim=2)[:, :, 1:].to(q.dtype)  # the null slot's value is zero
        read = torch.einsum("bhn,bnhe->bhe", attn, values.view(b, n, self.heads, e).to(q.dtype))
        return self.out(read.reshape(b, d))


class UserTower(nn.Module):
    """User ID + history (pooled, optionally attended) (+ features) -> (B, dim) unit vectors.

    Args:
        n_users: known users; index ``n_users`` is the unknown/new user.
        attention: a ``HistoryAttention`` read beside the pooled mean (None: the pool alone).
    """

    def __init__(
        self,
        n_users: int,
        dim: int,
        hidden: int,
        cardinalities: list[int] | None = None,
        n_numeric: int = 0,
        id_dropout: float = 0.0,
        attention: HistoryAttention | None = None,
    ) -> None:
        super().__init__()
        self.unknown, self.id_dropout = n_users, id_dropout
        self.ids = nn.Embedding(n_users + 1, dim)
        self.tab = _Tabular(cardinalities or [], n_numeric, dim)
        self.attention = attention
        n_history = 1 + (attention is not None)
        self.mlp = _mlp((1 + n_history + self.tab.n_parts) * dim, hidden, dim)
        nn.init.normal_(self.ids.weight, std=0.05)

    def read_history(self, item_vectors: Tensor, hist_index: Tensor, hist_weights: Tensor) -> Tensor:
        """(B, d) pooled mean (``pool``), ++ (B, d) attention read when configured: (B, d or 2d)."""
        pooled = self.pool(item_vectors, hist_index, hist_weights)
        if self.attention is None:
            return pooled
        pooled = pooled.to(self.ids.weight.dtype)
        return torch.cat([pooled, self.attention(item_vectors, hist_index, hist_weights, pooled)], dim=1)

    @staticmethod
    def pool(item_vectors: Tensor, hist_index: Tensor, hist_weights: Tensor) -> Tensor:
        """Weighted mean of history vectors without materialising (B, L, d): ``EmbeddingBag`` sum over rows
        ``hist_index`` (B, L) of ``item_vectors`` (U, d) with weights ``hist_weights`` (B, L) / row sum.
        Zero weights (padding) contribute nothing; an empty history pools to zeros."""
        w = hist_weights.float()
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return F.embedding_bag(hist_index, item_vectors, per_sample_weights=w.to(item_vectors.dtype), mode="sum")

    def forward(self, ids: Tensor, history: Tensor, codes: Tensor, values: Tensor) -> Tensor:
        """ids (B,) (``n_users`` = unknown), history (B, d or 2d) (``read_history``), codes (B, C), values (B, N)
        -> (B, dim) unit vectors."""
        parts = [
            self.ids(_drop_ids(ids, self.unknown, self.id_dropout, self.training)),
            history.to(self.ids.weight.dtype),
        ]
        parts += self.tab(codes, values)
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)
