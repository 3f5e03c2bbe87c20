"""The trainer behind ``torchrun -m jobs.train`` (and plain ``python -m jobs.train``).

One process per rank: gloo on CPU, nccl on GPU. The embedding tables are sharded by TorchRec's
planner (``DistributedModelParallel``; table-wise by default) and trained by an optimizer fused
into their backward; the dense parameters are data-parallel and trained by Adam. Every rank
reads its own users' rows (``model.data``), in time order, so STAN's per-user Beta state stays
local to a rank.

Outputs under ``output_dir``: ``checkpoints/step_<N>/`` (``torch.distributed.checkpoint``:
sharded weights, optimizer states, and per rank the Beta state, data position and RNG states),
``model.pt`` (the weights gathered into an unsharded model, with what is needed to rebuild it:
:func:`load_trained`), ``metrics.json``, ``predictions_<split>.parquet`` and ``learning_curve.png``.
Rank 0 alone logs to MLflow.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

from model import registry
from model.base import (
    FeatureLayout,
    MultiTaskModel,
    MultiTaskTrain,
    TaskConfig,
    TaskType,
    feature_layout,
    task_configs,
)
from model.config import TrainConfig, check_against_spec
from model.data import Batch, ExamplesLoader, make_loader, prefetch, pseudo_label_columns
from model.metrics import regression_metrics, rela_impr_auc, rela_impr_ndcg, task_metrics
from model.profiling import StepProfiler
from model.registry import build_model, model_from_saved, upgrade_state_dict
from model.stages import (
    STAGES,
    StageThresholds,
    assign_stages,
    fit_stage_thresholds,
    stage_expression,
    stage_task_index,
)
from model.stan import STAN
from pipelines.lake import Tables
from pipelines.preprocessing import Artifacts
from pipelines.preprocessing import load as load_artifacts
from pipelines.spec import FeatureSpec, load_spec

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]

# What loading the pyfunc needs (the versions this project pins, see .ci/requirements).
PYFUNC_REQUIREMENTS = [
    "torch==2.13.0",
    "torchrec==1.8.0",
    "fbgemm-gpu-cpu==1.8.0",
    "pandas<3",
    "pyarrow<26",
    "deltalake",
    "pydantic>=2",
    "pyyaml",
]

__all__ = ["TrainResult", "evaluate_unsharded", "load_trained", "train"]


# ----------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The rendezvous variables a one-process group set in this process (``release_distributed``
# takes them back: a later process started from this one must not inherit them).
_OWN_ENV: list[str] = []


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join (or, without torchrun, create a one-process) process group: (rank, world, created)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ:
        own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        if "MASTER_PORT" not in os.environ:
            own["MASTER_PORT"] = str(_free_port())
        os.environ.update(own)
        _OWN_ENV[:] = list(own)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def release_distributed() -> None:
    """Destroy the process group ``init_distributed`` created, and unset the variables it set
    (an in-process run, e.g. from a test or a notebook, leaves the environment as it was)."""
    dist.destroy_process_group()
    for key in _OWN_ENV:
        os.environ.pop(key, None)
    _OWN_ENV.clear()


def _device(cfg: TrainConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- model setup
@dataclass
class ModelBundle:
    """What rebuilds a model: its config, layout, tasks and (PLE_stage) stage thresholds."""

    cfg: TrainConfig
    spec: FeatureSpec
    artifacts: Artifacts
    layout: FeatureLayout
    tasks: list[TaskConfig]
    stage_thresholds: StageThresholds | None
    spec_overrides: list[str] = field(default_factory=list)

    def stage_rows(self) -> Any:
        """The Arrow row filter of ``train.stage_subset`` (None: every row)."""
        stage = self.cfg.train.stage_subset
        if stage is None:
            return None
        assert self.stage_thresholds is not None
        index = stage_task_index(self.cfg.model.stage, [t.name for t in self.spec.tasks])
        pl, n_prev = pseudo_label_columns(
            [self.spec.tasks[i].name for i in index], self.cfg.model.pseudo_labels
        )
        return stage_expression(stage, self.stage_thresholds, (pl[0], pl[1], pl[2]), n_prev)

    def stage_of(self, batch: Batch) -> torch.Tensor:
        """[B] stage index of each row (0 New .. 3 Loyal), as PLE_stage computes it."""
        assert self.stage_thresholds is not None
        i, j, k = stage_task_index(self.cfg.model.stage, [t.name for t in self.spec.tasks])
        pl = batch.pseudo_labels
        thresholds = self.stage_thresholds.as_tensor().to(pl.device)
        return assign_stages(pl[:, i], pl[:, j], pl[:, k], batch.n_prev, thresholds)

    def build(self) -> MultiTaskModel:
        return build_model(
            self.cfg.model,
            self.layout,
            self.tasks,
            spec_tasks=[t.name for t in self.spec.tasks],
            stage_thresholds=self.stage_thresholds,
            seed=self.cfg.train.seed,
        )


def model_tasks(
    cfg: TrainConfig, spec: FeatureSpec, divisors: dict[str, float]
) -> list[TaskConfig]:
    """The model's tasks: ``model.tasks`` (or the spec's); HTLNet's chain ends in a regression
    on the continuous core target, weighted by ``model.htlnet.core_weight``."""
    if cfg.model.name != "htlnet":
        return task_configs(spec, divisors, cfg.model.tasks)
    chain = cfg.model.tasks or cfg.model.htlnet.chain
    tasks = task_configs(spec, divisors, chain, regression=(chain[-1],))
    tasks[-1] = replace(tasks[-1], weight=cfg.model.htlnet.core_weight)
    return tasks


def prepare(
    cfg: TrainConfig, spec_overrides: list[str] | None = None, fit_stages: bool = True
) -> ModelBundle:
    """Load and check the spec, artifacts and config together (clear errors before training)."""
    spec = load_spec(cfg.spec, overrides=spec_overrides or [])
    check_against_spec(cfg, spec)
    tables = Tables.for_spec(cfg.lake, spec)
    if not Path(tables.artifacts).exists():
        raise FileNotFoundError(
            f"no fitted artifacts at {tables.artifacts}: run python -m jobs.build_features first"
        )
    artifacts = load_artifacts(tables.artifacts, spec, with_vocabs=False)
    layout = feature_layout(spec, artifacts.vocab_sizes)
    divisors = {t.name: float(artifacts.target_divisor(t.name)) for t in spec.tasks}
    tasks = model_tasks(cfg, spec, divisors)
    thresholds = None
    needs_stages = (
        cfg.model.name == "ple_stage" or cfg.train.stage_subset or cfg.train.metrics_by_stage
    )
    if needs_stages and fit_stages:
        thresholds = fit_stage_thresholds(
            tables.examples, spec, divisors, cfg.model.stage, cfg.table_version
        )
    return ModelBundle(cfg, spec, artifacts, layout, tasks, thresholds, list(spec_overrides or []))


def _sparse_optimizer(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    from torchrec.optim import RowWiseAdagrad

    o = cfg.optim
    if o.sparse == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": o.sparse_lr, "eps": 1e-8}
    if o.sparse == "adagrad":
        return torch.optim.Adagrad, {"lr": o.sparse_lr, "eps": 1e-8}
    if o.sparse == "adam":
        return torch.optim.Adam, {"lr": o.sparse_lr, "betas": o.betas, "eps": o.eps}
    return torch.optim.SGD, {"lr": o.sparse_lr}


def shard(
    train_module: MultiTaskTrain, cfg: TrainConfig, device: torch.device, world_size: int
) -> tuple[nn.Module, Any]:
    """DistributedModelParallel with the planner's plan, and the combined optimizer."""
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    opt_cls, opt_kwargs = _sparse_optimizer(cfg)
    # the pooled tables, and DTRN's sequence table (an unpooled EmbeddingCollection)
    collections = [
        m
        for m in train_module.model.modules()
        if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)
    ]
    sparse_params = [p for m in collections for p in m.parameters()]
    apply_optimizer_in_backward(opt_cls, sparse_params, opt_kwargs)
    table_names = [
        c.name
        for m in collections
        for c in (
            m.embedding_bag_configs()
            if isinstance(m, EmbeddingBagCollection)
            else m.embedding_configs()
        )
    ]
    constraints = {
        name: ParameterConstraints(sharding_types=[cfg.train.sharding]) for name in table_names
    }
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    pg = dist.GroupMember.WORLD
    sharders = get_default_sharders()
    plan = planner.collective_plan(train_module, sharders, pg)
    dmp = DistributedModelParallel(
        train_module,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    o = cfg.optim
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        # fused: one multi-tensor kernel for every dense parameter (CPU and CUDA), not a few
        # ops per parameter: the per-parameter launches are most of a GPU step's host time
        lambda params: torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, fused=True),
    )
    # Adam's state is created lazily at its first step; a checkpoint can only be loaded in
    # place into existing state tensors, so create it now (a zero-gradient step moves nothing).
    dense.init_state()
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _inner(dmp: nn.Module) -> MultiTaskModel:
    for m in dmp.modules():
        if isinstance(m, MultiTaskTrain):
            return m.model
    raise TypeError("no MultiTaskTrain inside the sharded module")


