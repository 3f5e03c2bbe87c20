"""Pure pieces of the trainer: the resume fingerprint, RelaImpr, per-split metrics."""

from __future__ import annotations

import numpy as np
import pytest

from model.base import TaskConfig, TaskType
from model.config import load_train_config
from model.metrics import auc
from model.trainer import relaimpr, run_fingerprint, split_metrics


def test_fingerprint_ignores_the_step_budget_but_not_the_model_or_data() -> None:
    base = run_fingerprint(load_train_config(None), 3, [])
    same = load_train_config(None, ["train.max_steps=500", "train.checkpoint_every=7"])
    assert run_fingerprint(same, 3, []) == base
    assert run_fingerprint(load_train_config(None), 4, []) != base  # another table version
    assert run_fingerprint(load_train_config(None, ["optim.lr=0.01"]), 3, []) != base
    assert run_fingerprint(load_train_config(None, ["train.batch_size=8"]), 3, []) != base
    assert run_fingerprint(load_train_config(None), 3, ["source.path=x"]) != base


def test_relaimpr_uses_the_paper_formulas() -> None:
    mine = {"test/click/auc": 0.74, "test/click/ndcg@5": 0.66, "test/click/logloss": 0.5}
    base = {"test/click/auc": 0.70, "test/click/ndcg@5": 0.60, "test/click/logloss": 0.6}
    out = relaimpr(mine, base, 5)
    assert out == {
        "test/click/relaimpr_auc": pytest.approx(0.24 / 0.20 - 1),
        "test/click/relaimpr_ndcg@5": pytest.approx(0.66 / 0.60 - 1),
    }


def test_split_metrics_binarise_dwell_and_skip_undefined_tasks() -> None:
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 20, n)
    bins = rng.integers(0, 4, n)  # 4 bins: soft target bin / 3
    click = rng.integers(0, 2, n).astype(float)
    pred = {
        "example_id": np.arange(n),
        "user_key": users,
        "labels": np.stack([click, bins / 3.0, np.zeros(n)], axis=1),
        "scores": rng.random((n, 3)),
    }
    tasks = [
        TaskConfig("click", TaskType.BINARY, 0),
        TaskConfig("dwell", TaskType.BINARY, 1, is_dwell=True, divisor=3.0),
        TaskConfig("follow", TaskType.BINARY, 2),  # no positive: AUC undefined
    ]
    m = split_metrics(pred, tasks, k=3)
    assert m["click/auc"] == pytest.approx(auc(click, pred["scores"][:, 0]))
    # dwell AUC: label = bin in the upper half (bins 2, 3)
    assert m["dwell/auc"] == pytest.approx(auc((bins >= 2).astype(float), pred["scores"][:, 1]))
    assert not any(k.startswith("follow/") for k in m)
