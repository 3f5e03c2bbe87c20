"""The feature build: raw log -> validated sessions -> examples, rejected, user state (Delta).

Two modes share every transform:
  * full rebuild: every day of the source in one pass; fits the preprocessing on the training
    window; writes all tables from scratch (the user state snapshot of the last day);
  * nightly (one date D): reads the day (and, for event streams, its neighbours for attribution),
    continues yesterday's user state, and replaces date D's partitions, nothing else.
Running nightly day by day yields exactly the tables of one full rebuild (tested).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import artifacts as arts
from pipelines import delta_io
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.preprocessing import Artifacts, check_finite
from pipelines.preprocessing import load as load_artifacts
from pipelines.progress import spark_progress
from pipelines.running import (
    K_DAY,
    K_FILE,
    K_USER,
    K_W,
    PSEUDO_DAY,
    PSEUDO_TIME,
    KernelPlan,
    KernelSink,
    q_col,
    run_kernel,
    s_col,
    snapshot_states,
)
from pipelines.source import (
    CORRUPT,
    FILE,
    FILE_DATE,
    TALLY_ACTION,
    TALLY_SESSION,
    ValidatedSource,
    action_column,
    as_text,
    index_files,
    local_files,
    open_side_table,
    read_raw,
    run_window,
    sc,
    sessionize,
    validate,
    value_column,
)
from pipelines.spec import EXAMPLE_ID_COLUMNS, FeatureSpec, SourceFormat, TaskKind

log = logging.getLogger("build_features")


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


# --------------------------------------------------------------------------- helpers
def _day_num(date_col: F.Column) -> F.Column:
    return F.datediff(F.to_date(date_col), F.lit("1970-01-01").cast("date"))


def _shift(date: str, days: int) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=days)).isoformat()


SPLITS = ("history", "train", "valid", "test")


def _split_col(spec: FeatureSpec) -> F.Column:
    s = spec.split
    d = F.col("date")
    expr = F.when(d <= F.lit(s.train_end.isoformat()), "train").when(
        d <= F.lit(s.valid_end.isoformat()), "valid"
    )
    expr = expr.otherwise("test")
    if s.train_start:
        expr = F.when(d < F.lit(s.train_start.isoformat()), "history").otherwise(expr)
    return expr


def _in_train(spec: FeatureSpec) -> F.Column:
    cond = F.col("date") <= F.lit(spec.split.train_end.isoformat())
    if spec.split.train_start:
        cond = cond & (F.col("date") >= F.lit(spec.split.train_start.isoformat()))
    return cond


def _label_columns(spec: FeatureSpec) -> dict[str, TaskKind]:
    src = spec.source
    if src.events is None:
        return {t.column: t.kind for t in spec.tasks}
    return {col: TaskKind.DWELL for col in src.events.action_values.values()}


def _order_columns(spec: FeatureSpec) -> list[str]:
    return [f"_tb{i}" for i in range(len(spec.source.tie_break))] + ["example_id"]


# --------------------------------------------------------------------------- reading scope
def read_validated(
    spark: SparkSession, spec: FeatureSpec, cfg: PipelineConfig, date: str | None, now_ms: int
) -> tuple[ValidatedSource, DataFrame]:
    """Validated sessions for the run's scope, and the raw rows that the rows-in invariant
    counts (those of a nightly run's neighbour days carry their file's date)."""
    src = spec.source
    window_s = src.events.attribution_window_s if src.events else 0
    if src.per_date:
        if date is None:
            paths = [src.path.replace("{date}", "*")]
        else:
            days = [date] if src.events is None else [_shift(date, -1), date, _shift(date, 1)]
            paths = [src.path.replace("{date}", d) for d in days]
            paths = [p for p in paths if local_files(p) or "://" in p]
            if src.path.replace("{date}", date) not in paths:
                raise BuildError(
                    f"{src.path.replace('{date}', date)}: no such file or directory (source.path for {date})"
                )
        raws = [read_raw(spark, src, p) for p in paths]
        if len({r.schema for r in raws}) > 1:
            # days whose files type a column differently meet as strings (validation casts)
            raws = [r.select(*[as_text(c) for c in src.columns], CORRUPT, FILE) for r in raws]
        unread = raws[0]
        for r in raws[1:]:
            unread = unread.unionByName(r)
        raw, files = index_files(unread, src.path, src.timezone)
    else:
        unread = read_raw(spark, src)
        raw, files = index_files(unread)
    cache_raw = src.format == SourceFormat.CSV
    if cache_raw:
        # Persisted: the row accounting must count the lines Spark parsed, not re-read them
        # (Parquet and Delta counts come from the files' metadata).
        raw = raw.persist(StorageLevel.MEMORY_AND_DISK)
    # What the row accounting counts: a full run's Parquet or Delta rows straight from the
    # files' metadata (the file index's join would make Spark read them).
    counted = unread if date is None and not cache_raw else raw
    validated = validate(raw, files, src, _label_columns(spec), now_ms, cfg.future_tolerance_s)
    acc, rej, staged = validated.accepted, validated.rejected, validated.staged
    if date is not None:
        # the day itself, yesterday (impressions that today's actions may belong to) and the
        # attribution window after midnight (actions of today's impressions)
        lo = (
            run_window(_shift(date, -1), src.timezone, 0)[0]
            if src.events
            else run_window(date, src.timezone, 0)[0]
        )
        hi = run_window(date, src.timezone, window_s)[1]
        in_run = (F.col("event_time_ms") >= lo) & (F.col("event_time_ms") < hi)
        acc = acc.where(in_run)
        if src.events is None:
            acc = acc.where(F.col("date") == date)
        rej_in_run = F.col("date").isin(date, "unparsed")
        rej = rej.where(rej_in_run)
        if staged is not None:
            ok = F.col("_reason").isNull()
            staged = staged.where((ok & in_run) | (~ok & rej_in_run))
    cached = (*validated.cached, *([raw] if cache_raw else []))
    validated = ValidatedSource(accepted=acc, rejected=rej, staged=staged, cached=cached)
    if src.events is not None:
        validated = sessionize(
            validated, files, src, {date} if date else None, keep=session_columns(spec)
        )
    return validated, counted


def session_columns(spec: FeatureSpec) -> list[str]:
    """The source columns `session_rows` reads from the sessions besides the ids and time: the
    tie-break columns and the features the source itself carries."""
    cols = list(spec.source.tie_break)
    cols += [f.column for f in [*spec.context.categorical, *spec.context.dense]]
    for g in ("user", "item"):
        group = getattr(spec, g)
        if not group.tables:
            cols += [f.column for f in [*group.categorical, *group.dense]]
    return list(dict.fromkeys(cols))


# --------------------------------------------------------------------------- rows
def session_rows(spec: FeatureSpec, accepted: DataFrame) -> DataFrame:
    """Accepted sessions -> ids, time, labels (source units x scale) and the raw values of the
    features the source itself carries (not those of side tables: `side_lookups`)."""
    src = spec.source
    cols = [
        F.col(sc(src.user_id)).alias("user_id"),
        F.col(sc(src.item_id)).alias("item_id"),
        F.col("event_time_ms"),
        F.col("date"),
        F.col("example_id"),
    ]
    cols += [F.col(sc(c)).alias(f"_tb{i}") for i, c in enumerate(src.tie_break)]
    for t in spec.tasks:
        if src.events is None:
            c = F.col(sc(t.column))
        else:
            c = F.col(
                action_column(t.column) if t.kind == TaskKind.BINARY else value_column(t.column)
            )
        if t.kind == TaskKind.BINARY:
            cols.append(c.cast("int").alias(f"label_{t.name}"))
        else:
            cols.append((c.cast("double") * F.lit(t.scale)).alias(f"label_{t.name}"))
    for f in [*spec.context.categorical, *spec.context.dense]:
        cols.append(F.col(sc(f.column)).alias(f.name))
    for g in ("user", "item"):
        group = getattr(spec, g)
        if not group.tables:
            for f in [*group.categorical, *group.dense]:
                cols.append(F.col(sc(f.column)).alias(f.name))
    return accepted.select(*cols)


def side_lookups(spark: SparkSession, spec: FeatureSpec) -> list[arts.SideLookup]:
    """The user and item side tables' features, each keyed by the id the rows join it on.
    Item tables are broadcast; a user table is when Spark finds it small enough."""
    sides = []
    for g, id_col in (("user", "user_id"), ("item", "item_id")):
        group = getattr(spec, g)
        owner = group.column_owner()
        for i, table in enumerate(group.tables):
            feats = [f for f in [*group.categorical, *group.dense] if owner.get(f.column) == i]
            if not feats:
                continue
            frame = _side_table(spark, table).select(
                F.col(table.key).alias("_key"), *[F.col(f.column).alias(f.name) for f in feats]
            )
            sides.append(arts.SideLookup(id_col, frame, broadcast=g == "item"))
    return sides


def wide_rows(spark: SparkSession, spec: FeatureSpec, accepted: DataFrame) -> DataFrame:
    """Accepted sessions -> `session_rows` joined with the side tables' raw feature values."""
    rows = session_rows(spec, accepted)
    for side in side_lookups(spark, spec):
        rows = side.join(rows)
    return rows


