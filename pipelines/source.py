"""Reading raw logs and side tables, validating them, and building one session per impression.

Validation never drops a row silently: every row read is either accepted or lands in the rejected
frame with a reason (``null_value:<col>``, ``bad_value:<col>``, ``bad_label:<col>``,
``negative_value:<col>``, ``future_time``, ``bad_time``, ``date_mismatch``, ``outside_run_date``,
``exact_duplicate``, ``malformed_line``, ``unknown_event_type``, ``orphan_action``,
``late_action``, ``action_before_impression``), the source file and the raw row as JSON.
Schema problems that concern a whole file (missing file, missing or unknown column, a different
header) raise `SourceError` naming the file and the column.
"""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from pipelines.spec import LogSource, SourceFormat, TableSource, TaskKind

if TYPE_CHECKING:
    import pyarrow as pa

SPARK_TYPE = {
    "string": T.StringType(),
    "int": T.IntegerType(),
    "long": T.LongType(),
    "double": T.DoubleType(),
    "float": T.FloatType(),
    "boolean": T.BooleanType(),
}
CORRUPT = "_corrupt_record"
FILE = "_source_file"
# The rows carry their file as its rank among the source's files (`index_files`), not its name.
FILE_IDX = "_source_file_idx"
FILE_DATE = "_file_date"
# The epoch-ms bounds [start, end) of FILE_DATE in the source's time zone (`index_files`).
FILE_DAY_START, FILE_DAY_END = "_file_day_start", "_file_day_end"
IMP_KEY = "_imp_key"
# Rows without a typed impression id (all rejected) are spread over this many groups by a hash
# of their content, so that a day of null ids does not gather in one task and one group.
IMP_SPREAD, IMP_SPREAD_BUCKETS = "_imp_spread", 4096
MIN_VALID_TIME_MS = 946_684_800_000  # 2000-01-01: anything older is a broken clock
# Times are turned into calendar days only within +-9999-12-31: Spark's timestamp arithmetic
# fails (not nulls) on a long far outside that, which would abort the build for one bad row.
MAX_DAY_TIME_MS = 253_402_300_799_999


DERIVED = {"date", "event_time_ms", "example_id"}


def sc(column: str) -> str:
    """Name of a source column in the accepted frame: a source column that clashes with a
    derived one (KuaiRand has its own `date`) is kept as src_<name>."""
    return f"src_{column}" if column in DERIVED else column


class SourceError(ValueError):
    """A source that cannot be read as declared; the message names the file and column."""


@dataclass(frozen=True)
class ValidatedSource:
    """accepted: typed rows (declared columns + date, event_time_ms, example_id, FILE_IDX);
    rejected: date, reason, source_file, raw (JSON of the raw row)."""

    accepted: DataFrame
    rejected: DataFrame
    # events sources: one row (its `date`) per attributed action (accepted input rows too)
    actions: DataFrame | None = None
    # events sources before `sessionize`: every row typed, with its reject reason (null when
    # valid) and, when rejected, its raw row as JSON (`_raw`); clustered by impression id
    staged: DataFrame | None = None
    # the persisted frames behind these, for the caller to unpersist when done
    cached: tuple[DataFrame, ...] = ()
    # events sources after `sessionize`: one row per row of the run's scope, ``what`` its
    # reject reason, TALLY_SESSION or TALLY_ACTION, so that one job counts them all
    tally: DataFrame | None = None


TALLY_SESSION, TALLY_ACTION = "<session>", "<attributed action>"


# --------------------------------------------------------------------------- reading
def local_files(path: str) -> list[str]:
    if "://" in path and not path.startswith("file://"):
        return []  # remote: Spark resolves it; header checks are done by Spark itself
    p = path.removeprefix("file://")
    if os.path.isdir(p):
        files = sorted(
            f
            for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
            if os.path.isfile(f) and not os.path.basename(f).startswith(("_", "."))
        )
    else:
        files = sorted(glob.glob(p))
    return files


