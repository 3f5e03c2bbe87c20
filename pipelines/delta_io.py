"""Delta Lake I/O: Spark executors write the Parquet files, the driver commits them with delta-rs.

Writing (``writer="delta-rs"``, the default) scales like delta-spark without its jars:

1. ``df.mapInArrow`` runs on the executors. Each task splits its Arrow batches by partition value,
   keeps one zstd ``ParquetWriter`` open per partition value and writes hive-style files
   ``<table>/<col>=<value>/part-<uuid4>.parquet`` (partition columns are not stored in the files,
   as in Delta). Each task yields one small metadata row per file: path, size, partition values,
   record count and Delta statistics.
2. The driver collects only those metadata rows (one per file, never a data row) and commits them
   as ``AddAction``s in ONE Delta transaction: ``create_table_with_add_actions`` for a new table,
   ``DeltaTable.create_write_transaction`` otherwise. A partition replace is an ``overwrite`` with
   ``partition_filters``: delta-rs removes exactly the files of those partitions in the same commit,
   so readers see either the old or the new partitions, never a mix.

The two halves are public for jobs that already run a ``mapInArrow`` over the rows (the feature
kernel): ``write_target`` checks the schema against the table, ``WriteTarget.task_writer()``
writes a task's files and returns their metadata rows, ``commit_files`` commits them.

Reading goes through the Delta log, never by listing Parquet files:
``DeltaTable(path, version).file_uris(...)`` then ``spark.read.parquet(*files)`` with the table's
schema, the partition columns coming from the paths (as strings).

``writer="delta-spark"`` is a thin branch for clusters that have the delta-spark jars
(``format("delta")`` with ``replaceWhere``); it is not exercised by the tests here.

delta-rs behaviour this module relies on or works around (deltalake 1.6.6):

* ``create_write_transaction(mode="overwrite", partition_filters=[(c, "in", vals)])`` removes the
  files of exactly the matching partitions, also with zero add actions and with several values.
  It does NOT check that the added files lie inside the filter, and it does NOT check the schema
  (a different schema is accepted silently and the table metadata is left unchanged): both are
  checked here before committing.
* The commit's ``operationParameters`` hold only ``mode`` and ``partitionBy``; the replace predicate
  is added through ``CommitProperties(custom_metadata={"operationParameters": {...}})``, which
  delta-rs merges into its own parameters.
* ``AddAction.path`` must be the plain relative path; delta-rs percent-encodes it for the log
  (passing an already encoded path double-encodes it).
* ``DeltaTable.version()`` is not refreshed by a commit made through that object.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import LongType, StringType, StructField, StructType

Writer = Literal["delta-rs", "delta-spark"]

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Buffer rows per open file before writing a row group (a Spark Arrow batch split by partition
# value gives small slices; writing each as a row group would give tiny row groups). At most
# 128k rows: a training loader worker reads the row groups holding its chunk of batches, and a
# chunk is sized to hold the largest of them (model/data.py).
ROW_GROUP_ROWS = 131_072
ROW_GROUP_BYTES = 128 << 20
TASK_BUFFER_BYTES = 512 << 20
_PLAIN_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Delta-spark truncates string statistics to 32 characters.
STATS_STRING_PREFIX = 32

_META_SCHEMA = StructType(
    [
        StructField("path", StringType()),
        StructField("size", LongType()),
        StructField("partition_values", StringType()),
        StructField("num_records", LongType()),
        StructField("stats", StringType()),
        StructField("modification_time", LongType()),
    ]
)
_META_ARROW = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("partition_values", pa.string()),
        ("num_records", pa.int64()),
        ("stats", pa.string()),
        ("modification_time", pa.int64()),
    ]
)

# The executor-side writer is shipped by value, so executors need pyarrow but not this package.
try:  # pragma: no cover - depends on the pyspark build
    from pyspark import cloudpickle as _cloudpickle

    _cloudpickle.register_pickle_by_value(sys.modules[__name__])
except Exception:  # noqa: BLE001
    pass


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def write_delta(
    df: DataFrame,
    path: str,
    *,
    partition_by: list[str],
    mode: Literal["append", "overwrite"],
    replace_partitions: dict[str, list[str]] | None = None,
    sort_within: list[str] | None = None,
    writer: Writer = "delta-rs",
    commit_info: dict[str, str] | None = None,
) -> int:
    """Write ``df`` to the Delta table at ``path`` in one atomic commit; return the new version.

    * ``mode="append"`` adds files.
    * ``mode="overwrite"`` without ``replace_partitions`` replaces the whole table.
    * ``mode="overwrite"`` with ``replace_partitions={"date": ["2022-04-25", ...]}`` replaces
      exactly those partitions and leaves every other partition untouched. All rows of ``df`` must
      fall in them (else ``ValueError`` naming the offending value, nothing is committed). An empty
      ``df`` still commits: the partitions' files are removed (an empty day).

    The table is created when it does not exist (also for an empty ``df``: a table with the schema
    and no files). On an existing table the schema and partition columns must be identical, else
    ``ValueError`` naming the columns. Partition columns are stored as strings.

    Executors write the Parquet files; the driver collects one metadata row per file and commits.
    ``sort_within`` repartitions by the partition columns (one task writes one partition value
    where possible) and sorts each task's rows by the partition columns, then ``sort_within``.
    ``commit_info`` is added to the commit's info in the Delta log.
    """
    _check_write_args(df, partition_by, mode, replace_partitions)
    if sort_within:
        df = _sorted_for_write(df, partition_by, sort_within)
    if writer == "delta-spark":
        return _write_delta_spark(
            df, _table_root(path), partition_by, mode, replace_partitions, commit_info
        )
    if writer != "delta-rs":
        raise ValueError(f"unknown writer {writer!r}; use 'delta-rs' or 'delta-spark'")

    df = df.withColumns(
        {c: df[c].cast("string") for c in partition_by if df.schema[c].dataType != StringType()}
    )
    target = write_target(path, df.schema, partition_by)
    files = _write_data_files(df, target)
    return commit_files(
        target, files, mode=mode, replace_partitions=replace_partitions, commit_info=commit_info
    )


@dataclass(frozen=True)
class WriteTarget:
    """A Delta table to write, checked against the existing table before any file is written.

    ``schema`` is the table's Arrow schema: the rows' columns in their order, all nullable, the
    partition columns as strings.
    Executors write the files with :meth:`task_writer` (a new one per task); the driver commits
    the metadata rows they yield with :func:`commit_files`."""

    root: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    exists: bool

    def task_writer(self) -> TaskFileWriter:
        return TaskFileWriter(self.root, list(self.partition_by), self.schema)


def write_target(path: str, schema: StructType, partition_by: list[str]) -> WriteTarget:
    """The write target for rows of Spark ``schema``; ValueError when it differs from the
    existing table's schema or partition columns."""
    from deltalake import DeltaTable

    root = _table_root(path)
    arrow_schema = _arrow_schema_of(schema, partition_by)
    exists = DeltaTable.is_deltatable(root)
    if exists:
        _check_same_table(DeltaTable(root), arrow_schema, partition_by, root)
    return WriteTarget(root, arrow_schema, tuple(partition_by), exists)