_SIDE_CACHE: dict[str, DataFrame] = {}
_SIDE_CHECKS: dict[str, Future[None]] = {}
_SIDE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="side-table-checks")


def _side_table(spark: SparkSession, table) -> DataFrame:
    """Side tables are read and checked once per process (they are small and static). Their
    checks run in the background, beside the build's first jobs: run one after another ahead
    of them, their small single-task jobs took about 4 s at 10M events. `_side_tables_checked`
    waits for them before anything is written."""
    key = table.model_dump_json()
    if key not in _SIDE_CACHE:
        typed, check = open_side_table(spark, table)
        _SIDE_CACHE[key] = typed.cache()
        _SIDE_CHECKS[key] = _SIDE_POOL.submit(check)
    return _SIDE_CACHE[key]


def _side_tables_checked() -> None:
    """Wait for the side tables' checks; a failed table is forgotten (read and checked anew by
    the next build) and its `SourceError` raised."""
    for key, check in list(_SIDE_CHECKS.items()):
        try:
            check.result()
        except BaseException:
            frame = _SIDE_CACHE.pop(key, None)
            if frame is not None:
                frame.unpersist()
            raise
        finally:
            _SIDE_CHECKS.pop(key, None)


def kernel_plan(spec: FeatureSpec, art: Artifacts) -> KernelPlan:
    return KernelPlan(
        tasks=[t.name for t in spec.tasks],
        divisors={t.name: art.target_divisor(t.name) for t in spec.tasks},
        fallback=dict(art.global_means),
        window_days=spec.pseudo_labels.window_days,
        all_history=spec.pseudo_labels.all_history,
        sequences={s.name: s.max_len for s in spec.sequences},
    )


