"""Running per-user features over strictly earlier events: pseudo-labels, counts, sequences.

For an event e of user u at time t on day D:
  * ``n_prev_all`` / ``pl_all_<task>``: count and mean task value of u's events with time < t;
  * ``n_prev`` / ``pl_<task>``: the same over the W calendar days D-W+1 .. D (W = window_days;
    all history when the spec has no window);
  * ``seq_<name>``: item indices of u's last L events with time < t that match the sequence's
    filter, oldest first.
Events at the same timestamp are not earlier than each other. With no history the mean falls
back to the training window's global mean (``n_prev = 0`` tells the trainer so).

One kernel serves the full rebuild and the nightly run. The nightly run feeds yesterday's user
state in as *pseudo-rows* that sort before the day's events: one row per stored sequence item
(weight 0), one aggregate row for history older than the window, and one row per window day
from the daily aggregates. Integer sums keep both paths bit-identical.

The kernel runs inside ``mapInArrow`` on partitions hash-partitioned and grouped by user; it
sorts each group of whole users by (user, time, tie-break) with Arrow and is vectorised numpy,
so its cost is O(n log n) per partition with no per-row Python. With a :class:`KernelSink` the
kernel task also writes the examples' Parquet files itself and hands back to Spark only one row
per user and day (counts, task sums, the day's last sequence items: what the daily aggregates
and the user state are made of), plus one metadata row per file: the examples then never
travel back from Python to the JVM, nor through a shuffle for the write or the state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.delta_io import TaskFileWriter, WriteTarget

PSEUDO_TIME = -(2**62)
PSEUDO_DAY = -1_000_000_000
DAY_OFFSET = 2_000_000_000
DAY_KEY = 2**32

# Internal kernel columns (dropped from the output).
K_USER, K_REAL, K_DAY, K_W = "_k_user", "_k_real", "_k_day", "_k_w"
# With a sink: the JSON metadata of one written file (null on the data rows).
K_FILE = "_k_file"


def s_col(task: str) -> str:
    return f"_k_s_{task}"


def q_col(seq: str) -> str:
    return f"_k_q_{seq}"


@dataclass(frozen=True)
class KernelPlan:
    tasks: list[str]
    # task -> divisor turning the integer value into a [0, 1] mean (1 or n_bins - 1)
    divisors: dict[str, int]
    fallback: dict[str, float]
    window_days: int | None
    all_history: bool
    sequences: dict[str, int]  # name -> max_len

    def output_fields(self) -> list[T.StructField]:
        fields = [T.StructField("n_prev", T.LongType(), False)]
        fields += [T.StructField(f"pl_{t}", T.DoubleType(), False) for t in self.tasks]
        if self.window_days is not None and self.all_history:
            fields.append(T.StructField("n_prev_all", T.LongType(), False))
            fields += [T.StructField(f"pl_all_{t}", T.DoubleType(), False) for t in self.tasks]
        fields += [
            T.StructField(f"seq_{s}", T.ArrayType(T.LongType(), False), False)
            for s in self.sequences
        ]
        return fields

    @property
    def internal_columns(self) -> list[str]:
        return (
            [K_USER, K_REAL, K_DAY, K_W]
            + [s_col(t) for t in self.tasks]
            + [q_col(s) for s in self.sequences]
        )


def _starts(flags: np.ndarray) -> np.ndarray:
    """For each position, the index of the last True at or before it (flags[0] must be True)."""
    idx = np.where(flags, np.arange(flags.size), 0)
    return np.maximum.accumulate(idx)


def compute(cols: dict[str, np.ndarray], plan: KernelPlan) -> dict[str, np.ndarray | pa.Array]:
    """Running features for rows sorted by (user, time, ...), all rows of each user present.

    Args:
        cols: K_USER, "event_time_ms", K_DAY, K_W, K_REAL, s_col(task), q_col(seq), "item_idx".
    Returns:
        output columns for the rows where K_REAL is true, in input order.
    """
    user = cols[K_USER]
    time = cols["event_time_ms"]
    n = user.size
    real = cols[K_REAL].astype(bool)
    out_idx = np.flatnonzero(real)
    if n == 0:
        return {f.name: np.empty(0) for f in plan.output_fields()}
    new_user = np.empty(n, dtype=bool)
    new_user[0] = True
    np.not_equal(user[1:], user[:-1], out=new_user[1:])
    new_tie = new_user.copy()
    new_tie[1:] |= time[1:] != time[:-1]
    ustart = _starts(new_user)
    tstart = _starts(new_tie)

    w = cols[K_W].astype(np.int64)
    cw = np.concatenate([[0], np.cumsum(w)])
    sums = {
        t: np.concatenate([[0], np.cumsum(cols[s_col(t)].astype(np.int64))]) for t in plan.tasks
    }

    def means(lo: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        hi = tstart[out_idx]
        cnt = cw[hi] - cw[lo]
        res = {}
        for t in plan.tasks:
            s = sums[t][hi] - sums[t][lo]
            with np.errstate(invalid="ignore", divide="ignore"):
                m = s / (cnt * plan.divisors[t])
            res[t] = np.where(cnt > 0, m, plan.fallback[t])
        return cnt, res

    out: dict[str, np.ndarray | pa.Array] = {}
    n_all, pl_all = means(ustart[out_idx])
    if plan.window_days is None:
        out["n_prev"] = n_all
        for t in plan.tasks:
            out[f"pl_{t}"] = pl_all[t]
    else:
        rank = np.cumsum(new_user) - 1
        day = cols[K_DAY].astype(np.int64)
        key = rank * DAY_KEY + (day + DAY_OFFSET)
        query = rank[out_idx] * DAY_KEY + (day[out_idx] - plan.window_days + 1 + DAY_OFFSET)
        wstart = np.searchsorted(key, query, side="left")
        n_win, pl_win = means(wstart)
        out["n_prev"] = n_win
        for t in plan.tasks:
            out[f"pl_{t}"] = pl_win[t]
        if plan.all_history:
            out["n_prev_all"] = n_all
            for t in plan.tasks:
                out[f"pl_all_{t}"] = pl_all[t]

    item = cols["item_idx"].astype(np.int64) if plan.sequences else None
    for name, max_len in plan.sequences.items():
        taken = np.flatnonzero(cols[q_col(name)].astype(bool))
        out[f"seq_{name}"] = _last_items(taken, item, ustart[out_idx], tstart[out_idx], max_len)
    return out


def _last_items(
    taken: np.ndarray, item: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_len: int
) -> pa.Array:
    """Per range [lo_i, hi_i) of row positions, the items of its last ``max_len`` rows in
    ``taken`` (sorted row positions), oldest first: a list<int64> array of len(lo)."""
    first = np.searchsorted(taken, lo, side="left")
    end = np.searchsorted(taken, hi, side="left")
    start = np.maximum(first, end - max_len)
    lengths = end - start
    offsets = np.zeros(lo.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    pos = np.repeat(start - offsets[:-1], lengths) + np.arange(total)
    values = item[taken[pos]] if total else np.empty(0, dtype=np.int64)
    return pa.LargeListArray.from_arrays(
        pa.array(offsets, pa.int64()), pa.array(values, pa.int64())
    ).cast(pa.list_(pa.field("element", pa.int64(), nullable=False)))


def daily_fields(plan: KernelPlan) -> list[T.StructField]:
    """The kernel's per user-day columns after ``user_key``, ``date`` and ``user_id``."""
    fields = [T.StructField("cnt", T.LongType(), False)]
    fields += [T.StructField(f"sum_{t}", T.LongType(), False) for t in plan.tasks]
    fields += [
        T.StructField(f"dseq_{s}", T.ArrayType(T.LongType(), False), False) for s in plan.sequences
    ]
    return fields


