"""Preprocessing fitted on the training window only, in Spark: vocabularies, dense statistics,
dwell bins, and the pseudo-label fallback means, stored as JSON + Parquet next to the tables
(read back by :mod:`pipelines.preprocessing`), and their application to the rows.

Index 0 of every vocabulary is the reserved OOV index (unknown, rare, or missing values).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from pipelines.preprocessing import OOV, Artifacts, DenseStats, spec_hash, vocab_tables
from pipelines.source import spark_schema_of
from pipelines.spec import DenseTransform, FeatureSpec, Task, TaskKind

# Dwell bin boundaries are order statistics at exact ranks (`quantile_ranks`), taken from the
# training window's per-value counts when it holds at most this many distinct values (the
# counts come to the driver: 16 bytes a value); with more, from Spark's percentile_approx
# sketch at this accuracy (rank error at most rows / accuracy).
EXACT_QUANTILE_MAX_DISTINCT = 2_000_000
PERCENTILE_ACCURACY = 1_000_000
# Vocabularies up to this size are broadcast to the join (a hash lookup in the JVM per row);
# larger ones are joined by a shuffle.
BROADCAST_VOCAB_MAX = 1_000_000
# Vocabularies whose kept values are at most this many in all are ranked on the driver (one
# collect of a few dozen bytes a value); more are ranked in Spark (`rank_vocabularies`).
DRIVER_RANK_MAX_VALUES = 5_000_000
# A side table's dense statistics come from one (feature, count, value) row a training id and
# feature: up to this many go to the driver (a few dozen bytes each), more are aggregated in
# Spark.
DRIVER_MOMENTS_MAX_ROWS = 5_000_000
# The fit's counts of the training rows (`count_values`), up to this many, and the side tables,
# up to this many rows each, come to the driver, where the side tables' weighed counts and
# moments are summed (`_driver_counts`); with more, Spark weighs them.
DRIVER_COUNTS_MAX_ROWS = 5_000_000
# A side table up to this many rows is mapped on the driver (`_driver_side_map`): one collect,
# its vocabulary lookups in Arrow, and one local table the rows join. Mapped in Spark, each of
# its categoricals was a broadcast join of its own: for KuaiRand's user table some thirty,
# whose planning and single-task jobs took most of a small nightly run.
DRIVER_SIDE_MAX_ROWS = 2_000_000
# ... when it has at least this many categoricals: the collect and the local table's broadcast
# cost about what a join or two does (synthetic logs' item table, 200k rows and 2 categoricals:
# 1M builds 1-2 s slower on the driver, within noise at 10M).
DRIVER_SIDE_MIN_CATEGORICALS = 4
INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)


@dataclass(frozen=True)
class SideLookup:
    """The features of one side table for the rows that join it on ``id_column``: ``frame``
    holds the table's key as ``_key`` (unique: checked with the table) and each feature's raw
    value under the feature's name."""

    id_column: str
    frame: DataFrame
    broadcast: bool = False

    @property
    def features(self) -> list[str]:
        return [c for c in self.frame.columns if c != "_key"]

    def broadcastable(self) -> bool:
        """Whether to broadcast it: always where asked, else when Spark's estimate of the
        table (exact once its cache is filled, as its checks do) is within the broadcast
        threshold. A mapping of the table (joined with its vocabularies) has no estimate
        Spark would broadcast, and the examples would be shuffled to meet it."""
        if self.broadcast:
            return True
        spark = self.frame.sparkSession
        threshold = spark._jsparkSession.sessionState().conf().autoBroadcastJoinThreshold()
        size = int(str(self.frame._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))
        return 0 <= size <= threshold

    def join(self, rows: DataFrame, frame: DataFrame | None = None) -> DataFrame:
        """``rows`` with the features (of ``frame``: this table's, or a mapping of it)."""
        side = self.frame if frame is None else frame
        side = F.broadcast(side) if self.broadcastable() else side
        return rows.join(side, rows[self.id_column] == side["_key"], "left").drop("_key")


def integral_tables(tables: dict[str, list[str]], schema: T.StructType) -> dict[str, bool]:
    """Vocabulary tables whose columns are all integers: counted, stored and looked up as the
    numbers' canonical decimal strings, so they are joined on longs, not on strings."""
    return {
        table: all(isinstance(schema[c].dataType, INTEGRAL) for c in cols)
        for table, cols in tables.items()
    }


def _vocab_limits(spec: FeatureSpec, table: str) -> tuple[int, int]:
    if table == "user_id":
        return spec.user_ids.max_vocab, spec.user_ids.min_count
    if table == "item_id":
        return spec.item_ids.max_vocab, spec.item_ids.min_count
    feats = [f for f in spec.categorical_features if (f.table or f.name) == table]
    return min(f.max_vocab for f in feats), max(f.min_count for f in feats)