def _csv_header(file: str) -> list[str]:
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rt", newline="") as fh:  # type: ignore[operator]
            line = fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SourceError(f"{file}: cannot read the header line ({e})") from None
    import csv

    return next(csv.reader([line.rstrip("\r\n")]), [])


def _check_columns(found: list[str], table: TableSource, where: str) -> None:
    declared = list(table.columns)
    missing = [c for c in declared if c not in found]
    if missing:
        raise SourceError(
            f"{where}: missing column {missing[0]!r} (declared in columns; found {found})"
        )
    extra = [c for c in found if c not in table.columns and c != CORRUPT]
    if extra and not table.allow_extra_columns:
        raise SourceError(
            f"{where}: unknown column {extra[0]!r} (not declared in columns; declare it or set "
            "allow_extra_columns: true)"
        )


def read_raw(spark: SparkSession, table: TableSource, path: str | None = None) -> DataFrame:
    """Read a table with its declared columns (casting is validation's job), plus
    ``_source_file`` and, for CSV, ``_corrupt_record`` for lines that do not parse.

    CSV columns are strings. A Parquet or Delta column already of its declared type stays as
    it is (its values need no check), any other one becomes a string: casting typed columns to
    strings and back cost about a fifth of the CPU of the read and the sessions at 10M events
    (JFR): string writes, string compares in the duplicate window, string-to-long parsing, and
    a larger shuffle. `as_text` gives a column's string form either way."""
    path = path or table.path
    files = local_files(path)
    if "://" not in path or path.startswith("file://"):
        if not files:
            raise SourceError(f"{path}: no such file or directory (source.path)")
    if table.format == SourceFormat.CSV:
        headers = {f: _csv_header(f) for f in files}
        distinct = {tuple(h) for h in headers.values()}
        if len(distinct) > 1:
            a, b = list(headers.items())[:2]
            raise SourceError(f"{b[0]}: header {b[1]} differs from {a[0]}: {a[1]}")
        header = list(next(iter(distinct))) if distinct else list(table.columns)
        _check_columns(header, table, files[0] if files else path)
        schema = T.StructType(
            [T.StructField(c, T.StringType()) for c in header]
            + [T.StructField(CORRUPT, T.StringType())]
        )
        df = (
            spark.read.option("header", True)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .option("enforceSchema", True)
            .schema(schema)
            .csv(files or path)
        )
        # Spark needs the corrupt column to be used before caching; keep it as a normal column.
        cols = [F.col(c) for c in table.columns] + [F.col(CORRUPT)]
    elif table.format == SourceFormat.PARQUET:
        # Spark takes the schema of one file: check every local file's own footer, so that a
        # file lacking (or adding) a column is an error naming it, not a day of null values.
        import pyarrow.parquet as pq

        footers = {}
        for f in (g for e in files for g in (local_files(e) if os.path.isdir(e) else [e])):
            footers[f] = pq.read_schema(f)
            _check_columns(footers[f].names, table, f)
        reader = spark.read
        known = spark_schema_of(list(footers.values()))
        if known is not None:
            reader = reader.schema(known)
        df = reader.parquet(*(files or [path]))
        _check_columns(df.columns, table, files[0] if files else path)
        cols = _typed_or_strings(df, table)
    else:
        from pipelines.delta_io import read_delta

        df = read_delta(spark, path)
        _check_columns(df.columns, table, path)
        cols = _typed_or_strings(df, table)
    return df.select(*cols, F.input_file_name().alias(FILE))


# Arrow types of Parquet columns and the Spark types Spark's own schema inference gives them.
_ARROW_TO_SPARK = {
    "int8": T.ByteType(),
    "int16": T.ShortType(),
    "int32": T.IntegerType(),
    "int64": T.LongType(),
    "float": T.FloatType(),
    "double": T.DoubleType(),
    "string": T.StringType(),
    "large_string": T.StringType(),
    "bool": T.BooleanType(),
    "date32[day]": T.DateType(),
}