def commit_files(
    target: WriteTarget,
    files: Sequence[dict[str, Any]],
    *,
    mode: Literal["append", "overwrite"],
    replace_partitions: dict[str, list[str]] | None = None,
    commit_info: dict[str, str] | None = None,
) -> int:
    """Commit files written by ``target.task_writer()`` (the metadata rows its ``finish``
    returns) in one Delta transaction, with ``write_delta``'s ``mode`` and ``replace_partitions``
    semantics; return the new version."""
    from deltalake import DeltaTable
    from deltalake import Schema as DeltaSchema
    from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

    root, partition_by = target.root, list(target.partition_by)
    actions = [
        AddAction(
            path=f["path"],
            size=f["size"],
            partition_values=json.loads(f["partition_values"]),
            modification_time=f["modification_time"],
            data_change=True,
            stats=f["stats"],
        )
        for f in files
    ]
    if replace_partitions:
        _check_inside(actions, replace_partitions, root)
    exists = DeltaTable.is_deltatable(root)
    if exists != target.exists:
        _remove_files(root, [a.path for a in actions])
        raise RuntimeError(f"the Delta table at {root} was created or deleted during the write")
    table = DeltaTable(root) if exists else None

    custom: dict[str, Any] = dict(commit_info or {})
    if table is None:
        create_table_with_add_actions(
            root,
            DeltaSchema.from_arrow(target.schema),
            actions,
            mode="error",
            partition_by=partition_by or None,
            commit_properties=CommitProperties(custom_metadata=custom or None),
        )
        return DeltaTable(root).version()

    filters = None
    if mode == "overwrite" and replace_partitions:
        filters = [(c, "in", list(v)) for c, v in replace_partitions.items()]
        custom["operationParameters"] = {"predicate": _sql_predicate(replace_partitions)}
    table.create_write_transaction(
        actions,
        mode=mode,
        schema=table.schema(),
        partition_by=partition_by or None,
        partition_filters=filters,
        commit_properties=CommitProperties(custom_metadata=custom or None),
    )
    return DeltaTable(root).version()


