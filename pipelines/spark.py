"""The Spark session: `local[*]` by default, any master by config.

A driver JVM this process launches starts with the parallel collector and, where a class-data
archive of this Spark and Java exists, from that archive (`ClassArchive`)."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import SparkSession

if TYPE_CHECKING:
    from pipelines.config import SparkConfig

log = logging.getLogger(__name__)

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

# A local driver is a batch job's whole JVM: the parallel collector's cheaper write barriers
# took about 9 % of the wall and CPU time of 10M-event builds off G1's (four interleaved pairs).
DRIVER_JAVA_OPTIONS = ["-XX:+UseParallelGC"]
DRIVER_OPTIONS_KEY = "spark.driver.extraJavaOptions"
# A recording left behind by a process that died is taken over after this long.
STALE_RECORDING_S = 3600
# An archive no driver has started from for this long is removed when another is written.
UNUSED_ARCHIVE_S = 30 * 86_400


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lifecycle-mtl" / "jvm"


def _spark_home() -> Path:
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home())


def _java() -> Path | None:
    home = os.environ.get("JAVA_HOME")
    java = Path(home) / "bin" / "java" if home else None
    found = str(java) if java is not None and java.exists() else shutil.which("java")
    return Path(found).resolve() if found else None


def archive_key(conf: dict[str, str]) -> str | None:
    """What a class-data archive is valid for: the java binary and Spark's class path (the
    JVM refuses an archive of another class path, so a new one is recorded). None without a
    java binary to name."""
    import pyspark

    java = _java()
    if java is None:
        return None
    home = _spark_home()
    jars = sorted((home / "jars").glob("*.jar"))
    st = java.stat()
    # The JVM compares the class path's strings and each jar's size and modification time:
    # another install's jars, or the same ones installed again (a rebuilt virtual environment
    # at the same path), need their own archive; the old one would be refused, silently.
    parts = [pyspark.__version__, str(java), str(st.st_size), str(st.st_mtime_ns), str(home)]
    parts += [f"{j.name}:{j.stat().st_size}:{j.stat().st_mtime_ns}" for j in jars]
    parts += [
        conf.get(k, "")
        for k in ("spark.jars", "spark.jars.packages", "spark.driver.extraClassPath")
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def archive_path(conf: dict[str, str], cache_dir: Path | None = None) -> Path | None:
    """Where the class-data archive of a driver with ``conf`` is kept (it may not exist)."""
    key = archive_key(conf)
    return None if key is None else (cache_dir or default_cache_dir()) / f"spark-driver-{key}.jsa"


@dataclass(frozen=True)
class ClassArchive:
    """A JVM class-data (AppCDS) archive of a local Spark driver, kept in ``cache_dir``.

    The JVM spends most of Spark's start loading and verifying classes: from an archive of
    them, the session starts and runs its first job in about half the time (on the 2-core
    dev machine: 16-17 s to a session that has read a Parquet file, 9-10 s with the archive).
    A driver without one records its classes, and at its exit (when it has loaded what its
    jobs use) dumps them to a file that replaces the archive once complete: the JVM maps an
    archive, and a truncated one crashes it. One process at a time records (a lock file);
    others start as they would without one."""

    path: Path
    recording: bool = False

    @property
    def lock(self) -> Path:
        return self.path.with_suffix(".recording")

    def java_options(self) -> list[str]:
        # quiet: the recording reports every class it cannot archive
        if self.recording:
            return ["-XX:+RecordDynamicDumpInfo", "-Xlog:cds*=off"]
        return [f"-XX:SharedArchiveFile={self.path}", "-Xlog:cds*=off"]

    @classmethod
    def for_conf(cls, conf: dict[str, str], cache_dir: Path) -> ClassArchive | None:
        """The archive to start from, or to record (None: another process records it)."""
        path = archive_path(conf, cache_dir)
        if path is None:
            return None
        if path.exists():
            try:
                # its modification time says when it was last used (`prune_archives`)
                os.utime(path)
            except OSError:
                pass
            return cls(path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        archive = cls(path, recording=True)
        return archive if archive._take_lock() else None

    def _take_lock(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    age = time.time() - self.lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < STALE_RECORDING_S:
                    return False
                self.lock.unlink(missing_ok=True)
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False

    def dump(self, spark: SparkSession) -> bool:
        """Write the recorded classes (the JVM's `VM.cds dynamic_dump`, through its
        diagnostic-command MBean) to a temporary file and move it into place."""
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            t0 = time.time()
            out = _diagnostic_command(spark, "vmCds", f"dynamic_dump {tmp}")
            if not tmp.exists() or tmp.stat().st_size == 0 or "error" in out.lower():
                raise RuntimeError(out.strip() or "no archive written")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            prune_archives(self.path.parent, keep=self.path)
            log.info(
                "JVM class-data archive written to %s in %.1fs (%d MB): later local Spark "
                "sessions start from it",
                self.path,
                time.time() - t0,
                self.path.stat().st_size >> 20,
            )
            return True
        except Exception as e:  # the archive only speeds up later starts
            log.warning("JVM class-data archive not written (%s): later runs start without", e)
            return False
        finally:
            tmp.unlink(missing_ok=True)
            self.lock.unlink(missing_ok=True)


def prune_archives(cache_dir: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the archives of ``cache_dir`` no driver has started from for
    `UNUSED_ARCHIVE_S` (each is 100-140 MB, and every new Spark, Java or rebuilt environment
    records its own), and temporary dumps a killed process left; ``keep`` stays. A driver that
    has one mapped keeps it: the file goes when it exits. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for f in [*cache_dir.glob("spark-driver-*.jsa"), *cache_dir.glob("spark-driver-*.jsa.*.tmp")]:
        limit = UNUSED_ARCHIVE_S if f.suffix == ".jsa" else STALE_RECORDING_S
        try:
            if f != keep and now - f.stat().st_mtime > limit:
                f.unlink()
                removed.append(f)
        except OSError:
            continue
    return removed


def _diagnostic_command(spark: SparkSession, operation: str, command: str) -> str:
    """Run a HotSpot diagnostic command in the driver JVM (what `jcmd` does from outside; a
    JRE has no jcmd). Called through the public MBeanServerConnection interface: py4j cannot
    reach the platform server's own class, which its module does not export."""
    gw = spark.sparkContext._gateway
    jvm = spark.sparkContext._jvm
    assert gw is not None and jvm is not None
    lang = jvm.java.lang
    server = jvm.java.lang.management.ManagementFactory.getPlatformMBeanServer()
    name = jvm.javax.management.ObjectName("com.sun.management:type=DiagnosticCommand")
    types = ["javax.management.ObjectName", "java.lang.String"]
    types += ["[Ljava.lang.Object;", "[Ljava.lang.String;"]
    ptypes = gw.new_array(lang.Class, len(types))
    for i, t in enumerate(types):
        ptypes[i] = lang.Class.forName(t)
    invoke = lang.Class.forName("javax.management.MBeanServerConnection").getMethod(
        "invoke", ptypes
    )
    argv = gw.new_array(lang.String, 1)
    argv[0] = command
    params = gw.new_array(lang.Object, 1)
    params[0] = argv
    signature = gw.new_array(lang.String, 1)
    signature[0] = "[Ljava.lang.String;"
    call = gw.new_array(lang.Object, 4)
    for i, v in enumerate([name, operation, params, signature]):
        call[i] = v
    return str(invoke.invoke(server, call))


