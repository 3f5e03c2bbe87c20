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
        return self.forward_range(x, 0, self.n_experts)

    def forward_range(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Experts lo .. hi - 1 only: x [B, I] -> [B, hi - lo, H]."""
        h = x.unsqueeze(0).expand(hi - lo, -1, -1)  # [E, B, I]
        every = lo == 0 and hi == self.n_experts
        for w, b in zip(self.weights, self.biases, strict=True):
            w, b = (w, b) if every else (w[lo:hi], b[lo:hi])
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

    All experts are one :class:`ExpertGroup` (task 0's, ..., task T-1's, then the shared ones)
    and all gates one linear layer (task 0's rows, ..., then the shared gate's). On an
    accelerator (`batched_kernels`; the step's launches bound these small ops there) every
    expert runs in one batched matmul per layer when all gates read one input (the first
    layer), and the gates' mixtures are one batched matmul; on CPU, where the fused matmul was
    ~20 % slower, group by group and gate by gate, as separate modules would.

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
        self.task_experts = task_experts
        n_experts = n_tasks * task_experts + shared_experts
        self.experts = ExpertGroup(in_dim, n_experts, hidden)
        task_gate = task_experts + shared_experts
        self.gate_widths = [task_gate] * n_tasks + ([] if last else [n_experts])
        self.gates = nn.Linear(in_dim, sum(self.gate_widths))
        # the experts each task gate mixes: its own, then the shared ones
        shared = list(range(n_tasks * task_experts, n_experts))
        self.register_buffer(
            "task_expert_index",
            torch.tensor(
                [
                    list(range(k * task_experts, (k + 1) * task_experts)) + shared
                    for k in range(n_tasks)
                ]
            ),  # fmt: skip
            persistent=False,
        )
        self.out_dim = int(hidden[-1])
        self.batched: bool | None = None
        self.last_gates: list[torch.Tensor] = []

    def _expert_groups(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each task's experts on its input and the shared ones on the shared input:
        T + 1 tensors [B, E_group, H]."""
        te, T = self.task_experts, self.n_tasks
        ranges = [(k * te, (k + 1) * te) for k in range(T)] + [(T * te, self.experts.n_experts)]
        return [
            self.experts.forward_range(x, lo, hi)
            for x, (lo, hi) in zip(inputs, ranges, strict=True)
        ]

    def _gate_logits(self, inputs: Sequence[torch.Tensor], same: bool) -> list[torch.Tensor]:
        """Each gate's logits (task gates read their task's input, the shared gate the shared
        input): T (+ 1) tensors [B, E_gate]."""
        if same:
            return list(self.gates(inputs[0]).split(self.gate_widths, dim=1))
        weights = self.gates.weight.split(self.gate_widths)
        biases = self.gates.bias.split(self.gate_widths)
        readers = [*inputs[: self.n_tasks], inputs[-1]]
        return [F.linear(x, w, b) for x, w, b in zip(readers, weights, biases, strict=False)]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != self.n_tasks + 1:
            raise ValueError(f"CGC expects {self.n_tasks + 1} inputs, got {len(inputs)}")
        same = all(x is inputs[0] for x in inputs)
        logits = self._gate_logits(inputs, same)
        T = self.n_tasks
        if batched_kernels(inputs[0], self.batched):
            # every expert in one batched matmul per layer (one input) or a few (one per group)
            experts = (
                self.experts(inputs[0]) if same else torch.cat(self._expert_groups(inputs), dim=1)
            )  # [B, E, H]
            B, E, _ = experts.shape
            task_w = torch.softmax(torch.stack(logits[:T], dim=1), dim=-1)  # [B, T, E_task]
            # every gate's weights over all E experts (0 where a gate does not look), one bmm
            # (in the experts' dtype: under autocast the softmax is fp32, the experts bf16)
            mixing = experts.new_zeros(B, T, E).scatter(
                2, self.task_expert_index.expand(B, -1, -1), task_w.to(experts.dtype)
            )
            gates = list(task_w.unbind(1))
            if not self.last:
                shared_w = torch.softmax(logits[T], dim=-1)
                mixing = torch.cat([mixing, shared_w.to(experts.dtype).unsqueeze(1)], dim=1)
                gates.append(shared_w)
            outs = list(torch.bmm(mixing, experts).unbind(1))
        else:
            # group by group, as separate modules would (faster on CPU than the fused matmul)
            *task, shared = self._expert_groups(inputs)
            outs, gates = [], []
            for k in range(T):
                mixed, w = _mix(logits[k], torch.cat([task[k], shared], dim=1))
                outs.append(mixed)
                gates.append(w)
            if not self.last:
                mixed, w = _mix(logits[T], torch.cat([*task, shared], dim=1))
                outs.append(mixed)
                gates.append(w)
        self.last_gates = [w.detach() for w in gates]
        return outs