def merge_small_files(
    target: WriteTarget,
    files: Sequence[dict[str, Any]],
    *,
    small_bytes: int,
    target_bytes: int,
    spark: SparkSession | None = None,
    threads: int = 2,
) -> list[dict[str, Any]]:
    """Files written by ``target``'s task writers, with each partition's small files merged,
    before they are committed (an "optimized write"; nothing is committed here).

    Every task writes its own file per partition value it meets, so a day of a small log comes
    as many files of a few thousand rows; a reader then pays a per-column-chunk cost per file
    (the trainer's loader read KuaiRand's examples, 120 files of about 1,900 rows, at a third
    of the speed of the same rows in 15 files). Within a partition, files below ``small_bytes``
    are merged in their path (task) order into files of at most about ``target_bytes``, each
    named after its first input: every input's rows stay together and in their order (a user's
    rows, which one task writes, too). Larger files are kept as they are.

    With ``spark`` the merges run as one Spark job, a task per merged file, on the executors
    (the driver reads no rows: a day's examples are the whole day's data); without it, on
    ``threads`` driver threads. The merged inputs are deleted once every merge has succeeded,
    so that a retried task still finds its inputs. Returns the metadata rows of the files to
    commit."""
    keep, merges = _plan_merges(files, small_bytes, target_bytes)
    if not merges:
        return keep
    merge = partial(_merge_run, target)
    if spark is not None:
        merged = spark.sparkContext.parallelize(merges, len(merges)).map(merge).collect()
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, threads)) as pool:
            merged = list(pool.map(merge, merges))
    _remove_files(target.root, [f["path"] for run in merges for f in run], threads=16)
    return keep + merged


