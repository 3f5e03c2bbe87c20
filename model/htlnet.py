"""HTLNet (RecSys 2024): a chain of binary tasks ending in a continuous core target.

On KuaiRand: click -> long_view -> play time, the last a regression on log1p(seconds).

* A shared bottom MLP gives h (the shared dense parameters).
* Task k's tower reads the fusion of h with what the earlier tasks pass on: their tower
  outputs and their **label embeddings**. Binary task j has a 2-row table E^j; the label
  embedding is ỹ_j · E^j with ỹ_j = Gumbel-softmax over (p_j, 1 − p_j) in training (the
  *predicted* probability, never the true label) and (p_j, 1 − p_j) itself in eval (so scoring
  is deterministic).
* The **attention fusion unit** weighs [h, earlier tower outputs, earlier label embeddings]
  with a query from h. Every transfer is stop-gradient: a later task never trains an earlier
  tower (the label tables E^j learn from the later tasks).
* **Gradient adjustment** on the shared bottom, with the core task's gradient G_core as the
  reference: a task gradient that conflicts with it (cos < 0) is projected onto the plane
  normal to G_core, then rescaled G_t <- γ·min(‖G_core‖/‖G_t‖, C)·G_t + (1 − γ)·G_t. The
  adjusted sum replaces the shared bottom's gradient through a zero-valued correction term of
  the loss, so the trainer's plain ``loss.backward()`` (and TorchRec's fused embedding
  optimizers, which see the unadjusted gradient of their outputs) work unchanged.

Shapes: B batch, T tasks (the chain), H the shared width, E the label embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.base import FeatureLayout, Lookups, ModelOutput, MultiTaskModel, TaskConfig, TaskType
from model.blocks import MLP
from model.config import ModelConfig
from model.data import Batch

__all__ = ["HTLNet", "adjust_task_gradient", "project_conflicting", "rescale_magnitude"]


def project_conflicting(g: torch.Tensor, g_core: torch.Tensor) -> torch.Tensor:
    """g [P] minus its component along g_core [P] when they conflict (g·g_core < 0); g
    itself otherwise."""
    dot = torch.dot(g, g_core)
    norm2 = torch.dot(g_core, g_core)
    if dot >= 0 or norm2 == 0:
        return g
    return g - dot / norm2 * g_core


def rescale_magnitude(
    g: torch.Tensor, g_core: torch.Tensor, gamma: float, clip: float
) -> torch.Tensor:
    """γ·min(‖g_core‖/‖g‖, clip)·g + (1 − γ)·g (g [P], g_core [P])."""
    norm = torch.linalg.vector_norm(g)
    if norm == 0:
        return g
    ratio = torch.clamp(torch.linalg.vector_norm(g_core) / norm, max=clip)
    return gamma * ratio * g + (1.0 - gamma) * g


def adjust_task_gradient(
    g: torch.Tensor, g_core: torch.Tensor, gamma: float, clip: float
) -> torch.Tensor:
    """Projection, then magnitude rescaling."""
    return rescale_magnitude(project_conflicting(g, g_core), g_core, gamma, clip)


class AttentionFusion(nn.Module):
    """Attention over candidate vectors with a query from the task's own input.

    Call: (query [B, H], candidates [B, N, H]) -> [B, H].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(
            (self.k(candidates) * self.q(query)[:, None, :]).sum(-1) * self.scale, dim=1
        )
        return (w.unsqueeze(-1) * self.v(candidates)).sum(1)