def driver_java_options(user: str | None, archive: ClassArchive | None) -> str:
    """The local driver's JVM options: ours first, so that the user's own win (the JVM takes
    the last of a flag); no archive where the user names one or turns class sharing off."""
    user = (user or "").strip()
    ours = list(DRIVER_JAVA_OPTIONS)
    if archive is not None and "SharedArchiveFile" not in user and "-Xshare:off" not in user:
        ours += archive.java_options()
    return " ".join([*ours, *([user] if user else [])])


def bundled_pyspark_matches(spark_home: Path) -> bool:
    """Whether ``spark_home``'s ``python/lib/pyspark.zip`` (what Spark puts first on the Python
    workers' path) holds the same PySpark version as the package this process imported."""
    import pyspark

    from pipelines.pyspark_daemon import bundled_version

    return (
        bundled_version(str(spark_home / "python" / "lib" / "pyspark.zip")) == pyspark.__version__
    )


# `pipelines.pyspark_daemon`: workers of a local driver import pyspark from the installed package
DAEMON_MODULE_KEY = "spark.python.daemon.module"
WORKER_PATH_KEY = "spark.executorEnv.PYTHONPATH"


def local_worker_conf(conf: dict[str, str], spark_home: Path) -> dict[str, str]:
    """What a local master's conf gains so that its Python workers import pyspark from the
    installed package, not Spark's zip (`pipelines.pyspark_daemon`): our daemon module, and
    this project's root on the workers' path so that they can import it. Nothing where the
    user names a daemon module, or where the zip holds another version than the package."""
    if DAEMON_MODULE_KEY in conf or not bundled_pyspark_matches(spark_home):
        return {}
    root = str(Path(__file__).resolve().parents[1])
    path = [p for p in conf.get(WORKER_PATH_KEY, "").split(os.pathsep) if p]
    return {
        DAEMON_MODULE_KEY: "pipelines.pyspark_daemon",
        WORKER_PATH_KEY: os.pathsep.join([root, *[p for p in path if p != root]]),
    }