def _plan_merges(
    files: Sequence[dict[str, Any]], small_bytes: int, target_bytes: int
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(files kept as they are, runs of two or more files to merge into one) for
    :func:`merge_small_files`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        groups.setdefault(f["partition_values"], []).append(f)
    keep: list[dict[str, Any]] = []
    runs: list[list[dict[str, Any]]] = []
    for group in groups.values():
        small = sorted((f for f in group if f["size"] < small_bytes), key=lambda f: f["path"])
        keep += [f for f in group if f["size"] >= small_bytes]
        run: list[dict[str, Any]] = []
        run_bytes = 0
        for f in small:
            if run and run_bytes + f["size"] > target_bytes:
                runs.append(run)
                run, run_bytes = [], 0
            run.append(f)
            run_bytes += f["size"]
        if run:
            runs.append(run)
    keep += [run[0] for run in runs if len(run) == 1]
    return keep, [run for run in runs if len(run) > 1]


def _merge_run(target: WriteTarget, run: list[dict[str, Any]]) -> dict[str, Any]:
    """One file of ``run``'s files' rows in their order; its metadata row. The inputs stay.
    A retried Spark task writes a file of its own (the attempt in its name)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    attempt = f"-{ctx.attemptNumber()}" if ctx is not None and ctx.attemptNumber() else ""
    fs, base = pafs.FileSystem.from_uri(target.root)
    data_schema = _data_schema(target.schema, list(target.partition_by))
    rel = run[0]["path"].replace(".parquet", f"-merged{len(run)}{attempt}.parquet")
    out = _OpenFile(fs, base, rel, data_schema)
    try:
        for f in run:
            with fs.open_input_file(f"{base}/{f['path']}") as src:
                out.add_table(pq.ParquetFile(src).read())  # the file's columns alone
        return out.finish(run[0]["partition_values"])
    except BaseException:
        out.abort()
        raise


def read_delta(
    spark: SparkSession,
    path: str,
    *,
    version: int | None = None,
    partitions: dict[str, list[str]] | None = None,
    writer: Writer = "delta-rs",
) -> DataFrame:
    """Read a snapshot of the Delta table at ``path`` as a Spark DataFrame.

    The files come from the Delta log (``version=None``: the latest snapshot), optionally only
    those of ``partitions`` (``{"date": ["2022-04-25"]}``). The result has the table's columns in
    the table's order, partition columns included, as strings. An empty snapshot (or empty selected
    partitions) gives an empty DataFrame with the table's schema. A missing table raises
    ``FileNotFoundError`` naming the path.
    """
    root = _table_root(path)
    if writer == "delta-spark":
        if not table_exists(root):
            raise FileNotFoundError(f"no Delta table at {path}")
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        out = reader.load(root)
        for col, values in (partitions or {}).items():
            out = out.where(F.col(_quote_ident(col)).isin(list(values)))
        return out
    if writer != "delta-rs":
        raise ValueError(f"unknown writer {writer!r}; use 'delta-rs' or 'delta-spark'")

    table = _open(root, version)
    schema = _spark_schema(table)
    part_cols = list(table.metadata().partition_columns)
    if partitions:
        unknown = sorted(set(partitions) - set(part_cols))
        if unknown:
            raise ValueError(f"{unknown} are not partition columns of {path} ({part_cols})")
        if any(len(v) == 0 for v in partitions.values()):
            return spark.createDataFrame([], schema)
    filters = [(c, "in", list(v)) for c, v in partitions.items()] if partitions else None
    files = [_spark_path(u) for u in table.file_uris(file_pruning_predicate=filters)]
    if not files:
        return spark.createDataFrame([], schema)
    out = spark.read.schema(schema).option("basePath", root).parquet(*files)
    return out.select(*[F.col(_quote_ident(c)) for c in schema.fieldNames()])


def table_exists(path: str) -> bool:
    """Whether ``path`` holds a Delta table (a ``_delta_log`` with at least one commit)."""
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(_table_root(path))


def table_version(path: str) -> int:
    """The latest version of the Delta table at ``path`` (``FileNotFoundError`` if missing)."""
    return _open(_table_root(path)).version()


def partition_values(path: str, column: str) -> list[str]:
    """The distinct non-null values of partition ``column`` in the current snapshot, sorted."""
    table = _open(_table_root(path))
    _check_partition_column(table, column, path)
    values = {p.get(column) for p in table.partitions()}
    return sorted(v for v in values if v is not None)


def history(path: str) -> list[dict]:
    """The table's commit infos, newest first (``DeltaTable.history()``)."""
    return _open(_table_root(path)).history()