class HTLNet(MultiTaskModel):
    """The chain ``tasks`` (binary tasks, then one regression task).

    Call: batch -> ModelOutput(logits [B, T]); the last column predicts log1p of the core
    target (``to_scores`` turns it into the value).
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__(layout, tasks, cfg)
        if len(tasks) < 2 or tasks[-1].task_type != TaskType.REGRESSION:
            raise ValueError("HTLNet needs a chain of binary tasks ending in a regression task")
        if any(t.task_type != TaskType.BINARY for t in tasks[:-1]):
            raise ValueError("HTLNet: every task but the last must be binary")
        hc = cfg.htlnet
        self.shared = MLP(self.input_dim, cfg.bottom_hidden, cfg.dropout)
        H = self.shared.out_dim
        self.towers = nn.ModuleList(MLP(H, cfg.expert_hidden, cfg.dropout) for _ in tasks)
        R = self.towers[0].out_dim
        self.outputs = nn.ModuleList(nn.Linear(R, 1) for _ in tasks)
        E = hc.label_embedding_dim
        self.label_tables = nn.ParameterList(
            nn.Parameter(torch.randn(2, E) * 0.1) for _ in tasks[:-1]
        )
        # earlier tower outputs and label embeddings are projected to H before the fusion
        self.from_tower = nn.Linear(R, H)
        self.from_label = nn.Linear(E, H)
        self.fusion = nn.ModuleList(AttentionFusion(H) for _ in tasks[1:])
        self.tau = hc.gumbel_tau
        self.adjust = hc.gradient_adjustment
        self.gamma = hc.magnitude_gamma
        self.clip = hc.magnitude_clip

    def label_embedding(self, j: int, logit: torch.Tensor) -> torch.Tensor:
        """Task j's label embedding [B, E] from its (detached) predicted logit [B]."""
        p = torch.sigmoid(logit.detach())
        probs = torch.stack([p, 1.0 - p], dim=1)
        if self.training:
            probs = F.gumbel_softmax(torch.log(probs.clamp_min(1e-6)), tau=self.tau, hard=False)
        return probs @ self.label_tables[j]

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.chain(self.shared(x))

    def chain(self, h: torch.Tensor) -> torch.Tensor:
        """Shared representation h [B, H] -> logits [B, T]."""
        logits, passed = [], []
        for k, tower in enumerate(self.towers):
            if k == 0:
                inp = h
            else:
                inp = self.fusion[k - 1](h, torch.stack([h, *passed], dim=1))
            r = tower(inp)
            logit = self.outputs[k](r).squeeze(-1)
            logits.append(logit)
            if k < len(self.towers) - 1:
                passed.append(self.from_tower(r.detach()))
                passed.append(self.from_label(self.label_embedding(k, logit)))
        return torch.stack(logits, dim=1)

    def dense_forward(self, looked_up: Lookups, batch: Batch) -> ModelOutput:
        _, x = self.embed(batch, looked_up)
        h = self.shared(x)
        return ModelOutput(self.chain(h), {"shared": h})

    def loss(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        per = super().loss(batch, out)  # [T]: BCE for the binary tasks, MSE for the core
        if not (self.adjust and self.training and torch.is_grad_enabled() and per.requires_grad):
            return per
        params = [p for p in self.shared.parameters() if p.requires_grad]
        weights = self.task_weights().to(per.device)
        grads = []
        for k in range(len(self.tasks)):
            g = torch.autograd.grad(per[k] * weights[k], params, retain_graph=True,
                                    allow_unused=True)  # fmt: skip
            grads.append(
                torch.cat(
                    [
                        (gi if gi is not None else torch.zeros_like(p)).flatten()
                        for gi, p in zip(g, params, strict=True)
                    ]
                )  # fmt: skip
            )
        g_core = grads[-1]
        adjusted = g_core + sum(
            adjust_task_gradient(g, g_core, self.gamma, self.clip) for g in grads[:-1]
        )
        correction = (adjusted - sum(grads)).detach()
        flat = torch.cat([p.flatten() for p in params])
        # value 0, gradient `correction` on the shared parameters only
        term = torch.dot(correction, flat) - torch.dot(correction, flat).detach()
        # carried by task 0's entry, which the training wrapper multiplies by its weight
        term = term / weights[0]
        return per + torch.cat([term[None], torch.zeros(len(self.tasks) - 1, device=per.device)])
