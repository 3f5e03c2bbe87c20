"""The local driver's JVM options and its class-data archive (`pipelines.spark`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.spark import (
    DRIVER_JAVA_OPTIONS,
    STALE_RECORDING_S,
    ClassArchive,
    archive_key,
    driver_java_options,
)

REPO = Path(__file__).resolve().parents[1]


def test_users_options_come_last_and_their_own_archive_wins(tmp_path: Path):
    archive = ClassArchive(tmp_path / "a.jsa")
    opts = driver_java_options("-Xss4m -XX:+UseG1GC", archive).split()
    # the JVM takes the last of a flag: the user's collector wins over ours
    assert opts[: len(DRIVER_JAVA_OPTIONS)] == DRIVER_JAVA_OPTIONS
    assert opts[-2:] == ["-Xss4m", "-XX:+UseG1GC"]
    assert f"-XX:SharedArchiveFile={tmp_path / 'a.jsa'}" in opts
    for own in ("-XX:SharedArchiveFile=/x.jsa", "-Xshare:off"):
        opts = driver_java_options(own, archive).split()
        assert not any("SharedArchiveFile" in o for o in opts[:-1]) and opts[-1] == own
    assert driver_java_options(None, None).split() == DRIVER_JAVA_OPTIONS
    recording = ClassArchive(tmp_path / "a.jsa", recording=True)
    assert "-XX:+RecordDynamicDumpInfo" in driver_java_options("", recording).split()


def test_archive_key_follows_the_class_path():
    base = archive_key({})
    if base is None:
        pytest.skip("no java binary")
    assert archive_key({"spark.sql.shuffle.partitions": "2"}) == base
    assert archive_key({"spark.jars": "/opt/delta-spark.jar"}) != base
    assert archive_key({"spark.driver.extraClassPath": "/opt/x.jar"}) != base


def test_archive_key_names_the_spark_install(tmp_path: Path, monkeypatch):
    """A second virtual environment's Spark (the same jars at another path) gets its own
    archive: the JVM would refuse the first one's class path, silently."""
    import pipelines.spark as ps

    base = archive_key({})
    if base is None:
        pytest.skip("no java binary")
    (tmp_path / "jars").mkdir()
    for jar in (ps._spark_home() / "jars").glob("*.jar"):
        with open(tmp_path / "jars" / jar.name, "wb") as f:
            f.truncate(jar.stat().st_size)
    monkeypatch.setattr(ps, "_spark_home", lambda: tmp_path)
    assert archive_key({}) != base


def test_archive_key_follows_the_jars_modification_times(tmp_path: Path, monkeypatch):
    """The same jars installed again at the same path (a rebuilt virtual environment) get a new
    archive: the JVM checks each jar's modification time and refused the old one ("A jar file
    is not the one used while building the shared archive file"), so every later driver
    started without sharing."""
    import pipelines.spark as ps

    if archive_key({}) is None:
        pytest.skip("no java binary")
    (tmp_path / "jars").mkdir()
    for name in ("a.jar", "b.jar"):
        (tmp_path / "jars" / name).write_bytes(b"x" * 10)
        os.utime(tmp_path / "jars" / name, ns=(1_700_000_000 * 10**9,) * 2)
    monkeypatch.setattr(ps, "_spark_home", lambda: tmp_path)
    base = archive_key({})
    assert archive_key({}) == base
    os.utime(tmp_path / "jars" / "b.jar", ns=(1_700_000_001 * 10**9,) * 2)
    assert archive_key({}) != base


def test_archives_unused_for_a_month_are_pruned_and_a_used_one_is_kept(tmp_path: Path):
    """Every Spark, Java or rebuilt environment records its own archive (100-140 MB): those no
    driver started from for 30 days, and temporary dumps of killed recorders, are removed when
    a new archive is written; starting from an archive counts as a use."""
    from pipelines.spark import UNUSED_ARCHIVE_S, ClassArchive, archive_path, prune_archives

    now = 1_800_000_000.0
    files = {
        name: tmp_path / name
        for name in (
            "spark-driver-old.jsa",
            "spark-driver-recent.jsa",
            "spark-driver-new.jsa",
            "spark-driver-new.jsa.0123.tmp",
            "spark-driver-other.jsa.4567.tmp",
            "unrelated.jsa",
        )
    }
    for f in files.values():
        f.write_bytes(b"x")
    day = 86_400
    ages = {"spark-driver-old.jsa": 31 * day, "spark-driver-recent.jsa": 29 * day}
    ages |= {"spark-driver-new.jsa": 40 * day, "spark-driver-new.jsa.0123.tmp": 2 * day}
    ages |= {"spark-driver-other.jsa.4567.tmp": 60, "unrelated.jsa": 90 * day}
    for name, age in ages.items():
        os.utime(files[name], (now - age, now - age))
    removed = prune_archives(tmp_path, keep=files["spark-driver-new.jsa"], now=now)
    assert sorted(p.name for p in removed) == [
        "spark-driver-new.jsa.0123.tmp",
        "spark-driver-old.jsa",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "spark-driver-new.jsa",
        "spark-driver-other.jsa.4567.tmp",  # a recorder may still be writing it
        "spark-driver-recent.jsa",
        "unrelated.jsa",
    ]

    path = archive_path({}, tmp_path)
    if path is None:
        pytest.skip("no java binary")
    path.write_bytes(b"x")
    old = time.time() - UNUSED_ARCHIVE_S - day
    os.utime(path, (old, old))
    archive = ClassArchive.for_conf({}, tmp_path)
    assert archive is not None and not archive.recording
    assert time.time() - path.stat().st_mtime < 60  # used now: not pruned for 30 days