def delete_partitions(path: str, column: str, values: list[str]) -> int | None:
    """Remove the files of partitions ``column in values`` in one commit (a Delta DELETE).

    Only files are removed (no data is rewritten). Returns the new version, or ``None`` when no
    file matched (nothing is committed).
    """
    from deltalake import DeltaTable

    root = _table_root(path)
    table = _open(root)
    _check_partition_column(table, column, path)
    if not values or not table.file_uris(file_pruning_predicate=[(column, "in", list(values))]):
        return None
    metrics = table.delete(_sql_predicate({column: values}))
    if not metrics.get("num_removed_files"):
        return None
    return DeltaTable(root).version()


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _check_write_args(
    df: DataFrame,
    partition_by: list[str],
    mode: str,
    replace_partitions: dict[str, list[str]] | None,
) -> None:
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be 'append' or 'overwrite', not {mode!r}")
    missing = [c for c in partition_by if c not in df.columns]
    if missing:
        raise ValueError(f"partition columns {missing} are not in the DataFrame {df.columns}")
    if len(set(partition_by)) == len(df.columns):
        raise ValueError("the DataFrame has no column besides the partition columns")
    if replace_partitions is None:
        return
    if mode != "overwrite":
        raise ValueError("replace_partitions needs mode='overwrite'")
    if not replace_partitions:
        raise ValueError("replace_partitions is empty; use None to overwrite the whole table")
    for col, values in replace_partitions.items():
        if col not in partition_by:
            raise ValueError(f"replace_partitions column {col!r} is not in partition_by")
        if not values or isinstance(values, str):
            raise ValueError(f"replace_partitions[{col!r}] must be a non-empty list of strings")


def _sorted_for_write(df: DataFrame, partition_by: list[str], sort_within: list[str]) -> DataFrame:
    if partition_by:
        df = df.repartition(*[df[c] for c in partition_by])
    return df.sortWithinPartitions(*[df[c] for c in [*partition_by, *sort_within]])


def _write_delta_spark(
    df: DataFrame,
    path: str,
    partition_by: list[str],
    mode: str,
    replace_partitions: dict[str, list[str]] | None,
    commit_info: dict[str, str] | None,
) -> int:
    """delta-spark branch: needs the delta-spark jars on the cluster (untested here)."""
    out = df.write.format("delta").mode(mode).partitionBy(*partition_by)
    if replace_partitions:
        out = out.option("replaceWhere", _sql_predicate(replace_partitions))
    if commit_info:
        out = out.option("userMetadata", json.dumps(commit_info, sort_keys=True))
    out.save(path)
    return table_version(path)


def _arrow_schema_of(struct: StructType, partition_by: list[str]) -> pa.Schema:
    """The Delta table's Arrow schema for rows of ``struct``: stable types, all nullable,
    partition columns as strings."""
    schema = to_arrow_schema(struct, timezone="UTC")
    fields = []
    for f in schema:
        typ = pa.string() if f.name in partition_by else _normalize_type(f.type)
        fields.append(pa.field(f.name, typ, nullable=True))
    return pa.schema(fields)


