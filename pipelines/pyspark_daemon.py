"""PySpark's worker daemon for a local driver, importing pyspark from the installed package.

Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` first on every Python worker's path. For a
pip-installed PySpark that zip is a second copy of the installed package, and importing from it
is slow: zipimport compiles every module from source in each new worker (no bytecode cache), and
``importlib.invalidate_caches()``, which each worker runs when its task's files dir joins the
path, re-reads the zip's 1,800-entry directory in Python. In a 1M-event build (py-spy) the five
Python processes spent 7.5 s of CPU importing and 3.1 s invalidating; with the package's cached
bytecode an import of ``pyspark.sql`` takes 0.25 s instead of 1.65 s, an invalidation ~0 ms
instead of 160 ms.

`pipelines.spark.get_spark` names this module as ``spark.python.daemon.module`` only for a local
master, and only where the zip holds the installed version (`bundled_pyspark_matches`): the path
is then the same code, faster. The workers are forked from this process and inherit its path.
"""

from __future__ import annotations

import os
import sys


def without_bundled_pyspark(path: list[str]) -> list[str]:
    """``path`` without Spark's ``pyspark.zip`` entries."""
    return [p for p in path if os.path.basename(p) != "pyspark.zip"]


if __name__ == "__main__":
    sys.path[:] = without_bundled_pyspark(sys.path)
    for name in [m for m in sys.modules if m == "pyspark" or m.startswith("pyspark.")]:
        del sys.modules[name]  # none is expected this early; never mix the two copies
    from pyspark.daemon import manager

    manager()
