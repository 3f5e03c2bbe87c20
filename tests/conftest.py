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