def compute_daily(
    cols: dict[str, np.ndarray], plan: KernelPlan
) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array]]:
    """Per (user, day) of the real rows, for rows sorted by (user, time, ...): the row count
    ``cnt``, the task sums ``sum_<task>`` and, per sequence, ``dseq_<name>``: the items of the
    day's last max_len rows it takes, oldest first (the user state is these days combined).

    Returns the position of each user-day's first row (to take its ids from) and the columns.
    A user's days are contiguous as the kernel's window already requires (day grows with
    time)."""
    real = np.flatnonzero(cols[K_REAL].astype(bool))
    user, day = cols[K_USER][real], cols[K_DAY][real]
    m = real.size
    new_day = np.ones(m, dtype=bool)
    new_day[1:] = (user[1:] != user[:-1]) | (day[1:] != day[:-1])
    starts = np.flatnonzero(new_day)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    if m:
        ends[-1] = m
    out: dict[str, np.ndarray | pa.Array] = {"cnt": (ends - starts).astype(np.int64)}
    for t in plan.tasks:
        s = cols[s_col(t)][real].astype(np.int64)
        out[f"sum_{t}"] = np.add.reduceat(s, starts) if m else np.empty(0, np.int64)
    if plan.sequences:
        item = cols["item_idx"][real].astype(np.int64)
        for name, max_len in plan.sequences.items():
            taken = np.flatnonzero(cols[q_col(name)][real].astype(bool))
            out[f"dseq_{name}"] = _last_items(taken, item, starts, ends, max_len)
    return real[starts], out