def user_key(user_id: F.Column) -> F.Column:
    """The kernel's and the user state's user key."""
    return F.xxhash64(user_id.cast("string"))


def kernel_keep(spec: FeatureSpec) -> list[str]:
    """Internal kernel columns `user_days` reads after a kernel without a sink."""
    return [K_USER, *[s_col(t.name) for t in spec.tasks], *[q_col(s.name) for s in spec.sequences]]


def with_kernel_columns(spec: FeatureSpec, rows: DataFrame, art: Artifacts) -> DataFrame:
    out = rows.withColumn(K_USER, user_key(F.col("user_id")))
    out = out.withColumn(K_DAY, _day_num(F.col("date"))).withColumn(K_W, F.lit(1).cast("long"))
    for t in spec.tasks:
        out = out.withColumn(s_col(t.name), arts.task_value(spec, t.name, art.bins))
    for s in spec.sequences:
        cond = (
            F.lit(True)
            if s.when is None
            else arts.task_value(spec, s.when.task, art.bins) == F.lit(s.when.equals)
        )
        out = out.withColumn(q_col(s.name), cond)
    return out


# --------------------------------------------------------------------------- state
def state_columns(spec: FeatureSpec) -> list[str]:
    return (
        ["user_key", "user_id", "cnt_all"]
        + [f"sum_{t.name}" for t in spec.tasks]
        + [f"seq_{s.name}" for s in spec.sequences]
    )


def _last(arr: F.Column, n: int) -> F.Column:
    return F.slice(arr, F.greatest(F.size(arr) - F.lit(n - 1), F.lit(1)), F.lit(n))


def user_days(spec: FeatureSpec, rows: DataFrame) -> DataFrame:
    """Per user and day of kernel-column rows, what a kernel with a sink hands back
    (`running.compute_daily`): user_key, date, user_id, cnt, sum_<task> and dseq_<name> (the
    items of the day's last rows the sequence takes, oldest first). For a kernel without a
    sink, whose output is the examples themselves."""
    order = [F.col("event_time_ms"), *[F.col(c) for c in _order_columns(spec)]]
    aggs = [F.first("user_id").alias("user_id"), F.count(F.lit(1)).alias("cnt")]
    aggs += [F.sum(s_col(t.name)).cast("long").alias(f"sum_{t.name}") for t in spec.tasks]
    for s in spec.sequences:
        items = F.collect_list(
            F.when(F.col(q_col(s.name)), F.struct(*order, F.col("item_idx").alias("_item")))
        )
        aggs.append(
            _last(F.transform(F.array_sort(items), lambda x: x["_item"]), s.max_len).alias(
                f"dseq_{s.name}"
            )
        )
    return rows.groupBy(F.col(K_USER).alias("user_key"), F.col("date")).agg(*aggs)


# A state date after every day: the state of all the rows of `user_days` rows.
_AFTER_ALL_DAYS = "9999-12-31"


def update_state(spec: FeatureSpec, old: DataFrame | None, days: DataFrame) -> DataFrame:
    """User state after ``days`` (`user_days` rows of one or more days) on top of ``old``."""
    today = state_snapshots(spec, days, [_AFTER_ALL_DAYS]).drop("state_date")
    if old is None:
        return today
    today = today.select("user_key", *[F.col(c).alias(f"n_{c}") for c in today.columns[1:]])
    j = old.join(today, "user_key", "full_outer")
    z = F.lit(0).cast("long")
    sel = [
        F.col("user_key"),
        F.coalesce("n_user_id", "user_id").alias("user_id"),
        (F.coalesce("cnt_all", z) + F.coalesce("n_cnt_all", z)).alias("cnt_all"),
    ]
    sel += [
        (F.coalesce(f"sum_{t.name}", z) + F.coalesce(f"n_sum_{t.name}", z))
        .cast("long")
        .alias(f"sum_{t.name}")
        for t in spec.tasks
    ]
    empty = F.array().cast(T.ArrayType(T.LongType()))
    for s in spec.sequences:
        both = F.concat(F.coalesce(f"seq_{s.name}", empty), F.coalesce(f"n_seq_{s.name}", empty))
        sel.append(_last(both, s.max_len).alias(f"seq_{s.name}"))
    return j.select(*sel)