def _normalize_type(t: pa.DataType) -> pa.DataType:
    """large/view types -> plain, timestamps -> us UTC, nested fields nullable."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC")
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return pa.list_(pa.field("element", _normalize_type(t.value_type)))
    if pa.types.is_map(t):
        return pa.map_(
            pa.field("key", _normalize_type(t.key_type), nullable=False),
            pa.field("value", _normalize_type(t.item_type)),
        )
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _normalize_type(f.type)) for f in t])
    return t


def _spark_schema(table: Any) -> StructType:
    """The Spark schema of a delta-rs table (arro3 schema -> pyarrow via the C interface)."""
    arrow = pa.schema(table.schema().to_arrow())
    return from_arrow_schema(pa.schema([f.with_type(_normalize_type(f.type)) for f in arrow]))


def _check_same_table(table: Any, arrow_schema: pa.Schema, partition_by: list[str], path: str):
    """Raise ValueError unless ``arrow_schema``/``partition_by`` match the existing table."""
    existing_parts = list(table.metadata().partition_columns)
    if existing_parts != list(partition_by):
        raise ValueError(
            f"partition_by {partition_by} differs from the partition columns {existing_parts} "
            f"of the Delta table at {path}"
        )
    old = {f.name: f.dataType.simpleString() for f in _spark_schema(table).fields}
    new = {f.name: f.dataType.simpleString() for f in from_arrow_schema(arrow_schema).fields}
    if old == new:
        return
    added = sorted(set(new) - set(old))
    dropped = sorted(set(old) - set(new))
    changed = {c: f"{old[c]} -> {new[c]}" for c in sorted(set(old) & set(new)) if old[c] != new[c]}
    raise ValueError(
        f"schema of the DataFrame differs from the Delta table at {path}: "
        f"new columns {added}, missing columns {dropped}, changed types {changed}"
    )


def _write_data_files(df: DataFrame, target: WriteTarget) -> list[dict[str, Any]]:
    """Executors write the Parquet files; return one metadata row per file (driver side).

    Only the per-file metadata rows are collected to the driver, never data rows.
    """
    meta = df.select(*[df[n] for n in target.schema.names]).mapInArrow(
        _TaskWriter(target), _META_SCHEMA
    )
    return [r.asDict() for r in meta.collect()]


def _check_inside(actions: list[Any], replace: dict[str, list[str]], root: str) -> None:
    """ValueError (after removing the uncommitted files) if a file lies outside ``replace``."""
    allowed = {c: set(v) for c, v in replace.items()}
    for action in actions:
        for col, values in allowed.items():
            value = action.partition_values.get(col)
            if value not in values:
                _remove_files(root, [a.path for a in actions])
                raise ValueError(
                    f"the DataFrame has rows with {col}={value!r}, outside replace_partitions "
                    f"{{{col!r}: {sorted(values)}}}; nothing was written"
                )


def _remove_files(root: str, paths: Sequence[str], threads: int = 1) -> None:
    """Delete ``paths`` under ``root``, ignoring those already gone; on ``threads`` threads
    (an object store deletes one file a request)."""
    fs, base = pafs.FileSystem.from_uri(root)

    def remove(p: str) -> None:
        try:
            fs.delete_file(f"{base}/{p}")
        except OSError:
            pass

    if threads <= 1 or len(paths) <= 1:
        for p in paths:
            remove(p)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        list(pool.map(remove, paths))


def _open(root: str, version: int | None = None) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(root, version=version)
    except TableNotFoundError as e:
        raise FileNotFoundError(f"no Delta table at {root}") from e


def _check_partition_column(table: Any, column: str, path: str) -> None:
    parts = list(table.metadata().partition_columns)
    if column not in parts:
        raise ValueError(f"{column!r} is not a partition column of {path} ({parts})")


def _table_root(path: str) -> str:
    """A local path made absolute (``file://`` URIs too); other URIs as given."""
    if path.startswith("file:"):
        path = unquote(urlparse(path).path)
    elif "://" in path:
        return path.rstrip("/")
    return os.path.abspath(path)


def _spark_path(uri: str) -> str:
    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_ident(name: str) -> str:
    """A column name for a SQL predicate, quoted only when it is not a plain identifier."""
    return name if _PLAIN_IDENT.fullmatch(name) else _quote_ident(name)


def _sql_predicate(partitions: dict[str, list[str]]) -> str:
    """``date = '2022-04-25'`` / ``date IN ('a', 'b')``, AND-ed over the columns."""

    def lit(v: str) -> str:
        return "'" + str(v).replace("'", "''") + "'"

    parts = []
    for col, values in partitions.items():
        if len(values) == 1:
            parts.append(f"{_sql_ident(col)} = {lit(values[0])}")
        else:
            parts.append(f"{_sql_ident(col)} IN ({', '.join(lit(v) for v in values)})")
    return " AND ".join(parts)


# ---------------------------------------------------------------------------------------------
# Executor side
# ---------------------------------------------------------------------------------------------

# Spark's ExternalCatalogUtils.escapePathName character set.
_ESCAPE = {chr(c) for c in range(1, 0x20)} | set("\"#%'*/:=?\\\x7f{[]^")


def _escape_path_name(s: str) -> str:
    return "".join(f"%{ord(ch):02X}" if ch in _ESCAPE else ch for ch in s)


def _partition_dir(partition_by: list[str], key: tuple[str | None, ...]) -> str:
    parts = []
    for col, value in zip(partition_by, key, strict=True):
        v = HIVE_NULL if value is None or value == "" else _escape_path_name(value)
        parts.append(f"{_escape_path_name(col)}={v}")
    return "/".join(parts)


def _split_by_partition(
    batch: pa.RecordBatch, partition_by: list[str]
) -> Iterator[tuple[tuple[str | None, ...], pa.RecordBatch]]:
    """(partition values, rows) groups of ``batch``, rows in their original order."""
    if not partition_by:
        yield (), batch
        return
    keys = [batch.column(c) for c in partition_by]
    # one integer code per row for its combination of partition values (nulls included)
    code = np.zeros(batch.num_rows, dtype=np.int64)
    for k in keys:
        enc = pc.dictionary_encode(k, null_encoding="encode")
        code = code * len(enc.dictionary) + enc.indices.to_numpy(zero_copy_only=False)
    if (code == code[0]).all():
        yield tuple(k[0].as_py() for k in keys), batch
        return
    # One stable sort and one take, then zero-copy slices: a take per group (and its row
    # indices as Python lists) cost a fifth of the kernel's Python time at 10M events.
    order = np.argsort(code, kind="stable")
    starts = np.flatnonzero(np.diff(code[order], prepend=-1))
    ends = np.append(starts[1:], batch.num_rows)
    grouped = batch.take(pa.array(order))
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        first = int(order[start])
        yield tuple(k[first].as_py() for k in keys), grouped.slice(start, end - start)


@dataclass
class _FileStats:
    """Delta statistics (numRecords, minValues, maxValues, nullCount) accumulated per file."""

    columns: list[str]
    num_records: int = 0
    null_count: dict[str, int] = field(default_factory=dict)
    min: dict[str, Any] = field(default_factory=dict)
    max: dict[str, Any] = field(default_factory=dict)
    no_bounds: set[str] = field(default_factory=set)

    def update(self, table: pa.Table) -> None:
        self.num_records += table.num_rows
        for col in self.columns:
            arr = table.column(col)
            self.null_count[col] = self.null_count.get(col, 0) + arr.null_count
            if col in self.no_bounds or arr.null_count == len(arr):
                continue
            if pa.types.is_floating(arr.type) and not pc.all(pc.is_finite(arr)).as_py():
                self.no_bounds.add(col)  # NaN/inf: no valid JSON bound, leave the file unbounded
                continue
            mm = pc.min_max(arr).as_py()
            lo, hi = mm["min"], mm["max"]
            self.min[col] = lo if col not in self.min else min(self.min[col], lo)
            self.max[col] = hi if col not in self.max else max(self.max[col], hi)

    def to_json(self) -> str:
        mins, maxs = {}, {}
        for col in self.columns:
            if col in self.no_bounds or col not in self.min:
                continue
            lo, hi = _stat_value(self.min[col], upper=False), _stat_value(self.max[col], upper=True)
            if lo is not None:
                mins[col] = lo
            if hi is not None:
                maxs[col] = hi
        return json.dumps(
            {
                "numRecords": self.num_records,
                "minValues": mins,
                "maxValues": maxs,
                "nullCount": {c: self.null_count.get(c, 0) for c in self.columns},
            }
        )


def _stat_value(v: Any, *, upper: bool) -> Any:
    """A JSON bound in Delta's format; ``None`` when no valid bound can be written."""
    if isinstance(v, dt.datetime):  # timestamps: millisecond ISO, bounds widened to the ms
        v = v.astimezone(dt.UTC)
        extra = v.microsecond % 1000
        if extra:
            v = (
                v + dt.timedelta(microseconds=1000 - extra)
                if upper
                else v - dt.timedelta(microseconds=extra)
            )
        return v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, str) and len(v) > STATS_STRING_PREFIX:
        return None if upper else v[:STATS_STRING_PREFIX]  # a prefix is a valid lower bound only
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _stats_columns(schema: pa.Schema) -> list[str]:
    """Top-level primitive columns that get Delta statistics."""
    ok = (
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_string,
        pa.types.is_boolean,
        pa.types.is_date32,
        pa.types.is_timestamp,
    )
    return [f.name for f in schema if any(check(f.type) for check in ok)]


