"""Preprocessing fitted on the training window only: vocabularies, dense statistics, dwell bins,
and the pseudo-label fallback means. Stored as JSON + Parquet next to the tables and loaded by
the nightly job, the trainer and the scoring model.

Index 0 of every vocabulary is the reserved OOV index (unknown, rare, or missing values).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from pipelines.spec import DenseTransform, FeatureSpec, TaskKind

OOV = 0
# Dwell bin boundaries are order statistics at exact ranks (`quantile_ranks`), taken from the
# training window's per-value counts when it holds at most this many distinct values (the
# counts come to the driver: 16 bytes a value); with more, from Spark's percentile_approx
# sketch at this accuracy (rank error at most rows / accuracy).
EXACT_QUANTILE_MAX_DISTINCT = 2_000_000
PERCENTILE_ACCURACY = 1_000_000
# Vocabularies up to this size are broadcast to the join (a hash lookup in the JVM per row);
# larger ones are joined by a shuffle.
BROADCAST_VOCAB_MAX = 1_000_000
INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)


@dataclass
class DenseStats:
    mean: float
    std: float


@dataclass
class Artifacts:
    spec_name: str
    spec_hash: str
    train_dates: list[str]
    train_rows: int
    # vocab table name -> size including the OOV row (embedding table rows)
    vocab_sizes: dict[str, int]
    dense: dict[str, DenseStats]
    # dwell task -> bin boundaries (strictly increasing); n_bins = len + 1
    bins: dict[str, list[float]]
    # task -> mean of the task's [0, 1] value on the training window (pseudo-label fallback)
    global_means: dict[str, float]
    vocab_dir: str = ""
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def n_bins(self, task: str) -> int:
        return len(self.bins[task]) + 1

    def target_divisor(self, task: str) -> int:
        """Turns a task's integer value into its [0, 1] target: n_bins - 1 for a dwell task
        (value = bin index), 1 for a binary task."""
        return self.n_bins(task) - 1 if task in self.bins else 1

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("vocabs")
        d.pop("vocab_dir")
        return d


def spec_hash(spec: FeatureSpec) -> str:
    """Fingerprint of what the preprocessing depends on: the spec without its data locations
    (moving the data does not invalidate the fitted vocabularies and bins)."""
    d = spec.model_dump(mode="json")
    d["source"].pop("path")
    for g in ("user", "item"):
        for t in d[g]["tables"]:
            t.pop("path")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def vocab_tables(spec: FeatureSpec) -> dict[str, list[str]]:
    """Embedding/vocabulary table name -> the example columns it indexes."""
    tables: dict[str, list[str]] = {"user_id": ["user_id"], "item_id": ["item_id"]}
    for f in spec.categorical_features:
        tables.setdefault(f.table or f.name, []).append(f.name)
    return tables


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


def dwell_boundaries(
    train_rows: DataFrame,
    tasks: dict[str, int],
    max_distinct: int = EXACT_QUANTILE_MAX_DISTINCT,
) -> dict[str, list[float]]:
    """Raw equal-frequency boundaries of each dwell task's ``label_<task>`` (``tasks``: name ->
    n_bins), before dropping the minimum: exact from one count per distinct value when there
    are at most ``max_distinct`` of them in all, else from percentile_approx.

    The counts are one scan; the sketch, a second one when they are too many. At 10M events
    (194k distinct dwell values) the group-by took 2.3 s where the sketch took 11 s."""
    if not tasks:
        return {}
    pairs = F.explode(
        F.array(
            *[
                F.struct(F.lit(t).alias("task"), F.col(f"label_{t}").cast("double").alias("v"))
                for t in tasks
            ]
        )
    ).alias("p")
    counts = (
        train_rows.select(pairs).select("p.*").where(F.col("v").isNotNull()).groupBy("task", "v")
    ).count()
    got = counts.limit(max_distinct + 1).toArrow()
    if got.num_rows <= max_distinct:
        out = {}
        for t, n_bins in tasks.items():
            mine = got.filter(pc.equal(got["task"], t))
            values = mine["v"].to_numpy()
            n = mine["count"].to_numpy().astype(np.int64)
            out[t] = values_at_ranks(values, n, quantile_ranks(n_bins, int(n.sum())))
        return out
    row = train_rows.agg(
        *[
            F.percentile_approx(
                F.col(f"label_{t}"), [i / n_bins for i in range(1, n_bins)], PERCENTILE_ACCURACY
            ).alias(t)
            for t, n_bins in tasks.items()
        ]
    ).first()
    return {t: [float(b) for b in row[t]] for t in tasks}


def bin_index(col: Column, boundaries: list[float]) -> Column:
    """Number of boundaries <= value: bins [-inf, b0), [b0, b1), ..., [b_last, inf)."""
    expr = F.lit(0)
    for b in boundaries:
        expr = expr + F.when(col >= F.lit(b), 1).otherwise(0)
    return expr.cast("int")


def fit(spec: FeatureSpec, train_rows: DataFrame, out_dir: Path) -> Artifacts:
    """Fit on rows of the training window (joined with side tables, labels in source units).

    ``train_rows`` must already be restricted to the training window; the caller decides it.
    It is scanned five times: the caller should pass a filter of a persisted frame.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_dir = out_dir / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    per_date = {r["date"]: r["count"] for r in train_rows.groupBy("date").count().collect()}
    n_rows = sum(per_date.values())
    if n_rows == 0:
        raise ValueError("the training window holds no accepted rows: check split dates and source")
    dates = sorted(per_date)

    # All vocabularies in one scan: (table, value) pairs exploded, counted per table. A table
    # whose columns are all integers is counted on the numbers (hashing and comparing longs,
    # not strings); values become strings only on the counted pairs.
    tables = vocab_tables(spec)
    integral = integral_tables(tables, train_rows.schema)
    no_num, no_str = F.lit(None).cast("long"), F.lit(None).cast("string")
    pairs = F.explode(
        F.array(
            *[
                F.struct(
                    F.lit(table).alias("tbl"),
                    (F.col(c).cast("long") if integral[table] else no_num).alias("num"),
                    (no_str if integral[table] else F.col(c).cast("string")).alias("str"),
                )
                for table, cols in tables.items()
                for c in cols
            ]
        )
    ).alias("p")
    counts = (
        train_rows.select(pairs)
        .select("p.*")
        .where("num is not null or str is not null")
        .groupBy("tbl", "num", "str")
        .count()
        .select("tbl", F.coalesce("str", F.col("num").cast("string")).alias("value"), "count")
    )
    limits = {t: _vocab_limits(spec, t) for t in tables}
    keep = F.lit(False)
    cap = F.lit(0)
    for t, (max_vocab, min_count) in limits.items():
        keep = keep | ((F.col("tbl") == t) & (F.col("count") >= min_count))
        cap = F.when(F.col("tbl") == t, F.lit(max_vocab)).otherwise(cap)
    # Most frequent first, ties by value: deterministic whatever the partitioning.
    order = Window.partitionBy("tbl").orderBy(F.desc("count"), F.asc("value"))
    ranked = (
        counts.where(keep).withColumn("idx", F.row_number().over(order)).where(F.col("idx") <= cap)
    )
    pdf_all = ranked.toPandas()
    vocab_sizes: dict[str, int] = {}
    vocabs: dict[str, dict[str, int]] = {}
    for table in limits:
        pdf = pdf_all[pdf_all["tbl"] == table]
        pdf = pdf[["value", "idx", "count"]].sort_values("idx").reset_index(drop=True)
        pq.write_table(
            pa.Table.from_pandas(pdf, preserve_index=False), vocab_dir / f"{table}.parquet"
        )
        vocabs[table] = dict(zip(pdf["value"], pdf["idx"].astype(int), strict=True))
        vocab_sizes[table] = len(pdf) + 1

    # Dense statistics, dwell boundaries and minima in one aggregate.
    aggs = []
    for f in spec.dense_features:
        x = _dense_pre(F.col(f.name), f.transform, f.fill)
        aggs += [F.avg(x).alias(f"m_{f.name}"), F.stddev_pop(x).alias(f"s_{f.name}")]
    dwell = [t for t in spec.tasks if t.kind == TaskKind.DWELL]
    aggs += [F.min(f"label_{t.name}").alias(f"min_{t.name}") for t in dwell]
    binary = [t for t in spec.tasks if t.kind == TaskKind.BINARY]
    aggs += [F.avg(F.col(f"label_{t.name}").cast("double")).alias(f"mean_{t.name}") for t in binary]
    row = train_rows.agg(*aggs).first()
    dense: dict[str, DenseStats] = {}
    for f in spec.dense_features:
        std = float(row[f"s_{f.name}"] or 0.0)
        dense[f.name] = DenseStats(
            mean=float(row[f"m_{f.name}"] or 0.0), std=std if std > 1e-12 else 1.0
        )
    bins: dict[str, list[float]] = {}
    raw_bins = dwell_boundaries(train_rows, {t.name: int(t.n_bins or 0) for t in dwell})
    for t in dwell:
        # A boundary equal to the minimum would leave bin 0 empty: drop it.
        vmin = row[f"min_{t.name}"]
        bins[t.name] = sorted({b for b in raw_bins[t.name] if b > vmin})
        if not bins[t.name]:
            raise ValueError(f"tasks.{t.name}: the training window's values are constant; no bins")
    means: dict[str, float] = {t.name: float(row[f"mean_{t.name}"]) for t in binary}
    if dwell:
        bin_aggs = [
            F.avg(
                bin_index(F.col(f"label_{t.name}"), bins[t.name]) / F.lit(len(bins[t.name]))
            ).alias(t.name)
            for t in dwell
        ]
        brow = train_rows.agg(*bin_aggs).first()
        means.update({t.name: float(brow[t.name]) for t in dwell})
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


