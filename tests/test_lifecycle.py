"""The MLflow lifecycle end to end on the KuaiRand slice: the pyfunc in a fresh process, batch
scoring with Spark, and the nightly chain (skip, force, failure)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

PYFUNC_SCRIPT = """
import sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
rows = pd.read_parquet(sys.argv[3])
model.predict(rows.drop(columns=["example_id"])).assign(example_id=rows["example_id"].values).to_parquet(sys.argv[4])
"""


def test_pyfunc_in_a_fresh_process_scores_like_the_trainer(kuairand_run, kuairand_scorer, tmp_path):
    """models:/<name>@champion loaded as pyfunc in a new Python (no torchrun, no Spark) gives
    the trainer's own test-split scores for the same raw rows."""
    from model.lifecycle import register_candidate

    decision = register_candidate(
        kuairand_run["run_id"],
        "ranker",
        "valid/click/auc",
        tracking_uri=kuairand_run["tracking_uri"],
    )
    assert decision.promoted
    _, raw = kuairand_scorer
    raw.to_parquet(tmp_path / "rows.parquet")
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT, kuairand_run["tracking_uri"],
         "models:/ranker@champion", str(tmp_path / "rows.parquet"), str(tmp_path / "scores.parquet")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pyspark" not in proc.stderr.lower() or "SparkSession" not in proc.stderr
    mine = pd.read_parquet(tmp_path / "scores.parquet").set_index("example_id")
    theirs = pq.read_table(kuairand_run["out"] / "predictions_test.parquet").to_pandas()
    theirs = theirs.set_index("example_id").loc[mine.index]
    assert len(mine) > 0.9 * len(pq.read_table(kuairand_run["out"] / "predictions_test.parquet"))
    for task in ("click", "dwell", "like", "long_view", "follow"):
        np.testing.assert_allclose(mine[f"score_{task}"], theirs[f"score_{task}"], atol=1e-5)


def test_the_scoring_driver_reads_the_model_s_facts_without_loading_it(
    kuairand_run, kuairand_scorer, tmp_path
) -> None:
    """Batch scoring's driver takes the spec, the task names and the sequence flag from the
    logged model's MLmodel metadata and spec.yaml, equal to what the loaded model says, without
    loading it; for a model logged without that metadata (an older one) it loads the model."""
    import yaml

    from model.pyfunc_facts import METADATA_KEY
    from pipelines import scoring
    from pipelines.preprocessing import spec_hash

    local, _ = scoring.download_model(
        kuairand_run["model_uri"], kuairand_run["tracking_uri"], tmp_path / "model"
    )
    scorer, _ = kuairand_scorer
    facts = scoring.model_facts(local)
    assert local not in scoring._SCORERS
    assert facts.tasks == [t.name for t in scorer.tasks]
    assert facts.uses_sequences is scorer.uses_sequences is False
    assert spec_hash(facts.spec) == spec_hash(scorer.transform.spec)

    mlmodel = Path(local) / "MLmodel"
    doc = yaml.safe_load(mlmodel.read_text())
    assert doc["metadata"][METADATA_KEY] == {"tasks": facts.tasks, "uses_sequences": False}
    del doc["metadata"]
    mlmodel.write_text(yaml.safe_dump(doc))
    try:
        old = scoring.model_facts(local)
        assert local in scoring._SCORERS
    finally:
        scoring._SCORERS.pop(local, None)
    assert (old.tasks, old.uses_sequences) == (facts.tasks, facts.uses_sequences)
    assert spec_hash(old.spec) == spec_hash(facts.spec)


def test_scoring_refuses_a_model_trained_on_another_spec(kuairand_run, tmp_path) -> None:
    """A spec that differs from the model's (its spec.yaml) in what the preprocessing depends
    on is refused with both hashes, before any data is read or written."""
    import yaml

    from pipelines import scoring
    from pipelines.config import load_config
    from pipelines.preprocessing import spec_hash
    from pipelines.spec import FeatureSpec

    trained = FeatureSpec.model_validate(
        yaml.safe_load((kuairand_run["out"] / "spec.yaml").read_text())
    )
    cfg = load_config(None, [f"lake={tmp_path / 'lake'}"])
    other = trained.model_copy(update={"tasks": trained.tasks[:-1]})
    with pytest.raises(scoring.ScoringError, match=spec_hash(other)) as err:
        scoring.score_date(
            None, other, cfg, kuairand_run["model_uri"], "2022-05-08",
            tracking_uri=kuairand_run["tracking_uri"],
        )  # fmt: skip
    assert spec_hash(trained) in str(err.value)
    assert not (tmp_path / "lake").exists()


def _nightly(lake: Path, run: dict, runs: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.nightly", "--date", "2022-05-08", "--runs-dir", str(runs)]
    cmd += ["--set-pipeline", f"lake={lake}", "--set-pipeline", "spark.user_partitions=2"]
    cmd += ["--set-pipeline", "spark.conf.spark.sql.shuffle.partitions=2"]
    for s in (
        "model.embedding_dim=8",
        "model.expert_hidden=[32,16]",
        "model.tower_hidden=[16]",
        "train.batch_size=256",
        "train.max_steps=20",
        "train.threads=2",
        "registry.model_name=nightly-ranker",
        f"mlflow.tracking_uri={run['tracking_uri']}",
    ):
        cmd += ["--set-train", s]
    for s in run["spec_overrides"]:
        cmd += ["--spec-set", s]
    return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=1200)


