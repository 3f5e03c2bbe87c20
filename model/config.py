"""Training configuration (``conf/train.yaml``), validated on load; every key overridable with
``--set key.path=value`` (see ``pipelines.config.load_config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.config import load_config
from pipelines.spec import FeatureSpec

ModelName = Literal[
    "mlp_single",
    "mlp_shared",
    "mmoe",
    "ple",
    "aitm",
    "ple_stage",
    "stan",
    "stan_no_beta",
    "dtrn",
    "htlnet",
]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PLEConfig(_Strict):
    layers: int = Field(1, ge=1)
    task_experts: int = Field(1, ge=1)
    shared_experts: int = Field(2, ge=1)


class StanConfig(_Strict):
    # f(U_i): self-attention across the user features (Eq. 7, default) or a DNN (Sec. 4).
    f: Literal["self_attention", "dnn"] = "self_attention"
    heads: int = Field(1, ge=1)
    # MLP^k of Eq. 9 (the preference towers)
    preference_hidden: list[int] = Field(default_factory=lambda: [64])
    # Weight of the MSE term for rows without history (n_prev = 0, fallback pseudo-label):
    # 0 masks them, 1 trains on the train-window mean like any other target.
    no_history_weight: float = Field(0.0, ge=0.0)
    # "none" (the paper): γ·BCE as is. "batch_mean": γ divided by its mean over the batch's real
    # rows, per task, so that a rare task (γ ≈ its positive rate) keeps its loss scale and γ
    # only reweights users relative to each other (see docs/experiments.md)
    gamma_normalization: Literal["none", "batch_mean"] = "none"
    # U_i: the user features the preference module attends over (null: the spec's user
    # categorical features and user_id)
    user_features: list[str] | None = None


class DTRNConfig(_Strict):
    """DTRN's task-specific bottoms (model/dtrn.py), used when ``model.name`` is ``dtrn``."""

    # the MTL model the T bottoms feed
    backbone: Literal["mmoe", "ple", "aitm", "stan"] = "ple"
    heads: int = Field(1, ge=1)
    ffn_hidden: int = Field(64, ge=1)
    # where the (task, behaviour) condition enters TIM (DTRN Table 6); "ln" is the paper's CLN
    condition: Literal["ln", "qkv", "ffn1", "ffn2"] = "ln"
    hyper_embedding_dim: int = Field(8, ge=1)
    hyper_hidden: int = Field(32, ge=1)
    # TRM's squeeze ratio (SENet): hidden = input width // reduction
    trm_reduction: int = Field(4, ge=1)


class HTLNetConfig(_Strict):
    """HTLNet (model/htlnet.py), used when ``model.name`` is ``htlnet``. The chain is
    ``model.tasks`` in order (default click -> long_view -> dwell); its last task is the
    continuous core target, a dwell-kind task regressed on log1p of its value."""

    # the chain when model.tasks is null; the last task is the core regression target
    chain: list[str] = Field(default_factory=lambda: ["click", "long_view", "dwell"])
    label_embedding_dim: int = Field(8, ge=1)
    # Gumbel-softmax temperature of the sampled label (predicted, not true, labels)
    gumbel_tau: float = Field(1.0, gt=0)
    # the gradient adjustment on the shared dense parameters (projection + magnitude)
    gradient_adjustment: bool = True
    # G_t <- γ·min(‖G_core‖/‖G_t‖, C)·G_t + (1 − γ)·G_t
    magnitude_gamma: float = Field(0.5, ge=0.0, le=1.0)
    magnitude_clip: float = Field(2.0, gt=0)
    # weight of the core regression loss in the total
    core_weight: float = Field(1.0, gt=0)


class StageConfig(_Strict):
    """The rule-based stages (STAN Sec. 2.1): users split by the medians of a CTR-like, a
    dwell-like and a conversion-like task (New / Wander / Stick / Loyal)."""

    ctr_task: str = "click"
    dwell_task: str = "dwell"
    conversion_task: str = "like"


