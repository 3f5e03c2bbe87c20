"""Shared building blocks of the multi-task models: MLPs, experts, gates, CGC and MMoE layers.

Notation: B = batch size, I = input width, E = experts, H = an expert's output width,
T = tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CGCLayer", "ExpertGroup", "MLP", "MMoELayer", "TaskTowers", "Tower", "batched_kernels"]


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) for each hidden width.

    Args:
        in_dim: I.
        hidden: widths of the layers (empty: the identity).
        dropout: dropout after each activation.

    Call: x [B, I] -> [B, hidden[-1]] (or [B, I] when ``hidden`` is empty).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        super().__init__(*layers)
        self.out_dim = width


class Tower(nn.Module):
    """A task tower f_T^k: an MLP and a last linear layer to one logit.

    Call: x [B, I] -> logit [B].
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)


def _stacked_linears(n: int, widths: Sequence[int]) -> tuple[nn.ParameterList, nn.ParameterList]:
    """Weights [n, fan_in, fan_out] and biases [n, 1, fan_out] of ``n`` parallel MLPs with the
    layer widths ``widths``, each initialised as a separate ``nn.Linear`` would be."""
    weights, biases = nn.ParameterList(), nn.ParameterList()
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        w = torch.empty(n, fan_in, fan_out)
        for e in range(n):  # same init as nn.Linear, per member
            w[e] = nn.Linear(fan_in, fan_out).weight.detach().t()
        bound = 1.0 / fan_in**0.5
        weights.append(nn.Parameter(w))
        biases.append(nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound)))
    return weights, biases


class ExpertGroup(nn.Module):
    """E experts of the same shape, evaluated as one batched matmul per layer.

    Each expert is an MLP ``I -> hidden[0] -> ... -> hidden[-1]`` with ReLU after every layer.

    Call: x [B, I] -> [B, E, H] with H = hidden[-1].
    """

    def __init__(self, in_dim: int, n_experts: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if n_experts < 1 or not hidden:
            raise ValueError("an expert group needs at least one expert and one hidden layer")
        self.n_experts = n_experts
        self.out_dim = int(hidden[-1])
        self.weights, self.biases = _stacked_linears(n_experts, [in_dim, *hidden])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.n_experts, -1, -1)  # [E, B, I]
        for w, b in zip(self.weights, self.biases, strict=True):
            h = torch.relu(torch.baddbmm(b, h, w))
        return h.transpose(0, 1)  # [B, E, H]


def batched_kernels(x: torch.Tensor, batched: bool | None = None) -> bool:
    """Whether T parallel members (towers, tasks) run as one batched kernel per op or member
    by member. ``None``: batched on an accelerator, where a step's kernel launches, not its
    FLOPs, bound these small layers; member by member on CPU, where each member's working set
    stays in cache and the per-member matmuls are faster (STAN at the paper's widths: the
    batched step is ~10 % slower on CPU)."""
    return x.device.type != "cpu" if batched is None else batched