def gather_state_dict(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded weights of the inner model on rank 0 (``None`` elsewhere); collective."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            tensor = full
        elif isinstance(value, DTensor):
            tensor = value.full_tensor().cpu()
        else:
            tensor = value.detach().cpu()
        if rank == 0 and tensor is not None:
            out[key.removeprefix("model.")] = tensor.clone()
    return out if rank == 0 else None


def load_unsharded(dmp: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded state dict (``model.pt``) into the sharded model, shard by shard
    (warm start). Every weight must be there with the same shape: the same spec, vocabularies
    and model config."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            name = key.removeprefix("model.")
            if name not in weights:
                raise ValueError(f"train.init_from: the weights have no {name!r}")
            src = weights[name]
            if tuple(src.shape) != tuple(value.shape):
                raise ValueError(
                    f"train.init_from: {name!r} has shape {tuple(src.shape)}, this model "
                    f"{tuple(value.shape)} (another vocabulary or model config)"
                )
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    md = shard.metadata
                    region = tuple(
                        slice(o, o + s)
                        for o, s in zip(md.shard_offsets, md.shard_sizes, strict=True)
                    )
                    shard.tensor.copy_(src[region])
            elif isinstance(value, DTensor):
                raise ValueError("train.init_from: DTensor state is not supported yet")
            else:
                value.copy_(src.to(value.device, value.dtype))


# ----------------------------------------------------------------------------- checkpoints
def _latest_checkpoint(root: Path) -> Path | None:
    done = sorted(root.glob("step_*/.complete"), key=lambda p: int(p.parent.name[5:]))
    return done[-1].parent if done else None


def run_fingerprint(cfg: TrainConfig, table_version: int, spec_overrides: list[str]) -> str:
    """What a checkpoint must share with the run that resumes it: the model, optimizer, data
    order (batch size, seed, epochs), sharding, spec and the examples table version. The step
    budget (``max_steps``), logging and checkpoint cadence may differ; the code's state-dict
    layout (`model.registry.STATE_LAYOUT`) may not."""
    import hashlib

    tc = cfg.train
    key = {
        "model": cfg.model.model_dump(mode="json"),
        "optim": cfg.optim.model_dump(mode="json"),
        "data": [tc.batch_size, tc.seed, tc.epochs, tc.sharding, cfg.spec, spec_overrides],
        "init_from": tc.init_from,
        "lake": str(Path(cfg.lake).resolve()),
        "table_version": table_version,
        "state_layout": registry.STATE_LAYOUT,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resumable(root: Path, fingerprint: str, rank: int) -> Path | None:
    """The newest complete checkpoint of this same run, or None. Checkpoints of another
    configuration or table version are removed (with a warning) so that they cannot mix."""
    latest = _latest_checkpoint(root)
    if latest is None:
        return None
    meta = json.loads((latest / ".complete").read_text())
    if meta.get("fingerprint") == fingerprint:
        return latest
    if rank == 0:
        log.warning(
            "the checkpoints in %s come from another configuration or table version "
            "(fingerprint %s, this run %s): starting from scratch and removing them",
            root,
            meta.get("fingerprint"),
            fingerprint,
        )
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    return None


def _save_checkpoint(
    root: Path,
    step: int,
    dmp: nn.Module,
    optimizer: Any,
    extra: dict[str, Any],
    fingerprint: str,
) -> Path:
    rank = dist.get_rank()
    path = root / f"step_{step}"
    buf = io.BytesIO()
    torch.save(extra, buf)
    buf.seek(0)
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict(), f"rank{rank}": buf}
    dcp.save(state, checkpoint_id=str(path))
    dist.barrier()
    if rank == 0:
        (path / ".complete").write_text(
            json.dumps(
                {"step": step, "world_size": dist.get_world_size(), "fingerprint": fingerprint}
            )
        )
        # keep the newest two complete checkpoints
        complete = sorted(int(p.parent.name[5:]) for p in root.glob("step_*/.complete"))
        for old in complete[:-2]:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()
    return path


def _load_checkpoint(path: Path, dmp: nn.Module, optimizer: Any) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = json.loads((path / ".complete").read_text())
    if int(meta["world_size"]) != world:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} processes, this run has "
            f"{world}: users are sharded by rank, resume with the same --nproc-per-node"
        )
    state = {
        "model": dmp.state_dict(),
        "optim": optimizer.state_dict(),
        f"rank{rank}": io.BytesIO(),
    }
    dcp.load(state, checkpoint_id=str(path))
    dmp.load_state_dict(dict(state["model"]))
    optimizer.load_state_dict(state["optim"])
    extra = state[f"rank{rank}"]
    if isinstance(extra, io.BytesIO):
        extra.seek(0)
        extra = torch.load(extra, weights_only=False)
    return extra


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _predict(
    model_call: Any,
    loader: ExamplesLoader,
    device: torch.device,
    tasks: list[TaskConfig],
    stage_of: Any = None,
) -> dict[str, np.ndarray]:
    """Scores and targets of this rank's real rows: example_id, user_key, scores [n, T],
    labels [n, T] (the [0, 1] targets), and with ``stage_of`` each row's stage [n]."""
    index = torch.tensor([t.label_index for t in tasks])
    parts: dict[str, list[np.ndarray]] = {
        "example_id": [],
        "user_key": [],
        "scores": [],
        "labels": [],
    }
    if stage_of is not None:
        parts["stage"] = []
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        scores = model_call(batch).float().cpu()
        real = batch.mask.cpu() > 0
        parts["example_id"].append(batch.example_id.cpu()[real].numpy())
        parts["user_key"].append(batch.user_key.cpu()[real].numpy())
        parts["scores"].append(scores[real].numpy())
        parts["labels"].append(batch.labels.cpu()[real][:, index].numpy())
        if stage_of is not None:
            parts["stage"].append(stage_of(batch).cpu()[real].numpy())
    n_tasks = len(tasks)
    return {
        k: np.concatenate(v) if v else np.zeros((0, n_tasks) if k in ("scores", "labels") else 0)
        for k, v in parts.items()
    }


