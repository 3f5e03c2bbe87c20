"""STAN (Stage-Adaptive Network, RecSys 2023) and STAN w/o Beta.

A PLE backbone ranks; a user preference module learns each user's task propensities ỹ from the
user feature embeddings U_i, supervised by the pipeline's pseudo-labels ``pl_<task>``; the latent
stage module (Algorithm 1, :mod:`model.beta_state`) turns ỹ into a per-user Beta state whose
sample γ weights each task's BCE loss:

    L = Σ_k mean_i( γ_i^k · BCE(ŷ_i^k, y_i^k) + w_i · (l_i^k − ỹ_i^k)² )     (Eq. 11-14)

with w_i = 1, or ``no_history_weight`` for rows whose user has no history (fallback label).
STAN w/o Beta uses ỹ (detached) in place of γ. Scores at inference are the backbone's ŷ.

Notation: B = batch, d1 = user features, D = embedding dim, T = tasks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.base import FeatureLayout, Lookups, ModelOutput, TaskConfig, masked_mean
from model.beta_state import BetaStageState
from model.blocks import MLP, TaskTowers, batched_kernels
from model.config import ModelConfig
from model.data import Batch
from model.ple import PLE


class UserPreference(nn.Module):
    """f, the task-specific attention and the preference towers (Eq. 7-9).

    U' = f(U) (self-attention across the d1 user features, or a DNN);
    s^k = U' ⊙ softmax_features(W^k U'); ỹ^k = sigmoid(MLP^k(flatten(s^k))).

    The T tasks' attentions W^k are the rows of one linear layer D -> T·D and their towers one
    :class:`TaskTowers`: on an accelerator one batched kernel per op whatever T (the step's
    launches, not its FLOPs, bound these small layers there), on CPU task by task
    (`model.blocks.batched_kernels`).

    Call: U [B, d1, D] -> preference logits [B, T] (ỹ = sigmoid).
    """

    def __init__(self, n_features: int, dim: int, n_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        scfg = cfg.stan
        self.kind = scfg.f
        self.n_tasks = n_tasks
        if self.kind == "self_attention":
            if dim % scfg.heads:
                raise ValueError(
                    f"model.stan.heads: {scfg.heads} does not divide embedding_dim {dim}"
                )
            self.heads = scfg.heads
            self.attention = nn.MultiheadAttention(dim, scfg.heads, batch_first=True)
        else:
            self.dnn = MLP(n_features * dim, [n_features * dim])
        # rows k·D .. (k+1)·D - 1 are W^k; the init of T separate D -> D layers (fan-in D)
        self.task_attention = nn.Linear(dim, n_tasks * dim, bias=False)
        self.towers = TaskTowers(n_features * dim, n_tasks, scfg.preference_hidden)
        self.batched: bool | None = None  # `model.blocks.batched_kernels`; set both to force

    def represent(self, user: torch.Tensor) -> torch.Tensor:
        """U' = f(U): [B, d1, D] -> [B, d1, D]."""
        if self.kind == "self_attention":
            return self._self_attention(user)
        return self.dnn(user.flatten(1)).view_as(user)

    def _self_attention(self, user: torch.Tensor) -> torch.Tensor:
        """``self.attention(U, U, U)`` (no dropout, no mask) straight through
        ``scaled_dot_product_attention``: the module's own call checks its arguments in Python
        at every step, which costs more host time than the attention itself."""
        a = self.attention
        B, L, D = user.shape
        qkv = F.linear(user, a.in_proj_weight, a.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, D / heads]
        return a.out_proj(o.transpose(1, 2).reshape(B, L, D))

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        u = self.represent(user)  # [B, d1, D]
        B, L, D = u.shape
        T = self.n_tasks
        w = self.task_attention.weight.view(T, D, D)  # W^k [D_out, D_in]
        if batched_kernels(u, self.batched):
            # task-major [T, B, d1, D]: the softmax and the towers read contiguous rows
            scores = torch.bmm(u.reshape(1, B * L, D).expand(T, -1, -1), w.transpose(1, 2))
            s = u * torch.softmax(scores.view(T, B, L, D), dim=2)  # softmax over d1
            return self.towers(s.view(T, B, L * D))
        s = [(u * torch.softmax(F.linear(u, w_k), dim=1)).flatten(1) for w_k in w.unbind(0)]
        return self.towers(s)