def snapshot_states(days: pa.Table, dates: list[str], plan: KernelPlan) -> pa.Table:
    """The user state at the end of each of ``dates`` from user-day rows (user_key, date,
    user_id, :func:`daily_fields`) that hold every day of their users: per user with days up
    to the date, ``cnt_all`` and ``sum_<task>`` over those days and ``seq_<name>``, the last
    max_len items of their ``dseq_<name>`` in date order; plus ``state_date``.

    Vectorised over the rows sorted by (user, date): prefix sums per user and one slice of
    the concatenated day sequences per user and date (the numpy form of
    `pipelines.build.state_snapshots`, which a full build with a kernel sink runs in the
    kernel's own partitions)."""
    days = days.take(pc.sort_indices(days, [("user_key", "ascending"), ("date", "ascending")]))
    n = days.num_rows
    user = days.column("user_key").to_numpy()
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    starts = np.flatnonzero(new_user)
    date = days.column("date")
    fields = ["cnt", *(f"sum_{t}" for t in plan.tasks)]
    totals = {c: days.column(c).to_numpy().astype(np.int64) for c in fields}
    # per field, the total of every row up to and including each row
    running = {c: np.cumsum(v) for c, v in totals.items()}
    flat: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in plan.sequences:
        seqs = days.column(f"dseq_{name}").combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(seqs), 0).to_numpy().astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat[name] = (offsets, pc.list_flatten(seqs).to_numpy().astype(np.int64))
    parts = []
    for state_date in dates:
        upto = pc.less_equal(date, pa.scalar(state_date, date.type)).to_numpy(zero_copy_only=False)
        k = np.add.reduceat(upto.astype(np.int64), starts) if n else np.empty(0, np.int64)
        has = k > 0
        first, last = starts[has], starts[has] + k[has] - 1
        cols: dict[str, pa.Array] = {
            "user_key": pa.array(user[first], pa.int64()),
            "user_id": days.column("user_id").take(pa.array(first, pa.int64())).combine_chunks(),
        }
        for c, run in running.items():
            out = "cnt_all" if c == "cnt" else c
            cols[out] = pa.array(run[last] - run[first] + totals[c][first], pa.int64())
        for name, max_len in plan.sequences.items():
            offsets, items = flat[name]
            lo, hi = offsets[first], offsets[last + 1]
            cols[f"seq_{name}"] = _last_items(np.arange(items.size), items, lo, hi, max_len)
        cols["state_date"] = pa.array([state_date] * first.size, pa.string())
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


@dataclass(frozen=True)
class KernelSink:
    """Where the kernel task writes its real rows: the columns of ``target.schema`` (passthrough
    and running-feature columns) go to ``target``'s files; the kernel's output is then only its
    per user-day rows (:func:`compute_daily`) and :data:`K_FILE`."""

    target: WriteTarget