def state_snapshots(spec: FeatureSpec, days: DataFrame, dates: list[str]) -> DataFrame:
    """The user state at the end of each of ``dates`` (a ``state_date`` column) from `user_days`
    rows, in one aggregation (`update_state` combines a run's days with it). Each user's days
    are collected once, sorted by date, and each snapshot combines those up to its date (an
    aggregation per snapshot took 6 s at 10M events, a chain of `update_state` joins 11 s)."""
    fields = ["date", "cnt", *[f"sum_{t.name}" for t in spec.tasks]]
    fields += [f"dseq_{s.name}" for s in spec.sequences]
    per_user = days.groupBy("user_key").agg(
        F.first("user_id").alias("user_id"),
        F.array_sort(F.collect_list(F.struct(*fields))).alias("_days"),
    )
    rows = per_user.select(
        "user_key", "user_id", "_days", F.explode(F.array(*map(F.lit, dates))).alias("state_date")
    )
    # The days up to the snapshot as a column of their own: filtered once, not once for each
    # column that reads them (Spark does not merge projections that would repeat it).
    rows = rows.select(
        "user_key",
        "user_id",
        "state_date",
        F.filter("_days", lambda d: d["date"] <= F.col("state_date")).alias("_upto"),
    ).where(F.size("_upto") > 0)
    upto = F.col("_upto")

    def total(field: str) -> Column:
        return F.aggregate(upto, F.lit(0).cast("long"), lambda acc, d: acc + d[field])

    def items(field: str) -> Column:
        return F.flatten(F.transform(upto, lambda d: d[field]))

    sel = [F.col("user_key"), F.col("user_id"), total("cnt").alias("cnt_all")]
    sel += [total(f"sum_{t.name}").alias(f"sum_{t.name}") for t in spec.tasks]
    sel += [
        _last(items(f"dseq_{s.name}"), s.max_len).alias(f"seq_{s.name}") for s in spec.sequences
    ]
    return rows.select(*sel, "state_date")


def kernel_state_snapshots(
    spec: FeatureSpec, plan: KernelPlan, days: DataFrame, dates: list[str]
) -> DataFrame:
    """`state_snapshots` of the user-day rows a kernel with a sink hands back, computed in the
    kernel's own partitions (`running.snapshot_states`): each holds every day of its users,
    so no shuffle is needed. At 10M events the aggregation took 7 s, mostly Spark's
    interpreted higher-order functions over each user's days."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = state_snapshots(spec, days, dates).schema
    arrow_schema = to_arrow_schema(schema)

    def snapshots(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        got = list(batches)
        if got:
            states = snapshot_states(pa.Table.from_batches(got), dates, plan)
            yield from states.select(arrow_schema.names).cast(arrow_schema).to_batches()

    return days.mapInArrow(snapshots, schema)


def daily_aggregates(spec: FeatureSpec, days: DataFrame) -> DataFrame:
    """The user_daily table's rows: `user_days` without the sequences."""
    return days.select("user_key", "date", "user_id", "cnt", *[f"sum_{t.name}" for t in spec.tasks])


def pseudo_rows(
    spec: FeatureSpec, state: DataFrame, daily: DataFrame, users: DataFrame
) -> DataFrame:
    """Yesterday's user state as rows the kernel sorts before the day's events (see running)."""
    state = state.join(users, "user_key", "left_semi")
    daily = daily.join(users, "user_key", "left_semi")
    z = F.lit(0).cast("long")
    tasks = [t.name for t in spec.tasks]
    frames = []
    win = daily.groupBy("user_key").agg(
        F.sum("cnt").alias("w_cnt"), *[F.sum(f"sum_{t}").alias(f"w_{t}") for t in tasks]
    )
    agg = state.join(win, "user_key", "left").select(
        F.col("user_key").alias(K_USER),
        F.lit(PSEUDO_TIME + 1_000_000).cast("long").alias("event_time_ms"),
        F.lit(PSEUDO_DAY).alias(K_DAY),
        (F.col("cnt_all") - F.coalesce("w_cnt", z)).alias(K_W),
        *[(F.col(f"sum_{t}") - F.coalesce(f"w_{t}", z)).alias(s_col(t)) for t in tasks],
    )
    frames.append(agg)
    frames.append(
        daily.select(
            F.col("user_key").alias(K_USER),
            (F.lit(PSEUDO_TIME + 2_000_000) + _day_num(F.col("date")))
            .cast("long")
            .alias("event_time_ms"),
            _day_num(F.col("date")).alias(K_DAY),
            F.col("cnt").alias(K_W),
            *[F.col(f"sum_{t}").alias(s_col(t)) for t in tasks],
        )
    )
    for s in spec.sequences:
        ex = state.select(F.col("user_key"), F.posexplode(f"seq_{s.name}").alias("pos", "item"))
        frames.append(
            ex.select(
                F.col("user_key").alias(K_USER),
                (F.lit(PSEUDO_TIME) + F.col("pos")).cast("long").alias("event_time_ms"),
                F.lit(PSEUDO_DAY).alias(K_DAY),
                z.alias(K_W),
                *[z.alias(s_col(t)) for t in tasks],
                F.lit(True).alias(q_col(s.name)),
                F.col("item").alias("item_idx"),
            )
        )
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f, allowMissingColumns=True)
    for s in spec.sequences:
        out = out.withColumn(q_col(s.name), F.coalesce(F.col(q_col(s.name)), F.lit(False)))
    return out


