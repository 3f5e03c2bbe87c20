"""What every multi-task model shares: the task configs, the sparse arch (a TorchRec
``EmbeddingBagCollection`` built from the feature spec), the input assembly, per-task losses,
and the ``*Train`` wrapper.

Notation: B = batch size, K = pooled sparse keys, D = embedding dim, F = dense features,
T = the model's tasks, T_s = the spec's tasks (label columns of a :class:`model.data.Batch`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from model.config import ModelConfig
from model.data import Batch
from pipelines.spec import FeatureSpec, TaskKind

__all__ = [
    "EagerCall",
    "FeatureLayout",
    "Lookups",
    "ModelOutput",
    "MultiTaskModel",
    "MultiTaskTrain",
    "SparseArch",
    "TaskConfig",
    "TaskType",
    "embedding_bag_configs",
    "feature_layout",
    "task_configs",
]


class TaskType(enum.Enum):
    # BCE on a target in [0, 1]: 0/1 labels, or a dwell task's soft bin target
    BINARY = "binary"
    # MSE on a continuous target
    REGRESSION = "regression"


@dataclass(frozen=True)
class TaskConfig:
    """One task of a model.

    Attributes:
        name: the spec's task name.
        task_type: the loss family.
        label_index: the task's column in ``Batch.labels`` / ``Batch.pseudo_labels``.
        is_dwell: a binned dwell task (soft target ``bin / divisor``).
        divisor: ``n_bins - 1`` for a dwell task, 1 otherwise (recovers the bin index).
        weight: the task's weight in the total loss.
    """

    name: str
    task_type: TaskType
    label_index: int
    is_dwell: bool = False
    divisor: float = 1.0
    weight: float = 1.0
    # regression targets: "log1p" regresses log(1 + value) (play time in seconds)
    transform: str = "none"


def task_configs(
    spec: FeatureSpec,
    divisors: dict[str, float],
    names: list[str] | None = None,
    regression: tuple[str, ...] = (),
) -> list[TaskConfig]:
    """TaskConfigs of ``names`` (default all spec tasks, spec order); unknown names raise.

    A dwell task named in ``regression`` is a regression on log1p of its continuous value
    (``Batch.labels`` column T_s + j for the j-th dwell task of the spec) instead of the
    binned soft target.
    """
    order = [t.name for t in spec.tasks]
    by_name = {t.name: t for t in spec.tasks}
    dwell = [t.name for t in spec.tasks if t.kind == TaskKind.DWELL]
    out = []
    for name in names or order:
        if name not in by_name:
            raise ValueError(f"task {name!r} is not in spec {spec.name!r} (tasks: {order})")
        t = by_name[name]
        if name in regression:
            if name not in dwell:
                raise ValueError(
                    f"task {name!r} is {t.kind.value}: only a dwell task has a continuous value "
                    "to regress on"
                )
            out.append(
                TaskConfig(
                    name=name,
                    task_type=TaskType.REGRESSION,
                    label_index=len(order) + dwell.index(name),
                    transform="log1p",
                )
            )
            continue
        out.append(
            TaskConfig(
                name=name,
                task_type=TaskType.BINARY,
                label_index=order.index(name),
                is_dwell=t.kind == TaskKind.DWELL,
                divisor=float(divisors.get(name, 1.0)),
            )
        )
    return out


@dataclass(frozen=True)
class FeatureLayout:
    """Where the inputs of a batch sit, by group.

    Attributes:
        sparse_keys: the KJT keys in a fixed order (the order of the stacked embeddings).
        tables: embedding table name -> (number of rows, the keys it serves).
        user_keys / item_keys / context_keys: the sparse keys of each group (``user_id`` and
            ``item_id`` included in theirs).
        n_dense: F.
        sequence_keys: the behaviour sequences' KJT keys (``Batch.sequences``), M of them.
        item_rows: rows of the item vocabulary (the sequences hold item indices).
    """

    sparse_keys: list[str]
    tables: dict[str, tuple[int, list[str]]]
    user_keys: list[str]
    item_keys: list[str]
    context_keys: list[str]
    n_dense: int
    sequence_keys: list[str] = field(default_factory=list)
    item_rows: int = 0

    def positions(self, keys: list[str]) -> list[int]:
        return [self.sparse_keys.index(k) for k in keys]


def feature_layout(spec: FeatureSpec, vocab_sizes: dict[str, int]) -> FeatureLayout:
    """The layout of spec + fitted vocabulary sizes (``Artifacts.vocab_sizes``)."""
    from pipelines.preprocessing import vocab_tables

    keys = [f.name for f in spec.categorical_features] + ["user_id", "item_id"]
    tables = {}
    for table, cols in vocab_tables(spec).items():
        if table not in vocab_sizes:
            raise ValueError(f"no vocabulary size for embedding table {table!r}")
        tables[table] = (int(vocab_sizes[table]), list(cols))
    return FeatureLayout(
        sparse_keys=keys,
        tables=tables,
        user_keys=[f.name for f in spec.user.categorical] + ["user_id"],
        item_keys=[f.name for f in spec.item.categorical] + ["item_id"],
        context_keys=[f.name for f in spec.context.categorical],
        n_dense=len(spec.dense_features),
        sequence_keys=[f"seq_{s.name}" for s in spec.sequences],
        item_rows=next(rows for rows, keys in tables.values() if "item_id" in keys),
    )


def embedding_bag_configs(layout: FeatureLayout, dim: int) -> list[EmbeddingBagConfig]:
    """One table per vocabulary (features with the same spec ``table`` share one)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{table}",
            embedding_dim=dim,
            num_embeddings=rows,
            feature_names=list(keys),
            pooling=PoolingType.SUM,
        )
        for table, (rows, keys) in layout.tables.items()
    ]