def _data_schema(schema: pa.Schema, partition_by: list[str]) -> pa.Schema:
    """The columns a data file stores: the table's less its partition columns (in the path)."""
    return pa.schema([f for f in schema if f.name not in partition_by])


class _OpenFile:
    """One Parquet file being written by a task, with buffered slices and its statistics."""

    def __init__(self, fs: pafs.FileSystem, base: str, rel_path: str, schema: pa.Schema):
        self.fs, self.rel_path, self.schema = fs, rel_path, schema
        self.full_path = f"{base}/{rel_path}"
        parent = self.full_path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        self.stream = fs.open_output_stream(self.full_path)
        self.writer = pq.ParquetWriter(self.stream, schema, compression="zstd")
        self.stats = _FileStats(_stats_columns(schema))
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.pending_bytes = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.pending_bytes += batch.nbytes
        if self.pending_rows >= ROW_GROUP_ROWS or self.pending_bytes >= ROW_GROUP_BYTES:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        for batch in table.cast(self.schema).to_batches():
            self.add(batch)

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending, self.schema)
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.stats.update(table)
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0

    def finish(self, partition_values: str) -> dict[str, Any]:
        """Close the file; return its metadata row for :func:`commit_files` (``partition_values``
        as JSON)."""
        self.flush()
        self.writer.close()
        self.stream.close()
        info = self.fs.get_file_info(self.full_path)
        mtime = info.mtime_ns // 1_000_000 if info.mtime_ns else int(time.time() * 1000)
        return {
            "path": self.rel_path,
            "size": info.size,
            "partition_values": partition_values,
            "num_records": self.stats.num_records,
            "stats": self.stats.to_json(),
            "modification_time": mtime,
        }

    def abort(self) -> None:
        try:
            self.writer.close()
            self.stream.close()
        finally:
            try:
                self.fs.delete_file(self.full_path)
            except OSError:
                pass


