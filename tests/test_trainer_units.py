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


def test_dense_flops_per_sample_match_a_count_of_the_layers() -> None:
    """MLP_single's towers: 2 * fan_in * fan_out per linear layer and sample forward; the
    backward twice that (input and weight gradients)."""
    from torch import nn

    from model.config import ModelConfig
    from model.flops import dense_flops_per_sample, peak_tflops
    from model.registry import build_model
    from tests.model_fixtures import random_batch, tiny_layout, tiny_tasks

    cfg = ModelConfig(name="mlp_single", embedding_dim=8, bottom_hidden=[32, 16], tower_hidden=[8])
    model = build_model(cfg, tiny_layout(), tiny_tasks(), spec_tasks=["click", "dwell", "like"])
    expected = sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    assert expected == 3 * 2 * ((6 * 8 + 3) * 32 + 32 * 16 + 16 * 8 + 8 * 1)
    flops = dense_flops_per_sample(model, random_batch(tiny_layout(), 64))
    assert flops["forward"] == expected
    assert flops["train"] == 3 * expected
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("Intel Xeon", "fp32") is None