def split_metrics(pred: dict[str, np.ndarray], tasks: list[TaskConfig], k: int) -> dict[str, float]:
    """``<task>/<metric>`` for every task: AUC, GAUC, NDCG@k, LogLoss on the split's rows.

    Regression tasks: NRMSE, NMAE, Gini and Spearman of the predicted value (e.g. seconds).
    Dwell tasks: AUC / GAUC / LogLoss on the binarised target (bin in the upper half, i.e. soft
    target > 0.5), NDCG with the bin index as graded relevance. A metric that is undefined on
    these rows (one class only) is left out with a warning.
    """
    out: dict[str, float] = {}
    for i, task in enumerate(tasks):
        y = pred["labels"][:, i]
        if task.task_type == TaskType.REGRESSION:
            try:
                m = regression_metrics(y, pred["scores"][:, i])
            except ValueError as err:
                log.warning("task %s: metrics undefined on these rows (%s)", task.name, err)
                continue
            out.update({f"{task.name}/{name}": float(v) for name, v in m.items()})
            continue
        relevance = np.rint(y * task.divisor) if task.is_dwell else None
        binary = (y > 0.5).astype(np.float64) if task.is_dwell else y
        try:
            m = task_metrics(
                binary, pred["scores"][:, i], pred["user_key"], k=k, relevance=relevance
            )
        except ValueError as err:
            log.warning("task %s: metrics undefined on these rows (%s)", task.name, err)
            continue
        out.update({f"{task.name}/{name}": float(v) for name, v in m.items()})
    return out