def _dense_pre(col: Column, transform: DenseTransform, fill: float) -> Column:
    x = F.coalesce(col.cast("double"), F.lit(fill))
    if transform in (DenseTransform.LOG1P, DenseTransform.LOG1P_STANDARDIZE):
        x = F.log1p(F.greatest(x, F.lit(0.0)))
    return x


def _dense_fill(transform: DenseTransform, fill: float) -> float:
    """`_dense_pre` of a missing value."""
    if transform in (DenseTransform.LOG1P, DenseTransform.LOG1P_STANDARDIZE):
        return math.log1p(max(fill, 0.0))
    return float(fill)


def task_value(spec: FeatureSpec, task: str, bins: dict[str, list[float]]) -> Column:
    """The integer value of a task that pseudo-labels and sequences use: the 0/1 label, or the
    dwell bin index. The task's [0, 1] target is value / (n_bins - 1) for dwell tasks."""
    t = spec.task(task)
    if t.kind == TaskKind.BINARY:
        return F.col(f"label_{task}").cast("long")
    return F.col(f"label_{task}_bin").cast("long")


def quantile_ranks(n_bins: int, n: int) -> list[int]:
    """1-based ranks, among n sorted values, of the n_bins - 1 inner equal-frequency boundaries
    (the inverted CDF at i / n_bins)."""
    return [max(1, math.ceil(i / n_bins * n)) for i in range(1, n_bins)]


def values_at_ranks(values: np.ndarray, counts: np.ndarray, ranks: list[int]) -> list[float]:
    """The values at 1-based ranks of the multiset {value: count}."""
    order = np.argsort(values, kind="stable")
    ordered, cum = values[order], np.cumsum(counts[order])
    return [float(ordered[np.searchsorted(cum, r, side="left")]) for r in ranks]


# What `count_values` counts: a vocabulary table's values, a dwell task's label values, rows
# per date.
VOCAB, DWELL, DATE = 0, 1, 2


def count_values(
    rows: DataFrame,
    vocab: dict[str, tuple[list[str], bool]] | None = None,
    dwell: list[str] | None = None,
    by_date: bool = False,
    weight: Column | None = None,
) -> DataFrame:
    """One group-by over ``rows`` that counts, as (kind, tbl, num, str, dbl, count) rows: every
    value of each vocabulary table (``vocab``: table -> (its columns, whether all are integers;
    integers are counted as longs in ``num``, others as strings in ``str``)), every distinct
    ``label_<task>`` of the dwell tasks (``dbl``) and the rows of each date (``str``). Nulls
    are not counted.

    One scan and one shuffle for all of them: each row's (what, value) pairs are exploded and
    counted together, ``what`` an integer until after the aggregation (at 10M events a string
    table name in the key cost 15 % more; one group-by per table, a union over the persisted
    rows, cost twice as much as this in the build). ``weight``: each row counts this many
    times (a side table's rows, weighed by their id's count of rows)."""
    no_num, no_str, no_dbl = (F.lit(None).cast(t) for t in ("long", "string", "double"))
    # (kind, tbl) -> its 1-based id; the columns of a shared table count under one id
    ids: dict[tuple[int, str], int] = {}

    def pair(kind: int, tbl: str, num=no_num, text=no_str, dbl=no_dbl) -> Column:
        what = ids.setdefault((kind, tbl), len(ids) + 1)
        return F.struct(
            F.lit(what).alias("what"), num.alias("num"), text.alias("str"), dbl.alias("dbl")
        )

    pairs = []
    for table, (cols, integral) in (vocab or {}).items():
        for c in cols:
            if integral:
                pairs.append(pair(VOCAB, table, num=F.col(c).cast("long")))
            else:
                pairs.append(pair(VOCAB, table, text=F.col(c).cast("string")))
    pairs += [pair(DWELL, t, dbl=F.col(f"label_{t}").cast("double")) for t in dwell or []]
    if by_date:
        pairs.append(pair(DATE, "", text=F.col("date")))
    weights = [] if weight is None else [weight.cast("long").alias("_w")]
    grouped = (
        rows.select(F.explode(F.array(*pairs)).alias("p"), *weights)
        .select("p.*", *(["_w"] if weights else []))
        .where("num is not null or str is not null or dbl is not null")
        .groupBy("what", "num", "str", "dbl")
    )
    counts = grouped.count() if weight is None else grouped.agg(F.sum("_w").alias("count"))
    kinds = F.array(*[F.lit(k) for k, _ in ids])
    tbls = F.array(*[F.lit(t) for _, t in ids])
    return counts.select(
        F.element_at(kinds, F.col("what")).alias("kind"),
        F.element_at(tbls, F.col("what")).alias("tbl"),
        "num",
        "str",
        "dbl",
        "count",
    )