def _batch(columns: dict[str, pa.Array], schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


def make_mapper(
    plan: KernelPlan,
    passthrough: list[str],
    out_schema: pa.Schema,
    sink: KernelSink | None = None,
    order: list[str] | None = None,
):
    """A mapInArrow function: buffers each user's rows across batches (they arrive grouped by
    user), sorts each group of whole users by (user, time, ``order``), then runs `compute`."""
    from pyspark.sql.pandas.types import to_arrow_type

    needed = ["event_time_ms", "item_idx", *plan.internal_columns]
    feature_types = {f.name: to_arrow_type(f.dataType) for f in plan.output_fields()}
    # Spark's NULLS FIRST (pseudo rows have no tie-break values); Arrow's sort is stable
    sort_keys = [(c, "ascending", "at_start") for c in [K_USER, "event_time_ms", *(order or [])]]

    def run(table: pa.Table, writer: TaskFileWriter | None) -> pa.RecordBatch:
        table = table.take(pc.sort_indices(table, sort_keys=sort_keys))
        cols = {}
        for c in needed:
            col = table.column(c)
            # nulls on pseudo rows (a state row has no item): 0, as an integer array holds no
            # null (to_numpy would make the column floats with NaN, or objects)
            cols[c] = np.asarray((col.fill_null(0) if col.null_count else col).to_numpy())
        res = compute(cols, plan)
        real_mask = pa.array(cols[K_REAL].astype(bool))
        kept = table.select(passthrough).filter(real_mask)
        arrays = {c: kept.column(c).combine_chunks() for c in passthrough}
        for name, v in res.items():
            arrays[name] = v if isinstance(v, pa.Array) else pa.array(v, feature_types[name])
        if writer is None:
            return _batch(arrays, out_schema)
        writer.write(_batch(arrays, sink.target.schema))
        first, per_day = compute_daily(cols, plan)
        index = pa.array(first, pa.int64())
        days: dict[str, pa.Array] = {
            "user_key": pa.array(cols[K_USER][first], pa.int64()),
            "date": table.column("date").take(index).combine_chunks(),
            "user_id": table.column("user_id").take(index).combine_chunks(),
        }
        for name, v in per_day.items():
            days[name] = v if isinstance(v, pa.Array) else pa.array(v, pa.int64())
        days[K_FILE] = pa.nulls(first.size, pa.string())
        return _batch(days, out_schema)

    def mapper(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if sink is None:
            yield from kernel(batches, None)
            return
        writer = sink.target.task_writer()
        try:
            yield from kernel(batches, writer)
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if files:
            meta = {f.name: pa.nulls(len(files), f.type) for f in out_schema}
            meta[K_FILE] = pa.array([json.dumps(f) for f in files], pa.string())
            yield _batch(meta, out_schema)

    def kernel(
        batches: Iterator[pa.RecordBatch], writer: TaskFileWriter | None
    ) -> Iterator[pa.RecordBatch]:
        pending: list[pa.RecordBatch] = []
        for batch in batches:
            if batch.num_rows == 0:
                continue
            users = batch.column(K_USER).to_numpy()
            # rows of the batch's last user may continue in the next batch: hold them back
            first_of_last = int(np.argmax(users == users[-1]))
            if first_of_last == 0:
                pending.append(batch)
                continue
            head, cut = batch.slice(0, first_of_last), batch.slice(first_of_last)
            table = pa.Table.from_batches([*pending, head])
            pending = [cut]
            out = run(table.combine_chunks(), writer)
            if out.num_rows:
                yield out
        if pending:
            out = run(pa.Table.from_batches(pending).combine_chunks(), writer)
            if out.num_rows:
                yield out

    return mapper


def run_kernel(
    rows: DataFrame,
    pseudo: DataFrame | None,
    plan: KernelPlan,
    order: list[str],
    partitions: int,
    keep: list[str] | None = None,
    sink: KernelSink | None = None,
) -> DataFrame:
    """rows: real rows with the kernel's internal columns; pseudo: history rows (or None).

    Without a sink, the output holds the real rows' columns but the internal ones, except those
    in ``keep``, and the running features. With one, those columns are written to the sink's
    files, and the output holds one row per user and day of the real rows (``user_key``,
    ``date``, ``user_id`` and :func:`daily_fields`) with a null :data:`K_FILE`, then one row per
    written file with its metadata and null data columns: the examples never come back."""
    passthrough = [c for c in rows.columns if c not in plan.internal_columns or c in (keep or [])]
    inp = rows.withColumn(K_REAL, F.lit(True))
    if pseudo is not None:
        inp = inp.unionByName(pseudo.withColumn(K_REAL, F.lit(False)), allowMissingColumns=True)
    # Spark only groups each partition's rows by user (a radix sort on one long); the kernel
    # orders each user's rows by time itself. Sorting on all three keys in Spark compared most
    # row pairs in full (users tie), 10 s of task time at 10M events.
    inp = inp.repartition(partitions, K_USER).sortWithinPartitions(K_USER)
    if sink is None:
        out_struct = T.StructType(
            [f for f in rows.schema.fields if f.name in passthrough] + plan.output_fields()
        )
    else:
        written = [*passthrough, *(f.name for f in plan.output_fields())]
        missing = [n for n in [*sink.target.schema.names, "user_id", "date"] if n not in written]
        if missing:
            raise ValueError(
                f"kernel sink: columns {missing} of the target {sink.target.root} or of the "
                "user-day rows are not in the kernel's rows"
            )
        ids = [
            T.StructField("user_key", T.LongType()),
            T.StructField("date", rows.schema["date"].dataType),
            T.StructField("user_id", rows.schema["user_id"].dataType),
        ]
        out_struct = T.StructType(
            [*ids, *(T.StructField(f.name, f.dataType, True) for f in daily_fields(plan))]
            + [T.StructField(K_FILE, T.StringType(), True)]
        )
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(out_struct)
    return inp.mapInArrow(make_mapper(plan, passthrough, arrow_schema, sink, order), out_struct)