def spark_schema_of(footers: list[pa.Schema]) -> T.StructType | None:
    """The Spark schema of local Parquet files whose footers (already read for the column
    checks) agree and hold only plain types; None leaves it to Spark's inference, a job of
    its own per read (three of them, about 2 s of the driver before a 10M build's first job)."""
    columns = [[(field.name, str(field.type)) for field in f] for f in footers]
    if not columns or any(c != columns[0] for c in columns[1:]):
        return None
    fields = []
    for field in footers[0]:
        spark_type = _ARROW_TO_SPARK.get(str(field.type))
        if spark_type is None:
            return None
        fields.append(T.StructField(field.name, spark_type, True))
    return T.StructType(fields)


def _typed_or_strings(df: DataFrame, table: TableSource) -> list[Column]:
    """The declared columns of a typed source, each as it is where it already has its declared
    type, else as a string; and a null corrupt-record column."""
    cols = [
        F.col(c) if df.schema[c].dataType == SPARK_TYPE[t] else as_text(c)
        for c, t in table.columns.items()
    ]
    return [*cols, F.lit(None).cast("string").alias(CORRUPT)]


def as_text(column: str) -> Column:
    """A raw column as the string the row's identity and its rejected-row JSON are made of,
    whether the source kept its type or not."""
    return F.col(column).cast("string").alias(column)


def read_side_table(spark: SparkSession, table: TableSource) -> DataFrame:
    """A side table, typed as declared. Side tables are small and static: a row that fails its
    cast or a duplicate key is an error naming the file, column and key, not a silent drop."""
    typed, check = open_side_table(spark, table)
    check()
    return typed


def open_side_table(
    spark: SparkSession, table: TableSource
) -> tuple[DataFrame, Callable[[], None]]:
    """A side table typed as declared (not yet read), and the function that checks it (its
    jobs; raises `SourceError` as `read_side_table` does), for a caller that runs the checks
    beside other work."""
    # cached: Spark refuses queries that touch only the corrupt-record column of a raw file
    raw = read_raw(spark, table).cache()
    typed = raw.select(
        *[F.col(c).try_cast(SPARK_TYPE[t]).alias(c) for c, t in table.columns.items()]
    )

    def check() -> None:
        try:
            _check_side_table(table, raw, typed)
        except SourceError:
            # forgotten, so that a fixed file is read anew (Spark would serve this cache)
            raw.unpersist()
            raise

    return typed, check


def _check_side_table(table: TableSource, raw: DataFrame, typed: DataFrame) -> None:
    # One job finds the first malformed line or failed cast (a job each cost ~0.5 s per table).
    checks = [F.when(F.col(CORRUPT).isNotNull(), F.lit(CORRUPT))]
    checks += [
        F.when(F.col(c).isNotNull() & F.col(c).try_cast(SPARK_TYPE[t]).isNull(), F.lit(c))
        for c, t in table.columns.items()
        if t != "string"
    ]
    bad = F.coalesce(*checks).alias("_bad")
    row = raw.select("*", bad).where(F.col("_bad").isNotNull()).first()
    if row is not None:
        if row["_bad"] == CORRUPT:
            raise SourceError(f"{row[FILE]}: malformed line {row[CORRUPT]!r}")
        raise SourceError(
            f"{row[FILE]}: column {row['_bad']!r} has value {row[row['_bad']]!r} that is not a "
            f"{table.columns[row['_bad']]} (row {dict((k, row[k]) for k in table.columns)})"
        )
    key = getattr(table, "key", None)
    if key:
        dup = typed.groupBy(key).count().where("count > 1").first()
        if dup is not None:
            raise SourceError(
                f"{table.path}: key column {key!r} value {dup[key]!r} appears {dup['count']} times"
            )


# --------------------------------------------------------------------------- validation
def _first_reason(checks: list[tuple[Column, str | Column]]) -> Column:
    expr = F.lit(None).cast("string")
    for cond, reason in reversed(checks):
        expr = F.when(cond, reason if isinstance(reason, Column) else F.lit(reason)).otherwise(expr)
    return expr


