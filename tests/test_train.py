"""The trainer end to end on the real KuaiRand examples (every 16th user, 14 days): a
2-process ``torchrun`` on CPU (gloo) with table-wise sharding, the gathered unsharded model,
kill-and-resume, MLflow logging, and the errors for bad input before training starts."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from model.config import load_train_config
from model.data import ExamplesTableError
from model.stages import fit_stage_thresholds
from model.trainer import evaluate_unsharded, load_trained, prepare, train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 240
CKPT_EVERY = 80


def _args(lake: dict, out: Path, *extra: str) -> list[str]:
    args = [
        f"lake={lake['lake']}",
        f"output_dir={out}",
        "model.name=stan",
        "model.embedding_dim=8",
        "model.expert_hidden=[32,16]",
        "model.tower_hidden=[16]",
        "model.stan.preference_hidden=[16]",
        "train.batch_size=64",
        f"train.max_steps={STEPS}",
        "train.epochs=3",
        "train.log_every=20",
        f"train.checkpoint_every={CKPT_EVERY}",
        "train.threads=1",
        "train.eval_splits=[valid,test]",
        f"mlflow.tracking_uri=sqlite:///{out.parent}/mlflow.db",
        f"mlflow.artifact_location={out.parent}/mlartifacts",
        *extra,
    ]
    cmd = []
    for a in args:
        cmd += ["--set", a]
    for o in lake["spec_overrides"]:
        cmd += ["--spec-set", o]
    return cmd


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "jobs.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


# Runs jobs.train on an image without Spark or MLflow: importing either fails, as it would there.
WITHOUT_SPARK_NOR_MLFLOW = """
import runpy, sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyspark", "mlflow"):
            raise ImportError(f"{name} is not installed on this training image")
