"""PySpark's worker daemon for a local driver, importing pyspark from the installed package.

Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` first on every Python worker's path, and the
spark-core jar after it. For a pip-installed PySpark that zip is a second copy of the installed
package, and importing from it is slow: zipimport compiles every module from source in each new
worker (no bytecode cache). ``importlib.invalidate_caches()``, which each worker runs when its
task's files dir joins the path, re-reads the directory of every zip and jar on it in Python:
160 ms for the zip's 1,800 entries, 55 ms for the jar's 5,900. In a 1M-event build (py-spy)
the five Python processes spent 7.5 s of CPU importing and 3.1 s invalidating; an import of
``pyspark.sql`` takes 0.25 s from the package's cached bytecode instead of 1.65 s.

`pipelines.spark.get_spark` names this module as ``spark.python.daemon.module`` only for a local
master, and only where the zip holds the installed version (`bundled_pyspark_matches`): the
path then resolves to the same code. The workers are forked from this process and inherit it.
"""

from __future__ import annotations

import os
import sys
import zipfile


def _python_free_jar(entry: str) -> bool:
    if not entry.endswith(".jar") or not os.path.isfile(entry):
        return False
    try:
        with zipfile.ZipFile(entry) as jar:
            return not any(name.endswith((".py", ".pyc")) for name in jar.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def without_bundled_pyspark(path: list[str]) -> list[str]:
    """``path`` without Spark's ``pyspark.zip`` and the jars on it that hold no Python."""
    return [p for p in path if os.path.basename(p) != "pyspark.zip" and not _python_free_jar(p)]


if __name__ == "__main__":
    kept = without_bundled_pyspark(sys.path)
    dropped = set(sys.path) - set(kept)
    sys.path[:] = kept
    # invalidate_caches() asks every cached finder, also those of entries off the path
    for entry in [e for e in sys.path_importer_cache if any(e.startswith(d) for d in dropped)]:
        del sys.path_importer_cache[entry]
    for name in [m for m in sys.modules if m == "pyspark" or m.startswith("pyspark.")]:
        del sys.modules[name]  # none is expected this early; never mix the two copies
    from pyspark.daemon import manager

    manager()