def day_string(time_ms: Column, tz: str) -> Column:
    """Calendar day (yyyy-MM-dd) of an epoch-ms column in the spec's time zone."""
    return F.date_format(F.from_utc_timestamp(F.timestamp_millis(time_ms), tz), "yyyy-MM-dd")


def file_date_regex(path_template: str) -> str:
    """A regex that captures the {date} of a per-date path template from a file URI."""
    tail = path_template.split("{date}")[0].rstrip("/").split("/")[-1]
    return re.escape(tail) + r"[^/]*?(\d{4}-\d{2}-\d{2})" if tail else r"(\d{4}-\d{2}-\d{2})"


def _day_bounds(date: str, tz: str) -> tuple[int, int]:
    """``run_window(date, tz, 0)``; (0, 0) for a name's date that is no calendar day (such as
    2022-13-40), which then holds no valid time (its rows are outside_run_date)."""
    try:
        return run_window(date, tz, 0)
    except ValueError:
        return 0, 0


def index_files(
    raw: DataFrame, path_template: str | None = None, tz: str = "UTC"
) -> tuple[DataFrame, DataFrame]:
    """``raw`` (from `read_raw`) with its file name FILE replaced by FILE_IDX, the file's rank
    among the files Spark lists (ranks order as the names do), and, for a per-date
    ``path_template``, FILE_DATE: the {date} in the file's name (`file_date_regex`), null where
    it holds none, with FILE_DAY_START and FILE_DAY_END, that day's epoch-ms bounds in time
    zone ``tz``. Also the table (FILE_IDX, FILE) that names the files again.

    Each name is matched once, on the driver, and joined back on the name. Matching it on every
    row and carrying the ~100-byte name through the sessions' shuffle cost 11 s of CPU at 10M
    events (JFR); the int is 4 bytes. The bounds let validation check a row's time against its
    file's date with two comparisons: formatting every row's day was a fifth of the CPU of the
    read-and-shuffle stage at 10M events (JFR)."""
    files = sorted(set(raw.inputFiles()))
    # Python's re reads this pattern as Java's does: an escaped literal, a lazy class, digits.
    pattern = re.compile(file_date_regex(path_template)) if path_template else None

    def date_in(name: str) -> str | None:
        found = pattern.search(name) if pattern else None
        return found.group(1) if found else None

    schema = (
        f"{FILE_IDX} int, {FILE} string, {FILE_DATE} string, {FILE_DAY_START} long, "
        f"{FILE_DAY_END} long"
    )
    rows = [(i, f, date_in(f)) for i, f in enumerate(files)]
    bounds = {d: _day_bounds(d, tz) for d in {d for _, _, d in rows if d is not None}}
    if rows:
        # A literal relation: a DataFrame made from Python rows is an RDD that Python workers
        # compute for the broadcast (a job of its own, 1.6 s at the start of a 10M build).
        by_file = raw.sparkSession.range(1).select(
            F.inline(
                F.array(
                    *[
                        F.struct(
                            F.lit(i).cast("int").alias(FILE_IDX),
                            F.lit(f).alias(FILE),
                            F.lit(d).cast("string").alias(FILE_DATE),
                            F.lit(bounds[d][0] if d else None).cast("long").alias(FILE_DAY_START),
                            F.lit(bounds[d][1] if d else None).cast("long").alias(FILE_DAY_END),
                        )
                        for i, f, d in rows
                    ]
                )
            )
        )
    else:
        by_file = raw.sparkSession.createDataFrame([], schema)
    dated = [FILE_DATE, FILE_DAY_START, FILE_DAY_END] if pattern else []
    keep = [c for c in raw.columns if c != FILE] + [FILE_IDX] + dated
    # input_file_name() and inputFiles() spell a file alike (URI-encoded); see the tests.
    indexed = raw.join(F.broadcast(by_file), FILE, "left").select(*keep)
    return indexed, by_file.select(FILE_IDX, FILE)


