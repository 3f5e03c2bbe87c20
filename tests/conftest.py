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
