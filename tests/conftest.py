from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
KUAIRAND_DIR = (REPO / ".." / "shared" / "data" / "kuairand_pure_14d").resolve()


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole test run (it takes 6-16 s to start)."""
    from pipelines.spark import get_spark

    session = get_spark(
        "tests",
        master="local[2]",
        conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"},
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def kuairand_dir() -> Path:
    if not KUAIRAND_DIR.exists():
        pytest.fail(f"the KuaiRand slice is missing at {KUAIRAND_DIR}")
    return KUAIRAND_DIR


@pytest.fixture(scope="session")
def kuairand_train_lake(spark, kuairand_dir: Path, tmp_path_factory) -> dict:
    """The pipeline's build of every 16th KuaiRand user over all 14 days (about 14k rows:
    train up to 05-04, valid 05-05..06, test 05-07..08), for the training tests.

    Returns ``{"lake", "spec_overrides", "spec"}``.
    """
    import gzip

    import pandas as pd

    from pipelines.build import build
    from pipelines.config import PipelineConfig
    from pipelines.spec import load_spec

    root = tmp_path_factory.mktemp("kuairand_train")
    log = pd.read_csv(kuairand_dir / "log_standard_4_25_to_5_08_pure.csv.gz")
    path = root / "log.csv.gz"
    with gzip.open(path, "wt") as fh:
        log[log["user_id"] % 16 == 0].to_csv(fh, index=False)
    overrides = [f"source.path={path}"]
    spec = load_spec(REPO / "feature_specs" / "kuairand.yaml", overrides=overrides)
    lake = root / "lake"
    build(spark, spec, PipelineConfig(lake=str(lake), spark={"user_partitions": 2}))
    return {"lake": str(lake), "spec_overrides": overrides, "spec": spec}


@pytest.fixture(scope="session")
def kuairand_raw(kuairand_train_lake, kuairand_dir: Path):
    """The raw rows of the training slice, joined with the side tables in pandas (what a caller
    of the pyfunc would pass), with the ``example_id`` and ``split`` of each row's example.

    Rows whose (user, item, time) is not unique are left out (the join key would be ambiguous).
    """
    import pandas as pd
    from deltalake import DeltaTable

    spec = kuairand_train_lake["spec"]
    log = pd.read_csv(spec.source.path)
    users = pd.read_csv(kuairand_dir / "user_features_pure.csv.gz")
    basic = pd.read_csv(kuairand_dir / "video_features_basic_pure.csv.gz")
    stats = pd.read_csv(kuairand_dir / "video_features_statistic_pure.from_item_features.csv.gz")
    raw = (
        log.merge(users, on="user_id", how="left")
        .merge(basic, on="video_id", how="left")
        .merge(stats, on="video_id", how="left", suffixes=("", "_stat"))
    )
    key = ["user_id", "video_id", "time_ms"]
    raw = raw.drop_duplicates(key, keep=False)
    ex = DeltaTable(kuairand_train_lake["lake"] + "/kuairand/examples").to_pandas(
        columns=["user_id", "item_id", "event_time_ms", "example_id", "split", "date"]
    )
    ex = ex.drop_duplicates(["user_id", "item_id", "event_time_ms"], keep=False)
    ex = ex.rename(columns={"item_id": "video_id", "event_time_ms": "time_ms"})
    return raw.merge(ex, on=key, suffixes=("", "_example")).reset_index(drop=True)


@pytest.fixture(scope="session")
def kuairand_run(kuairand_train_lake, tmp_path_factory) -> dict:
    """A small STAN trained by ``python -m jobs.train`` on the slice, logged to a fresh MLflow
    store (the pyfunc included). Returns ``{"out", "tracking_uri", "model_uri", "run_id"}``."""
    import json
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("run")
    out = root / "out"
    uri = f"sqlite:///{root}/mlflow.db"
    sets = [
        f"lake={kuairand_train_lake['lake']}",
        f"output_dir={out}",
        "model.embedding_dim=8",
        "model.expert_hidden=[32,16]",
        "model.tower_hidden=[16]",
        "model.stan.preference_hidden=[16]",
        "train.batch_size=256",
        "train.max_steps=40",
        "train.threads=2",
        f"mlflow.tracking_uri={uri}",
        f"mlflow.artifact_location={root}/mlartifacts",
    ]
    cmd = [sys.executable, "-m", "jobs.train"]
    for s in sets:
        cmd += ["--set", s]
    for s in kuairand_train_lake["spec_overrides"]:
        cmd += ["--spec-set", s]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "metrics.json").read_text())
    return {
        "out": out,
        "tracking_uri": uri,
        "model_uri": info["model_uri"],
        "run_id": info["run_id"],
    }


@pytest.fixture(scope="session")
def kuairand_scorer(kuairand_run, kuairand_raw):
    """(Scorer of the small run, its raw test rows as the pyfunc takes them)."""
    from model.serving import RawFeatureTransform, load_scorer

    out = kuairand_run["out"]
    lake = Path(json_lake(out))
    scorer = load_scorer(out / "model.pt", out / "spec.yaml", lake / "kuairand" / "artifacts")
    cols = list(RawFeatureTransform.input_types(scorer.transform.spec))
    test = kuairand_raw[kuairand_raw["split"] == "test"].reset_index(drop=True)
    return scorer, test[cols + ["example_id"]]


def json_lake(out: Path) -> str:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["lake"]
