"""PLE (Tang et al., RecSys 2020): stacked CGC layers of task-specific and shared experts."""

from __future__ import annotations

import torch
from torch import nn

from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.blocks import CGCLayer, TaskTowers
from model.config import ModelConfig
from model.data import Batch


class PLEBackbone(nn.Module):
    """``layers`` CGC layers (Eq. 1-3); the last one has no shared gate.

    Call: x [B, I] -> T task representations [B, H]. With task-specific inputs x [T, B, I]
    (DTRN's bottoms) task k's experts take x[k] and the shared experts their mean.
    """

    def __init__(self, in_dim: int, n_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        layers, width = [], in_dim
        for i in range(cfg.ple.layers):
            layer = CGCLayer(
                width,
                n_tasks,
                cfg.ple.task_experts,
                cfg.ple.shared_experts,
                cfg.expert_hidden,
                last=i == cfg.ple.layers - 1,
            )
            layers.append(layer)
            width = layer.out_dim
        self.layers = nn.ModuleList(layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = list(x.unbind(0)) + [x.mean(0)] if x.dim() == 3 else [x] * (self.n_tasks + 1)
        for layer in self.layers:
            h = layer(h)
        return h


class PLE(MultiTaskModel):
    """logit_k = Tower_k(PLE(x)_k) (Eq. 4).

    Call: batch -> logits [B, T].
    """

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: list[TaskConfig],
        cfg: ModelConfig,
        extra_inputs: int = 0,
    ) -> None:
        super().__init__(layout, tasks, cfg)
        self.backbone = PLEBackbone(self.input_dim + extra_inputs, len(tasks), cfg)
        self.towers = TaskTowers(self.backbone.out_dim, len(tasks), cfg.tower_hidden, cfg.dropout)

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.towers(self.backbone(x))
