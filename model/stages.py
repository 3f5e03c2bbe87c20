"""Rule-based user lifecycle stages (STAN Sec. 2.1): New / Wander / Stick / Loyal.

Users are split by the medians of three per-user rates: a CTR-like task, a dwell-like task and a
conversion-like task. The medians are fitted on the training window (per-user means of the
training rows, then the median over users). A row's stage comes from its *pseudo-labels*
(the user's strictly earlier events), so it never sees the row's own outcome or anything later:

* New: no history (``n_prev = 0``) or CTR <= median;
* Wander: CTR above the median, dwell <= median;
* Stick: CTR and dwell above their medians, conversion <= median;
* Loyal: all three above their medians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from deltalake import DeltaTable

from model.config import StageConfig
from pipelines.spec import FeatureSpec, TaskKind

STAGES = ("new", "wander", "stick", "loyal")

__all__ = [
    "STAGES",
    "StageThresholds",
    "assign_stages",
    "fit_stage_thresholds",
    "stage_expression",
]


@dataclass(frozen=True)
class StageThresholds:
    """Medians over users of their training-window rates, on the [0, 1] target scale."""

    ctr: float
    dwell: float
    conversion: float

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.ctr, self.dwell, self.conversion], dtype=torch.float32)


def stage_task_index(cfg: StageConfig, spec_tasks: list[str]) -> tuple[int, int, int]:
    """The spec task index (column of ``Batch.pseudo_labels``) of the CTR-like, dwell-like and
    conversion-like tasks."""
    return (
        spec_tasks.index(cfg.ctr_task),
        spec_tasks.index(cfg.dwell_task),
        spec_tasks.index(cfg.conversion_task),
    )


def target_column(spec: FeatureSpec, task: str, divisors: dict[str, float]) -> tuple[str, float]:
    kind = next(t.kind for t in spec.tasks if t.name == task)
    if kind == TaskKind.DWELL:
        return f"label_{task}_bin", float(divisors[task])
    return f"label_{task}", 1.0


def fit_stage_thresholds(
    examples: str,
    spec: FeatureSpec,
    divisors: dict[str, float],
    cfg: StageConfig,
    version: int | None = None,
) -> StageThresholds:
    """The three medians from the ``train`` split of the examples table (read via its log)."""
    table = DeltaTable(examples, version=version)
    cols = {
        key: target_column(spec, getattr(cfg, f"{key}_task"), divisors)
        for key in ("ctr", "dwell", "conversion")
    }
    data = table.to_pyarrow_dataset().to_table(
        columns=["user_id"] + sorted({c for c, _ in cols.values()}),
        filter=pc.field("split") == "train",
    )
    if data.num_rows == 0:
        raise ValueError(f"{examples}: no train rows to fit the stage medians on")
    out = {}
    for key, (col, divisor) in cols.items():
        means = data.group_by("user_id").aggregate([(col, "mean")])
        out[key] = float(np.median(means[f"{col}_mean"].to_numpy()) / divisor)
    return StageThresholds(**out)


def assign_stages(
    ctr: torch.Tensor,
    dwell: torch.Tensor,
    conversion: torch.Tensor,
    n_prev: torch.Tensor,
    thresholds: torch.Tensor,
) -> torch.Tensor:
    """Stage index (0 New, 1 Wander, 2 Stick, 3 Loyal) of each row [B] from its user's rates
    [B] and the medians ``thresholds`` [3] (ctr, dwell, conversion)."""
    high_ctr = (ctr > thresholds[0]) & (n_prev > 0)
    high_dwell = dwell > thresholds[1]
    high_conv = conversion > thresholds[2]
    stage = torch.zeros_like(n_prev, dtype=torch.long)
    stage = torch.where(high_ctr, torch.ones_like(stage), stage)
    stage = torch.where(high_ctr & high_dwell, torch.full_like(stage, 2), stage)
    return torch.where(high_ctr & high_dwell & high_conv, torch.full_like(stage, 3), stage)


def stage_expression(
    stage: str,
    thresholds: StageThresholds,
    pl_columns: tuple[str, str, str],
    n_prev_column: str,
) -> ds.Expression:
    """An Arrow filter selecting the rows of ``stage``: :func:`assign_stages` written over the
    examples table's pseudo-label columns (ctr, dwell, conversion) and ``n_prev_column``.

    The comparison is done in float32, as the model does it on the batch tensors, so a row on a
    median's boundary gets the same stage here and in PLE_stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {STAGES}")

    def above(col: str, value: float) -> ds.Expression:
        return ds.field(col).cast(pa.float32()) > pa.scalar(np.float32(value), pa.float32())

    ctr, dwell, conv = pl_columns
    high_ctr = above(ctr, thresholds.ctr) & (ds.field(n_prev_column) > 0)
    high_dwell = above(dwell, thresholds.dwell)
    high_conv = above(conv, thresholds.conversion)
    return {
        "new": ~high_ctr,
        "wander": high_ctr & ~high_dwell,
        "stick": high_ctr & high_dwell & ~high_conv,
        "loyal": high_ctr & high_dwell & high_conv,
    }[stage]