def test_one_process_records_at_a_time_and_a_stale_recording_is_taken_over(tmp_path: Path):
    if archive_key({}) is None:
        pytest.skip("no java binary")
    first = ClassArchive.for_conf({}, tmp_path)
    assert first is not None and first.recording and first.lock.exists()
    # while one records, another process starts without an archive
    assert ClassArchive.for_conf({}, tmp_path) is None
    old = time.time() - STALE_RECORDING_S - 60
    os.utime(first.lock, (old, old))
    again = ClassArchive.for_conf({}, tmp_path)
    assert again is not None and again.recording
    # a written archive is used, not recorded again
    again.path.write_bytes(b"x")
    used = ClassArchive.for_conf({}, tmp_path)
    assert used is not None and not used.recording
    assert used.java_options()[0] == f"-XX:SharedArchiveFile={used.path}"


SESSION = textwrap.dedent(
    """
    import json, sys
    from pipelines.spark import get_spark
    conf = {"spark.driver.extraJavaOptions": sys.argv[2]} if len(sys.argv) > 2 else {}
    spark = get_spark("archive-test", "local[1]", conf, cache_dir=sys.argv[1])
    jvm = spark.sparkContext._jvm
    args = list(jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    n = spark.read.parquet(sys.argv[1] + "/t.parquet").count()
    print(json.dumps({"args": args, "rows": n}))
    spark.stop()
    """
)


@pytest.mark.slow
def test_the_first_driver_records_an_archive_the_next_one_starts_from(tmp_path: Path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if archive_key({}) is None:
        pytest.skip("no java binary")
    pq.write_table(pa.table({"x": list(range(5))}), tmp_path / "t.parquet")

    def run(*extra: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", SESSION, str(tmp_path), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # the JVM may print after it (the dump at exit)
        return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))

    first = run()
    assert "-XX:+RecordDynamicDumpInfo" in first["args"] and first["rows"] == 5
    archives = list(tmp_path.glob("spark-driver-*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 1 << 20
    # the lock is gone and no partial file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archives[0].name, "t.parquet"])
    # -Xshare:on: the JVM fails to start unless it maps the archive
    second = run("-Xshare:on")
    assert f"-XX:SharedArchiveFile={archives[0]}" in second["args"]
    assert "-Xshare:on" in second["args"] and second["rows"] == 5


def test_local_python_workers_import_the_installed_pyspark(spark):
    """A local driver's Python workers import the pyspark package this process imported, with
    its cached bytecode, not the copy in Spark's pyspark.zip, and have no Spark jar on their
    path (`pipelines.pyspark_daemon`)."""
    import pyarrow as pa
    import pyspark

    def where_from(batches):
        import sys

        import pyspark as worker_pyspark

        for _ in batches:
            zips = [p for p in sys.path if p.endswith(("pyspark.zip", ".jar"))]
            yield pa.RecordBatch.from_pydict({"file": [worker_pyspark.__file__], "zips": [zips]})

    rows = spark.range(2).mapInArrow(where_from, "file string, zips array<string>").collect()
    assert rows and all(r["file"] == pyspark.__file__ and r["zips"] == [] for r in rows)


def test_workers_keep_sparks_daemon_unless_the_zip_is_the_installed_pyspark(tmp_path: Path):
    import zipfile

    import pyspark

    from pipelines.pyspark_daemon import without_bundled_pyspark
    from pipelines.spark import DAEMON_MODULE_KEY, WORKER_PATH_KEY, local_worker_conf

    root = str(Path(__file__).resolve().parents[1])

    def home(version: str | None) -> Path:
        h = tmp_path / str(version)
        (h / "python" / "lib").mkdir(parents=True)
        if version is not None:
            with zipfile.ZipFile(h / "python" / "lib" / "pyspark.zip", "w") as z:
                z.writestr("pyspark/version.py", f"__version__: str = '{version}'\n")
        return h

    same, other, missing = home(pyspark.__version__), home("0.0.1"), home(None)
    got = local_worker_conf({WORKER_PATH_KEY: f"/mine{os.pathsep}{root}"}, same)
    assert got == {
        DAEMON_MODULE_KEY: "pipelines.pyspark_daemon",
        WORKER_PATH_KEY: f"{root}{os.pathsep}/mine",
    }
    assert local_worker_conf({}, other) == {}
    assert local_worker_conf({}, missing) == {}
    assert local_worker_conf({DAEMON_MODULE_KEY: "their.daemon"}, same) == {}
    # Spark's path: its zips and the spark-core jar (no Python in it); a jar with Python stays
    jars = tmp_path / "jars"
    jars.mkdir()
    for name, member in (("spark-core.jar", "org/C.class"), ("with-python.jar", "m/x.py")):
        with zipfile.ZipFile(jars / name, "w") as z:
            z.writestr(member, "")
    py4j = str(same / "python" / "lib" / "py4j-0.10.9.9-src.zip")
    bundled = str(same / "python" / "lib" / "pyspark.zip")
    site = str(Path(pyspark.__file__).resolve().parents[1])  # the installed package's
    path = ["/a", bundled, py4j, str(jars / "spark-core.jar"), str(jars / "with-python.jar"), site]
    assert without_bundled_pyspark(path) == ["/a", py4j, str(jars / "with-python.jar"), site]
    # the zip stays where the rest of the path has no pyspark, or one of another version
    assert bundled in without_bundled_pyspark([bundled, "/a"])
    newer = str(other / "python" / "lib" / "pyspark.zip")
    assert without_bundled_pyspark([newer, site]) == [newer, site]
