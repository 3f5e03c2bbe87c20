"""PySpark's worker daemon for a local driver, importing pyspark from the installed package.

Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` first on every Python worker's path, and the
spark-core jar after it. For a pip-installed PySpark that zip is a second copy of the installed
package, and importing from it is slow: zipimport compiles every module from source in each new
worker (no bytecode cache). ``importlib.invalidate_caches()``, which each worker runs when its
task's files dir joins the path, re-reads the directory of every zip and jar on it in Python:
160 ms for the zip's 1,800 entries, 55 ms for the jar's 5,900. In a 1M-event build (py-spy)
the five Python processes spent 7.5 s of CPU importing and 3.1 s invalidating; an import of
``pyspark.sql`` takes 0.25 s from the package's cached bytecode instead of 1.65 s.

`pipelines.spark.get_spark` names this module as ``spark.python.daemon.module`` for a local
master where the zip holds the installed version. The daemon checks that again itself (the
zip stays where no installed pyspark of the zip's version is on the path, as on a cluster whose
Spark differs from the executors' package), so the path resolves to the same code. The
workers are forked from this process and inherit its path.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from importlib.machinery import PathFinder
from pathlib import Path

_VERSION = re.compile(r"__version__\s*(?::\s*str)?\s*=\s*[\"']([^\"']+)[\"']")


def bundled_version(zip_path: str) -> str | None:
    """The PySpark version a ``pyspark.zip`` holds (None: unreadable)."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            found = _VERSION.search(z.read("pyspark/version.py").decode())
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    return found.group(1) if found else None


def installed_version(path: list[str]) -> str | None:
    """The version of the pyspark package ``path`` would import (None: none there)."""
    spec = PathFinder.find_spec("pyspark", path)
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    found = _VERSION.search(text)
    return found.group(1) if found else None


def _python_free_jar(entry: str) -> bool:
    if not entry.endswith(".jar") or not os.path.isfile(entry):
        return False
    try:
        with zipfile.ZipFile(entry) as jar:
            return not any(name.endswith((".py", ".pyc")) for name in jar.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def without_bundled_pyspark(path: list[str]) -> list[str]:
    """``path`` without the jars on it that hold no Python, and without Spark's
    ``pyspark.zip`` where the rest of it imports an installed pyspark of the zip's version."""
    bundled = [p for p in path if os.path.basename(p) == "pyspark.zip"]
    rest = [p for p in path if p not in bundled]
    installed = installed_version(rest) if bundled else None
    if installed is None or any(bundled_version(z) != installed for z in bundled):
        rest = list(path)
    return [p for p in rest if not _python_free_jar(p)]


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