def get_spark(
    app_name: str = "lifecycle-mtl",
    master: str | None = "local[*]",
    conf: dict[str, Any] | None = None,
    class_archive: bool = True,
    cache_dir: str | Path | None = None,
) -> SparkSession:
    """Build (or reuse) a SparkSession. ``master=None`` leaves it to spark-submit, whose JVM
    is already running. ``class_archive``: start a driver JVM this process launches from a
    class-data archive in ``cache_dir`` (`ClassArchive`; default `default_cache_dir`)."""
    from pyspark import SparkContext

    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON", _python()))
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    merged = {**DEFAULT_CONF, **{k: str(v) for k, v in (conf or {}).items()}}
    archive = None
    launches_jvm = bool(master) and SparkContext._gateway is None
    if launches_jvm:
        if class_archive:
            archive = ClassArchive.for_conf(
                merged, Path(cache_dir) if cache_dir else default_cache_dir()
            )
        merged[DRIVER_OPTIONS_KEY] = driver_java_options(merged.get(DRIVER_OPTIONS_KEY), archive)
        if master and master.startswith("local"):
            merged |= local_worker_conf(merged, _spark_home())
    for k, v in merged.items():
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except BaseException:
        if archive is not None and archive.recording:
            archive.lock.unlink(missing_ok=True)
        raise
    spark.sparkContext.setLogLevel("WARN")
    if archive is not None and archive.recording:
        log.info(
            "no JVM class-data archive for this Spark and Java yet: recording one, written "
            "when this process exits (once)"
        )
        # at exit the JVM has loaded what the jobs used; it lives until this process ends
        # (it exits when its stdin closes), so the dump runs before that
        atexit.register(archive.dump, spark)
    return spark


def _python() -> str:
    import sys

    return sys.executable


def spark_session(cfg: SparkConfig, app_name: str | None = None) -> SparkSession:
    """`get_spark` as a run's `SparkConfig` says."""
    return get_spark(
        app_name or cfg.app_name,
        cfg.master,
        cfg.conf,
        class_archive=cfg.class_archive,
        cache_dir=cfg.jvm_cache_dir,
    )