def load(out_dir: Path, spec: FeatureSpec | None = None, with_vocabs: bool = True) -> Artifacts:
    path = out_dir / "preprocessing.json"
    if not path.exists():
        raise FileNotFoundError(f"no fitted preprocessing at {path}")
    d = json.loads(path.read_text())
    d["dense"] = {k: DenseStats(**v) for k, v in d["dense"].items()}
    art = Artifacts(**d, vocab_dir=str(out_dir / "vocab"))
    if spec is not None and art.spec_hash != spec_hash(spec):
        raise ValueError(
            f"{path} was fitted for a different version of spec {spec.name!r} "
            f"({art.spec_hash} != {spec_hash(spec)}): run a full rebuild (--full) to refit"
        )
    if with_vocabs:
        for table in art.vocab_sizes:
            t = pq.read_table(Path(art.vocab_dir) / f"{table}.parquet", columns=["value", "idx"])
            art.vocabs[table] = dict(zip(t["value"].to_pylist(), t["idx"].to_pylist(), strict=True))
    return art


def apply(spec: FeatureSpec, rows: DataFrame, art: Artifacts) -> DataFrame:
    """Map categoricals to indices (OOV = 0), transform dense features, bin dwell labels."""
    spark = rows.sparkSession
    out = rows
    tables = vocab_tables(spec)
    integral = integral_tables(tables, rows.schema)
    for table, cols in tables.items():
        for c in cols:
            target = {"user_id": "user_idx", "item_id": "item_idx"}.get(c, c)
            value = F.col("value").cast("long") if integral[table] else F.col("value")
            vocab_df = spark.read.parquet(str(Path(art.vocab_dir) / f"{table}.parquet")).select(
                value.alias("_v"), F.col("idx").alias("_idx")
            )
            if art.vocab_sizes[table] <= BROADCAST_VOCAB_MAX:
                vocab_df = F.broadcast(vocab_df)
            # integer columns meet the numbers (a long hash join, no string per row)
            key = F.col(c).cast("long") if integral[table] else F.col(c).cast("string")
            out = (
                out.join(vocab_df, key == F.col("_v"), "left")
                .withColumn(target, F.coalesce(F.col("_idx"), F.lit(OOV)).cast("long"))
                .drop("_v", "_idx")
            )
    for f in spec.dense_features:
        x = _dense_pre(F.col(f.name), f.transform, f.fill)
        if f.transform in (DenseTransform.STANDARDIZE, DenseTransform.LOG1P_STANDARDIZE):
            s = art.dense[f.name]
            x = (x - F.lit(s.mean)) / F.lit(s.std)
        out = out.withColumn(f.name, x.cast("float"))
    for t in spec.tasks:
        if t.kind == TaskKind.DWELL:
            out = out.withColumn(
                f"label_{t.name}_bin", bin_index(F.col(f"label_{t.name}"), art.bins[t.name])
            )
    return out


def check_finite(art: Artifacts) -> None:
    for k, s in art.dense.items():
        if not (math.isfinite(s.mean) and math.isfinite(s.std)):
            raise ValueError(f"dense feature {k}: non-finite statistics {s}")