sys.meta_path.insert(0, NotInstalled())
sys.argv = ["jobs.train", *sys.argv[1:]]
runpy.run_module("jobs.train", run_name="__main__")
"""


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Bit-identical weights and identical loss history."""
    a = torch.load(a_dir / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(b_dir / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ha = json.loads((a_dir / "metrics.json").read_text())["history"]
    assert json.loads((b_dir / "metrics.json").read_text())["history"] == ha


@pytest.fixture(scope="module")
def uninterrupted(kuairand_train_lake, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    proc = _torchrun(_args(kuairand_train_lake, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_loss_decreases(uninterrupted: Path) -> None:
    history = json.loads((uninterrupted / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(20, STEPS + 1, 20))
    first = np.mean([h["loss"] for h in history[:2]])
    last = np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.9 * first, (first, last)
    for task in ("click", "dwell", "like", "long_view", "follow"):
        assert history[-1][f"loss/{task}"] < history[0][f"loss/{task}"]


def test_metrics_on_valid_and_test(uninterrupted: Path) -> None:
    metrics = json.loads((uninterrupted / "metrics.json").read_text())["metrics"]
    for split in ("valid", "test"):
        # the model learnt something: click and long view rank above chance
        assert metrics[f"{split}/click/auc"] > 0.6
        assert metrics[f"{split}/long_view/auc"] > 0.6
        for m in ("gauc", "ndcg@5", "logloss", "n"):
            assert f"{split}/click/{m}" in metrics


def test_sharded_predictions_equal_the_gathered_unsharded_model(
    uninterrupted: Path, kuairand_train_lake
) -> None:
    model, bundle = load_trained(uninterrupted)
    mine = evaluate_unsharded(model, bundle, "test")
    theirs = pq.read_table(uninterrupted / "predictions_test.parquet").to_pandas()
    order = np.argsort(mine["example_id"])
    assert (
        len(theirs)
        == len(order)
        == DeltaTable(kuairand_train_lake["lake"] + "/kuairand/examples")
        .to_pyarrow_dataset()
        .count_rows(filter=pc.field("split") == "test")
    )
    np.testing.assert_array_equal(mine["example_id"][order], theirs["example_id"].to_numpy())
    for i, task in enumerate(bundle.tasks):
        np.testing.assert_allclose(
            mine["scores"][order, i], theirs[f"score_{task.name}"].to_numpy(), atol=1e-5
        )


def test_killed_and_resumed_run_ends_with_the_same_weights(
    uninterrupted: Path, kuairand_train_lake, tmp_path
) -> None:
    out = tmp_path / "run"
    crash = _torchrun(_args(kuairand_train_lake, out, f"train.crash_after_step={2 * CKPT_EVERY}"))
    assert crash.returncode != 0
    assert "crash_after_step" in crash.stderr
    assert not (out / "model.pt").exists()
    resumed = _torchrun(_args(kuairand_train_lake, out))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {out}/checkpoints/step_{2 * CKPT_EVERY}" in resumed.stderr
    _assert_same_run(uninterrupted, out)


def test_rank_zero_logged_to_mlflow(uninterrupted: Path) -> None:
    run_id = json.loads((uninterrupted / "metrics.json").read_text())["run_id"]
    db = sqlite3.connect(uninterrupted.parent / "mlflow.db")
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)))
    assert params["model.name"] == "stan" and params["data.world_size"] == "2"
    assert params["data.table_version"] == "0"
    steps = db.execute(
        "select step from metrics where run_uuid=? and key='loss/click' order by step", (run_id,)
    ).fetchall()
    assert [s for (s,) in steps] == list(range(20, STEPS + 1, 20))
    keys = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (run_id,))}
    assert {"test/click/auc", "valid/dwell/ndcg_at_5", "train/samples_per_s"} <= keys
    # one run only: rank 1 logged nothing
    assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_plain_python_single_process(kuairand_train_lake, uninterrupted: Path, tmp_path) -> None:
    """Plain ``python -m jobs.train`` (no torchrun), PLE_stage, RelaImpr against the STAN run,
    a profile of 3 steps (operators per step, the trace and the operator table)."""
    out = tmp_path / "ple"
    args = _args(
        kuairand_train_lake,
        out,
        "model.name=ple_stage",
        "train.max_steps=30",
        "train.profile_steps=3",
        f"train.relaimpr_base={uninterrupted}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args, "--set", "mlflow.enabled=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 30 and "test/click/auc" in summary["metrics"]
    model, _ = load_trained(out)
    assert model.stage_thresholds.shape == (3,)
    mine = json.loads((out / "metrics.json").read_text())["metrics"]
    assert mine["train/profile/steps"] == 3 and mine["train/samples_per_s"] > 0
    # a forward, a backward and an optimizer step of PLE_stage: hundreds of operators, no
    # device kernels on CPU
    assert 100 < mine["train/profile/aten_ops_per_step"] < 5000
    assert mine["train/profile/device_kernels_per_step"] == 0
    assert "aten::" in (out / "profile" / "rank0_ops.txt").read_text()
    assert json.loads((out / "profile" / "rank0_trace.json").read_text())["traceEvents"]
    base = json.loads((uninterrupted / "metrics.json").read_text())["metrics"]
    for task in ("click", "like"):
        key = f"test/{task}"
        expected = (mine[f"{key}/auc"] - 0.5) / (base[f"{key}/auc"] - 0.5) - 1
        assert mine[f"{key}/relaimpr_auc"] == pytest.approx(expected)
        expected = mine[f"{key}/ndcg@5"] / base[f"{key}/ndcg@5"] - 1
        assert mine[f"{key}/relaimpr_ndcg@5"] == pytest.approx(expected)


def test_bf16_training_under_torchrun_keeps_the_fp32_run_s_metrics(
    uninterrupted: Path, kuairand_train_lake, tmp_path
) -> None:
    """``train.precision=bf16`` through the sharded 2-process path: the run of the same seed and
    data as the fp32 run learns as it does, and the benchmark's parity check (paired DeLong on
    the two runs' predictions of the same valid rows) finds the common labels' AUCs equal."""
    from jobs.benchmark import precision_parity

    out = tmp_path / "bf16"
    args = _args(kuairand_train_lake, out, "train.precision=bf16", "train.checkpoint_every=0")
    proc = _torchrun([*args, "--set", "mlflow.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "metrics.json").read_text())["history"]
    fp32 = json.loads((uninterrupted / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [h["step"] for h in fp32]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert np.mean([h["loss"] for h in history[-3:]]) < 0.9 * np.mean(
        [h["loss"] for h in history[:2]]
    )
    parity = precision_parity(uninterrupted, out)["auc_parity"]
    for task in ("click", "long_view"):
        assert parity[task]["ok"], parity[task]
        assert abs(parity[task]["diff"]) < 0.02, parity[task]


def test_stage_thresholds_are_medians_of_training_window_user_rates(kuairand_train_lake) -> None:
    spec = kuairand_train_lake["spec"]
    path = kuairand_train_lake["lake"] + "/kuairand/examples"
    df = DeltaTable(path).to_pandas()
    train_rows = df[df["split"] == "train"]
    cfg = load_train_config(None)
    divisor = float(df["label_dwell_bin"].max())  # bins 0..n-1 all occur in the slice
    thr = fit_stage_thresholds(path, spec, {"dwell": divisor}, cfg.model.stage)
    per_user = train_rows.groupby("user_id")
    assert thr.ctr == pytest.approx(per_user["label_click"].mean().median())
    assert thr.dwell == pytest.approx(per_user["label_dwell_bin"].mean().median() / divisor)
    assert thr.conversion == pytest.approx(per_user["label_like"].mean().median())


# ----------------------------------------------------------------------------- bad input
def _cfg(lake: dict, tmp_path: Path, *extra: str):
    return load_train_config(
        REPO / "conf" / "train.yaml",
        [
            f"lake={lake['lake']}",
            f"output_dir={tmp_path / 'out'}",
            "mlflow.enabled=false",
            "train.max_steps=2",
            *extra,
        ],
    )


def test_config_naming_a_missing_task_or_feature(kuairand_train_lake, tmp_path) -> None:
    ov = kuairand_train_lake["spec_overrides"]
    with pytest.raises(ValueError, match=r"model.tasks: 'watch' is not a task"):
        prepare(_cfg(kuairand_train_lake, tmp_path, "model.tasks=[click,watch]"), ov)
    with pytest.raises(ValueError, match=r"model.stan.user_features: 'age'"):
        prepare(_cfg(kuairand_train_lake, tmp_path, "model.stan.user_features=[age]"), ov)
    with pytest.raises(ValueError, match=r"model.stage.conversion_task: task 'buy'"):
        prepare(_cfg(kuairand_train_lake, tmp_path, "model.stage.conversion_task=buy"), ov)
    # the CLI turns them into exit code 2 with the message, before any process group starts
    args = _args(kuairand_train_lake, tmp_path / "x", "model.tasks=[watch]")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "model.tasks: 'watch' is not a task" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_forked_training_exits_with_the_training_s_code(
    kuairand_train_lake, tmp_path, capfd
) -> None:
    """`run_training` (the experiment's trainings: forks of a server that has imported the
    trainer) hands back the CLI's exit code and message, as the subprocess did."""
    from model.launch import run_training

    sets = [f"lake={kuairand_train_lake['lake']}", f"output_dir={tmp_path / 'x'}"]
    sets += [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "model.tasks=[watch]"]
    spec_sets = kuairand_train_lake["spec_overrides"]
    assert run_training(1, sets, conf="conf/train.yaml", spec_sets=spec_sets, cwd=REPO) == 2
    assert "model.tasks: 'watch' is not a task" in capfd.readouterr().err
    assert not (tmp_path / "x").exists()


def _broken_lake(lake: dict, tmp_path: Path, edit) -> str:
    """A copy of the lake whose examples table is rewritten through ``edit(DataFrame)``."""
    import shutil

    src = Path(lake["lake"]) / "kuairand"
    dst = tmp_path / "lake" / "kuairand"
    shutil.copytree(src / "artifacts", dst / "artifacts")
    df = DeltaTable(str(src / "examples")).to_pandas()
    write_deltalake(str(dst / "examples"), edit(df), partition_by=["date"])
    return str(tmp_path / "lake")


def test_table_without_a_needed_column(kuairand_train_lake, tmp_path) -> None:
    bad = _broken_lake(kuairand_train_lake, tmp_path, lambda d: d.drop(columns=["pl_like"]))
    cfg = _cfg({**kuairand_train_lake, "lake": bad}, tmp_path)
    with pytest.raises(ExamplesTableError, match=r"has no column 'pl_like'"):
        train(cfg, kuairand_train_lake["spec_overrides"])
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_nan_labels_are_refused_before_training(kuairand_train_lake, tmp_path) -> None:
    def nan_label(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df["label_click"] = df["label_click"].astype("float64")
        df.loc[df.index[5], "label_click"] = np.nan
        return df

    bad = _broken_lake(kuairand_train_lake, tmp_path, nan_label)
    cfg = _cfg({**kuairand_train_lake, "lake": bad}, tmp_path)
    with pytest.raises(ExamplesTableError, match=r"label_click"):
        train(cfg, kuairand_train_lake["spec_overrides"])
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_warm_start_continues_from_the_given_weights(
    uninterrupted: Path, kuairand_train_lake, tmp_path
) -> None:
    """train.init_from copies an unsharded model.pt into the sharded tables and dense layers:
    the warm-started run starts at the loss the earlier run ended with, far below a cold start."""
    out = tmp_path / "warm"
    proc = _torchrun(
        _args(
            kuairand_train_lake,
            out,
            f"train.init_from={uninterrupted / 'model.pt'}",
            "train.max_steps=20",
            "train.log_every=10",
            "train.checkpoint_every=0",
            "mlflow.enabled=false",
        )
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warm start from" in proc.stderr
    warm = json.loads((out / "metrics.json").read_text())["history"]
    cold = json.loads((uninterrupted / "metrics.json").read_text())["history"]
    assert warm[0]["loss"] < 0.8 * cold[0]["loss"]
    assert warm[0]["loss"] < 1.25 * np.mean([h["loss"] for h in cold[-3:]])
    bad = _torchrun(
        _args(
            kuairand_train_lake,
            tmp_path / "bad",
            f"train.init_from={uninterrupted / 'model.pt'}",
            "model.embedding_dim=4",
            "train.max_steps=2",
            "mlflow.enabled=false",
        )
    )
    assert bad.returncode != 0
    assert "train.init_from" in bad.stderr and "has shape" in bad.stderr


@pytest.mark.parametrize(
    "name, extra",
    [
        ("dtrn", ["model.dtrn.ffn_hidden=16", "model.dtrn.backbone=ple"]),
        ("htlnet", ["model.bottom_hidden=[32,16]"]),
    ],
)
def test_dtrn_and_htlnet_train_sharded_on_two_processes(
    name: str, extra: list[str], kuairand_train_lake, tmp_path
) -> None:
    """A 2-process CPU run on the KuaiRand examples: the loss decreases, and the sharded
    model's predictions (DTRN's sequence table is sharded too) equal the gathered model's."""
    out = tmp_path / name
    steps = 120
    args = _args(kuairand_train_lake, out, f"model.name={name}", f"train.max_steps={steps}",
                 "train.checkpoint_every=0", "mlflow.enabled=false", *extra)  # fmt: skip
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "metrics.json").read_text())
    history = result["history"]
    assert history[-1]["step"] == steps
    first = np.mean([h["loss"] for h in history[:2]])
    last = np.mean([h["loss"] for h in history[-2:]])
    assert last < 0.9 * first, (first, last)
    model, bundle = load_trained(out)
    mine = evaluate_unsharded(model, bundle, "test")
    theirs = pq.read_table(out / "predictions_test.parquet").to_pandas()
    order = np.argsort(mine["example_id"])
    np.testing.assert_array_equal(mine["example_id"][order], theirs["example_id"].to_numpy())
    for i, task in enumerate(bundle.tasks):
        np.testing.assert_allclose(
            mine["scores"][order, i], theirs[f"score_{task.name}"].to_numpy(), rtol=1e-4, atol=1e-5
        )
    metrics = result["metrics"]
    assert metrics["test/click/auc"] > 0.55
    if name == "htlnet":
        # the core target: play seconds, scored with the regression metrics
        assert [t.name for t in bundle.tasks] == ["click", "long_view", "dwell"]
        assert 0 < metrics["test/dwell/spearman"] <= 1 and metrics["test/dwell/nrmse"] > 0
        assert (theirs["score_dwell"] >= 0).all() and theirs["score_dwell"].max() > 1
        assert set(theirs["target_dwell"].round(3)) != {0, 1}


def test_two_simulated_nodes_train_like_one_node(
    uninterrupted: Path, kuairand_train_lake, tmp_path
):
    """The multi-node launch (`torchrun --nnodes 2` with a c10d rendezvous, one process per
    node, both on localhost) runs the same code path as a cluster: it ends with the same weights
    and history as the single-node 2-process run."""
    out = tmp_path / "run"
    args = _args(kuairand_train_lake, out)
    port = 29400 + os.getpid() % 1000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "-m", "jobs.train", *args]  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "w")
        nodes.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env), log))
    for node, (proc, log) in enumerate(nodes):
        code = proc.wait(timeout=900)
        log.close()
        assert code == 0, (tmp_path / f"node{node}.log").read_text()[-4000:]
    logs = "".join((tmp_path / f"node{n}.log").read_text() for n in range(2))
    assert "2 ranks" in logs
    _assert_same_run(uninterrupted, out)


def test_torchrec_s_pipeline_trains_stan_as_the_plain_loop(kuairand_train_lake, tmp_path) -> None:
    """``train.pipeline=sparse_dist`` (TorchRec's TrainPipelineSparseDist, CUDA's default step)
    runs on CPU too: STAN on the real lake (its Beta state advanced batch by batch, the pipeline
    one batch ahead) logs the losses of the plain loop, and so does the plain loop fed by the
    prefetching thread (``train.prefetch_batches``) and by two persistent worker processes
    (``train.num_workers``, started once and told the next epoch), across an epoch's end (16
    steps of 1024 rows: more than the slice's 14k rows). Every model is checked the same way on random
    batches in ``test_pipeline.py``."""
    ov = kuairand_train_lake["spec_overrides"]
    runs = {}
    variants = {
        "simple": ["train.pipeline=simple"],
        "sparse_dist": ["train.pipeline=sparse_dist"],
        "prefetch": ["train.pipeline=simple", "train.prefetch_batches=3"],
        "workers": ["train.pipeline=simple", "train.num_workers=2"],
    }
    for name, sets in variants.items():
        cfg = _cfg(
            kuairand_train_lake,
            tmp_path / name,
            "model.name=stan",
            "train.max_steps=16",
            "train.log_every=4",
            "train.batch_size=1024",
            "train.epochs=3",
            "train.eval_splits=[]",
            *sets,
        )
        runs[name] = train(cfg, ov).history
    assert [h["step"] for h in runs["sparse_dist"]] == [4.0, 8.0, 12.0, 16.0]
    for other in ("sparse_dist", "prefetch", "workers"):
        for a, b in zip(runs["simple"], runs[other], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), other


def test_training_needs_neither_spark_nor_mlflow(kuairand_train_lake, tmp_path) -> None:
    """A GPU training image need not carry Spark (or Java): the trainer reads the Delta examples
    and the fitted preprocessing with deltalake and pyarrow alone (``pipelines.lake``,
    ``pipelines.preprocessing``), and with ``mlflow.enabled=false`` it needs no MLflow."""
    out = tmp_path / "run"
    args = _args(kuairand_train_lake, out, "train.max_steps=10", "train.checkpoint_every=0",
                 "train.eval_splits=[valid]", "mlflow.enabled=false")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_SPARK_NOR_MLFLOW, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.0 < metrics["valid/click/auc"] < 1.0
    assert (out / "model.pt").exists()
