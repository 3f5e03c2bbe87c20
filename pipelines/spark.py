"""The Spark session: `local[*]` by default, any master by config."""

from __future__ import annotations

import os
from typing import Any

from pyspark.sql import SparkSession

# Keep the embedded session quiet and small: 2-core machines, no UI.
DEFAULT_CONF: dict[str, str] = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
    # Int.MaxValue turns off the byte limit of the batches sent to Python: below it, Spark sizes
    # the Arrow buffers after every row it adds (a walk over every column vector), about a
    # quarter of the JVM CPU of the running-features kernel (JFR, 10M events). The batches stay
    # bounded by maxRecordsPerBatch.
    "spark.sql.execution.arrow.maxBytesPerBatch": "2147483647",
    "spark.sql.adaptive.enabled": "true",
    "spark.driver.memory": "4g",
    "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
    "spark.python.worker.reuse": "true",
    # The build persists wide frames that are each read a few times, soon after. Compressing
    # the cached batches cost about a third of the CPU of the stages that fill them (dictionary
    # statistics gathered on every value of every column, measured with JFR at 10M events)
    # and saved nothing the reads noticed; uncompressed blocks spill to disk like any other.
    "spark.sql.inMemoryColumnarStorage.compressed": "false",
    # PySpark 4 otherwise records the Python call site of every Column function for error
    # messages: four py4j round trips and a stack walk per call, 2.5 s of the driver's 9 s of
    # planning before the first job of a 10M build (py-spy).
    "spark.python.sql.dataFrameDebugging.enabled": "false",
}


def get_spark(
    app_name: str = "lifecycle-mtl",
    master: str | None = "local[*]",
    conf: dict[str, Any] | None = None,
) -> SparkSession:
    """Build (or reuse) a SparkSession. ``master=None`` leaves it to spark-submit."""
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON", _python()))
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    merged = {**DEFAULT_CONF, **{k: str(v) for k, v in (conf or {}).items()}}
    for k, v in merged.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _python() -> str:
    import sys

    return sys.executable