def _name_files(rejected: DataFrame, files: DataFrame) -> DataFrame:
    """Rejected rows (date, reason, FILE_IDX, raw) with their file's name as source_file."""
    return rejected.join(F.broadcast(files), FILE_IDX, "left").select(
        "date", "reason", F.col(FILE).alias("source_file"), "raw"
    )


def validate(
    raw: DataFrame,
    files: DataFrame,
    source: LogSource,
    label_columns: dict[str, TaskKind],
    now_ms: int,
    future_tolerance_s: int,
) -> ValidatedSource:
    """Type, check and de-duplicate raw rows (`index_files`' output; ``files`` names them).
    ``label_columns`` maps a label source column to the kind of task reading it (binary columns
    must be 0/1, dwell columns non-negative)."""
    cols = list(source.columns)
    unit = 1000 if source.time_unit.value == "s" else 1
    # try_*: under ANSI SQL (the Spark 4 default) a plain cast or product raises on one bad
    # value and fails the whole build; a null here becomes the row's reject reason instead.
    casts = {c: F.col(c).try_cast(SPARK_TYPE[t]) for c, t in source.columns.items()}
    time_ms = F.try_multiply(casts[source.time_column], F.lit(unit)).try_cast("long")
    required = [source.user_id, source.item_id, source.time_column]
    if source.events is not None:
        required += [source.events.type_column, source.events.impression_id_column]
    checks: list[tuple[Column, str | Column]] = [(F.col(CORRUPT).isNotNull(), "malformed_line")]
    for c in required:
        checks.append((F.col(c).isNull(), f"null_value:{c}"))
    for c, t in source.columns.items():
        if t != "string":
            checks.append((F.col(c).isNotNull() & casts[c].isNull(), f"bad_value:{c}"))
    for c, kind in label_columns.items():
        if c not in source.columns:
            continue
        if source.events is None:
            checks.append((F.col(c).isNull(), f"null_value:{c}"))
        if kind == TaskKind.BINARY:
            checks.append((~casts[c].isin(0, 1), f"bad_label:{c}"))
        else:
            checks.append((casts[c] < 0, f"negative_value:{c}"))
    # a null time_ms here (its column parsed) is an overflow of the unit conversion
    checks.append((time_ms.isNull() | (time_ms < F.lit(MIN_VALID_TIME_MS)), "bad_time"))
    checks.append((time_ms > F.lit(now_ms + future_tolerance_s * 1000), "future_time"))
    in_range = time_ms.between(-MAX_DAY_TIME_MS, MAX_DAY_TIME_MS)
    day = day_string(F.when(in_range, time_ms), source.timezone)
    if source.date_column:
        fmt = source.date_column_format
        declared_day = F.date_format(F.try_to_date(F.col(source.date_column), fmt), "yyyy-MM-dd")
        checks.append((declared_day.isNull() | (declared_day != day), "date_mismatch"))
    if source.events is not None:
        known = [source.events.impression_type, *source.events.actions.values()]
        checks.append((~F.col(source.events.type_column).isin(*known), "unknown_event_type"))
    if source.per_date:
        # the row's day is its file's date when its time falls within that day's bounds
        outside = (time_ms < F.col(FILE_DAY_START)) | (time_ms >= F.col(FILE_DAY_END))
        checks.append((F.col(FILE_DATE).isNotNull() & outside, "outside_run_date"))

    events = source.events is not None
    hash_cols = [F.coalesce(as_text(c), F.lit("\u0000")) for c in cols]
    staged = raw.withColumn("_reason", _first_reason(checks))
    if events:
        assert source.events is not None
        # One shuffle serves validation and sessions: rows clustered by (impression id, spread)
        # satisfy the impression window (duplicates and the impression) and the labels' window,
        # so Spark plans no second exchange or sort.
        imp = source.events.impression_id_column
        spread = F.when(
            casts[imp].isNull(),
            F.pmod(
                F.xxhash64(*hash_cols, F.col(CORRUPT), F.col(FILE_IDX)), F.lit(IMP_SPREAD_BUCKETS)
            ),
        ).otherwise(F.lit(0))
        staged = staged.withColumns({IMP_KEY: casts[imp], IMP_SPREAD: spread}).repartition(
            IMP_KEY, IMP_SPREAD
        )
        is_imp = F.col(source.events.type_column) == source.events.impression_type
        staged = staged.withColumns(
            {
                # the row's identity, a tie-break only among the id's impression events
                "_row_id": F.when(is_imp, F.xxhash64(*hash_cols)),
                # a per-date file's date, where it has one, is every accepted row's own day:
                # no day of the row's time is formatted again after the shuffle
                "_date": _row_date(source, F.when(time_ms.isNotNull(), day)),
            }
        )
        staged = staged.withColumns(
            _impression_window(source, cols, time_ms, casts[source.user_id], casts[source.item_id])
        )
    elif source.reject_exact_duplicates:
        # Exact duplicates: identical in every declared column; the first stays, the rest go.
        w = Window.partitionBy(*[F.col(c) for c in cols]).orderBy(F.col(FILE_IDX))
        staged = staged.withColumn(
            "_reason",
            F.when(
                F.col("_reason").isNull() & (F.row_number().over(w) > 1), F.lit("exact_duplicate")
            ).otherwise(F.col("_reason")),
        )
    if not events:
        staged = staged.withColumn("_day", F.when(time_ms.isNotNull(), day))
    raw_json = F.to_json(F.struct(*[as_text(c) for c in cols], F.col(CORRUPT)))
    row_date = F.col("_date") if events else _row_date(source, F.col("_day"))
    if events:
        # Not persisted here: `sessionize` reads every row once and persists after its window.
        typed = staged.select(
            *[(F.col(IMP_KEY) if c == imp else casts[c]).alias(sc(c)) for c in cols],
            row_date.alias("date"),
            time_ms.alias("event_time_ms"),
            F.col("_row_id").alias("example_id"),
            F.col(FILE_IDX),
            F.col("_reason"),
            F.when(F.col("_reason").isNotNull(), raw_json).alias("_raw"),
            F.col(IMP_SPREAD),
            F.col("_imp"),
        )
        valid = F.col("_reason").isNull()
        return ValidatedSource(
            accepted=typed.where(valid).drop("_reason", "_raw", IMP_SPREAD, "_imp"),
            rejected=_name_files(
                typed.where(~valid).select(
                    "date", F.col("_reason").alias("reason"), FILE_IDX, F.col("_raw").alias("raw")
                ),
                files,
            ),
            staged=typed,
        )
    # persisted: the accepted and the rejected rows are both read from it
    staged = staged.persist(StorageLevel.MEMORY_AND_DISK)
    rejected = staged.where(F.col("_reason").isNotNull()).select(
        row_date.alias("date"), F.col("_reason").alias("reason"), FILE_IDX, raw_json.alias("raw")
    )
    accepted = staged.where(F.col("_reason").isNull()).select(
        *[casts[c].alias(sc(c)) for c in cols],
        F.col("_day").alias("date"),
        time_ms.alias("event_time_ms"),
        F.xxhash64(*hash_cols).alias("example_id"),
        F.col(FILE_IDX),
    )
    return ValidatedSource(
        accepted=accepted, rejected=_name_files(rejected, files), cached=(staged,)
    )


