"""AITM (Xi et al., KDD 2021): adaptive information transfer along a chain of tasks.

The model's tasks, in order, are the chain (``model.tasks`` picks and orders them).
"""

from __future__ import annotations

import torch
from torch import nn

from model.base import FeatureLayout, ModelOutput, MultiTaskModel, TaskConfig, masked_mean
from model.blocks import MLP, Tower
from model.config import ModelConfig
from model.data import Batch


class AdaptiveInformationTransfer(nn.Module):
    """AIT: attention over the transferred information p and the task's own representation q.

    w_u = <h1(u), h2(u)> / sqrt(H) for u in {p, q}; z = Σ_u softmax(w)_u · h3(u).

    Call: (p [B, H], q [B, H]) -> z [B, H].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1 = nn.Linear(dim, dim)
        self.h2 = nn.Linear(dim, dim)
        self.h3 = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        u = torch.stack([p, q], dim=1)  # [B, 2, H]
        w = torch.softmax((self.h1(u) * self.h2(u)).sum(-1) * self.scale, dim=1)  # [B, 2]
        return (w.unsqueeze(-1) * self.h3(u)).sum(1)


class AITM(MultiTaskModel):
    """q_k = Bottom_k(x); z_1 = q_1; z_k = AIT(Transfer_{k-1}(z_{k-1}), q_k); logit_k =
    Tower_k(z_k). With ``aitm_calibration_weight`` > 0 the behavioural-expectation calibrator
    adds weight · mean(max(ŷ_k − ŷ_{k−1}, 0)) to task k's loss.

    Call: batch -> logits [B, T].
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        self.bottoms = nn.ModuleList(
            MLP(self.input_dim, cfg.expert_hidden, cfg.dropout) for _ in tasks
        )
        dim = self.bottoms[0].out_dim
        self.transfers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in tasks[1:]
        )
        self.ait = nn.ModuleList(AdaptiveInformationTransfer(dim) for _ in tasks[1:])
        self.towers = nn.ModuleList(Tower(dim, cfg.tower_hidden, cfg.dropout) for _ in tasks)

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        xs = list(x.unbind(0)) if x.dim() == 3 else [x] * len(self.tasks)  # DTRN: per task
        z = self.bottoms[0](xs[0])
        logits = [self.towers[0](z)]
        for k in range(1, len(self.tasks)):
            z = self.ait[k - 1](self.transfers[k - 1](z), self.bottoms[k](xs[k]))
            logits.append(self.towers[k](z))
        return torch.stack(logits, dim=1)

    def loss(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        per = super().loss(batch, out)
        weight = self.cfg.aitm_calibration_weight
        if weight <= 0 or len(self.tasks) < 2:
            return per
        p = torch.sigmoid(out.logits)
        calib = [torch.zeros((), device=p.device)] + [
            weight * masked_mean(torch.relu(p[:, k] - p[:, k - 1]), batch.mask)
            for k in range(1, len(self.tasks))
        ]
        return per + torch.stack(calib)