def dwell_boundaries(
    train_rows: DataFrame,
    tasks: dict[str, int],
    max_distinct: int = EXACT_QUANTILE_MAX_DISTINCT,
    counts: DataFrame | pa.Table | None = None,
) -> tuple[dict[str, list[float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Raw equal-frequency boundaries of each dwell task's ``label_<task>`` (``tasks``: name ->
    n_bins), before dropping the minimum: exact from one count per distinct value when there
    are at most ``max_distinct`` of them in all, else from percentile_approx. Also returns,
    when exact, each task's distinct values and their counts (empty otherwise).

    ``counts``: `count_values` output holding the tasks' values (the fit's shared counts, in
    Spark or on the driver); without it they are counted here. At 10M events (194k distinct
    dwell values) the group-by took 2.3 s where the sketch took 11 s."""
    if not tasks:
        return {}, {}
    if counts is None:
        counts = count_values(train_rows, dwell=list(tasks))
    if isinstance(counts, pa.Table):
        got = counts.filter(pc.equal(counts["kind"], DWELL)).select(["tbl", "dbl", "count"])
    else:
        got = (
            counts.where(F.col("kind") == DWELL)
            .select("tbl", "dbl", "count")
            .limit(max_distinct + 1)
            .toArrow()
        )
    if got.num_rows <= max_distinct:
        out, exact = {}, {}
        for t, n_bins in tasks.items():
            mine = got.filter(pc.equal(got["tbl"], t))
            values = mine["dbl"].to_numpy()
            n = mine["count"].to_numpy().astype(np.int64)
            out[t] = values_at_ranks(values, n, quantile_ranks(n_bins, int(n.sum())))
            exact[t] = (values, n)
        return out, exact
    row = train_rows.agg(
        *[
            F.percentile_approx(
                F.col(f"label_{t}"), [i / n_bins for i in range(1, n_bins)], PERCENTILE_ACCURACY
            ).alias(t)
            for t, n_bins in tasks.items()
        ]
    ).first()
    return {t: [float(b) for b in row[t]] for t in tasks}, {}


def _moments(w: np.ndarray, x: np.ndarray, n: float) -> tuple[float, float]:
    """Mean and population standard deviation of values ``x`` weighed ``w`` over ``n`` rows,
    in two passes (the deviations from the mean: the sums of squares alone would cancel)."""
    m = float((w * x).sum() / n)
    return m, math.sqrt(max(float((w * (x - m) ** 2).sum() / n), 0.0))


def _weighed_moments(
    sides: list[SideLookup], counts: DataFrame, integral: dict[str, bool], feats: dict
) -> dict[str, float | None]:
    """``m_<f>`` and ``s_<f>`` (mean, population standard deviation) over the training rows of
    the side tables' dense features (``feats``: side -> its features): each id's value (the
    fill value where the table lacks the id) weighed by its count of rows, in two passes (the
    means, then the deviations from them: as exact as Spark's stddev_pop over the rows; the
    sums of squares alone would cancel). They come from one (count, value) row a training id
    and feature: up to ``DRIVER_MOMENTS_MAX_ROWS`` of those come to the driver in one collect
    (8 small Spark jobs became 3: about 2 s less at 1M events); more take two Spark jobs."""
    parts = []
    for side in sides:
        if not feats.get(id(side)):
            continue
        rows = _weighed(side, counts, integral[side.id_column], "left")
        for f in feats[id(side)]:
            x = _dense_pre(F.col(f.name), f.transform, f.fill)
            parts.append(rows.select(F.lit(f.name).alias("f"), F.col("_n").cast("double"), x))
    if not parts:
        return {}
    values = parts[0].toDF("f", "n", "x")
    for p in parts[1:]:
        values = values.union(p.toDF("f", "n", "x"))
    limit = DRIVER_MOMENTS_MAX_ROWS
    got = values.limit(limit + 1).toArrow()
    if got.num_rows <= limit:
        out: dict[str, float | None] = {}
        f_col = got["f"].to_numpy(zero_copy_only=False)
        n_all = got["n"].to_numpy(zero_copy_only=False)
        x_all = pc.fill_null(got["x"], 0.0).to_numpy(zero_copy_only=False)
        # as Spark's sums: a null value (log1p of a value below -1) adds to the counts only
        w_all = np.where(got["x"].is_valid().to_numpy(zero_copy_only=False), n_all, 0.0)
        for name in dict.fromkeys(f_col):
            mine = f_col == name
            out[f"m_{name}"], out[f"s_{name}"] = _moments(
                w_all[mine], x_all[mine], n_all[mine].sum()
            )
        return out
    values = values.coalesce(2)
    n, x = F.col("n"), F.col("x")
    means = {
        r["f"]: r["m"]
        for r in values.groupBy("f").agg((F.sum(n * x) / F.sum(n)).alias("m")).collect()
    }
    mean = F.lit(None).cast("double")
    for name, m in means.items():
        mean = F.when(F.col("f") == name, F.lit(m)).otherwise(mean)
    dev = values.groupBy("f").agg((F.sum(n * F.pow(x - mean, 2)) / F.sum(n)).alias("v"))
    out = {f"m_{name}": m for name, m in means.items()}
    for r in dev.collect():
        out[f"s_{r['f']}"] = None if r["v"] is None else math.sqrt(max(r["v"], 0.0))
    return out


def row_aggregates(
    spec: FeatureSpec, side_features: set[str], where: Column | None = None
) -> dict[str, Column]:
    """The fit's aggregates over the training rows themselves, by name: mean and population
    standard deviation of each dense feature the rows carry (not those of ``side_features``,
    which the fit weighs from their tables), each dwell task's minimum and each binary task's
    mean. ``where``: only rows where it holds count, so that a caller can compute them in a
    job over more rows than the training window's (the build's statistics job)."""

    def only(x: Column) -> Column:
        return x if where is None else F.when(where, x)

    aggs: dict[str, Column] = {}
    for f in spec.dense_features:
        if f.name in side_features:
            continue
        x = only(_dense_pre(F.col(f.name), f.transform, f.fill))
        aggs[f"m_{f.name}"] = F.avg(x)
        aggs[f"s_{f.name}"] = F.stddev_pop(x)
    for t in spec.tasks:
        label = F.col(f"label_{t.name}")
        if t.kind == TaskKind.DWELL:
            aggs[f"min_{t.name}"] = F.min(only(label))
        else:
            aggs[f"mean_{t.name}"] = F.avg(only(label.cast("double")))
    return {name: agg.alias(name) for name, agg in aggs.items()}


def rank_vocabularies(
    counts: DataFrame | pa.Table,
    limits: dict[str, tuple[int, int]],
    max_driver_values: int = DRIVER_RANK_MAX_VALUES,
) -> dict[str, pa.Table]:
    """Each table's vocabulary from `count_values` counts (``limits``: table -> (max_vocab,
    min_count)): its values counted at least min_count times, the max_vocab most frequent,
    ties by value (as strings, in byte order: deterministic whatever the partitioning), as
    (value, idx from 1, count).

    A table's values counted as integers become strings only here, on the counted values.
    The kept values come to the driver in one collect and are ranked there with Arrow when
    they are at most ``max_driver_values`` in all; more are ranked by a Spark window per table
    and only the max_vocab first come back. The window is a shuffle and one task per table: two
    jobs of 4.3 s in all at 10M events, 2.2 s at 1M, where the collect took 0.8 s. Counts
    already on the driver (an Arrow table) are ranked there."""
    if isinstance(counts, pa.Table):
        got = _kept_values(counts, limits)
    else:
        keep = F.lit(False)
        cap = F.lit(0)
        for t, (max_vocab, min_count) in limits.items():
            keep = keep | ((F.col("tbl") == t) & (F.col("count") >= min_count))
            cap = F.when(F.col("tbl") == t, F.lit(max_vocab)).otherwise(cap)
        kept = counts.where((F.col("kind") == VOCAB) & keep).select(
            "tbl", F.coalesce("str", F.col("num").cast("string")).alias("value"), "count"
        )
        got = kept.limit(max_driver_values + 1).toArrow()
        if got.num_rows > max_driver_values:
            order = Window.partitionBy("tbl").orderBy(F.desc("count"), F.asc("value"))
            got = (
                kept.withColumn("idx", F.row_number().over(order))
                .where(F.col("idx") <= cap)
                .drop("idx")
                .toArrow()
            )
    out: dict[str, pa.Table] = {}
    for table, (max_vocab, _) in limits.items():
        mine = got.filter(pc.equal(got["tbl"], table))
        order = pc.sort_indices(mine, sort_keys=[("count", "descending"), ("value", "ascending")])
        top = mine.take(order[:max_vocab])
        out[table] = pa.table(
            {
                "value": top["value"].cast(pa.string()),
                "idx": pa.array(np.arange(1, top.num_rows + 1, dtype=np.int32)),
                "count": top["count"].cast(pa.int64()),
            }
        )
    return out


def _kept_values(counts: pa.Table, limits: dict[str, tuple[int, int]]) -> pa.Table:
    """`rank_vocabularies`' kept values of Arrow counts: (tbl, value as a string, count) of
    each table's values counted at least its min_count times."""
    vocab = counts.filter(pc.equal(counts["kind"], VOCAB))
    parts = []
    for t, (_, min_count) in limits.items():
        mine = vocab.filter(
            pc.and_(pc.equal(vocab["tbl"], t), pc.greater_equal(vocab["count"], min_count))
        )
        # as Spark's cast of a long to a string: its canonical decimal digits
        value = pc.coalesce(mine["str"], mine["num"].cast(pa.string()))
        parts.append(pa.table({"tbl": mine["tbl"], "value": value, "count": mine["count"]}))
    schema = pa.schema([("tbl", pa.string()), ("value", pa.string()), ("count", pa.int64())])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


