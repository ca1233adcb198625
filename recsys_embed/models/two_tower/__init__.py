"""Two-tower retrieval on PyTorch Lightning: ``features`` -> ``towers`` -> ``task`` (loss + metrics), glued
by ``module`` (LightningModule) and ``data`` (LightningDataModule); ``train.train_two_tower`` is the entry
point and ``encoder.TwoTowerEncoder`` embeds users and items that arrived after training.

Imports are lazy so that ``import recsys_embed.models.two_tower`` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsys_embed.models.two_tower.encoder import TwoTowerEncoder
    from recsys_embed.models.two_tower.train import train_two_tower

__all__ = ["TwoTowerEncoder", "train_two_tower"]


def __getattr__(name: str) -> Any:
    if name == "train_two_tower":
        from recsys_embed.models.two_tower.train import train_two_tower

        return train_two_tower
    if name == "TwoTowerEncoder":
        from recsys_embed.models.two_tower.encoder import TwoTowerEncoder

        return TwoTowerEncoder
    raise AttributeError(name)
