"""MLP_shared: a shared-bottom MLP feeding one tower per task."""

from __future__ import annotations

import torch

from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.blocks import MLP, TaskTowers
from model.config import ModelConfig
from model.data import Batch


class MLPShared(MultiTaskModel):
    """h = MLP_shared(x); logit_k = Tower_k(h).

    Call: batch -> logits [B, T].
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        self.bottom = MLP(self.input_dim, cfg.bottom_hidden, cfg.dropout)
        self.towers = TaskTowers(self.bottom.out_dim, len(tasks), cfg.tower_hidden, cfg.dropout)

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.towers(self.bottom(x))