def _row_date(source: LogSource, day: Column) -> Column:
    """The date a row is accounted to: per-date sources account it to the day of its file,
    others to the row's own ``day``; for an accepted row both are its own day."""
    if source.per_date:
        return F.coalesce(F.col(FILE_DATE), day)
    return F.coalesce(day, F.lit("unparsed"))


def _impression_window(
    source: LogSource, cols: list[str], time_ms: Column, user: Column, item: Column
) -> dict[str, Column]:
    """Over each impression id's rows (clustered by `validate`'s shuffle), in one window:
    ``_reason`` with the exact duplicates marked, and ``_imp``, the id's impression: its
    earliest valid impression event (time, then row id; `sessionize` matches the actions to
    it), a struct of event_time_ms, example_id, u(ser), i(tem) and date.

    Exact duplicates are identical in every declared column: ordered by the columns and the
    file, each row after the first of its run of identical rows. An event stream that keeps
    exact duplicates still keeps one impression per id: the copies of an impression are
    duplicate impression ids (a session is its impression's own row). The duplicates need not
    be known to find the impression: a copy of the earliest impression is that impression.
    One window frame for both (a window over all the columns apart was a group per event,
    about 3 s at 10M events), and no other sort: the labels' window reuses this order."""
    ev = source.events
    assert ev is not None
    w = Window.partitionBy(IMP_KEY, IMP_SPREAD).orderBy(*[F.col(c) for c in cols], F.col(FILE_IDX))
    same = F.lag(F.lit(True)).over(w).isNotNull()
    for c in cols:
        same = same & F.col(c).eqNullSafe(F.lag(F.col(c)).over(w))
    is_imp = F.col(ev.type_column) == ev.impression_type
    dup = F.lit("exact_duplicate")
    if not source.reject_exact_duplicates:
        dup = F.when(is_imp, F.lit("duplicate_impression_id"))
    impression = F.struct(
        time_ms.alias("event_time_ms"),
        F.col("_row_id").alias("example_id"),
        user.alias("u"),
        item.alias("i"),
        F.col("_date").alias("date"),
    )
    whole = w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    return {
        "_reason": F.when(F.col("_reason").isNull() & same, dup).otherwise(F.col("_reason")),
        "_imp": F.min(F.when(is_imp & F.col("_reason").isNull(), impression)).over(whole),
    }


