"""Content features for the towers: hashed text tokens and tabular (categorical + numeric) columns.

Everything here is vectorised over Polars/NumPy and *stateless or explicitly fitted*, so the same
encoding can be replayed on items and users that arrive after training:

- ``hash_tokens``: lower-cased ``\\w+`` words and adjacent-word bigrams of a text column, hashed with
  64-bit FNV-1a (stable across processes, platforms and library versions, unlike Python's ``hash`` or
  Polars' ``Series.hash``) into ``n_buckets`` buckets. Output: int64 (n, max_tokens), padded with
  ``n_buckets`` (the ``EmbeddingBag``'s ``padding_idx``).
- ``TabularSpec``: per-column vocabularies (categorical -> code 1..V, 0 = unknown or null) and mean/std
  (numeric -> standardised, null -> 0), fitted on the train entities and saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# Bytes hashed per token: longer tokens share a bucket only if their first 48 bytes agree.
_MAX_TOKEN_BYTES = 48
HASH_VERSION = "fnv1a64-w-bigram-v1"
"""Saved with a model; a model trained under another version must not be fed these token ids."""


def fnv1a_64(strings: pl.Series) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (the first 48); vectorised over byte positions.

    Args:
        strings: Utf8 series without nulls.

    Returns:
        uint64 (n,). Worked example: ``fnv1a_64(["a"]) == 0xAF63DC4C8601EC8C`` (the published FNV-1a test vector).
    """
    n = strings.len()
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    # fixed-width bytes matrix (n, width); NUL padding marks the end (text never contains NUL)
    raw = strings.cast(pl.Binary).to_numpy()
    lengths = strings.str.len_bytes().to_numpy()
    width = max(1, min(_MAX_TOKEN_BYTES, int(lengths.max())))
    mat = np.asarray(raw.astype(f"S{width}")).view(np.uint8).reshape(n, width)
    lengths = np.minimum(lengths, width)
    for p in range(width):  # loop over byte positions (<= 48), vectorised over all strings
        live = lengths > p
        if not live.any():
            break
        h[live] = (h[live] ^ mat[live, p].astype(np.uint64)) * _FNV_PRIME
    return h


def hash_tokens(
    texts: pl.Series, n_buckets: int, max_tokens: int, bigrams: bool = True
) -> tuple[np.ndarray, dict[str, float]]:
    """Hashed word (+ bigram) token ids of each text.

    Args:
        texts: Utf8 (n,), nulls allowed (no tokens).
        n_buckets: hash buckets; ids are in ``[0, n_buckets)`` and ``n_buckets`` is padding.
        max_tokens: tokens kept per text (all unigrams first in text order, then bigrams).
        bigrams: add ``"w1 w2"`` tokens of adjacent words.

    Returns:
        (int64 (n, max_tokens) token ids padded with ``n_buckets``, stats: mean tokens per text, share
        of texts with no token, share truncated).
    """
    n = texts.len()
    words = (
        pl.DataFrame({"text": texts.cast(pl.Utf8)})
        .with_row_index("row")
        .select(pl.col("row"), pl.col("text").str.to_lowercase().str.extract_all(r"\w+").alias("tok"))
        .explode("tok")
        .drop_nulls("tok")
        .with_columns(pl.int_range(pl.len()).over("row").alias("pos"))
    )
    parts = [words.select("row", "tok", kind=pl.lit(0), pos="pos")]
    if bigrams:
        pairs = words.with_columns(pl.col("tok").shift(-1).over("row").alias("next")).drop_nulls("next")
        parts.append(pairs.select("row", tok=pl.col("tok") + " " + pl.col("next"), kind=pl.lit(1), pos="pos"))
    toks = pl.concat(parts).sort("row", "kind", "pos")
    vocab = toks.select(pl.col("tok").unique())
    vocab = vocab.with_columns(pl.Series("bucket", fnv1a_64(vocab["tok"]) % np.uint64(n_buckets)).cast(pl.Int64))
    toks = toks.join(vocab, on="tok", how="left").with_columns(pl.int_range(pl.len()).over("row").alias("slot"))
    counts = toks.group_by("row").len()
    kept = toks.filter(pl.col("slot") < max_tokens)
    out = np.full((n, max_tokens), n_buckets, dtype=np.int64)
    out[kept["row"].to_numpy(), kept["slot"].to_numpy()] = kept["bucket"].to_numpy()
    stats = {
        "tokens_per_text": float(counts["len"].sum()) / max(n, 1),
        "texts_without_tokens": 1.0 - counts.height / max(n, 1),
        "texts_truncated": float((counts["len"] > max_tokens).sum()) / max(n, 1),
    }
    return out, stats