def metrics_by_stage(
    pred: dict[str, np.ndarray], tasks: list[TaskConfig], k: int
) -> dict[str, float]:
    """``stage_<s>/<task>/<metric>``: :func:`split_metrics` on each stage's rows."""
    out: dict[str, float] = {}
    for s, name in enumerate(STAGES):
        rows = pred["stage"] == s
        out[f"stage_{name}/rows"] = float(rows.sum())
        if not rows.any():
            continue
        sub = {key: v[rows] for key, v in pred.items()}
        out.update({f"stage_{name}/{key}": v for key, v in split_metrics(sub, tasks, k).items()})
    return out


def _gather_predictions(local: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    world = dist.get_world_size()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    if dist.get_rank() != 0:
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in local}


def _write_predictions(path: Path, pred: dict[str, np.ndarray], tasks: list[TaskConfig]) -> None:
    cols = {"example_id": pred["example_id"], "user_key": pred["user_key"]}
    for i, t in enumerate(tasks):
        cols[f"score_{t.name}"] = pred["scores"][:, i]
        cols[f"target_{t.name}"] = pred["labels"][:, i]
    if "stage" in pred:
        cols["stage"] = np.asarray(STAGES)[pred["stage"]]
    order = np.argsort(pred["example_id"], kind="stable")
    pq.write_table(pa.table({k: v[order] for k, v in cols.items()}), path)


def base_run_metrics(base: str, tracking_uri: str) -> dict[str, float]:
    """The final metrics of a base run: an output_dir with metrics.json, or an MLflow run id."""
    path = Path(base) / "metrics.json"
    if path.exists():
        return dict(json.loads(path.read_text())["metrics"])
    import mlflow

    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(base)
    except Exception as err:  # noqa: BLE001 - mlflow raises several kinds
        raise ValueError(
            f"train.relaimpr_base: {base!r} is neither an output_dir with metrics.json nor a run "
            f"id in {tracking_uri} ({err})"
        ) from None
    return {k.replace("_at_", "@"): v for k, v in run.data.metrics.items()}