# --------------------------------------------------------------------------- sessions
def action_column(name: str) -> str:
    return f"action_{name}"


def value_column(name: str) -> str:
    return f"value_{name}"


def sessionize(
    validated: ValidatedSource,
    files: DataFrame,
    source: LogSource,
    count_dates: set[str] | None,
    keep: list[str] | None = None,
) -> ValidatedSource:
    """Events -> one row per impression with its attributed actions (STAN's session).

    An action belongs to the impression named by its impression id when it comes within
    ``attribution_window_s`` after it (same user and item). Actions that match no impression,
    come too late, or come before their impression are rejected. An action is matched only with
    impressions of its own calendar day or the day before (the days a nightly run can see), so
    an action whose impression is older counts as an orphan in every mode. ``count_dates``: only
    actions and impressions dated on these days are accounted here (a nightly run reads the
    neighbour days for attribution only); None = all.

    One shuffle (`validate`'s, by impression id) and no aggregation: `validate`'s window over
    each id's rows found its impression; a second one here gives it the labels of its
    attributed actions (in the same order: no sort); the session is the impression's own row.
    The rows after them are persisted: sessions, rejected rows, attributed actions and the
    tally are filters of that frame.

    ``keep``: the source columns the sessions carry besides the user, item and impression ids
    (None: all). Only those are persisted, with date, time, labels and what the rejected rows
    need: at 10M events, caching every column (event ids, raw dwell, the event type as a
    string, a second copy of the time) cost about 3.5 s more.
    """
    ev = source.events
    assert ev is not None and validated.staged is not None
    typ, imp_id = F.col(sc(ev.type_column)), sc(ev.impression_id_column)
    uid, iid = sc(source.user_id), sc(source.item_id)
    is_imp = typ == ev.impression_type
    valid = F.col("_reason").isNull()
    per_id = Window.partitionBy(imp_id, IMP_SPREAD)
    cols = validated.accepted.columns
    # `validate` found each id's impression (`_impression_window`)
    staged = validated.staged
    delay = F.col("event_time_ms") - F.col("_imp.event_time_ms")
    too_old = F.datediff(F.to_date(F.col("date")), F.to_date(F.col("_imp.date"))) > 1
    window_ms = ev.attribution_window_s * 1000
    reason = F.when(
        is_imp, F.when(F.col("example_id") != F.col("_imp.example_id"), "duplicate_impression_id")
    ).otherwise(
        _first_reason(
            [
                (F.col("_imp").isNull() | too_old, "orphan_action"),
                (
                    (F.col(uid) != F.col("_imp.u")) | (F.col(iid) != F.col("_imp.i")),
                    "orphan_action",
                ),
                (delay < 0, "action_before_impression"),
                (delay > window_ms, "late_action"),
            ]
        )
    )
    typed_json = F.to_json(
        F.struct(*[F.col(sc(c)).cast("string").alias(c) for c in source.columns])
    )
    staged = staged.select(
        *cols,
        F.coalesce(F.col("_reason"), reason).alias("_reason"),
        F.coalesce(F.col("_raw"), F.when(valid & reason.isNotNull(), typed_json)).alias("_raw"),
        F.col(IMP_SPREAD),
    )
    # Labels: what the id's attributed actions say, on every row of the id (the same window
    # partitioning and order, so Spark adds no exchange or sort for it).
    good = F.col("_reason").isNull()
    good_action = good & ~is_imp
    labels = {
        action_column(name): F.max(F.when(good_action & (typ == v), 1).otherwise(0)).over(per_id)
        for name, v in ev.actions.items()
    }
    labels |= {
        value_column(name): F.coalesce(
            F.sum(
                F.when(good_action & (typ == ev.actions[name]), F.col(sc(col)).cast("double"))
            ).over(per_id),
            F.lit(0.0),
        )
        for name, col in ev.action_values.items()
    }
    staged = staged.withColumns(labels)
    if keep is not None:
        wanted = {sc(c) for c in [source.user_id, source.item_id, *keep]}
        wanted |= {imp_id, "date", "event_time_ms", FILE_IDX}
        cols = [c for c in cols if c in wanted]
        staged = staged.select(
            *cols, "_reason", "_raw", IMP_SPREAD, *labels, is_imp.alias("_is_imp")
        )
        # the event type is needed only as this flag from here on
        is_imp = F.col("_is_imp")
        good_action = good & ~is_imp
    per_row = staged.persist(StorageLevel.MEMORY_AND_DISK)
    sessions = (
        per_row.where(good & is_imp)
        .select(
            *cols,
            *[action_column(n) for n in ev.actions],
            *[value_column(n) for n in ev.action_values],
        )
        # The impression id is the tie-break identity of a session.
        .withColumn("example_id", F.xxhash64(F.col(imp_id)))
    )
    rejected = per_row.where(~good).select(
        "date", F.col("_reason").alias("reason"), FILE_IDX, F.col("_raw").alias("raw")
    )
    actions = per_row.where(good_action).select("date")
    what = F.when(~good, F.col("_reason")).when(is_imp, TALLY_SESSION).otherwise(TALLY_ACTION)
    tally = per_row.select(what.alias("what"), "date")
    if count_dates is not None:
        dates = sorted(count_dates)
        sessions = sessions.where(F.col("date").isin(dates))
        rejected = rejected.where(F.col("date").isin(*dates, "unparsed"))
        actions = actions.where(F.col("date").isin(dates))
        tally = tally.where(
            F.when(~good, F.col("date").isin(*dates, "unparsed")).otherwise(
                F.col("date").isin(dates)
            )
        )
    rejected = _name_files(rejected, files)
    return ValidatedSource(
        accepted=sessions,
        rejected=rejected,
        actions=actions,
        cached=(*validated.cached, per_row),
        tally=tally.select("what"),
    )


def run_window(date: str, tz: str, pad_s: int) -> tuple[int, int]:
    """Epoch-ms bounds [start - pad, end + pad) of a calendar day in time zone tz."""
    from zoneinfo import ZoneInfo

    d = dt.date.fromisoformat(date)
    start = dt.datetime(d.year, d.month, d.day, tzinfo=ZoneInfo(tz))
    end = start + dt.timedelta(days=1)
    return int((start.timestamp() - pad_s) * 1000), int((end.timestamp() + pad_s) * 1000)