class TaskTowers(nn.Module):
    """T towers of the same shape, one logit each, with their weights stacked.

    Tower k is the MLP ``I -> hidden[0] -> ... -> hidden[-1] -> 1`` with ReLU (and dropout)
    after every hidden layer, as T separate :class:`Tower` modules; on an accelerator the T
    towers run as one batched matmul per layer (`batched_kernels`; ``batched`` forces a way).

    Call: x [B, I] (the same input for every tower), [T, B, I] or a sequence of T [B, I]
    (tower k reads x[k]) -> logits [B, T].
    """

    def __init__(
        self, in_dim: int, n_towers: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_towers < 1:
            raise ValueError("task towers need at least one tower")
        self.n_towers = n_towers
        self.in_dim = in_dim
        self.dropout = dropout
        self.batched: bool | None = None
        self.weights, self.biases = _stacked_linears(n_towers, [in_dim, *hidden, 1])

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.relu(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout > 0 else h

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        T, last = self.n_towers, len(self.weights) - 1
        shared = isinstance(x, torch.Tensor) and x.dim() == 2
        n_inputs = T if shared else (x.shape[0] if isinstance(x, torch.Tensor) else len(x))
        if n_inputs != T:
            raise ValueError(f"{T} task towers got {n_inputs} inputs")
        first = x if shared else x[0]
        assert isinstance(first, torch.Tensor)
        if batched_kernels(first, self.batched):
            if isinstance(x, torch.Tensor):
                h = x.unsqueeze(0).expand(T, -1, -1) if shared else x  # [T, B, I]
            else:
                h = torch.stack(list(x))
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                h = torch.baddbmm(b, h, w)
                h = self._activation(h) if i < last else h
            return h.squeeze(-1).t()  # [T, B, 1] -> [B, T]
        inputs = [x] * T if shared else (x.unbind(0) if isinstance(x, torch.Tensor) else x)
        layers = [
            (w.unbind(0), b.unbind(0)) for w, b in zip(self.weights, self.biases, strict=True)
        ]
        logits = []
        for k, h in enumerate(inputs):
            for i, (w, b) in enumerate(layers):
                h = torch.addmm(b[k], h, w[k])
                h = self._activation(h) if i < last else h
            logits.append(h)
        return torch.cat(logits, dim=1)  # T of [B, 1] -> [B, T]


def _mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gate over experts: ([B, E], [B, E, H]) -> (mixture [B, H], weights [B, E])."""
    weights = torch.softmax(gate_logits, dim=-1)
    # a broadcast multiply-add, not bmm: B tiny [1, E] x [E, H] products are slow on CPU
    return (weights.unsqueeze(-1) * experts).sum(1), weights


class MMoELayer(nn.Module):
    """Multi-gate Mixture-of-Experts: E shared experts, one softmax gate per task.

    Call: x [B, I] -> list of T tensors [B, H]. With task-specific inputs x [T, B, I] (DTRN's
    bottoms) the experts run on each task's input and task k's gate mixes those. The last gate
    weights ([B, E] per task) are kept in ``last_gates`` for inspection.
    """

    def __init__(self, in_dim: int, n_tasks: int, n_experts: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.experts = ExpertGroup(in_dim, n_experts, hidden)
        self.gates = nn.ModuleList(nn.Linear(in_dim, n_experts) for _ in range(n_tasks))
        self.out_dim = self.experts.out_dim
        self.experts_shape = (n_experts, self.out_dim)
        self.last_gates: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() == 3:
            T, B, _ = x.shape
            per_task = self.experts(x.reshape(T * B, -1)).view(T, B, *self.experts_shape)
            inputs, experts = list(x.unbind(0)), list(per_task.unbind(0))
        else:
            inputs, experts = [x] * len(self.gates), [self.experts(x)] * len(self.gates)
        outs, self.last_gates = [], []
        for gate, xk, ek in zip(self.gates, inputs, experts, strict=True):
            mixed, w = _mix(gate(xk), ek)
            outs.append(mixed)
            self.last_gates.append(w.detach())
        return outs


class CGCLayer(nn.Module):
    """Customized Gate Control (PLE, Eq. 1-3): task-specific and shared experts.

    Task k's gate mixes its own ``task_experts`` and the ``shared_experts``; unless this is the
    last layer a shared gate mixes all experts into the shared input of the next layer.

    Call: inputs, a list of T task inputs and the shared input (T + 1 tensors [B, I]) ->
    T task outputs (+ the shared output unless ``last``), each [B, H]. The last gate weights
    are kept in ``last_gates`` (T or T + 1 tensors [B, E_gate]).
    """

    def __init__(
        self,
        in_dim: int,
        n_tasks: int,
        task_experts: int,
        shared_experts: int,
        hidden: Sequence[int],
        last: bool,
    ) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.last = last
        self.task_experts = nn.ModuleList(
            ExpertGroup(in_dim, task_experts, hidden) for _ in range(n_tasks)
        )
        self.shared_experts = ExpertGroup(in_dim, shared_experts, hidden)
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, task_experts + shared_experts) for _ in range(n_tasks)
        )
        self.shared_gate = (
            None if last else nn.Linear(in_dim, n_tasks * task_experts + shared_experts)
        )
        self.out_dim = int(hidden[-1])
        self.last_gates: list[torch.Tensor] = []

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != self.n_tasks + 1:
            raise ValueError(f"CGC expects {self.n_tasks + 1} inputs, got {len(inputs)}")
        shared = self.shared_experts(inputs[-1])
        task = [ex(x) for ex, x in zip(self.task_experts, inputs[:-1], strict=True)]
        outs, self.last_gates = [], []
        for k, gate in enumerate(self.task_gates):
            mixed, w = _mix(gate(inputs[k]), torch.cat([task[k], shared], dim=1))
            outs.append(mixed)
            self.last_gates.append(w.detach())
        if self.shared_gate is not None:
            mixed, w = _mix(self.shared_gate(inputs[-1]), torch.cat([*task, shared], dim=1))
            outs.append(mixed)
            self.last_gates.append(w.detach())
        return outs
