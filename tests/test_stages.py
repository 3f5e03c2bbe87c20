"""Rule-based stages as a row filter (Stage_single) and per-stage metrics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from model.base import TaskConfig, TaskType
from model.experiment import stage_single_table
from model.stages import STAGES, StageThresholds, assign_stages, stage_expression
from model.trainer import metrics_by_stage, split_metrics


def test_stage_expression_selects_exactly_the_rows_the_model_assigns() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    thresholds = StageThresholds(ctr=0.5, dwell=0.4666666666666667, conversion=0.0)
    # values on and around the medians (float64 in the table, float32 in the model)
    grid = np.array([0.0, 0.25, 0.4666666666666667, 0.47, 0.5, 0.5000001, 0.75, 1.0])
    table = pa.table(
        {
            "pl_click": rng.choice(grid, n),
            "pl_dwell": rng.choice(grid, n),
            "pl_like": rng.choice(grid, n),
            "n_prev": rng.choice([0, 1, 5], n),
            "row": np.arange(n),
        }
    )
    expected = assign_stages(
        torch.tensor(table["pl_click"].to_numpy(), dtype=torch.float32),
        torch.tensor(table["pl_dwell"].to_numpy(), dtype=torch.float32),
        torch.tensor(table["pl_like"].to_numpy(), dtype=torch.float32),
        torch.tensor(table["n_prev"].to_numpy()),
        thresholds.as_tensor(),
    ).numpy()
    dataset = ds.dataset(table)
    seen = np.full(n, -1)
    for s, name in enumerate(STAGES):
        expr = stage_expression(name, thresholds, ("pl_click", "pl_dwell", "pl_like"), "n_prev")
        rows = dataset.to_table(filter=expr)["row"].to_numpy()
        assert (seen[rows] == -1).all(), "a row in two stages"
        seen[rows] = s
        assert len(rows) > 0
    np.testing.assert_array_equal(seen, expected)
    with pytest.raises(ValueError, match="stage 'loyl'"):
        stage_expression("loyl", thresholds, ("a", "b", "c"), "n")


def test_metrics_by_stage_equal_split_metrics_on_each_stage_subset() -> None:
    rng = np.random.default_rng(1)
    n = 600
    task = TaskConfig("click", TaskType.BINARY, label_index=0)
    pred = {
        "example_id": np.arange(n),
        "user_key": rng.integers(0, 40, n),
        "scores": rng.random((n, 1)),
        "labels": (rng.random((n, 1)) < 0.4).astype(np.float32),
        "stage": rng.choice([0, 2, 3], n),  # no Wander rows
    }
    out = metrics_by_stage(pred, [task], 5)
    assert out["stage_wander/rows"] == 0 and "stage_wander/click/auc" not in out
    for s in (0, 2, 3):
        rows = pred["stage"] == s
        ref = split_metrics({k: v[rows] for k, v in pred.items()}, [task], 5)
        assert out[f"stage_{STAGES[s]}/rows"] == rows.sum()
        assert out[f"stage_{STAGES[s]}/click/auc"] == ref["click/auc"]


def test_stage_single_table_compares_stage_only_with_all_rows_training() -> None:
    def run(phase: str, seed: int, stage: str | None, aucs: dict[str, float]) -> dict:
        metrics = {f"test/stage_{s}/click/auc": v for s, v in aucs.items()}
        metrics |= {f"test/stage_{s}/rows": 100.0 for s in aucs}
        return {"model": "stan", "phase": phase, "stage": stage, "seed": seed, "metrics": metrics}

    runs = [
        run("final", 0, None, {"new": 0.70, "loyal": 0.60}),
        run("final", 1, None, {"new": 0.72, "loyal": 0.62}),
        run("stage_single", 0, "new", {"new": 0.66, "wander": 0.1}),
        run("stage_single", 1, "new", {"new": 0.68}),
        run("stage_single", 0, "loyal", {"loyal": 0.64}),
        {"model": "ple", "phase": "final", "seed": 0, "metrics": {"test/stage_new/click/auc": 0.9}},
    ]
    table, md = stage_single_table(runs, "stan")
    assert list(table.stage) == ["new", "loyal"]
    new = table[table.stage == "new"].iloc[0]
    assert new.on_all == pytest.approx(0.71) and new.on_stage == pytest.approx(0.67)
    assert new.difference == pytest.approx(-0.04) and new.test_rows == 100
    loyal = table[table.stage == "loyal"].iloc[0]
    assert loyal.difference == pytest.approx(0.64 - 0.61)
    assert "| new | 100 | click | 0.7100 | 0.6700 | -0.0400 |" in md
