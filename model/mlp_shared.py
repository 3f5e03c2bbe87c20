"""MLP_shared: a shared-bottom MLP feeding one tower per task."""

from __future__ import annotations

import torch
from torch import nn

from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.blocks import MLP, Tower
from model.config import ModelConfig
from model.data import Batch


class MLPShared(MultiTaskModel):
    """h = MLP_shared(x); logit_k = Tower_k(h).

    Call: batch -> logits [B, T].
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        self.bottom = MLP(self.input_dim, cfg.bottom_hidden, cfg.dropout)
        self.towers = nn.ModuleList(
            Tower(self.bottom.out_dim, cfg.tower_hidden, cfg.dropout) for _ in tasks
        )

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.bottom(x)
        return torch.stack([tower(h) for tower in self.towers], dim=1)
