"""Models by name (``model.name`` in the training config)."""

from __future__ import annotations

from typing import Any

from model.aitm import AITM
from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.config import MODEL_NAMES, ModelConfig
from model.htlnet import HTLNet
from model.mlp_shared import MLPShared
from model.mlp_single import MLPSingle
from model.mmoe import MMoE
from model.ple import PLE
from model.ple_stage import PLEStage
from model.stages import StageThresholds, stage_task_index
from model.stan import STAN
from pipelines.preprocessing import Artifacts
from pipelines.spec import FeatureSpec

__all__ = ["build_model", "model_from_saved"]


def build_model(
    cfg: ModelConfig,
    layout: FeatureLayout,
    tasks: list[TaskConfig],
    *,
    spec_tasks: list[str],
    stage_thresholds: StageThresholds | None = None,
    seed: int = 0,
) -> MultiTaskModel:
    """The model ``cfg.name`` (see :data:`model.config.MODEL_NAMES`)."""
    name = cfg.dtrn.backbone if cfg.name == "dtrn" else cfg.name
    if name == "htlnet":
        return HTLNet(layout, tasks, cfg)
    if name == "mlp_single":
        return MLPSingle(layout, tasks, cfg)
    if name == "mlp_shared":
        return MLPShared(layout, tasks, cfg)
    if name == "mmoe":
        return MMoE(layout, tasks, cfg)
    if name == "ple":
        return PLE(layout, tasks, cfg)
    if name == "aitm":
        return AITM(layout, tasks, cfg)
    if name == "ple_stage":
        if stage_thresholds is None:
            raise ValueError("ple_stage needs the fitted stage thresholds")
        index = stage_task_index(cfg.stage, spec_tasks)
        return PLEStage(layout, tasks, cfg, index, stage_thresholds)
    if name in ("stan", "stan_no_beta"):
        return STAN(layout, tasks, cfg, beta=name == "stan", seed=seed)
    raise ValueError(f"model.name: {name!r} is not one of {MODEL_NAMES}")


def model_from_saved(
    saved: dict[str, Any], spec: FeatureSpec, artifacts: Artifacts
) -> MultiTaskModel:
    """The unsharded model of a trainer's ``model.pt`` (already loaded), weights in place, in
    eval mode: its config, tasks and stage thresholds come from the file, the layout from the
    spec and its fitted vocabularies."""
    from model.base import TaskType, feature_layout
    from model.config import TrainConfig

    cfg = TrainConfig.model_validate(saved["config"])
    tasks = [TaskConfig(**{**t, "task_type": TaskType(t["task_type"])}) for t in saved["tasks"]]
    thresholds = saved.get("stage_thresholds")
    model = build_model(
        cfg.model,
        feature_layout(spec, artifacts.vocab_sizes),
        tasks,
        spec_tasks=[t.name for t in spec.tasks],
        stage_thresholds=StageThresholds(**thresholds) if thresholds else None,
        seed=cfg.train.seed,
    )
    model.load_state_dict(saved["state_dict"])
    return model.eval()