@dataclass
class TabularSpec:
    """A fitted encoding of categorical and numeric columns (JSON-able through ``to_dict``).

    Attributes:
        categorical: column -> its vocabulary (as strings); code ``1 + position``, 0 = unknown/null.
        numeric: column -> (mean, std) of the fit rows; standardised values, null -> 0.
    """

    categorical: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def cardinalities(self) -> list[int]:
        """Embedding rows per categorical column, unknown slot included."""
        return [len(v) + 1 for v in self.categorical.values()]

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    @classmethod
    def fit(cls, frame: pl.DataFrame | None, categorical: list[str], numeric: list[str], what: str) -> TabularSpec:
        """Fit vocabularies and standardisation on ``frame`` (one row per entity)."""
        if not categorical and not numeric:
            return cls()
        cols = [*categorical, *numeric]
        if frame is None:
            raise ValueError(f"{what} features {cols} are configured but no {what} feature frame was given")
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{what} feature frame lacks column(s) {missing} (found: {frame.columns}); "
                f"fix models.two_tower.{what}_categorical / {what}_numeric"
            )
        cat = {c: frame[c].cast(pl.Utf8).drop_nulls().unique().sort().to_list() for c in categorical}
        num: dict[str, tuple[float, float]] = {}
        for c in numeric:
            x = frame[c].cast(pl.Float64)
            mean, std = x.mean(), x.std()
            num[c] = (float(mean) if isinstance(mean, float) else 0.0, float(std) if isinstance(std, float) else 1.0)
        return cls(cat, num)

    def encode(self, frame: pl.DataFrame | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(int64 (n, C) codes, float32 (n, N) standardised values) of ``frame``'s rows (zeros if None)."""
        codes = np.zeros((n, len(self.categorical)), dtype=np.int64)
        values = np.zeros((n, self.n_numeric), dtype=np.float32)
        if frame is None:
            return codes, values
        for j, (c, vocab) in enumerate(self.categorical.items()):
            lut = pl.DataFrame({"v": vocab, "code": np.arange(1, len(vocab) + 1, dtype=np.int64)})
            probe = pl.DataFrame({"v": frame[c].cast(pl.Utf8)}).with_row_index("_pos")
            joined = probe.join(lut, on="v", how="left").sort("_pos")
            codes[:, j] = joined["code"].fill_null(0).to_numpy()
        for j, (c, (mean, std)) in enumerate(self.numeric.items()):
            x = frame[c].cast(pl.Float64).fill_null(mean).fill_nan(mean).to_numpy()
            values[:, j] = (x - mean) / (std if std > 0 else 1.0)
        return codes, values

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": self.categorical, "numeric": {k: list(v) for k, v in self.numeric.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TabularSpec:
        return cls(
            dict(d.get("categorical", {})), {k: (float(v[0]), float(v[1])) for k, v in d.get("numeric", {}).items()}
        )


def align(frame: pl.DataFrame | None, ids: pl.Series, id_column: str) -> pl.DataFrame | None:
    """Rows of ``frame`` in the order of ``ids`` (an ID map's ids), nulls where an ID has no row.

    The first row wins when ``frame`` repeats an ID.
    """
    if frame is None:
        return None
    if id_column not in frame.columns:
        raise ValueError(f"feature frame lacks the ID column {id_column!r} (found: {frame.columns})")
    uniq = frame.unique(subset=id_column, keep="first", maintain_order=True)
    probe = pl.DataFrame({id_column: ids}).with_row_index("_pos")
    uniq = uniq.with_columns(pl.col(id_column).cast(ids.dtype, strict=False))
    return probe.join(uniq, on=id_column, how="left").sort("_pos").drop("_pos")