class LatentStage(nn.Module):
    """Holds the per-user :class:`BetaStageState` (no parameters, no buffers: DDP must not
    broadcast it, each rank owns its users). A module of its own so that TorchRec's pipeline
    tracer treats it as a leaf and runs its data-dependent update eagerly.

    Call: (user_key, event_time_ms, example_id [B], preference ỹ [B, T], mask [B]) -> γ [B, T].
    """

    def __init__(self, n_tasks: int, seed: int) -> None:
        super().__init__()
        self.state = BetaStageState(n_tasks, seed=seed)

    def forward(
        self,
        user_key: torch.Tensor,
        event_time_ms: torch.Tensor,
        example_id: torch.Tensor,
        preference: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        # the state's counts are bookkeeping, not arithmetic to speed up: fp32 under autocast
        with torch.autocast(preference.device.type, enabled=False):
            return self.state.update_and_sample(
                user_key, event_time_ms, example_id, preference.float(), mask
            )


class STAN(PLE):
    """PLE backbone + user preference learning + latent stage (Beta) weighting.

    Args:
        beta: True for STAN (γ from the Beta state), False for STAN w/o Beta (γ = ỹ).
        seed: the Beta sampler's seed.

    Call: batch -> ModelOutput(logits [B, T], aux {"preference": ỹ [B, T], "gamma": γ [B, T]});
    γ is drawn (and the per-user state advanced) only in training mode.
    """

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: list[TaskConfig],
        cfg: ModelConfig,
        beta: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(layout, tasks, cfg)
        self.user_keys = cfg.stan.user_features or layout.user_keys
        self.register_buffer(
            "user_positions", torch.tensor(layout.positions(self.user_keys)), persistent=False
        )
        self.preference = UserPreference(len(self.user_keys), cfg.embedding_dim, len(tasks), cfg)
        self.use_beta = beta
        self.no_history_weight = cfg.stan.no_history_weight
        self.gamma_normalization = cfg.stan.gamma_normalization
        self.latent_stage = LatentStage(len(tasks), seed)

    @property
    def beta_state(self) -> BetaStageState:
        return self.latent_stage.state

    def dense_forward(self, looked_up: Lookups, batch: Batch) -> ModelOutput:
        emb, x = self.embed(batch, looked_up)
        logits = self.heads(x, batch)
        user = emb.index_select(1, self.user_positions)
        preference = torch.sigmoid(self.preference(user))
        aux = {"preference": preference}
        if self.training:
            if self.use_beta:
                aux["gamma"] = self.latent_stage(
                    batch.user_key, batch.event_time_ms, batch.example_id, preference, batch.mask
                )
            else:
                aux["gamma"] = preference.detach()
        return ModelOutput(logits, aux)

    def loss(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        """Per task: mean(γ · BCE) + mean(w · (l − ỹ)²) over real rows -> [T]."""
        y = self.labels(batch)
        pl = self.pseudo_labels(batch)
        preference = out.aux["preference"]
        gamma = out.aux.get("gamma", preference.detach())
        if self.gamma_normalization == "batch_mean":
            mean = (gamma * batch.mask[:, None]).sum(0) / batch.mask.sum().clamp_min(1.0)
            gamma = gamma / mean.clamp_min(1e-6)
        history = torch.where(
            batch.n_prev > 0,
            torch.ones_like(batch.mask),
            torch.full_like(batch.mask, self.no_history_weight),
        )
        bce = F.binary_cross_entropy_with_logits(out.logits, y, reduction="none")  # [B, T]
        mse = (pl - preference) ** 2
        return masked_mean(gamma * bce, batch.mask) + masked_mean(
            history[:, None] * mse, batch.mask
        )