def test_nightly_chain(kuairand_train_lake, kuairand_run, tmp_path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(kuairand_train_lake["lake"], lake)
    runs = tmp_path / "runs"
    run = {**kuairand_run, "spec_overrides": kuairand_train_lake["spec_overrides"]}
    examples = str(lake / "kuairand" / "examples")
    preds = str(lake / "kuairand" / "predictions")

    first = _nightly(lake, run, runs)
    assert first.returncode == 0, first.stderr[-4000:]
    record = json.loads(first.stdout)
    steps = record["steps"]
    assert steps["build"]["status"] == "skipped"  # the slice's full build has 05-08 already
    assert [steps[s]["status"] for s in ("train", "register", "score")] == ["done"] * 3
    assert steps["register"]["promoted"] and steps["score"]["model_version"] == "1"
    day = DeltaTable(examples).to_pandas(filters=[("date", "=", "2022-05-08")])
    scored = DeltaTable(preds).to_pandas()
    assert sorted(scored["example_id"]) == sorted(day["example_id"])
    # the champion's batch scores equal the trainer's own evaluation of those rows
    trainer = pq.read_table(runs / "2022-05-08" / "predictions_test.parquet").to_pandas()
    trainer = trainer.set_index("example_id").loc[scored["example_id"]]
    for task in ("click", "long_view"):
        np.testing.assert_allclose(scored[f"score_{task}"], trainer[f"score_{task}"], atol=1e-5)

    versions = {p: DeltaTable(p).version() for p in (examples, preds)}
    again = _nightly(lake, run, runs)
    assert again.returncode == 0, again.stderr[-4000:]
    assert all(s["status"] == "skipped" for s in json.loads(again.stdout)["steps"].values())
    assert {p: DeltaTable(p).version() for p in versions} == versions  # a no-op

    forced = _nightly(lake, run, runs, "--force", "build,score")
    assert forced.returncode == 0, forced.stderr[-4000:]
    steps = json.loads(forced.stdout)["steps"]
    assert steps["build"]["status"] == "done" and steps["build"]["mode"] == "nightly"
    assert steps["score"]["status"] == "done"
    assert DeltaTable(preds).version() == versions[preds] + 1
    rescored = DeltaTable(preds).to_pandas()
    assert len(rescored) == len(scored)  # replaced, not appended
    assert len(DeltaTable(examples).to_pandas(filters=[("date", "=", "2022-05-08")])) == len(day)


def test_nightly_failure_names_the_step_and_keeps_earlier_outputs(
    kuairand_train_lake, kuairand_run, tmp_path
) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(kuairand_train_lake["lake"], lake)
    run = {**kuairand_run, "spec_overrides": kuairand_train_lake["spec_overrides"]}
    before = DeltaTable(str(lake / "kuairand" / "examples")).version()
    proc = _nightly(lake, run, tmp_path / "runs", "--set-train", "model.tasks=[watch]")
    assert proc.returncode == 1
    assert "step 'train' failed" in proc.stderr
    assert "model.tasks: 'watch' is not a task" in proc.stderr
    record = json.loads((lake / "kuairand" / "nightly" / "2022-05-08.json").read_text())
    assert record["failed_step"] == "train" and record["steps"]["build"]["status"] == "skipped"
    assert "score" not in record["steps"]
    assert DeltaTable(str(lake / "kuairand" / "examples")).version() == before


@pytest.mark.parametrize(
    "name, extra",
    [
        ("dtrn", ["model.dtrn.ffn_hidden=16"]),
        ("htlnet", ["model.bottom_hidden=[32,16]"]),
    ],
)
def test_nightly_chain_trains_registers_and_scores_dtrn_and_htlnet(
    name: str, extra: list[str], kuairand_train_lake, kuairand_run, tmp_path
) -> None:
    """DTRN and HTLNet go through train -> register -> Spark batch scoring like any model: the
    champion's batch scores (DTRN reading the day's behaviour sequences) equal the trainer's."""
    lake = tmp_path / "lake"
    shutil.copytree(kuairand_train_lake["lake"], lake)
    run = {**kuairand_run, "spec_overrides": kuairand_train_lake["spec_overrides"]}
    sets = [f"model.name={name}", f"registry.model_name=nightly-{name}", *extra]
    proc = _nightly(lake, run, tmp_path / "runs", *[a for s in sets for a in ("--set-train", s)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = json.loads(proc.stdout)["steps"]
    assert steps["register"]["promoted"] and steps["score"]["status"] == "done"
    scored = DeltaTable(str(lake / "kuairand" / "predictions")).to_pandas()
    trainer = pq.read_table(tmp_path / "runs" / "2022-05-08" / "predictions_test.parquet")
    trainer = trainer.to_pandas().set_index("example_id").loc[scored["example_id"]]
    tasks = ["click", "long_view", "dwell"] if name == "htlnet" else ["click", "like", "follow"]
    for task in tasks:
        np.testing.assert_allclose(
            scored[f"score_{task}"], trainer[f"score_{task}"], rtol=1e-4, atol=1e-5
        )
    if name == "htlnet":  # the core target is scored as a value (seconds), not a probability
        assert (scored["score_dwell"] >= 0).all() and scored["score_dwell"].std() > 0