def _driver_counts(
    row_counts: DataFrame,
    sides: list[SideLookup],
    mine_of: dict[int, dict[str, tuple[list[str], bool]]],
    feats: dict[int, list],
    integral: dict[str, bool],
) -> tuple[pa.Table, dict[str, float | None]] | None:
    """The fit's counts on the driver: the training rows' counts (`count_values`) and each
    side table's values weighed by its id's count of training rows, summed where a table has
    columns of several sources; and the side tables' dense moments (as `_weighed_moments`).
    None where the counts hold more than ``DRIVER_COUNTS_MAX_ROWS`` rows or a side table
    more: Spark weighs them then.

    ``mine_of``: side -> its vocabulary columns (table -> (columns, integral)); ``feats``:
    side -> its dense features. The side tables' values are cast and transformed in Spark
    (as `count_values` and `_dense_pre` do), so the driver only joins and sums. At 10M events
    the Spark path's weighing was three stages over the counts, two broadcasts and a union
    persisted a second time.
    """
    limit = DRIVER_COUNTS_MAX_ROWS
    got = row_counts.limit(limit + 1).toArrow()
    if got.num_rows > limit:
        return None
    schema = got.schema
    parts = [got]
    moments: dict[str, float | None] = {}
    for side in sides:
        mine, dense = mine_of.get(id(side), {}), feats.get(id(side), [])
        if not mine and not dense:
            continue
        long_id = integral[side.id_column]
        sel = [F.col("_key").cast("long" if long_id else "string").alias("_key")]
        for cols, integ in mine.values():
            sel += [F.col(c).cast("long" if integ else "string").alias(f"v_{c}") for c in cols]
        sel += [_dense_pre(F.col(f.name), f.transform, f.fill).alias(f"x_{f.name}") for f in dense]
        table = side.frame.select(*sel).limit(limit + 1).toArrow()
        if table.num_rows > limit:
            return None
        ids = got.filter(
            pc.and_(pc.equal(got["kind"], VOCAB), pc.equal(got["tbl"], side.id_column))
        )
        ids = pa.table({"_key": ids["num" if long_id else "str"], "_n": ids["count"]})
        # each training id once, with its side row's values (null where the table lacks it)
        joined = ids.join(table, "_key", join_type="left outer")
        # in the ids' order: the same sums, to the last digit, on every run
        joined = joined.sort_by("_key")
        for t, (cols, integ) in mine.items():
            values = pa.concat_arrays([joined[f"v_{c}"].combine_chunks() for c in cols])
            weights = pa.concat_arrays([joined["_n"].combine_chunks() for _ in cols])
            pairs = pa.table({"v": values, "n": weights}).filter(pc.is_valid(values))
            summed = pairs.group_by("v").aggregate([("n", "sum")])
            k = summed.num_rows
            parts.append(
                pa.table(
                    {
                        "kind": pa.array(np.full(k, VOCAB, dtype=np.int32)),
                        "tbl": pa.array([t] * k, pa.string()),
                        "num": summed["v"] if integ else pa.nulls(k, pa.int64()),
                        "str": pa.nulls(k, pa.string()) if integ else summed["v"],
                        "dbl": pa.nulls(k, pa.float64()),
                        "count": summed["n_sum"],
                    }
                ).cast(schema)
            )
        n = joined["_n"].to_numpy().astype(np.float64)
        total = n.sum()
        for f in dense:
            # an id the table lacks takes the fill value, as the joined rows would
            fill = _dense_fill(f.transform, f.fill)
            x = pc.fill_null(joined[f"x_{f.name}"], fill).to_numpy().astype(np.float64)
            if total == 0:  # as Spark's averages of no rows
                moments[f"m_{f.name}"] = moments[f"s_{f.name}"] = None
                continue
            moments[f"m_{f.name}"], moments[f"s_{f.name}"] = _moments(n, x, total)
    counts = pa.concat_tables(parts)
    if len(parts) > 1:
        # a table of columns of the rows and of a side table (or of two): its counts add up
        keys = ["kind", "tbl", "num", "str", "dbl"]
        counts = counts.group_by(keys, use_threads=False).aggregate([("count", "sum")])
        counts = counts.rename_columns([*keys, "count"]).select(schema.names).cast(schema)
    return counts, moments