# --------------------------------------------------------------------------- the build
def example_columns(spec: FeatureSpec, plan: KernelPlan) -> list[str]:
    cols = list(EXAMPLE_ID_COLUMNS)
    cols += [f.name for f in spec.categorical_features] + [f.name for f in spec.dense_features]
    for t in spec.tasks:
        cols.append(f"label_{t.name}")
        if t.kind == TaskKind.DWELL:
            cols.append(f"label_{t.name}_bin")
    cols += [f.name for f in plan.output_fields()]
    return cols


def fit_artifacts(
    spark: SparkSession,
    spec: FeatureSpec,
    cfg: PipelineConfig,
    tables: Tables,
    now_ms: int,
    rows: DataFrame | None = None,
    row_stats: dict[str, float | None] | None = None,
) -> Artifacts:
    """Fit on the training window of ``rows`` (`session_rows` of every day) and the side
    tables, or of the whole source; ``row_stats``: `arts.fit`'s, computed by the caller."""
    cached: tuple[DataFrame, ...] = ()
    if rows is None:
        validated, _ = read_validated(spark, spec, cfg, None, now_ms)
        rows = session_rows(spec, validated.accepted)
        train = rows.where(_in_train(spec)).persist(StorageLevel.MEMORY_AND_DISK)
        cached = (*validated.cached, train)
    else:
        train = rows.where(_in_train(spec))
    log.info("fitting vocabularies, dense statistics and dwell bins on the training window")
    try:
        return arts.fit(spec, train, tables.artifacts, side_lookups(spark, spec), row_stats)
    finally:
        for frame in cached:
            frame.unpersist()


def build(
    spark: SparkSession,
    spec: FeatureSpec,
    cfg: PipelineConfig,
    *,
    date: str | None = None,
    now_ms: int | None = None,
) -> dict:
    """Run the build: ``date=None`` is a full rebuild, otherwise the nightly run for that date.
    Returns the run's summary (also written to ``summaries/<date|full>.json``)."""
    with spark_progress(spark, f"build {date or 'full'}"):
        return _build(spark, spec, cfg, date=date, now_ms=now_ms)


