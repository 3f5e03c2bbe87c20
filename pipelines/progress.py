"""Progress of long Spark work: a thread that logs the active stages' task counts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

log = logging.getLogger("progress")


@contextmanager
def spark_progress(spark: SparkSession, label: str, every_s: float = 15.0) -> Iterator[None]:
    """Log ``label: stage S <name> done/total tasks, elapsed`` every ``every_s`` seconds. (Spark
    does not know its remaining stages in advance, so there is no honest whole-job ETA.)"""
    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()
    t0 = time.time()

    def run() -> None:
        while not stop.wait(every_s):
            parts = []
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is None or info.numTasks == 0:
                    continue
                name = info.name.split(" at ")[0]
                parts.append(f"stage {sid} {name} {info.numCompletedTasks}/{info.numTasks} tasks")
            if parts:
                log.info("%s: %s, %.0fs elapsed", label, "; ".join(parts), time.time() - t0)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=1)
        log.info("%s: done in %.1fs", label, time.time() - t0)