def relaimpr(metrics: dict[str, float], base: dict[str, float], k: int) -> dict[str, float]:
    """``<split>/<task>/relaimpr_auc`` and ``relaimpr_ndcg@k`` for every metric the base run
    has too (STAN Sec. 4.1.4: (AUC - 0.5) / (AUC_base - 0.5) - 1 and NDCG / NDCG_base - 1)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key not in base:
            continue
        prefix, _, name = key.rpartition("/")
        if name == "auc" and base[key] != 0.5:
            out[f"{prefix}/relaimpr_auc"] = rela_impr_auc(value, base[key])
        elif name == f"ndcg@{k}" and base[key] != 0:
            out[f"{prefix}/relaimpr_ndcg@{k}"] = rela_impr_ndcg(value, base[key])
    return out


# ----------------------------------------------------------------------------- logging
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Tracker:
    """MLflow on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.active = rank == 0 and cfg.mlflow.enabled
        self.run_id: str | None = None
        if not self.active:
            return
        import mlflow

        self.mlflow = mlflow
        mc = cfg.mlflow
        mlflow.set_tracking_uri(mc.tracking_uri)
        exp = mlflow.get_experiment_by_name(mc.experiment)
        if exp is None:
            location = Path(mc.artifact_location).resolve().as_uri()
            mlflow.create_experiment(mc.experiment, artifact_location=location)
        mlflow.set_experiment(mc.experiment)
        tags = dict(mc.tags)
        if mc.parent_run_id:
            tags["mlflow.parentRunId"] = mc.parent_run_id
        run = mlflow.start_run(run_name=mc.run_name or cfg.model.name, tags=tags)
        self.run_id = run.info.run_id

    def params(self, params: dict[str, Any]) -> None:
        if self.active:
            items = {k: str(v)[:500] for k, v in params.items()}
            keys = sorted(items)
            for i in range(0, len(keys), 100):
                self.mlflow.log_params({k: items[k] for k in keys[i : i + 100]})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {k.replace("@", "_at_"): v for k, v in values.items() if math.isfinite(v)}
            self.mlflow.log_metrics(clean, step=step)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path)
            else:
                self.mlflow.log_artifact(str(path), artifact_path)

    def log_model(
        self, out_dir: Path, preprocessing: Path, bundle: ModelBundle, uses_sequences: bool
    ) -> str | None:
        """Log the gathered model as a pyfunc (raw columns in, ``score_<task>`` out), with the
        facts batch scoring's driver reads instead of loading it (`model.pyfunc_facts`)."""
        if not self.active:
            return None
        from model.pyfunc_facts import scoring_metadata
        from model.serving import RankerModel, pyfunc_signature

        tasks = [t.name for t in bundle.tasks]

        info = self.mlflow.pyfunc.log_model(
            name="model",
            python_model=RankerModel(),
            artifacts={
                "model": str(out_dir / "model.pt"),
                "spec": str(out_dir / "spec.yaml"),
                "preprocessing": str(preprocessing),
            },
            signature=pyfunc_signature(bundle.spec, tasks),
            metadata=scoring_metadata(tasks, uses_sequences),
            pip_requirements=PYFUNC_REQUIREMENTS,
            # the model ships its own code: loading needs no checkout of this repository
            code_paths=[str(REPO / "model"), str(REPO / "pipelines")],
        )
        self.mlflow.set_tag("lifecycle.model_uri", str(info.model_uri))
        return str(info.model_uri)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self.mlflow.end_run(status=status)


