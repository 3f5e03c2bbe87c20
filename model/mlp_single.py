"""MLP_single: one independent MLP per task on the shared embeddings (the paper's baseline)."""

from __future__ import annotations

import torch

from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.blocks import TaskTowers
from model.config import ModelConfig
from model.data import Batch


class MLPSingle(MultiTaskModel):
    """Per task k: logit_k = Tower_k(x), Tower_k = MLP(bottom_hidden + tower_hidden) -> 1.

    Call: batch -> logits [B, T].
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        self.towers = TaskTowers(
            self.input_dim, len(tasks), [*cfg.bottom_hidden, *cfg.tower_hidden], cfg.dropout
        )

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.towers(x)