class SparseArch(nn.Module):
    """The embedding lookup: KJT (one id per key and sample) -> stacked embeddings.

    Keys come back from a sharded EBC in another order than from an unsharded one, so the
    output is assembled by name (``KeyedTensor.to_dict``) in ``layout.sparse_keys`` order.

    Call: KJT -> [B, K, D].
    """

    def __init__(self, layout: FeatureLayout, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.embedding_dim = dim
        self.ebc = EmbeddingBagCollection(
            tables=embedding_bag_configs(layout, dim), device=device or torch.device("cpu")
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.stack(self.ebc(features))

    def stack(self, pooled: KeyedTensor) -> torch.Tensor:
        """The EBC's output (``KeyedTensor``) -> [B, K, D] in ``layout.sparse_keys`` order."""
        by_key = pooled.to_dict()
        return torch.stack([by_key[k] for k in self.layout.sparse_keys], dim=1)


class Lookups(NamedTuple):
    """What the sharded modules return for a batch: the pooled lookups (``KeyedTensor``) and,
    for DTRN, the sequence lookups (key -> ``JaggedTensor``, else None)."""

    pooled: KeyedTensor
    sequences: dict[str, JaggedTensor] | None


class EagerCall(nn.Module):
    """Calls ``fn`` as one module, so that torch.fx records the call without looking inside.

    TorchRec's ``TrainPipelineSparseDist`` traces the training module with torch.fx to find
    each sharded module's input (it must be read straight off the batch), treating every module
    without a sharded child as a leaf. The dense half of a step (loops over a module's outputs,
    branches on tensors, HTLNet's ``autograd.grad``) cannot be traced and need not be: it runs
    inside this leaf, eagerly. It has no parameters of its own; ``fn``'s owner holds them (the
    reference is not registered, so the owner is not a submodule of this module).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


@dataclass
class ModelOutput:
    """logits: [B, T] of the ranking heads (scores = sigmoid); aux: model-specific tensors
    (STAN: ``preference`` ỹ [B, T], ``gamma`` [B, T])."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def float(self) -> ModelOutput:
        """The outputs in fp32 (those of an autocast forward are bf16): losses and scores are
        computed in fp32."""
        return ModelOutput(self.logits.float(), {k: v.float() for k, v in self.aux.items()})


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real rows (mask [B]) of x [B] -> [], or of each column of x [B, T] -> [T];
    0 for an all-padding batch (keeps the graph)."""
    weights = mask if x.dim() == 1 else mask.unsqueeze(1)
    return (x * weights).sum(0) / mask.sum().clamp_min(1.0)


class MultiTaskModel(nn.Module):
    """Base of the ranking models: embeddings + dense features in, T logits out.

    Subclasses implement :meth:`heads` on the flat input ``x`` = [embeddings of the K keys,
    dense features] ([B, K * D + F]); STAN overrides :meth:`forward` / :meth:`loss`. With
    ``cfg.name == "dtrn"`` the input is DTRN's T task-specific bottoms instead ([T, B, I]); the
    backbones that accept them (MMoE, PLE, AITM, STAN) give task k its own ``x[k]``.
    """

    def __init__(self, layout: FeatureLayout, tasks: list[TaskConfig], cfg: ModelConfig) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.layout = layout
        self.tasks = tasks
        self.cfg = cfg
        self.sparse_arch = SparseArch(layout, cfg.embedding_dim)
        self.input_dim = len(layout.sparse_keys) * cfg.embedding_dim + layout.n_dense
        self.task_bottom: nn.Module | None = None
        if cfg.name == "dtrn":
            from model.dtrn import DTRNBottom

            d = cfg.dtrn
            self.task_bottom = DTRNBottom(
                self.input_dim, cfg.embedding_dim, len(tasks), layout.sequence_keys,
                layout.item_rows, d.heads, d.ffn_hidden, d.condition, d.hyper_embedding_dim,
                d.hyper_hidden, d.trm_reduction,
            )  # fmt: skip
            self.input_dim = self.task_bottom.out_dim
            self.item_position = layout.sparse_keys.index("item_id")
        self.register_buffer(
            "label_index", torch.tensor([t.label_index for t in tasks]), persistent=False
        )
        self.register_buffer(
            "is_binary",
            torch.tensor([t.task_type == TaskType.BINARY for t in tasks]),
            persistent=False,
        )
        self.register_buffer(
            "is_log1p", torch.tensor([t.transform == "log1p" for t in tasks]), persistent=False
        )

    # --- inputs -------------------------------------------------------------------------
    @property
    def uses_sequences(self) -> bool:
        """Whether the model reads the behaviour sequences (DTRN's task-specific bottoms)."""
        return self.task_bottom is not None

    def lookups(self, batch: Batch) -> Lookups:
        """The embedding lookups of a batch: only the (sharded) embedding modules, each fed a
        field of the batch, so that TorchRec's pipeline can run them ahead of the step."""
        pooled = self.sparse_arch.ebc(batch.sparse_features)
        if self.task_bottom is None:
            return Lookups(pooled, None)
        return Lookups(pooled, self.task_bottom.lookup(batch.sequences))

    def embed(
        self, batch: Batch, looked_up: Lookups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, K, D], input x): x is [B, K * D + F], or with DTRN the T
        task-specific bottoms [T, B, I]. ``looked_up``: the batch's :meth:`lookups` (done
        here when not given)."""
        if looked_up is None:
            looked_up = self.lookups(batch)
        emb = self.sparse_arch.stack(looked_up.pooled)
        x = torch.cat([emb.flatten(1), batch.dense_features], dim=1)
        if self.task_bottom is not None:
            x = self.task_bottom(x, emb[:, self.item_position], looked_up.sequences)
        return emb, x

    def labels(self, batch: Batch) -> torch.Tensor:
        """The model's tasks' targets [B, T]: in [0, 1] for binary tasks, log1p of the value
        for log1p regression tasks."""
        y = batch.labels.index_select(1, self.label_index)
        return torch.where(self.is_log1p, torch.log1p(y.clamp_min(0)), y)

    def to_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T] logits -> scores: sigmoid for binary tasks, the predicted value for
        regression tasks (expm1 of the prediction for log1p targets, e.g. seconds)."""
        value = torch.where(self.is_log1p, torch.expm1(logits).clamp_min(0.0), logits)
        return torch.where(self.is_binary, torch.sigmoid(logits), value)

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        return batch.pseudo_labels.index_select(1, self.label_index)

    # --- model --------------------------------------------------------------------------
    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: Batch) -> ModelOutput:
        return self.dense_forward(self.lookups(batch), batch)

    def dense_forward(self, looked_up: Lookups, batch: Batch) -> ModelOutput:
        """The model after its embedding lookups (what subclasses with auxiliary outputs
        override)."""
        _, x = self.embed(batch, looked_up)
        return ModelOutput(self.heads(x, batch))

    def task_losses(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        """Per-sample, per-task losses [B, T] (``reduction="none"``), before masking."""
        y = self.labels(batch)
        # every column both ways, then each task's kind: two kernels, not two per task
        bce = F.binary_cross_entropy_with_logits(out.logits, y, reduction="none")
        return torch.where(self.is_binary, bce, F.mse_loss(out.logits, y, reduction="none"))

    def loss(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        """The per-task training losses [T] (masked means); the total is their weighted sum."""
        return masked_mean(self.task_losses(batch, out), batch.mask)

    def task_weights(self) -> torch.Tensor:
        return torch.tensor([t.weight for t in self.tasks])

    def scores(self, batch: Batch) -> torch.Tensor:
        """Ranking scores [B, T] (:meth:`to_scores`; no state is updated)."""
        return self.to_scores(self.forward(batch).logits)


class MultiTaskTrain(nn.Module):
    """The training wrapper (as ``torchrec.models.dlrm.DLRMTrain``).

    Call: batch -> ``(loss, (task_losses, logits, labels))``: the scalar total loss, then,
    detached, the per-task losses [T] that sum (weighted) to it, the logits [B, T] and the
    model's targets [B, T].
    """

    def __init__(
        self,
        model: MultiTaskModel,
        autocast_dtype: torch.dtype | None = None,
        device_type: str = "cpu",
    ) -> None:
        super().__init__()
        self.model = model
        # Mixed precision of the forward (``train.precision=bf16``): autocast runs the matmuls
        # in ``autocast_dtype``; the parameters, the losses and the Beta state stay fp32.
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type
        self.register_buffer("weights", model.task_weights(), persistent=False)
        self.dense_step = EagerCall(self._dense_step)

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # TorchRec's pipeline traces this: the lookups, then the rest as one opaque call
        return self.dense_step(self.model.lookups(batch), batch)

    def _dense_step(
        self, looked_up: Lookups, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.autocast_dtype is None:
            out = self.model.dense_forward(looked_up, batch)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                out = self.model.dense_forward(looked_up, batch)
            out = out.float()
        per_task = self.model.loss(batch, out)
        loss = (per_task * self.weights).sum()
        return loss, (per_task.detach(), out.logits.detach(), self.model.labels(batch))