def _plot_curve(history: list[dict[str, float]], path: Path, tasks: list[TaskConfig]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="total", lw=2)
    for t in tasks:
        ax.plot(steps, [h[f"loss/{t.name}"] for h in history], label=t.name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    output_dir: str
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    table_version: int | None = None
    samples_per_s: float = 0.0
    rank: int = 0
    model_uri: str | None = None


def _progress(total: int, rank: int) -> Any:
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="batch",
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig, spec_overrides: list[str] | None = None) -> TrainResult:
    """Train ``cfg.model.name`` on the examples table; see the module docstring."""
    device = _device(cfg)
    check_precision(cfg.train.precision, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Everything that can fail on bad input fails here, before the process group starts.
    bundle = prepare(cfg, spec_overrides)
    rank, world, created = init_distributed(device)
    tracker: _Tracker | None = None
    try:
        with _matmul_precision(cfg.train.precision):
            tracker = _Tracker(cfg, rank)
            result = _train(cfg, bundle, device, rank, world, tracker)
        tracker.end()
        return result
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    finally:
        if created:
            release_distributed()


def check_precision(precision: str, device: torch.device) -> None:
    """TF32 is a format of NVIDIA's tensor cores: on another device a "tf32" run would be an
    fp32 run under another name (a benchmark row or a parity check that measures nothing)."""
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(
            f"train.precision=tf32 needs a CUDA device (the run's is {device.type}): use fp32 "
            "or bf16"
        )


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matmuls and convolutions for the run (``train.precision=tf32``); the process's
    settings are restored after it (a training in a notebook or a test leaves them as found)."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the forward is autocast to for ``train.precision`` (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


def _train(
    cfg: TrainConfig,
    bundle: ModelBundle,
    device: torch.device,
    rank: int,
    world: int,
    tracker: _Tracker,
) -> TrainResult:
    tc = cfg.train
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    tables = Tables.for_spec(cfg.lake, bundle.spec)

    stage_rows = bundle.stage_rows()

    def loader(split: str, batch_size: int, persistent: bool = False) -> ExamplesLoader:
        return make_loader(
            tables.examples,
            bundle.spec,
            bundle.artifacts,
            split,
            batch_size,
            rank=rank,
            world_size=world,
            version=version,
            num_workers=tc.num_workers,
            persistent_workers=persistent,
            pin_memory=device.type == "cuda",
            pseudo_labels=cfg.model.pseudo_labels,
            rows=stage_rows,
        )

    version = cfg.table_version
    # the eval loaders are read once each: only the train loader keeps its workers
    train_loader = loader("train", tc.batch_size, persistent=tc.persistent_workers)
    version = train_loader.dataset.version  # pinned: the eval splits read the same snapshot
    if train_loader.dataset.num_batches == 0:
        subset = f" of stage {tc.stage_subset!r}" if tc.stage_subset else ""
        raise ValueError(f"{tables.examples} (version {version}) has no train rows{subset}")
    eval_loaders = {s: loader(s, tc.eval_batch_size) for s in tc.eval_splits}

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = bundle.build()
    wrapped = MultiTaskTrain(model, autocast_dtype(tc.precision), device.type)
    dmp, optimizer = shard(wrapped, cfg, device, world)
    inner = _inner(dmp)
    beta_state = inner.beta_state if isinstance(inner, STAN) and inner.use_beta else None
    if beta_state is not None:
        beta_state.to(device)

    steps_per_epoch = train_loader.dataset.num_batches
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    step, epoch, in_epoch = 0, 0, 0
    history: list[dict[str, float]] = []
    fingerprint = run_fingerprint(cfg, version, bundle.spec_overrides)
    resume_from = _resumable(ckpt_root, fingerprint, rank) if tc.resume else None
    if resume_from is None and tc.init_from:
        warm = torch.load(tc.init_from, weights_only=False)["state_dict"]
        load_unsharded(dmp, upgrade_state_dict(warm, inner.state_dict().keys()))
        if rank == 0:
            log.info("warm start from %s", tc.init_from)
    if resume_from is None:
        dist.barrier()
        if rank == 0 and ckpt_root.exists():
            shutil.rmtree(ckpt_root)  # a fresh run: no stale step numbers to resume from later
        dist.barrier()
    if resume_from is not None:
        extra = _load_checkpoint(resume_from, dmp, optimizer)
        step, epoch, in_epoch = extra["step"], extra["epoch"], extra["in_epoch"]
        history = extra["history"]
        if beta_state is not None:
            beta_state.load_state_dict(extra["beta_state"])
        _set_rng_state(extra["rng"])
        if rank == 0:
            log.info("resumed from %s (step %d, epoch %d)", resume_from, step, epoch)

    params = _flatten(cfg.model_dump(mode="json"))
    params.update(
        {
            "data.table_version": version,
            "data.world_size": world,
            "data.train_rows": sum(train_loader.dataset.rows_per_rank),
            "data.steps_per_epoch": steps_per_epoch,
        }
    )
    if step == 0:
        tracker.params(params)
    if rank == 0:
        log.info(
            "training %s on %s (version %d): %d train rows, %d ranks, %d steps of %d",
            cfg.model.name,
            tables.examples,
            version,
            params["data.train_rows"],
            world,
            total_steps,
            tc.batch_size,
        )

    def checkpoint() -> None:
        extra = {
            "step": step,
            "epoch": epoch,
            "in_epoch": in_epoch,
            "history": history,
            "beta_state": beta_state.state_dict() if beta_state is not None else None,
            "rng": _rng_state(),
            "data": train_loader.state_dict(),
        }
        _save_checkpoint(ckpt_root, step, dmp, optimizer, extra, fingerprint)

    bar = _progress(total_steps, rank)
    if bar is not None:
        bar.update(step)
    dmp.train()
    pipelined = use_sparse_dist(device, tc.pipeline, dmp, cfg.model.name)
    step_fn = _Step(dmp, optimizer, device, pipelined)
    rows_here = train_loader.dataset.rows_per_rank[rank]
    batch_rows = tc.batch_size
    warmup = min(3, max(total_steps - step - 1, 0))  # steps left out of the throughput
    profiler = StepProfiler(out_dir / "profile", device, rank) if tc.profile_steps else None
    profile_figures: dict[str, float] = {}
    timed_from = warmup + tc.profile_steps  # the profiled steps are not timed either
    samples_timed = 0
    t_start = time.perf_counter()
    window_loss = torch.zeros(len(bundle.tasks) + 1, device=device)
    window_steps = 0
    steps_run = 0
    epoch_loss = torch.zeros(len(bundle.tasks) + 1, device=device)
    epoch_steps = 0

    def log_epoch(done_epoch: int) -> None:
        nonlocal epoch_steps
        mean = (epoch_loss / max(epoch_steps, 1)).cpu()
        dist.all_reduce(mean)
        mean /= world
        values = {"epoch/loss": float(mean[0])}
        values.update(
            {f"epoch/loss/{t.name}": float(mean[i + 1]) for i, t in enumerate(bundle.tasks)}
        )
        tracker.metrics(values, step=done_epoch)
        epoch_loss.zero_()
        epoch_steps = 0

    while step < total_steps and epoch < tc.epochs:
        train_loader.dataset.set_epoch(epoch)
        if in_epoch:
            train_loader.load_state_dict({**train_loader.state_dict(), "batches_yielded": in_epoch})
        elif beta_state is not None:
            beta_state.reset()  # each epoch replays the chronology from the start
        batches = _device_batches(prefetch(train_loader, tc.prefetch_batches), device, pipelined)
        while step < total_steps:
            if profiler is not None and steps_run == warmup and not profiler.active:
                profiler.start()
            try:
                loss, per_task = step_fn(batches)
            except StopIteration:
                break
            step += 1
            in_epoch += 1
            steps_run += 1
            if profiler is not None and profiler.active and steps_run == timed_from:
                profile_figures = profiler.stop(tc.profile_steps)
            if steps_run == timed_from:
                t_start = time.perf_counter()
            elif steps_run > timed_from:
                # real rows of this step on this rank (padding rows excluded), no device sync
                samples_timed += max(0, min(batch_rows, rows_here - (in_epoch - 1) * batch_rows))
            step_loss = torch.cat([loss.detach().reshape(1), per_task.detach()]).float()
            window_loss += step_loss
            epoch_loss += step_loss
            window_steps += 1
            epoch_steps += 1
            if bar is not None:
                bar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                mean = (window_loss / window_steps).cpu()
                dist.all_reduce(mean)
                mean /= world
                entry = {"step": float(step), "loss": float(mean[0])}
                entry.update(
                    {f"loss/{t.name}": float(mean[i + 1]) for i, t in enumerate(bundle.tasks)}
                )
                history.append(entry)
                tracker.metrics({k: v for k, v in entry.items() if k != "step"}, step=step)
                window_loss.zero_()
                window_steps = 0
                if bar is not None:
                    elapsed = max(time.perf_counter() - t_start, 1e-9)
                    rate = samples_timed * world / elapsed
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", samples_s=f"{rate:,.0f}")
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                checkpoint()
                if tc.crash_after_step is not None and step >= tc.crash_after_step:
                    log.error("crash_after_step=%d: exiting hard (test hook)", step)
                    sys.stderr.flush()
                    os._exit(17)
        batches.close()  # the epoch's prefetching thread stops before the next one starts
        if in_epoch >= steps_per_epoch:
            log_epoch(epoch)  # (a resumed epoch's mean covers the steps after the resume)
            epoch += 1
            in_epoch = 0
        elif step >= total_steps:
            break
        else:
            raise RuntimeError(
                f"the train loader of rank {rank} ended after {in_epoch} of {steps_per_epoch} "
                "batches: the table changed under the run?"
            )
    if profiler is not None and profiler.active:  # the run ended inside the profiled steps
        profile_figures = profiler.stop(steps_run - warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t_start
    train_loader.close()  # its persistent workers, if any
    if bar is not None:
        bar.close()
    step_fn.detach()
    rate_t = torch.tensor([float(samples_timed)])
    dist.all_reduce(rate_t)
    samples_per_s = float(rate_t[0]) / max(elapsed, 1e-9)
    if not tc.checkpoint_every or step % tc.checkpoint_every:
        checkpoint()

    # ---- evaluation (sharded model) and the gathered unsharded weights
    dmp.eval()
    metrics: dict[str, float] = {"train/samples_per_s": samples_per_s}
    metrics.update({f"train/profile/{k}": v for k, v in profile_figures.items()})
    if device.type == "cuda":
        metrics["train/gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

    def scores(batch: Batch) -> torch.Tensor:
        return inner.to_scores(dmp(batch)[1][1])

    stage_of = bundle.stage_of if tc.metrics_by_stage else None
    for split, ev in eval_loaders.items():
        pred = _gather_predictions(_predict(scores, ev, device, bundle.tasks, stage_of))
        if rank == 0 and pred is not None:
            _write_predictions(out_dir / f"predictions_{split}.parquet", pred, bundle.tasks)
            m = split_metrics(pred, bundle.tasks, tc.ndcg_k)
            if stage_of is not None:
                m |= metrics_by_stage(pred, bundle.tasks, tc.ndcg_k)
            metrics.update({f"{split}/{k}": v for k, v in m.items()})
    weights = gather_state_dict(dmp)
    if rank == 0 and tc.relaimpr_base:
        base = base_run_metrics(tc.relaimpr_base, cfg.mlflow.tracking_uri)
        metrics.update(relaimpr(metrics, base, tc.ndcg_k))
    result = TrainResult(
        output_dir=str(out_dir),
        steps=step,
        metrics=metrics,
        history=history,
        run_id=tracker.run_id,
        table_version=version,
        samples_per_s=samples_per_s,
        rank=rank,
    )
    if rank == 0:
        assert weights is not None
        torch.save(
            {
                "state_dict": weights,
                "config": cfg.model_dump(mode="json"),
                "spec_overrides": bundle.spec_overrides,
                "tasks": [asdict(t) | {"task_type": t.task_type.value} for t in bundle.tasks],
                "stage_thresholds": asdict(bundle.stage_thresholds)
                if bundle.stage_thresholds
                else None,
                "table_version": version,
                "steps": step,
            },
            out_dir / "model.pt",
        )
        spec_path = out_dir / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(bundle.spec.model_dump(mode="json"), sort_keys=False))
        (out_dir / "config.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
        tracker.metrics(metrics)
        if history:
            _plot_curve(history, out_dir / "learning_curve.png", bundle.tasks)
            tracker.artifact(out_dir / "learning_curve.png")
        for name in ("config.yaml", "spec.yaml"):
            tracker.artifact(out_dir / name)
        tracker.artifact(Path(tables.artifacts), "preprocessing")
        if profile_figures:
            tracker.artifact(out_dir / "profile", "profile")
        model_uri = tracker.log_model(
            out_dir, Path(tables.artifacts), bundle, uses_sequences=inner.uses_sequences
        )
        result.model_uri = model_uri
        (out_dir / "metrics.json").write_text(
            json.dumps(
                {
                    "steps": step,
                    "table_version": version,
                    "run_id": tracker.run_id,
                    "model_uri": model_uri,
                    "metrics": metrics,
                    "history": history,
                },
                indent=1,
            )
        )
        tracker.artifact(out_dir / "metrics.json")
        _log_metrics_table(metrics)
    dist.barrier()
    return result


def _device_batches(
    batches: Generator[Batch, None, None], device: torch.device, pipelined: bool
) -> Generator[Batch, None, None]:
    """Batches as the step function wants them: host batches for TorchRec's pipeline (it
    copies them itself, on its own stream), device batches otherwise. Closing it closes
    ``batches`` (stops the prefetching thread)."""
    try:
        for batch in batches:
            if device.type == "cpu" or pipelined:
                yield batch
            else:
                yield batch.to(device, non_blocking=True)
    finally:
        batches.close()


def pipeline_trace_error(dmp: nn.Module) -> str | None:
    """Why TorchRec's ``TrainPipelineSparseDist`` cannot run this sharded model (None: it can).

    The pipeline finds each sharded module's input by tracing the model with torch.fx, every
    module without a sharded child as a leaf; a forward that iterates over a leaf's output or
    branches on a tensor outside a leaf fails that trace at its first step (``MultiTaskTrain``
    keeps such code in one leaf, ``model.base.EagerCall``). The same trace, done here before
    any batch is drawn."""
    from torchrec.distributed.train_pipeline.utils import Tracer, _get_leaf_module_names

    module = dmp.module if hasattr(dmp, "module") else dmp
    try:
        Tracer(leaf_modules=_get_leaf_module_names(module)).trace(module)
    except Exception as e:  # the trace's errors are of several types (TraceError, RuntimeError)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def use_sparse_dist(device: torch.device, pipeline: str, dmp: nn.Module, model_name: str) -> bool:
    """Whether the step runs through TorchRec's ``TrainPipelineSparseDist``: ``sparse_dist``
    asks for it (on any device; on CPU it has no copy stream to overlap), ``auto`` on CUDA where
    the pipeline can trace the model, else the plain loop (with a warning naming why)."""
    if pipeline == "simple" or (pipeline == "auto" and device.type != "cuda"):
        return False
    why = pipeline_trace_error(dmp)
    if why is None:
        return True
    if pipeline == "sparse_dist":
        raise ValueError(
            f"train.pipeline=sparse_dist: TorchRec's pipeline cannot trace model {model_name!r} "
            f"({why}); use train.pipeline=simple or auto"
        )
    log.warning(
        "TorchRec's pipeline cannot trace model %r (%s): the plain training loop runs instead "
        "(no overlap of the next batch's copy and all-to-all with the step)",
        model_name,
        why,
    )
    return False


class _Step:
    """One training step from a batch iterator -> (loss, per-task losses); raises
    StopIteration at the end of the iterator.

    With ``pipelined`` (`use_sparse_dist`) TorchRec's ``TrainPipelineSparseDist`` overlaps the
    host-to-device copy and the sparse all-to-all of the next batch with this step's compute;
    otherwise a plain forward / backward / step.
    """

    def __init__(self, dmp: nn.Module, optimizer: Any, device: torch.device, pipelined: bool):
        self.dmp, self.optimizer = dmp, optimizer
        self.pipeline = None
        if pipelined:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(
                dmp, optimizer, device, execute_all_batches=True
            )

    def __call__(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pipeline is not None:
            per_task, _, _ = self.pipeline.progress(batches)
            return per_task.sum(), per_task
        batch = next(batches)
        self.optimizer.zero_grad()
        loss, (per_task, _, _) = self.dmp(batch)
        loss.backward()
        self.optimizer.step()
        return loss, per_task

    def detach(self) -> None:
        """Give the model its plain forward back (for evaluation after the pipeline)."""
        if self.pipeline is not None and hasattr(self.pipeline, "detach"):
            self.pipeline.detach()


def _log_metrics_table(metrics: dict[str, float]) -> None:
    for key in sorted(metrics):
        log.info("%-32s %.5f", key, metrics[key])


# ----------------------------------------------------------------------------- reloading
def load_trained(
    output_dir: str | Path, spec_overrides: list[str] | None = None, lake: str | None = None
) -> tuple[MultiTaskModel, ModelBundle]:
    """The unsharded model of a finished run (``model.pt``), in eval mode, on CPU."""
    saved = torch.load(Path(output_dir) / "model.pt", weights_only=False)
    cfg = TrainConfig.model_validate(saved["config"])
    if lake is not None:
        cfg = cfg.model_copy(update={"lake": lake})
    cfg = cfg.model_copy(update={"table_version": saved["table_version"]})
    if spec_overrides is None:
        spec_overrides = saved.get("spec_overrides", [])
    bundle = prepare(cfg, spec_overrides, fit_stages=False)
    if saved["stage_thresholds"] is not None:
        bundle.stage_thresholds = StageThresholds(**saved["stage_thresholds"])
    return model_from_saved(saved, bundle.spec, bundle.artifacts), bundle


@torch.no_grad()
def evaluate_unsharded(
    model: MultiTaskModel, bundle: ModelBundle, split: str, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """Predictions of an unsharded model on a split (one process), as :func:`_predict`."""
    tables = Tables.for_spec(bundle.cfg.lake, bundle.spec)
    loader = make_loader(
        tables.examples,
        bundle.spec,
        bundle.artifacts,
        split,
        batch_size,
        version=bundle.cfg.table_version,
        pseudo_labels=bundle.cfg.model.pseudo_labels,
    )
    return _predict(model.scores, loader, torch.device("cpu"), bundle.tasks)