def _build(
    spark: SparkSession,
    spec: FeatureSpec,
    cfg: PipelineConfig,
    *,
    date: str | None,
    now_ms: int | None,
) -> dict:
    t0 = time.time()
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    tables = Tables.for_spec(cfg.lake, spec)
    tables.root.mkdir(parents=True, exist_ok=True)
    writer = cfg.delta.writer
    mode = "full" if date is None else f"date {date}"
    log.info("build %s for spec %s into %s", mode, spec.name, tables.root)

    # A nightly run continues yesterday's state: check the chain before any heavy work.
    old_state = _previous_state(spark, spec, tables, date, writer) if date is not None else None
    # The side tables' checks start first: their jobs run while the driver plans the rest.
    for table in [*spec.user.tables, *spec.item.tables]:
        _side_table(spark, table)

    validated, _raw = read_validated(spark, spec, cfg, date, now_ms)
    # Both read a persisted frame (validation's, or the sessions'). Without a tally the few
    # rejected rows are persisted on their own, as three jobs read them; with one, only their
    # write does.
    rejected = validated.rejected
    if validated.tally is None:
        rejected = rejected.persist(StorageLevel.MEMORY_AND_DISK)
    # The stats job counts the sessions and gathers the summary's example statistics: these
    # rows are the run's examples, which the kernel does not hand back. The side tables join
    # the rows only where the features are applied (once, before the kernel): the stats and
    # the fit read the sessions alone (`arts.fit` weighs the side tables' values by each id's
    # count of rows).
    sessions = session_rows(spec, validated.accepted)
    # A full run's fit takes its dense statistics and label means from this job too (a scan of
    # the 7.7M cached sessions less at 10M events, 2.5 s).
    sides = side_lookups(spark, spec)
    fit_aggs: dict[str, Column] = {}
    if date is None:
        side_features = {name for side in sides for name in side.features}
        fit_aggs = arts.row_aggregates(spec, side_features, where=_in_train(spec))
    stats = _example_stats(
        spec, sessions, [agg.alias(f"_fit_{name}") for name, agg in fit_aggs.items()]
    )
    _side_tables_checked()
    reasons, n_actions = _tally(validated, rejected)
    n_acc, n_rej = stats["_rows"], sum(reasons.values())
    log.info("validated: %d sessions accepted, %d rows rejected", n_acc, n_rej)
    if date is None:
        row_stats = {name: stats[f"_fit_{name}"] for name in fit_aggs}
        art = fit_artifacts(spark, spec, cfg, tables, now_ms, sessions, row_stats)
    else:
        try:
            # the build joins the vocabulary files; their Python dicts are for serving
            art = load_artifacts(tables.artifacts, spec, with_vocabs=False)
        except FileNotFoundError:
            log.info("no fitted preprocessing yet: fitting it from the source's training window")
            art = fit_artifacts(spark, spec, cfg, tables, now_ms)
    check_finite(art)
    plan = kernel_plan(spec, art)

    if date is not None and n_acc == 0 and not cfg.allow_empty_day:
        raise BuildError(
            f"no accepted rows for {date} in {spec.source.path} ({n_rej} rejected): an empty day is "
            "usually an upstream failure; set allow_empty_day=true to record it as empty"
        )

    # Not persisted: the rows go once through the kernel's shuffle; its output is persisted
    # and every table and the summary read it.
    rows = arts.apply(spec, sessions, art, sides)
    rows = with_kernel_columns(spec, rows, art)
    rows = rows.withColumn("split", _split_col(spec))
    pseudo = None
    if date is not None:
        if old_state is not None:
            users = sessions.select(user_key(F.col("user_id")).alias("user_key")).distinct()
            pseudo = pseudo_rows(
                spec, old_state, _window_daily(spark, spec, tables, date, writer), users
            )

    # With delta-rs the kernel task writes the examples' files itself (see running.KernelSink)
    # and hands back only its rows per user and day, which the daily aggregates and the user
    # state are made of; delta-spark writes the examples from the kernel's full output, and
    # the user-day rows are aggregated from it.
    examples_cols = example_columns(spec, plan)
    sink = None
    if writer == "delta-rs":
        full = T.StructType([*rows.schema.fields, *plan.output_fields()])
        target = delta_io.write_target(
            tables.examples, T.StructType([full[c] for c in examples_cols]), ["date"]
        )
        sink = KernelSink(target)
    out = run_kernel(
        rows,
        pseudo,
        plan,
        _order_columns(spec),
        cfg.spark.user_partitions,
        kernel_keep(spec) if sink is None else None,
        sink,
    ).persist(StorageLevel.MEMORY_AND_DISK)
    n_out = out.count()
    files: list[dict] = []
    n_task_files = 0
    if sink is not None:
        files = [
            json.loads(r[0]) for r in out.where(F.col(K_FILE).isNotNull()).select(K_FILE).collect()
        ]
        n_task_files = len(files)
        if cfg.delta.merge_files_below_mb > 0:
            files = delta_io.merge_small_files(
                sink.target,
                files,
                small_bytes=int(cfg.delta.merge_files_below_mb * 2**20),
                target_bytes=int(cfg.delta.target_file_mb * 2**20),
                spark=spark,
            )
        days = out.where(F.col(K_FILE).isNull()).drop(K_FILE)
        log.info(
            "running features of %d rows at %.1fs: %d examples files (%d as the tasks wrote "
            "them), %d user-day rows",
            n_acc,
            time.time() - t0,
            len(files),
            n_task_files,
            n_out - n_task_files,
        )
    else:
        days = user_days(spec, out).persist(StorageLevel.MEMORY_AND_DISK)
        log.info("running features of %d rows at %.1fs", n_out, time.time() - t0)
    info = {"run": mode}
    # The user-day rows (a few per user and day) and the rejected rows are small: written by
    # as many tasks as the kernel has, they made a file per task and date, and a nightly
    # run's read of the pseudo-label window (29 days x 4 files in the benchmark) a Spark
    # listing job of its own (above 32 paths).
    n_days = n_out - n_task_files if sink is not None else None
    daily = _few_files(daily_aggregates(spec, days), n_days)
    rejected_rows = _few_files(rejected, n_rej)

    def write_examples(replace: dict[str, list[str]] | None) -> None:
        if sink is not None:
            delta_io.commit_files(
                sink.target, files, mode="overwrite", replace_partitions=replace, commit_info=info
            )
            return
        delta_io.write_delta(
            out.select(*examples_cols),
            tables.examples,
            partition_by=["date"],
            mode="overwrite",
            replace_partitions=replace,
            sort_within=["user_id", "event_time_ms", "example_id"],
            writer=writer,
            commit_info=info,
        )

    # Writes: examples, rejected, daily aggregates, user state.
    if date is None:
        dates = sorted(r["date"] for r in days.select("date").distinct().collect())
        write_examples(None)
        delta_io.write_delta(
            rejected_rows,
            tables.rejected,
            partition_by=["date"],
            mode="overwrite",
            writer=writer,
            commit_info=info,
        )
        delta_io.write_delta(
            daily,
            tables.user_daily,
            partition_by=["date"],
            mode="overwrite",
            writer=writer,
            commit_info=info,
        )
        snapshot_dates = dates[-cfg.full_state_snapshots :]
        state = (
            kernel_state_snapshots(spec, plan, days, snapshot_dates)
            if sink is not None
            else state_snapshots(spec, days, snapshot_dates)
        )
        _write_chain_start(tables, dates[0])
        delta_io.write_delta(
            state,
            tables.user_state,
            partition_by=["state_date"],
            mode="overwrite",
            writer=writer,
            commit_info=info,
        )
    else:
        dates = [date]
        rep = {"date": [date]}
        write_examples(rep)
        rej_dates = [date] + (["unparsed"] if not spec.source.per_date else [])
        delta_io.write_delta(
            rejected_rows.where(F.col("date").isin(rej_dates)),
            tables.rejected,
            partition_by=["date"],
            mode="overwrite",
            replace_partitions={"date": rej_dates},
            writer=writer,
            commit_info=info,
        )
        delta_io.write_delta(
            daily,
            tables.user_daily,
            partition_by=["date"],
            mode="overwrite",
            replace_partitions=rep,
            writer=writer,
            commit_info=info,
        )
        state = update_state(spec, old_state, days).withColumn("state_date", F.lit(date))
        delta_io.write_delta(
            state,
            tables.user_state,
            partition_by=["state_date"],
            mode="overwrite",
            replace_partitions={"state_date": [date]},
            writer=writer,
            commit_info=info,
        )
        _retain_states(tables, date, cfg.state_retention_days)
        _warn_later_dates(tables, date)

    log.info("tables written at %.1fs", time.time() - t0)
    rows_in = _rows_in(spec, _raw, date)
    if rows_in is not None and rows_in != n_acc + n_actions + n_rej:
        raise BuildError(
            f"row accounting broken for {mode}: {rows_in} rows in, {n_acc} sessions + {n_actions} "
            f"attributed actions accepted, {n_rej} rejected"
        )
    summary = _summary(
        spec,
        tables,
        art,
        mode,
        dates,
        reasons,
        n_acc,
        n_actions,
        n_rej,
        rows_in,
        stats,
        days,
        time.time() - t0,
    )
    for frame in (*validated.cached, rejected, out, days):
        frame.unpersist()
    return summary


