"""Models by name (``model.name`` in the training config)."""

from __future__ import annotations

from model.aitm import AITM
from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.config import MODEL_NAMES, ModelConfig
from model.mlp_shared import MLPShared
from model.mlp_single import MLPSingle
from model.mmoe import MMoE
from model.ple import PLE
from model.ple_stage import PLEStage
from model.stages import StageThresholds
from model.stan import STAN

__all__ = ["build_model"]


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
    name = cfg.name
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
        st = cfg.stage
        index = (
            spec_tasks.index(st.ctr_task),
            spec_tasks.index(st.dwell_task),
            spec_tasks.index(st.conversion_task),
        )
        return PLEStage(layout, tasks, cfg, index, stage_thresholds)
    if name in ("stan", "stan_no_beta"):
        return STAN(layout, tasks, cfg, beta=name == "stan", seed=seed)
    raise ValueError(f"model.name: {name!r} is not one of {MODEL_NAMES}")