class ModelConfig(_Strict):
    name: ModelName = "stan"
    # the tasks to train, in chain order for AITM (null: all tasks of the spec, in spec order)
    tasks: list[str] | None = None
    embedding_dim: int = Field(16, ge=1)
    # MLP_single's per-task MLPs and MLP_shared's shared bottom
    bottom_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    # each expert of MMoE / PLE / PLE_stage / STAN, and AITM's task bottoms
    expert_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    tower_hidden: list[int] = Field(default_factory=lambda: [64])
    mmoe_experts: int = Field(4, ge=1)
    ple: PLEConfig = Field(default_factory=PLEConfig)
    stan: StanConfig = Field(default_factory=StanConfig)
    stage: StageConfig = Field(default_factory=StageConfig)
    dtrn: DTRNConfig = Field(default_factory=DTRNConfig)
    htlnet: HTLNetConfig = Field(default_factory=HTLNetConfig)
    # AITM's behavioural-expectation calibrator weight (0 = off: KuaiRand's tasks are not a
    # strict funnel, a like does not need a click of the same impression's probability order)
    aitm_calibration_weight: float = Field(0.0, ge=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Pseudo-labels for STAN: the rolling window (pl_<task>) or all history (pl_all_<task>)
    pseudo_labels: Literal["window", "all_history"] = "window"


class OptimConfig(_Strict):
    # Dense parameters: Adam with the paper's settings (Sec. 4.1.3)
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0)
    # Embedding tables: an optimizer fused into TorchRec's backward
    sparse: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = Field(0.05, gt=0)


class TrainLoopConfig(_Strict):
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(4096, ge=1)
    epochs: int = Field(1, ge=1)
    # stop after this many steps in total (null: all epochs)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0
    log_every: int = Field(50, ge=1)
    eval_splits: list[Literal["valid", "test"]] = Field(default_factory=lambda: ["valid", "test"])
    ndcg_k: int = Field(5, ge=1)
    # RelaImpr of AUC and NDCG@k against a base run: its output_dir (metrics.json) or its
    # MLflow run id (in the configured tracking store); null: none
    relaimpr_base: str | None = None
    # a checkpoint every N steps (0: only at the end); resume from the latest one if present
    checkpoint_every: int = Field(0, ge=0)
    resume: bool = True
    # warm start: the model.pt of an earlier run (same spec and vocabularies) to start from
    init_from: str | None = None
    # test hook: the process exits hard right after the checkpoint of this step (a crash)
    crash_after_step: int | None = None
    # loader worker processes (spawned) converting the train and eval batches; 0: in the step's
    # process. persistent_workers: the train loader's workers are started once for the run,
    # not again every epoch (a few seconds each)
    num_workers: int = Field(0, ge=0)
    persistent_workers: bool = True
    # train batches a background thread makes ahead of the step (0: made in the step's thread).
    # Off by default: on a 2-core CPU the thread halved the samples/s (GIL and cores shared
    # with the step); for a CUDA host, where the step mostly waits on the device, measure it.
    prefetch_batches: int = Field(0, ge=0)
    # "auto": cuda when available, else cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # table_wise on CPU; row_wise / column_wise also allowed on CUDA
    sharding: Literal["table_wise", "row_wise", "column_wise", "data_parallel"] = "table_wise"
    # the step: TorchRec's TrainPipelineSparseDist (auto: on CUDA, where it can trace the
    # model; sparse_dist: always, an error where it cannot) or a plain loop (simple)
    pipeline: Literal["auto", "sparse_dist", "simple"] = "auto"
    # the dense arch's arithmetic: fp32; tf32 (fp32 matmuls on CUDA tensor cores, CUDA only);
    # bf16 (autocast of the forward: matmuls in bfloat16, weights, losses and the optimizer's
    # state in fp32). The embedding tables stay fp32 in every case.
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    # torch intra-op threads per process (0: torch's default)
    threads: int = Field(0, ge=0)
    # Stage_single (STAN Sec. 4): train and evaluate on the rows of one rule-based stage only
    stage_subset: Literal["new", "wander", "stick", "loyal"] | None = None
    # also report every eval metric per rule-based stage: <split>/stage_<s>/<task>/<metric>
    metrics_by_stage: bool = False
    # profile this many steps right after the warm-up (model.profiling): operators and device
    # kernels per step as train/profile/* metrics, a trace and an operator table under
    # <output_dir>/profile; the profiled steps are left out of train/samples_per_s
    profile_steps: int = Field(0, ge=0)


