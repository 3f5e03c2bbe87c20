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

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from pipelines.spec import DenseTransform, FeatureSpec, TaskKind

OOV = 0
PERCENTILE_ACCURACY = 1_000_000  # exact below 1M distinct ranks, bounded memory above


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

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("vocabs")
        d.pop("vocab_dir")
        return d


def spec_hash(spec: FeatureSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def vocab_tables(spec: FeatureSpec) -> dict[str, list[str]]:
    """Embedding/vocabulary table name -> the example columns it indexes."""
    tables: dict[str, list[str]] = {"user_id": ["user_id"], "item_id": ["item_id"]}
    for f in spec.categorical_features:
        tables.setdefault(f.table or f.name, []).append(f.name)
    return tables


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


def bin_index(col: Column, boundaries: list[float]) -> Column:
    """Number of boundaries <= value: bins [-inf, b0), [b0, b1), ..., [b_last, inf)."""
    expr = F.lit(0)
    for b in boundaries:
        expr = expr + F.when(col >= F.lit(b), 1).otherwise(0)
    return expr.cast("int")


def fit(spec: FeatureSpec, train_rows: DataFrame, out_dir: Path) -> Artifacts:
    """Fit on rows of the training window (joined with side tables, labels in source units).

    ``train_rows`` must already be restricted to the training window; the caller decides it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_dir = out_dir / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    train_rows = train_rows.cache()
    n_rows = train_rows.count()
    if n_rows == 0:
        raise ValueError("the training window holds no accepted rows: check split dates and source")
    dates = sorted(r["date"] for r in train_rows.select("date").distinct().collect())

    vocab_sizes: dict[str, int] = {}
    vocabs: dict[str, dict[str, int]] = {}
    for table, cols in vocab_tables(spec).items():
        max_vocab, min_count = _vocab_limits(spec, table)
        values = None
        for c in cols:
            v = train_rows.select(F.col(c).cast("string").alias("value")).where("value is not null")
            values = v if values is None else values.unionByName(v)
        assert values is not None
        counts = values.groupBy("value").count().where(F.col("count") >= min_count)
        # Most frequent first, ties by value: deterministic whatever the partitioning.
        ranked = counts.withColumn(
            "idx", F.row_number().over(Window.orderBy(F.desc("count"), F.asc("value")))
        ).where(F.col("idx") <= max_vocab)
        pdf = ranked.select("value", "idx", "count").toPandas()
        pq.write_table(
            pa.Table.from_pandas(pdf.sort_values("idx"), preserve_index=False),
            vocab_dir / f"{table}.parquet",
        )
        vocabs[table] = dict(zip(pdf["value"], pdf["idx"].astype(int), strict=True))
        vocab_sizes[table] = len(pdf) + 1

    dense: dict[str, DenseStats] = {}
    for f in spec.dense_features:
        x = _dense_pre(F.col(f.name), f.transform, f.fill)
        row = train_rows.select(F.avg(x).alias("m"), F.stddev_pop(x).alias("s")).first()
        std = float(row["s"] or 0.0)
        dense[f.name] = DenseStats(mean=float(row["m"] or 0.0), std=std if std > 1e-12 else 1.0)

    bins: dict[str, list[float]] = {}
    for t in spec.tasks:
        if t.kind != TaskKind.DWELL:
            continue
        assert t.n_bins is not None
        qs = [i / t.n_bins for i in range(1, t.n_bins)]
        row = train_rows.select(
            F.percentile_approx(F.col(f"label_{t.name}"), qs, PERCENTILE_ACCURACY).alias("q")
        ).first()
        bounds = sorted({float(b) for b in row["q"]})
        # A boundary equal to the minimum would leave bin 0 empty: drop it.
        vmin = train_rows.select(F.min(f"label_{t.name}")).first()[0]
        bins[t.name] = [b for b in bounds if b > vmin]
        if not bins[t.name]:
            raise ValueError(f"tasks.{t.name}: the training window's values are constant; no bins")

    means: dict[str, float] = {}
    for t in spec.tasks:
        if t.kind == TaskKind.BINARY:
            m = train_rows.select(F.avg(F.col(f"label_{t.name}").cast("double"))).first()[0]
        else:
            b = bin_index(F.col(f"label_{t.name}"), bins[t.name])
            m = train_rows.select(F.avg(b / F.lit(len(bins[t.name])))).first()[0]
        means[t.name] = float(m)
    train_rows.unpersist()

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
    for table, cols in vocab_tables(spec).items():
        vocab_df = spark.read.parquet(str(Path(art.vocab_dir) / f"{table}.parquet")).select(
            "value", "idx"
        )
        if art.vocab_sizes[table] <= 200_000:
            vocab_df = F.broadcast(vocab_df)
        for c in cols:
            target = {"user_id": "user_idx", "item_id": "item_idx"}.get(c, c)
            v = vocab_df.withColumnRenamed("value", "_v").withColumnRenamed("idx", "_idx")
            out = (
                out.join(v, F.col(c).cast("string") == F.col("_v"), "left")
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
