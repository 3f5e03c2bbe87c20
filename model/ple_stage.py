"""PLE_stage: PLE with the rule-based lifecycle stage (one-hot) appended to its input."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from model.base import FeatureLayout, TaskConfig
from model.config import ModelConfig
from model.data import Batch
from model.ple import PLE
from model.stages import STAGES, StageThresholds, assign_stages


class PLEStage(PLE):
    """PLE on [x, one_hot(stage)], the stage computed from the row's pseudo-labels (strictly
    earlier events) and the training-window medians (:mod:`model.stages`).

    Args:
        stage_index: the spec task index (column of ``Batch.pseudo_labels``) of the CTR-like,
            dwell-like and conversion-like tasks.
        thresholds: the fitted medians (kept as a buffer: saved with the weights).

    Call: batch -> logits [B, T].
    """

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: list[TaskConfig],
        cfg: ModelConfig,
        stage_index: tuple[int, int, int],
        thresholds: StageThresholds,
    ) -> None:
        super().__init__(layout, tasks, cfg, extra_inputs=len(STAGES))
        self.stage_index = stage_index
        self.register_buffer("stage_thresholds", thresholds.as_tensor())

    def stages(self, batch: Batch) -> torch.Tensor:
        pl = batch.pseudo_labels
        i, j, k = self.stage_index
        return assign_stages(pl[:, i], pl[:, j], pl[:, k], batch.n_prev, self.stage_thresholds)

    def heads(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        stage = F.one_hot(self.stages(batch), len(STAGES)).to(x.dtype)
        return super().heads(torch.cat([x, stage], dim=1), batch)