class MlflowConfig(_Strict):
    enabled: bool = True
    # embedded default: a sqlite store and an artifact folder in the working directory
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "lifecycle-ranking"
    run_name: str | None = None
    # a child run of this run (the experiment job's parent run)
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class RegistryConfig(_Strict):
    # registered model name; the champion alias moves only when the candidate beats it on
    # `metric` (a metric the training run logged, e.g. valid/click/auc)
    model_name: str = "lifecycle-ranker"
    metric: str = "valid/click/auc"
    greater_is_better: bool = True


class TrainConfig(_Strict):
    spec: str = "feature_specs/kuairand.yaml"
    lake: str = "lake"
    # Delta version of the examples table to train on (null: the latest, recorded in the run)
    table_version: int | None = None
    # run outputs: checkpoints/, model.pt (the gathered unsharded weights), metrics.json
    output_dir: str = "out/train"
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _sharding(self) -> TrainConfig:
        if self.train.sharding == "row_wise" and self.train.device == "cpu":
            raise ValueError("train.sharding: row_wise needs CUDA (TorchRec offers it on GPU only)")
        return self


def check_against_spec(cfg: TrainConfig, spec: FeatureSpec) -> None:
    """Names the config uses must exist in the spec: a clear error before training starts."""
    tasks = [t.name for t in spec.tasks]
    for name in cfg.model.tasks or []:
        if name not in tasks:
            raise ValueError(f"model.tasks: {name!r} is not a task of spec {spec.name!r} ({tasks})")
    users = [f.name for f in spec.user.categorical] + ["user_id"]
    for name in cfg.model.stan.user_features or []:
        if name not in users:
            raise ValueError(
                f"model.stan.user_features: {name!r} is not a user categorical feature of spec "
                f"{spec.name!r} ({users})"
            )
    for key in ("ctr_task", "dwell_task", "conversion_task"):
        name = getattr(cfg.model.stage, key)
        if name not in tasks:
            raise ValueError(
                f"model.stage.{key}: task {name!r} is not in spec {spec.name!r} (tasks: {tasks})"
            )
    if cfg.model.name == "htlnet":
        chain = cfg.model.tasks or cfg.model.htlnet.chain
        kinds = {t.name: t.kind.value for t in spec.tasks}
        for name in chain:
            if name not in kinds:
                raise ValueError(
                    f"model.htlnet.chain: {name!r} is not a task of spec {spec.name!r} ({tasks})"
                )
        if len(chain) < 2 or kinds[chain[-1]] != "dwell":
            raise ValueError(
                f"model.htlnet.chain {chain}: HTLNet needs binary tasks followed by a dwell "
                "task (the continuous core target)"
            )
    if cfg.model.name == "dtrn" and not spec.sequences:
        raise ValueError(
            f"model.name: dtrn needs behaviour sequences, and spec {spec.name!r} has none "
            "(add a `sequences:` section and rebuild the features)"
        )
    if cfg.model.pseudo_labels == "all_history" and not spec.pseudo_labels.all_history:
        raise ValueError(
            "model.pseudo_labels: all_history needs pseudo_labels.all_history: true in spec "
            f"{spec.name!r}"
        )


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load and validate ``conf/train.yaml`` (or defaults) with ``key.path=value`` overrides."""
    return load_config(path, overrides, model=TrainConfig)
