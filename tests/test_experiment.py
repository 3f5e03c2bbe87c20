"""The paper-comparison experiment: the results table from per-seed runs, and a tiny end-to-end
run on the KuaiRand slice (2 models, 1 seed, a small search on the valid days)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from model.experiment import results_tables

REPO = Path(__file__).resolve().parents[1]


def _run(model: str, seed: int, click_auc: float, valid: float) -> dict:
    return {
        "model": model,
        "phase": "final",
        "seed": seed,
        "valid": valid,
        "metrics": {
            "test/click/auc": click_auc,
            "test/click/gauc": click_auc - 0.1,
            "test/click/ndcg@5": click_auc + 0.1,
            "test/click/logloss": 0.5,
            "valid/click/auc": valid,
        },
    }


def test_results_table_means_relaimpr_and_paired_ttest() -> None:
    runs = [
        _run("mlp_single", 0, 0.70, 0.69),
        _run("mlp_single", 1, 0.72, 0.70),
        _run("ple", 0, 0.74, 0.73),
        _run("ple", 1, 0.75, 0.74),
        _run("stan", 0, 0.76, 0.75),
        _run("stan", 1, 0.78, 0.76),
    ]
    long, md = results_tables(runs, 5, "mlp_single", "stan")
    row = long[(long.model == "stan") & (long.task == "click") & (long.metric == "auc")].iloc[0]
    assert row["mean"] == pytest.approx(0.77) and row["std"] == pytest.approx(
        np.std([0.76, 0.78], ddof=1)
    )
    rela = long[(long.model == "stan") & (long.metric == "relaimpr_auc")]["mean"].iloc[0]
    assert rela == pytest.approx((0.77 - 0.5) / (0.71 - 0.5) - 1)
    ndcg = long[(long.model == "ple") & (long.metric == "relaimpr_ndcg")]["mean"].iloc[0]
    assert ndcg == pytest.approx(0.845 / 0.81 - 1)
    t, p = stats.ttest_rel([0.76, 0.78], [0.74, 0.75])
    assert "best baseline (ple" in md
    assert f"| click | AUC | +0.0250 | {t:.3f} | {p:.4f} | 2 |" in md
    assert "| stan | 0.7700 ± 0.0141 |" in md


@pytest.mark.slow
def test_tiny_experiment_end_to_end(kuairand_train_lake, tmp_path) -> None:
    out = tmp_path / "exp"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "jobs.experiment", "--models", "mlp_single,stan", "--seeds", "1"]
    cmd += ["--search", "optim.lr=0.001,0.003", "--stage-single", "stan", "--out", str(out)]
    for s in (
        f"lake={kuairand_train_lake['lake']}",
        "model.embedding_dim=8",
        "model.expert_hidden=[32,16]",
        "model.bottom_hidden=[32,16]",
        "model.tower_hidden=[16]",
        "train.batch_size=128",
        "train.max_steps=100",
        "train.threads=2",
        f"mlflow.tracking_uri={uri}",
        f"mlflow.artifact_location={tmp_path}/art",
    ):
        cmd += ["--set", s]
    for s in kuairand_train_lake["spec_overrides"]:
        cmd += ["--spec-set", s]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["model", "task", "metric", "mean", "std", "n"]
    assert set(table.model) == {"mlp_single", "stan"}
    assert set(table.task) == {"click", "dwell", "like", "long_view", "follow"}
    assert {"auc", "gauc", "ndcg", "logloss", "relaimpr_auc", "relaimpr_ndcg"} <= set(table.metric)
    base = table[(table.model == "mlp_single") & (table.metric == "relaimpr_auc")]["mean"]
    assert np.allclose(base, 0.0)
    md = (out / "results.md").read_text()
    assert "### click" in md and "Paired t-test: stan vs the best baseline (mlp_single" in md
    # the stage analysis of STAN's user representations, logged as PNGs
    assert (out / "stage_analysis" / "tsne_stan.png").stat().st_size > 10_000
    assert (out / "stage_analysis" / "stage_shift.png").exists()
    shift = pd.read_csv(out / "stage_analysis" / "stage_shift.csv", index_col=0)
    assert shift.shape == (4, 4) and shift.to_numpy().sum() > 100
    assert "### Stage analysis" in md and "silhouette" in md.lower()
    # the search never evaluated the test days
    search_metrics = list((out / "search").rglob("metrics.json"))
    assert len(search_metrics) == 4
    for path in search_metrics:
        assert '"test/' not in path.read_text()
    # Stage_single: STAN trained on each stage's rows alone, evaluated on that stage only
    for stage in ("new", "wander", "stick", "loyal"):
        pred = pd.read_parquet(
            out / "runs" / f"stan@{stage}" / "seed0" / "predictions_test.parquet"
        )
        assert len(pred) > 0 and set(pred["stage"]) == {stage}
    full = pd.read_parquet(out / "runs" / "stan" / "seed0" / "predictions_test.parquet")
    assert full["stage"].value_counts().to_dict() == {
        s: len(pd.read_parquet(out / "runs" / f"stan@{s}" / "seed0" / "predictions_test.parquet"))
        for s in full["stage"].unique()
    }
    single = pd.read_csv(out / "stage_single.csv")
    assert {"stage", "task", "on_all", "on_stage", "difference", "test_rows"} <= set(single.columns)
    assert "### Stage_single: stan" in md
    # one parent run with 10 child runs (4 search + 2 final + 4 Stage_single)
    db = sqlite3.connect(tmp_path / "mlflow.db")
    parents = db.execute("select run_uuid from runs where name='experiment'").fetchall()
    assert len(parents) == 1
    children = db.execute(
        "select count(*) from tags where key='mlflow.parentRunId' and value=?", parents[0]
    ).fetchone()[0]
    assert children == 10


def test_results_table_with_htlnet_and_dtrn_rows() -> None:
    runs = [_run("mlp_single", s, 0.70 + s / 100, 0.69) for s in (0, 1)]
    runs += [_run("stan", s, 0.72 + s / 100, 0.70) for s in (0, 1)]
    # DTRN has the best valid AUC, but the t-test compares STAN with the paper's baselines
    runs += [_run("dtrn", s, 0.75, 0.80) for s in (0, 1)]
    for s, (nrmse, spear) in enumerate([(0.9, 0.5), (1.1, 0.6)]):
        run = _run("htlnet", s, 0.71, 0.99)
        run["metrics"] |= {"test/dwell/nrmse": nrmse, "test/dwell/nmae": 0.7,
                           "test/dwell/gini": 0.4, "test/dwell/spearman": spear}  # fmt: skip
        runs.append(run)
    long, md = results_tables(runs, 5, "mlp_single", "stan")
    row = long[(long.model == "htlnet") & (long.task == "dwell") & (long.metric == "nrmse")]
    assert row["mean"].iloc[0] == pytest.approx(1.0)
    assert "### dwell (continuous target)" in md
    assert (
        "| htlnet | 1.0000 ± 0.1414 | 0.7000 ± 0.0000 | 0.4000 ± 0.0000 | 0.5500 ± 0.0707 |" in md
    )
    assert "### dwell\n" not in md  # no binary-metric table for a task without AUC
    assert "| dtrn | 0.7500 ± 0.0000 |" in md
    assert "best baseline (mlp_single" in md
