"""STAN's latent stage module (Algorithm 1) as per-user running state.

Per user u and task k: α = β = 1, c = 0; for each of the user's samples in time order
c ← c + 1, α ← α + ỹ·c, β ← β + (1 − ỹ)·c, and γ_u^k ~ Beta(α, β) weights that sample's loss.
The state lives outside autograd (ỹ enters detached, γ is a sample): no gradient can flow
through it. Users are keyed by ``Batch.user_key``; the loader keeps every user on one rank, so
each rank holds the state of its own users.

The update is vectorised: a batch's real rows are sorted by (user, time, example id), each
user's run gets its counts c0 + 1, ..., c0 + m and segment-wise cumulative sums of ỹ·c and
(1 − ỹ)·c, so γ of the j-th sample sees exactly the j earlier updates, as the loop would.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BetaStageState", "sample_beta"]


def sample_beta(
    alpha: torch.Tensor, beta: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Beta(α, β) samples as X / (X + Y) with X ~ Gamma(α), Y ~ Gamma(β) (seeded)."""
    x = torch._standard_gamma(alpha, generator=generator)
    y = torch._standard_gamma(beta, generator=generator)
    return x / (x + y).clamp_min(torch.finfo(x.dtype).tiny)


class BetaStageState:
    """The running (α, β, c) of every user seen on this rank, for T tasks.

    Attributes:
        keys: [N] int64 user keys, sorted.
        alpha, beta: [N, T] float64.
        count: [N] int64, the samples applied per user.
    """

    def __init__(self, n_tasks: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.n_tasks = n_tasks
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.reset()

    def reset(self) -> None:
        """Forget every user (the start of a pass over the chronology), reseed the sampler."""
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)
        self.alpha = torch.empty(0, self.n_tasks, dtype=torch.float64, device=self.device)
        self.beta = torch.empty_like(self.alpha)
        self.count = torch.empty(0, dtype=torch.long, device=self.device)
        self.generator.manual_seed(self.seed)

    def __len__(self) -> int:
        return int(self.keys.numel())

    def _slots(self, users: torch.Tensor) -> torch.Tensor:
        """Indices of sorted unique ``users`` in the state, inserting new users (α = β = 1)."""
        pos = torch.searchsorted(self.keys, users)
        n = len(self)
        # no boolean-mask indexing (each one waits on the device for its size): clamp, compare
        found = (
            (pos < n) & (self.keys[pos.clamp(max=n - 1)] == users)
            if n
            else torch.zeros_like(users, dtype=torch.bool)
        )
        if not bool(found.all()):
            new = users[~found]
            keys = torch.cat([self.keys, new])
            order = torch.argsort(keys)
            ones = torch.ones(len(new), self.n_tasks, dtype=torch.float64, device=self.device)
            self.keys = keys[order]
            self.alpha = torch.cat([self.alpha, ones])[order]
            self.beta = torch.cat([self.beta, ones])[order]
            self.count = torch.cat([self.count, torch.zeros_like(new)])[order]
            pos = torch.searchsorted(self.keys, users)
        return pos

    @torch.no_grad()
    def update_and_sample(
        self,
        user_key: torch.Tensor,
        event_time_ms: torch.Tensor,
        example_id: torch.Tensor,
        preference: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Apply a batch's real rows in (user, time, example id) order; return γ.

        Args:
            user_key, event_time_ms, example_id, mask: [B].
            preference: ỹ [B, T] in [0, 1] (detached here).

        Returns:
            γ [B, T] float32 (0 on padding rows, which change nothing).
        """
        dev = self.device
        n_rows = preference.shape[0]
        gamma = torch.zeros(n_rows, self.n_tasks, dtype=torch.float32, device=dev)
        rows = torch.nonzero(mask.to(dev) > 0).squeeze(1)
        if rows.numel() == 0:
            return gamma.to(preference.device)
        users = user_key.to(dev)[rows]
        # stable lexicographic sort by (user, time, example id): last key first
        order = torch.argsort(example_id.to(dev)[rows], stable=True)
        order = order[torch.argsort(event_time_ms.to(dev)[rows][order], stable=True)]
        order = order[torch.argsort(users[order], stable=True)]
        rows, users = rows[order], users[order]
        uniq, seg, sizes = torch.unique_consecutive(users, return_inverse=True, return_counts=True)
        slots = self._slots(uniq)
        starts = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(rows.numel(), device=dev) - starts[seg]
        c = (self.count[slots][seg] + within + 1).to(torch.float64).unsqueeze(1)  # [n, 1]
        y = preference.detach().to(dev, torch.float64)[rows].clamp(0.0, 1.0)
        inc_a, inc_b = y * c, (1.0 - y) * c

        def seg_cumsum(inc: torch.Tensor) -> torch.Tensor:
            cs = torch.cumsum(inc, 0)
            return cs - (cs[starts] - inc[starts])[seg]

        alpha = self.alpha[slots][seg] + seg_cumsum(inc_a)
        beta = self.beta[slots][seg] + seg_cumsum(inc_b)
        ends = starts + sizes - 1
        self.alpha[slots] = alpha[ends]
        self.beta[slots] = beta[ends]
        self.count[slots] += sizes
        gamma[rows] = sample_beta(alpha, beta, self.generator).to(torch.float32)
        return gamma.to(preference.device)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.cpu(),
            "alpha": self.alpha.cpu(),
            "beta": self.beta.cpu(),
            "count": self.count.cpu(),
            "generator": self.generator.get_state(),
            "n_tasks": self.n_tasks,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_tasks"]) != self.n_tasks:
            raise ValueError(
                f"Beta state for {state['n_tasks']} tasks cannot load into {self.n_tasks}"
            )
        self.keys = state["keys"].to(self.device)
        self.alpha = state["alpha"].to(self.device)
        self.beta = state["beta"].to(self.device)
        self.count = state["count"].to(self.device)
        self.generator.set_state(state["generator"])

    def to(self, device: torch.device | str) -> BetaStageState:
        """Move the state to ``device`` (a new generator there, with the same seed position
        only on CPU -> CPU)."""
        device = torch.device(device)
        if device == self.device:
            return self
        state = self.state_dict()
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        state["generator"] = self.generator.get_state()
        self.load_state_dict(state)
        return self