class TaskFileWriter:
    """One task's Parquet files of a Delta table: one open file per partition value.

    Rows go in with :meth:`write` (any batches whose columns are the table's, in its order), in
    any partition order; :meth:`finish` closes the files and returns one metadata row per file
    (path, size, partition_values, num_records, stats, modification_time), for :func:`commit_files`. On failure :meth:`abort` deletes them. Files
    are named ``part-<task partition>-<uuid>.parquet``, as Spark names them, so that the loader's
    (date, path) order follows the task order.
    """

    def __init__(self, root: str, partition_by: list[str], schema: pa.Schema):
        self.fs, self.base = pafs.FileSystem.from_uri(root)
        self.partition_by, self.schema = partition_by, schema
        self.data_schema = _data_schema(schema, partition_by)
        self.data_names = self.data_schema.names
        self.files: dict[tuple[str | None, ...], _OpenFile] = {}
        from pyspark import TaskContext

        ctx = TaskContext.get()
        self.task = ctx.partitionId() if ctx is not None else 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        batch = batch.cast(self.schema)
        for key, rows in _split_by_partition(batch, self.partition_by):
            f = self.files.get(key)
            if f is None:
                prefix = _partition_dir(self.partition_by, key)
                name = f"part-{self.task:05d}-{uuid.uuid4()}.parquet"
                rel = f"{prefix}/{name}" if prefix else name
                f = self.files[key] = _OpenFile(self.fs, self.base, rel, self.data_schema)
            f.add(rows.select(self.data_names))
        if sum(f.pending_bytes for f in self.files.values()) >= TASK_BUFFER_BYTES:
            for f in self.files.values():
                f.flush()

    def finish(self) -> list[dict[str, Any]]:
        out = []
        for key, f in self.files.items():
            pvals = {
                c: (None if v == "" else v) for c, v in zip(self.partition_by, key, strict=True)
            }
            out.append(f.finish(json.dumps(pvals)))
        return out

    def abort(self) -> None:
        for f in self.files.values():
            f.abort()


@dataclass
class _TaskWriter:
    """The ``mapInArrow`` function of ``write_delta``: writes a task's rows, yields one metadata
    row per file."""

    target: WriteTarget

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        writer = self.target.task_writer()
        try:
            for batch in batches:
                writer.write(batch)
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if files:
            yield pa.RecordBatch.from_pylist(files, schema=_META_ARROW)
