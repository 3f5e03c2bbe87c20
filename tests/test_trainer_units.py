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


def test_a_new_state_dict_layout_does_not_resume_old_checkpoints(monkeypatch) -> None:
    """Checkpoints written by code with another state-dict layout (per-task towers) have
    another fingerprint: the run starts again rather than loading mismatched shapes."""
    from model import registry

    base = run_fingerprint(load_train_config(None), 3, [])
    monkeypatch.setattr(registry, "STATE_LAYOUT", registry.STATE_LAYOUT - 1)
    assert run_fingerprint(load_train_config(None), 3, []) != base


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
    from model.config import ModelConfig
    from model.flops import dense_flops_per_sample, peak_tflops
    from model.registry import build_model
    from tests.model_fixtures import random_batch, tiny_layout, tiny_tasks

    cfg = ModelConfig(name="mlp_single", embedding_dim=8, bottom_hidden=[32, 16], tower_hidden=[8])
    model = build_model(cfg, tiny_layout(), tiny_tasks(), spec_tasks=["click", "dwell", "like"])
    # 3 towers of (6 keys x 8 dims + 3 dense) -> 32 -> 16 -> 8 -> 1
    expected = 3 * 2 * ((6 * 8 + 3) * 32 + 32 * 16 + 16 * 8 + 8 * 1)
    widths = [(w.shape[0], w.shape[1], w.shape[2]) for w in model.towers.weights]
    assert widths == [(3, 51, 32), (3, 32, 16), (3, 16, 8), (3, 8, 1)]
    flops = dense_flops_per_sample(model, random_batch(tiny_layout(), 64))
    assert flops["forward"] == expected
    assert flops["train"] == 3 * expected
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("Intel Xeon", "fp32") is None


def test_precision_is_validated_and_tf32_needs_cuda() -> None:
    import torch

    from model.trainer import autocast_dtype, check_precision

    with pytest.raises(ValueError, match=r"train\.precision"):
        load_train_config(None, ["train.precision=fp16"])
    assert load_train_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ValueError, match=r"train.precision=tf32 needs a CUDA device .* cpu"):
        check_precision("tf32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    assert autocast_dtype("bf16") == torch.bfloat16
    assert autocast_dtype("fp32") is None and autocast_dtype("tf32") is None


def _predicted(root, name, labels, scores):
    """A run's output folder as `precision_parity` reads it: predictions and metrics."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / name
    out.mkdir()
    cols = {"example_id": np.arange(len(next(iter(labels.values()))))}
    for task, s in scores.items():
        cols[f"score_{task}"], cols[f"target_{task}"] = s, labels[task]
    pq.write_table(pa.table(cols), out / "predictions_valid.parquet")
    metrics = {f"valid/{t}/auc": auc(labels[t] > 0.5, s) for t, s in scores.items()}
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return out


def test_precision_parity_compares_each_task_s_valid_auc_with_fp32(tmp_path) -> None:
    from jobs.benchmark import precision_parity
    from model.metrics import paired_auc_difference

    rng = np.random.default_rng(0)
    n = 4000
    click = (rng.random(n) < 0.4).astype(np.float32)
    rare = (rng.random(n) < 0.005).astype(np.float32)  # a label with ~20 positives
    dwell = rng.random(n).astype(np.float32)  # a dwell task's soft target: AUC of > 1/2
    signal = {"click": click, "rare": rare, "dwell": (dwell > 0.5).astype(np.float32)}
    base = {t: y + rng.normal(0, 1.0, n) for t, y in signal.items()}
    labels = {"click": click, "rare": rare, "dwell": dwell}
    fp32 = _predicted(tmp_path, "fp32", labels, base)
    # a close run: a little noise on every score
    near = {t: s + rng.normal(0, 0.02, n) for t, s in base.items()}
    out = precision_parity(fp32, _predicted(tmp_path, "near", labels, near), tolerance=0.002)
    assert set(out["auc_parity"]) == {"click", "dwell", "rare"} and out["parity_ok"] is True
    a, b, se = paired_auc_difference(click, base["click"], near["click"])
    assert out["auc_parity"]["click"]["diff"] == pytest.approx(b - a, abs=1e-6)
    assert out["auc_parity"]["click"]["se"] == pytest.approx(se, abs=1e-6)
    # a worse click model fails; the rare label moves by more than the tolerance, but not by
    # more than the tolerance and 1.96 of its (larger) errors
    worse = {
        **near,
        "click": base["click"] + rng.normal(0, 1.0, n),
        "rare": base["rare"] + rng.normal(0, 0.1, n),
    }
    out = precision_parity(fp32, _predicted(tmp_path, "worse", labels, worse), tolerance=0.002)
    assert out["auc_parity"]["click"]["diff"] < -0.02 and out["parity_ok"] is False
    rare_check = out["auc_parity"]["rare"]
    assert 0.002 < abs(rare_check["diff"]) <= 0.002 + 1.96 * rare_check["se"], rare_check
    assert rare_check["ok"] and out["auc_parity"]["dwell"]["ok"]
    assert out["max_abs_auc_diff"] == pytest.approx(-out["auc_parity"]["click"]["diff"])
    # runs that predicted other rows are refused
    other = _predicted(tmp_path, "other", {t: y[:-1] for t, y in labels.items()},
                       {t: s[:-1] for t, s in near.items()})  # fmt: skip
    with pytest.raises(ValueError, match="other valid rows"):
        precision_parity(fp32, other)


def test_a_one_process_group_leaves_the_environment_as_it_found_it(monkeypatch) -> None:
    """An in-process run (a test, a notebook) sets the rendezvous variables for its one-process
    group and takes them back after: a process started later from this one (a torchrun-less
    ``python -m jobs.train``) would otherwise join a port that is no longer its own."""
    import os

    import torch
    import torch.distributed as dist

    from model.trainer import init_distributed, release_distributed

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()
    assert init_distributed(torch.device("cpu")) == (0, 1, True)
    assert os.environ["RANK"] == "0" and int(os.environ["MASTER_PORT"]) > 0
    release_distributed()
    assert not dist.is_initialized()
    assert [k for k in keys if k in os.environ] == []


def test_step_counts_count_the_operators_the_host_dispatched() -> None:
    """Two profiled "steps" of three top-level operators each (matmul calls mm inside: one
    operator, counted with its caller): 3 per step, no device kernels on CPU."""
    import torch
    from torch.profiler import profile

    from model.profiling import step_counts

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with profile() as prof:
        for _ in range(2):
            c = torch.matmul(a, b)
            c = c + a
            c.relu_()
    counts = step_counts(prof.events(), steps=2)
    assert counts == {"aten_ops_per_step": 3.0, "device_kernels_per_step": 0.0}