def bin_index(col: Column, boundaries: list[float]) -> Column:
    """Number of boundaries <= value: bins [-inf, b0), [b0, b1), ..., [b_last, inf)."""
    expr = F.lit(0)
    for b in boundaries:
        expr = expr + F.when(col >= F.lit(b), 1).otherwise(0)
    return expr.cast("int")


def fit(
    spec: FeatureSpec,
    train_rows: DataFrame,
    out_dir: Path,
    sides: list[SideLookup] | None = None,
    row_stats: dict[str, float | None] | None = None,
) -> Artifacts:
    """Fit on rows of the training window (labels in source units) and the side tables their
    ids join (``sides``; without them, ``train_rows`` carries every feature).

    ``train_rows`` must already be restricted to the training window; the caller decides it.
    It is scanned twice: one group-by counts the vocabularies' values, the dwell values and the
    rows per date (`count_values`), one aggregate takes the dense statistics and label means (a
    third scan only where the dwell values are too many for exact boundaries). The caller
    should pass a filter of a persisted frame, or one cheap to recompute. ``row_stats``: that
    aggregate's values (`row_aggregates` over these rows), where the caller computed them in a
    job of its own; the fit then scans the rows once.

    A side table's features are fitted on the table itself, each row weighed by how many
    training rows its id has (that id's count, which the id's vocabulary counts anyway), so the
    figures are those of the joined rows: a training row without a match has no value (not
    counted; the fill value in the dense statistics). The rows are neither joined nor
    exploded into the side features' values (at 10M events they were 5 of the 9 values each
    row is counted under).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_dir = out_dir / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    tables = vocab_tables(spec)
    sides = list(sides or [])
    if any(tables[s.id_column] != [s.id_column] for s in sides):
        # an id's vocabulary shared with another column no longer counts the id's rows alone
        for side in sides:
            train_rows = side.join(train_rows)
        sides = []
    schema = T.StructType(
        [*train_rows.schema.fields, *(f for s in sides for f in s.frame.schema.fields)]
    )
    integral = integral_tables(tables, schema)
    side_of = {name: side for side in sides for name in side.features}
    dwell = [t for t in spec.tasks if t.kind == TaskKind.DWELL]
    row_vocab = {t: [c for c in cols if c not in side_of] for t, cols in tables.items()}
    counts = count_values(
        train_rows,
        vocab={t: (cols, integral[t]) for t, cols in row_vocab.items() if cols},
        dwell=[t.name for t in dwell],
        by_date=True,
    )
    # Persisted: a few small jobs read the counts (442k rows at 10M events), and the side
    # tables' weights are the ids' counts.
    row_counts = counts.persist(StorageLevel.MEMORY_AND_DISK)
    mine_of = {
        id(side): {
            t: ([c for c in cols if side_of.get(c) is side], integral[t])
            for t, cols in tables.items()
            if any(side_of.get(c) is side for c in cols)
        }
        for side in sides
    }
    feats = {
        id(side): [f for f in spec.dense_features if side_of.get(f.name) is side] for side in sides
    }
    local = _driver_counts(row_counts, sides, mine_of, feats, integral)
    if local is not None:
        row_counts.unpersist()
        local_counts, moments = local
        return _fit_from_counts(
            spec, train_rows, local_counts, tables, dwell, out_dir, vocab_dir, sides, integral,
            row_stats, moments,
        )  # fmt: skip
    cached = [row_counts]
    weighed = []
    for side in sides:
        mine = mine_of[id(side)]
        if mine:
            ids = _weighed(side, row_counts, integral[side.id_column], "inner")
            weighed.append(count_values(ids, vocab=mine, weight=F.col("_n")))
    if weighed:
        for w in weighed:
            counts = counts.unionByName(w)

        def sources(cols: list[str]) -> set[int]:
            return {id(side_of[c]) if c in side_of else 0 for c in cols}

        if any(len(sources(cols)) > 1 for cols in tables.values()):
            # a table of columns of the rows and of a side table (or of two): its counts add up
            keys = ["kind", "tbl", "num", "str", "dbl"]
            counts = counts.groupBy(*keys).agg(F.sum("count").alias("count"))
        counts = counts.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(counts)
    else:
        counts = row_counts
    try:
        moments = _weighed_moments(sides, counts, integral, feats)
        return _fit_from_counts(
            spec, train_rows, counts, tables, dwell, out_dir, vocab_dir, sides, integral,
            row_stats, moments,
        )  # fmt: skip
    finally:
        for frame in cached:
            frame.unpersist()


def _weighed(side: SideLookup, counts: DataFrame, integral_id: bool, how: str) -> DataFrame:
    """The side table's rows for the training ids, each with ``_n``, its id's count of
    training rows (from the id's vocabulary counts); ``how="left"`` keeps the ids the table
    lacks, with null features."""
    key = F.col("num") if integral_id else F.col("str")
    ids = counts.where((F.col("kind") == VOCAB) & (F.col("tbl") == side.id_column)).select(
        key.alias("_id"), F.col("count").alias("_n")
    )
    frame = side.frame.withColumn("_key", F.col("_key").cast("long" if integral_id else "string"))
    return ids.join(
        F.broadcast(frame) if side.broadcastable() else frame, F.col("_id") == F.col("_key"), how
    )


def _fit_from_counts(
    spec: FeatureSpec,
    train_rows: DataFrame,
    counts: DataFrame | pa.Table,
    tables: dict[str, list[str]],
    dwell: list[Task],
    out_dir: Path,
    vocab_dir: Path,
    sides: list[SideLookup],
    integral: dict[str, bool],
    row_stats: dict[str, float | None] | None,
    side_moments: dict[str, float | None],
) -> Artifacts:
    """The artifacts from the counts (`count_values` rows of the training rows and the side
    tables' weighed ones: a Spark frame, or on the driver an Arrow table) and
    ``side_moments``, the side tables' dense moments (`_weighed_moments`, `_driver_counts`)."""
    if isinstance(counts, pa.Table):
        dated = counts.filter(pc.equal(counts["kind"], DATE))
        per_date = dict(zip(dated["str"].to_pylist(), dated["count"].to_pylist(), strict=True))
    else:
        per_date = {
            r["str"]: r["count"]
            for r in counts.where(F.col("kind") == DATE).select("str", "count").collect()
        }
    n_rows = sum(per_date.values())
    if n_rows == 0:
        raise ValueError("the training window holds no accepted rows: check split dates and source")
    dates = sorted(per_date)

    vocab_sizes: dict[str, int] = {}
    vocabs: dict[str, dict[str, int]] = {}
    limits = {t: _vocab_limits(spec, t) for t in tables}
    for table, ranked in rank_vocabularies(counts, limits, DRIVER_RANK_MAX_VALUES).items():
        pq.write_table(ranked, vocab_dir / f"{table}.parquet")
        values = ranked["value"].to_pylist()
        vocabs[table] = dict(zip(values, range(1, len(values) + 1), strict=True))
        vocab_sizes[table] = len(values) + 1

    # Dense statistics of the rows' own features, dwell minima and binary label means in one
    # aggregate (or the caller's, `row_aggregates`); a side table's dense features from the
    # table, weighed.
    side_of = {name: side for side in sides for name in side.features}
    aggs = row_aggregates(spec, set(side_of))
    binary = [t for t in spec.tasks if t.kind == TaskKind.BINARY]
    if row_stats is not None and all(n in row_stats for n in aggs):
        row = {n: row_stats[n] for n in aggs}
    else:
        row = train_rows.agg(*aggs.values()).first().asDict() if aggs else {}
    row |= side_moments
    dense: dict[str, DenseStats] = {}
    for f in spec.dense_features:
        std = float(row[f"s_{f.name}"] or 0.0)
        dense[f.name] = DenseStats(
            mean=float(row[f"m_{f.name}"] or 0.0), std=std if std > 1e-12 else 1.0
        )
    bins: dict[str, list[float]] = {}
    raw_bins, exact = dwell_boundaries(
        train_rows, {t.name: int(t.n_bins or 0) for t in dwell}, counts=counts
    )
    for t in dwell:
        # A boundary equal to the minimum would leave bin 0 empty: drop it.
        vmin = row[f"min_{t.name}"]
        bins[t.name] = sorted({b for b in raw_bins[t.name] if b > vmin})
        if not bins[t.name]:
            raise ValueError(f"tasks.{t.name}: the training window's values are constant; no bins")
    means: dict[str, float] = {t.name: float(row[f"mean_{t.name}"]) for t in binary}
    # A dwell task's mean [0, 1] target: from its value counts when exact, else one more scan.
    for t in dwell:
        if t.name in exact:
            values, n = exact[t.name]
            idx = np.searchsorted(np.asarray(bins[t.name]), values, side="right")
            means[t.name] = float((idx * n).sum() / n.sum() / len(bins[t.name]))
    rest = [t for t in dwell if t.name not in means]
    if rest:
        bin_aggs = [
            F.avg(
                bin_index(F.col(f"label_{t.name}"), bins[t.name]) / F.lit(len(bins[t.name]))
            ).alias(t.name)
            for t in rest
        ]
        brow = train_rows.agg(*bin_aggs).first()
        means.update({t.name: float(brow[t.name]) for t in rest})
    means = {t.name: means[t.name] for t in spec.tasks}

    art = Artifacts(
        spec_name=spec.name,
        spec_hash=spec_hash(spec),
        train_dates=dates,
        train_rows=n_rows,
        vocab_sizes=vocab_sizes,
        dense=dense,
        bins=bins,
        global_means=means,
        vocab_dir=str(vocab_dir),
        vocabs=vocabs,
    )
    (out_dir / "preprocessing.json").write_text(json.dumps(art.to_json(), indent=2, sort_keys=True))
    return art


def apply(
    spec: FeatureSpec, rows: DataFrame, art: Artifacts, sides: list[SideLookup] | None = None
) -> DataFrame:
    """Map categoricals to indices (OOV = 0), transform dense features, bin dwell labels.

    ``sides``: side tables the rows join for their features. Those are mapped on the table
    itself (a few hundred thousand rows, not one lookup per example and feature: at 10M
    events 5 of the 7 vocabulary joins), then joined: a row the table lacks gets what a
    missing value maps to (OOV, the transformed fill value)."""
    spark = rows.sparkSession
    sides = list(sides or [])
    side_of = {name: side for side in sides for name in side.features}
    tables = vocab_tables(spec)
    schema = T.StructType([*rows.schema.fields, *(f for s in sides for f in s.frame.schema.fields)])
    integral = integral_tables(tables, schema)

    def index(frame: DataFrame, c: str, table: str, target: str) -> DataFrame:
        value = F.col("value").cast("long") if integral[table] else F.col("value")
        path = str(Path(art.vocab_dir) / f"{table}.parquet")
        # its schema from its footer: Spark's inference is a job per file
        known = spark_schema_of([pq.read_schema(path)])
        reader = spark.read if known is None else spark.read.schema(known)
        vocab_df = reader.parquet(path).select(value.alias("_v"), F.col("idx").alias("_idx"))
        if art.vocab_sizes[table] <= BROADCAST_VOCAB_MAX:
            vocab_df = F.broadcast(vocab_df)
        return (
            frame.join(vocab_df, key(c, table) == F.col("_v"), "left")
            .withColumn(target, F.coalesce(F.col("_idx"), F.lit(OOV)).cast("long"))
            .drop("_v", "_idx")
        )

    def dense(f, col: Column) -> Column:
        x = _dense_pre(col, f.transform, f.fill)
        if f.transform in (DenseTransform.STANDARDIZE, DenseTransform.LOG1P_STANDARDIZE):
            s = art.dense[f.name]
            x = (x - F.lit(s.mean)) / F.lit(s.std)
        return x.cast("float")

    def key(c: str, table: str) -> Column:
        # integer columns meet the numbers (a long hash join, no string per row)
        return F.col(c).cast("long") if integral[table] else F.col(c).cast("string")

    out = rows
    for side in sides:
        mine = [(c, t) for t, cols in tables.items() for c in cols if side_of.get(c) is side]
        feats = [f for f in spec.dense_features if side_of.get(f.name) is side]
        frame = side.frame.select(
            "_key",
            *[key(c, t).alias(c) for c, t in mine],
            *[dense(f, F.col(f.name)).alias(f.name) for f in feats],
        )
        on_driver = bool(mine) and len(mine) >= DRIVER_SIDE_MIN_CATEGORICALS
        mapped = _driver_side_map(frame, mine, art) if on_driver else None
        if mapped is None:
            for c, table in mine:
                frame = index(frame, c, table, c)
            mapped = frame
        out = side.join(out, mapped)
        # the rows whose id the table lacks
        out = out.withColumns(
            {c: F.coalesce(F.col(c), F.lit(OOV).cast("long")) for c, _ in mine}
            | {f.name: F.coalesce(F.col(f.name), dense(f, F.lit(None))) for f in feats}
        )
    for table, cols in tables.items():
        for c in cols:
            if c not in side_of:
                out = index(out, c, table, {"user_id": "user_idx", "item_id": "item_idx"}.get(c, c))
    for f in spec.dense_features:
        if f.name not in side_of:
            out = out.withColumn(f.name, dense(f, F.col(f.name)))
    for t in spec.tasks:
        if t.kind == TaskKind.DWELL:
            out = out.withColumn(
                f"label_{t.name}_bin", bin_index(F.col(f"label_{t.name}"), art.bins[t.name])
            )
    return out


def _driver_side_map(
    frame: DataFrame, mine: list[tuple[str, str]], art: Artifacts
) -> DataFrame | None:
    """A side table with its categoricals mapped on the driver, or None where it has more than
    ``DRIVER_SIDE_MAX_ROWS`` rows. ``frame``: the table with each categorical column ``c`` of
    ``mine`` ((column, vocabulary table) pairs) already cast to its lookup key in Spark (long
    or string, as the Spark path joins them) and its dense features transformed, so the
    driver only looks the keys up: an exact match of the same long or string, as the join's;
    a null or unknown key gets OOV."""
    limit = DRIVER_SIDE_MAX_ROWS
    got = frame.limit(limit + 1).toArrow()
    if got.num_rows > limit:
        return None
    columns = {name: got[name] for name in got.column_names}
    for c, table in mine:
        vocab = pq.read_table(Path(art.vocab_dir) / f"{table}.parquet", columns=["value", "idx"])
        keys = columns[c].combine_chunks()
        values = vocab["value"].combine_chunks().cast(keys.type)
        at = pc.index_in(keys, value_set=values, skip_nulls=True)
        idx = pc.take(vocab["idx"].combine_chunks().cast(pa.int64()), at)
        columns[c] = pc.fill_null(idx, OOV)
    mapped = {c for c, _ in mine}
    schema = T.StructType(
        [T.StructField(c, T.LongType()) if c in mapped else frame.schema[c] for c in columns]
    )
    return frame.sparkSession.createDataFrame(pa.table(columns), schema=schema)