# Rows of a small table per file: user-day and rejected rows are a few dozen bytes each.
SMALL_TABLE_ROWS_PER_FILE = 2_000_000


def _few_files(df: DataFrame, rows: int | None) -> DataFrame:
    """``df`` in as few partitions as its ``rows`` fill at `SMALL_TABLE_ROWS_PER_FILE`;
    unchanged where the count is not known. A shuffle of the few rows, not a coalesce: that
    would scan the whole frame they are filtered from (the cached events) in one task."""
    if rows is None:
        return df
    return df.repartition(max(1, -(-rows // SMALL_TABLE_ROWS_PER_FILE)))


def _chain_file(tables: Tables) -> Path:
    return tables.root / "chain.json"


def _write_chain_start(tables: Tables, first_date: str) -> None:
    _chain_file(tables).write_text(json.dumps({"first_date": first_date}))


def _previous_state(
    spark: SparkSession, spec: FeatureSpec, tables: Tables, date: str, writer: str
) -> DataFrame | None:
    """Yesterday's user state; None only where the chain starts (no history before it)."""
    chain = _chain_file(tables)
    first = json.loads(chain.read_text())["first_date"] if chain.exists() else None
    if first is None or date <= first:
        if first is None or date < first:
            _write_chain_start(tables, date)
        log.info("%s starts the nightly chain: no history before it", date)
        return None
    prev = _shift(date, -1)
    have = (
        delta_io.partition_values(tables.user_state, "state_date")
        if delta_io.table_exists(tables.user_state)
        else []
    )
    if prev not in have:
        earlier = [d for d in have if d < date]
        latest = earlier[-1] if earlier else "none"
        raise BuildError(
            f"user_state has no snapshot for {prev} (latest before {date}: {latest}; the chain "
            f"starts {first}): run the missing dates in order, or rebuild with --full"
        )
    return delta_io.read_delta(
        spark, tables.user_state, partitions={"state_date": [prev]}, writer=writer
    ).drop("state_date")


def _window_daily(
    spark: SparkSession, spec: FeatureSpec, tables: Tables, date: str, writer: str
) -> DataFrame:
    w = spec.pseudo_labels.window_days
    cols = ["user_key", "date", "cnt"] + [f"sum_{t.name}" for t in spec.tasks]
    if w is None or w == 1 or not delta_io.table_exists(tables.user_daily):
        schema = T.StructType(
            [
                T.StructField("user_key", T.LongType()),
                T.StructField("date", T.StringType()),
                T.StructField("cnt", T.LongType()),
            ]
            + [T.StructField(f"sum_{t.name}", T.LongType()) for t in spec.tasks]
        )
        return spark.createDataFrame([], schema)
    days = [_shift(date, -k) for k in range(1, w)]
    return delta_io.read_delta(
        spark, tables.user_daily, partitions={"date": days}, writer=writer
    ).select(*cols)


def _retain_states(tables: Tables, date: str, keep: int) -> None:
    old = [
        d
        for d in delta_io.partition_values(tables.user_state, "state_date")
        if d <= _shift(date, -keep)
    ]
    if old:
        delta_io.delete_partitions(tables.user_state, "state_date", old)


def _warn_later_dates(tables: Tables, date: str) -> None:
    later = [d for d in delta_io.partition_values(tables.examples, "date") if d > date]
    if later:
        log.warning(
            "re-ran %s while later dates exist (%s..%s): they were built from the old %s state; "
            "re-run them in order if this date's input changed",
            date,
            later[0],
            later[-1],
            date,
        )


def _rows_in(spec: FeatureSpec, raw: DataFrame, date: str | None) -> int | None:
    """Raw rows in the run's scope, counted independently of validation; None when the scope of
    a nightly run over a single all-days file is only known after parsing the time column."""
    if date is None:
        return raw.count()
    if spec.source.per_date:
        return raw.where(F.col(FILE_DATE) == date).count()
    return None


def _tally(validated: ValidatedSource, rejected: DataFrame) -> tuple[dict[str, int], int]:
    """The rejected rows by reason, and the attributed actions: one job over the persisted
    rows where the source has a tally (events: a job less for the actions, and the rejected
    rows need not be persisted for their count), else a count of each."""
    if validated.tally is not None:
        counts = {r["what"]: r["count"] for r in validated.tally.groupBy("what").count().collect()}
        counts.pop(TALLY_SESSION, None)
        return counts, counts.pop(TALLY_ACTION, 0)
    reasons = {r["reason"]: r["count"] for r in rejected.groupBy("reason").count().collect()}
    return reasons, validated.actions.count() if validated.actions is not None else 0


def _example_stats(spec: FeatureSpec, sessions: DataFrame, extra: list[Column]) -> Row:
    """One job over the run's examples (before the kernel): their count, distinct items, label
    rates and split sizes, and the ``extra`` aggregates (a full run's fit statistics)."""
    split = _split_col(spec)
    return sessions.agg(
        F.count(F.lit(1)).alias("_rows"),
        F.countDistinct("item_id").alias("items"),
        *[F.avg(F.col(f"label_{t.name}").cast("double")).alias(t.name) for t in spec.tasks],
        *[F.count_if(split == s).alias(f"_split_{s}") for s in SPLITS],
        *extra,
    ).first()


def _summary(
    spec: FeatureSpec,
    tables: Tables,
    art: Artifacts,
    mode: str,
    dates: list[str],
    reasons: dict[str, int],
    n_acc: int,
    n_actions: int,
    n_rej: int,
    rows_in: int | None,
    stats: Row,
    days: DataFrame,
    seconds: float,
) -> dict:
    users = days.agg(F.countDistinct("user_id")).first()[0]
    n_rows = stats["_rows"]
    splits = {s: stats[f"_split_{s}"] for s in SPLITS if stats[f"_split_{s}"]}
    summary = {
        "spec": spec.name,
        "run": mode,
        "dates": dates if len(dates) <= 3 else [dates[0], "...", dates[-1]],
        "n_dates": len(dates),
        "rows_in": rows_in if rows_in is not None else n_acc + n_actions + n_rej,
        "rows_in_counted_independently": rows_in is not None,
        "rows_accepted": n_acc + n_actions,
        "sessions": n_acc,
        "actions_attributed": n_actions,
        "rows_rejected": n_rej,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "examples": n_rows,
        "examples_by_split": splits,
        "users": users,
        "items": stats["items"],
        "label_rates": {t.name: stats[t.name] for t in spec.tasks},
        "bin_boundaries": art.bins,
        "vocab_sizes": art.vocab_sizes,
        "tables": {
            "examples": {
                "path": tables.examples,
                "version": delta_io.table_version(tables.examples),
            },
            "rejected": {
                "path": tables.rejected,
                "version": delta_io.table_version(tables.rejected),
            },
            "user_state": {
                "path": tables.user_state,
                "version": delta_io.table_version(tables.user_state),
            },
            "user_daily": {
                "path": tables.user_daily,
                "version": delta_io.table_version(tables.user_daily),
            },
        },
        "seconds": round(seconds, 1),
    }
    tables.summaries.mkdir(parents=True, exist_ok=True)
    name = "full" if mode == "full" else dates[0]
    (tables.summaries / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info(
        "summary: %s",
        json.dumps(
            {
                k: summary[k]
                for k in ("rows_in", "rows_accepted", "rows_rejected", "examples", "users")
            }
        ),
    )
    return summary
