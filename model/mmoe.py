"""MMoE (Ma et al., KDD 2018): shared experts mixed by one softmax gate per task."""

from __future__ import annotations

import torch

from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.blocks import MMoELayer, TaskTowers
from model.config import ModelConfig
from model.data import Batch


class MMoE(MultiTaskModel):
    """h_k = Σ_e softmax(W_k x)_e · expert_e(x); logit_k = Tower_k(h_k).

    Call: batch -> logits [B, T]; ``self.mmoe.last_gates`` holds the gate weights [B, E].
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        self.mmoe = MMoELayer(self.input_dim, len(tasks), cfg.mmoe_experts, cfg.expert_hidden)
        self.towers = TaskTowers(self.mmoe.out_dim, len(tasks), cfg.tower_hidden, cfg.dropout)

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.towers(self.mmoe(x))
