"""Bad raw input: every row in scope is accepted or rejected with its reason, never dropped.

One hand-made CSV holds good rows and one row per kind of defect; a single full build checks
the reason of every bad row and the rows-in accounting. Whole-file schema problems must raise
`SourceError` (file and column named), spec mistakes `SpecError` (key path named), and an
empty nightly day `BuildError` unless allowed.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipelines.build import BuildError, build
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.source import SourceError
from pipelines.spec import FeatureSpec, SpecError, parse_spec

COLUMNS = {
    "user_id": "long",
    "item_id": "long",
    "time_ms": "long",
    "is_click": "int",
    "play_time_ms": "long",
    "tab": "string",
}
HEADER = ",".join(COLUMNS)
DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]
HOUR_MS = 3_600_000


def day_ms(date: str, hour: float = 0.0) -> int:
    d = dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC)
    return int(d.timestamp() * 1000 + hour * HOUR_MS)


NOW_MS = day_ms("2024-01-10")


def spec_dict(path: str | Path, fmt: str = "csv") -> dict:
    return {
        "name": "bad_input",
        "source": {
            "path": str(path),
            "format": fmt,
            "shape": "impressions",
            "user_id": "user_id",
            "item_id": "item_id",
            "time_column": "time_ms",
            "columns": dict(COLUMNS),
        },
        "context": {"categorical": [{"name": "tab", "column": "tab"}]},
        "tasks": [
            {"name": "click", "kind": "binary", "column": "is_click"},
            {
                "name": "dwell",
                "kind": "dwell",
                "column": "play_time_ms",
                "scale": 0.001,
                "n_bins": 4,
            },
        ],
        "split": {"train_end": DAYS[0], "valid_end": DAYS[1]},
        "sequences": [{"name": "clicked", "when": {"task": "click", "equals": 1}, "max_len": 5}],
    }


def make_spec(path: str | Path, fmt: str = "csv") -> FeatureSpec:
    return parse_spec(spec_dict(path, fmt))


def make_cfg(tmp_path: Path, **kw) -> PipelineConfig:
    return PipelineConfig(lake=str(tmp_path / "lake"), spark={"user_partitions": 2}, **kw)


def good_rows() -> list[dict]:
    """4 users x 2 impressions x 3 days; items 1..24, dwell and click varying."""
    rows = []
    item = 0
    for di, date in enumerate(DAYS):
        for user in range(1, 5):
            for k in range(2):
                item += 1
                rows.append(
                    {
                        "user_id": user,
                        "item_id": item,
                        "time_ms": day_ms(date, 2 + 5 * k + user + 0.1 * di),
                        "is_click": (user + k + di) % 2,
                        "play_time_ms": 1000 * ((item * 7) % 23),
                        "tab": f"t{(user + k) % 3}",
                    }
                )
    return rows


def csv_line(r: dict) -> str:
    return ",".join("" if r[c] is None else str(r[c]) for c in COLUMNS)


def tag(raw: str) -> str:
    """Identity of a rejected row from its raw JSON: the corrupt line, else the item id."""
    d = json.loads(raw)
    return d.get("_corrupt_record") or str(d.get("item_id"))


def read(path: str) -> pd.DataFrame:
    return DeltaTable(path).to_pandas()


# --------------------------------------------------------------------------- one full build
T1 = day_ms(DAYS[1], 12)
# item id (or the corrupt line itself) -> expected reason
BAD = {
    "901": (f",901,{T1},0,1000,t0", "null_value:user_id"),
    "902": ("1,902,,0,1000,t0", "null_value:time_ms"),
    "903": ("1,903,abc,0,1000,t0", "bad_value:time_ms"),
    "904": ("1,904,915148800000,0,1000,t0", "bad_time"),  # 1999-01-01
    "905": (f"1,905,{NOW_MS + 2 * HOUR_MS},0,1000,t0", "future_time"),
    "906": (f"1,906,{T1},0,-5,t0", "negative_value:play_time_ms"),
    "907": (f"1,907,{T1},2,1000,t0", "bad_label:is_click"),
    "908": (f"1,908,{T1},0,1000x,t0", "bad_value:play_time_ms"),
    "909": (f"1,909,{T1},0,,t0", "null_value:play_time_ms"),
    "913": (f"1,913,{T1}.5,0,1000,t0", "bad_value:time_ms"),  # not an integer
    # times far outside the calendar (Spark's timestamp arithmetic overflows on them)
    "914": ("1,914,9223372036854775807,0,1000,t0", "future_time"),
    "915": ("1,915,-9223372036854775808,0,1000,t0", "bad_time"),
}
MALFORMED = [
    f"2,910,{T1},0,1000",  # a field missing
    f"2,911,{T1},0,1000,t0,extra",  # a field too many
    f'2,"912,{T1},0,1000,t0',  # an unclosed quote
]
DUP = {
    "user_id": 3,
    "item_id": 950,
    "time_ms": T1,
    "is_click": 1,
    "play_time_ms": 4000,
    "tab": "t1",
}


@pytest.fixture(scope="module")
def bad_build(spark, tmp_path_factory):
    """The one full build over the CSV with every kind of bad row (shared by two tests)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    good = good_rows()
    lines = [csv_line(r) for r in good]
    lines += [line for line, _ in BAD.values()]
    lines += MALFORMED
    lines += [csv_line(DUP), csv_line(DUP)]
    # mix the bad rows in among the good ones: position must not matter
    lines = lines[::2] + lines[1::2]
    src = tmp / "log.csv"
    src.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    spec = make_spec(src)
    cfg = make_cfg(tmp)
    summary = build(spark, spec, cfg, now_ms=NOW_MS)
    return spec, cfg, summary, lines, good


@pytest.mark.slow
def test_bad_rows_rejected_with_their_reason(bad_build):
    spec, cfg, summary, lines, good = bad_build
    tables = Tables.for_spec(cfg.lake, spec)

    n_rows = len(lines)
    n_good = len(good) + 1  # the duplicate pair leaves one accepted row
    assert summary["rows_in"] == n_rows
    assert summary["rows_in_counted_independently"]
    assert summary["rows_accepted"] == n_good
    assert summary["rows_rejected"] == n_rows - n_good
    assert summary["rows_in"] == summary["rows_accepted"] + summary["rows_rejected"]

    rejected = read(tables.rejected)
    assert len(rejected) == summary["rows_rejected"]
    got: dict[str, list[str]] = {}
    for r in rejected.itertuples():
        got.setdefault(tag(r.raw), []).append(r.reason)
        assert r.source_file.endswith("log.csv")
    want = {k: [reason] for k, (_, reason) in BAD.items()}
    want.update({line: ["malformed_line"] for line in MALFORMED})
    want["950"] = ["exact_duplicate"]  # one of the pair, not both
    assert got == want
    reasons = [x for v in want.values() for x in v]
    assert summary["rejected_by_reason"] == {x: reasons.count(x) for x in set(reasons)}
    # a rejected row is filed under its own day when its time gives one, else "unparsed"
    date_of = {tag(r.raw): r.date for r in rejected.itertuples()}
    assert date_of["901"] == DAYS[1]
    assert date_of["904"] == "1999-01-01"
    assert date_of["905"] == "2024-01-10"
    for k in ("902", "903", "913", "914", "915"):
        assert date_of[k] == "unparsed", k

    # accepted rows: exactly the good ones (one of the duplicate pair), labels as written
    ex = read(tables.examples)
    assert len(ex) == summary["examples"] == n_good
    want_ex = pd.DataFrame([*good, DUP])
    merged = ex.merge(want_ex, on=["user_id", "item_id"], validate="one_to_one")
    assert len(merged) == n_good
    assert (merged["event_time_ms"] == merged["time_ms"]).all()
    assert (merged["date"] == merged["time_ms"].map(_day)).all()
    assert (merged["label_click"] == merged["is_click"]).all()
    assert (merged["label_dwell"] == merged["play_time_ms"] * 0.001).all()


def _day(t: int) -> str:
    return dt.datetime.fromtimestamp(t / 1000, dt.UTC).date().isoformat()


# --------------------------------------------------------------------------- empty day
def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by).reset_index(drop=True)


@pytest.mark.slow
def test_empty_day(spark, bad_build, tmp_path):
    spec, cfg0, _summary, _lines, _good = bad_build
    # nightly runs on a copy of the full build's lake
    shutil.copytree(cfg0.lake, tmp_path / "lake")
    cfg = make_cfg(tmp_path)
    tables = Tables.for_spec(cfg.lake, spec)
    ex_before, rej_before = read(tables.examples), read(tables.rejected)

    empty = "2024-01-04"
    with pytest.raises(BuildError, match=empty):
        build(spark, spec, cfg, date=empty, now_ms=NOW_MS)

    summary = build(
        spark, spec, make_cfg(tmp_path, allow_empty_day=True), date=empty, now_ms=NOW_MS
    )
    assert summary["rows_accepted"] == summary["examples"] == 0
    # a single all-days file: rows without a day are re-accounted (and replaced) every night
    unparsed = rej_before[rej_before["date"] == "unparsed"]
    assert len(unparsed) == 6  # 902, 903, 913, 914, 915 and the unclosed quote
    assert summary["rejected_by_reason"] == unparsed["reason"].value_counts().to_dict()
    ex_after = read(tables.examples)
    assert (ex_after["date"] == empty).sum() == 0
    pd.testing.assert_frame_equal(
        _sorted(ex_after, ["example_id"]), _sorted(ex_before, ["example_id"])
    )
    by = ["date", "reason", "raw"]
    pd.testing.assert_frame_equal(_sorted(read(tables.rejected), by), _sorted(rej_before, by))
    # the user state carries over the empty day unchanged
    state = read(tables.user_state)
    last, new = (
        state[state["state_date"] == d].drop(columns="state_date") for d in (DAYS[-1], empty)
    )
    assert len(new) == 4
    pd.testing.assert_frame_equal(_sorted(new, ["user_key"]), _sorted(last, ["user_key"]))


# --------------------------------------------------------------------------- per-date source
PARQUET_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("time_ms", pa.int64()),
        ("is_click", pa.int32()),
        ("play_time_ms", pa.int64()),
        ("tab", pa.string()),
    ]
)


def write_days(root: Path, by_day: dict[str, list[dict]], fix=None) -> Path:
    """One parquet file per day folder; ``fix(date, table)`` may alter a day's table."""
    for d, rs in by_day.items():
        (root / f"date={d}").mkdir(parents=True)
        table = pa.Table.from_pylist(rs, schema=PARQUET_SCHEMA)
        table = fix(d, table) if fix else table
        pq.write_table(table, root / f"date={d}" / "part-00000.parquet")
    return root / "date={date}"


def rows_by_day() -> dict[str, list[dict]]:
    by_day: dict[str, list[dict]] = {d: [] for d in DAYS}
    for r in good_rows():
        by_day[_day(r["time_ms"])].append(r)
    return by_day


@pytest.mark.slow
def test_per_date_row_outside_its_folder(spark, tmp_path):
    by_day = rows_by_day()
    rows = [r for rs in by_day.values() for r in rs]
    stray = {**rows[0], "item_id": 960, "time_ms": day_ms(DAYS[1], 1)}  # filed under DAYS[0]
    by_day[DAYS[0]].append(stray)
    root = write_days(tmp_path / "daily", by_day)

    spec = make_spec(root, fmt="parquet")
    assert spec.source.per_date
    cfg = make_cfg(tmp_path)
    summary = build(spark, spec, cfg, now_ms=NOW_MS)
    assert summary["rows_in"] == len(rows) + 1
    assert summary["rows_accepted"] == len(rows)
    assert summary["rejected_by_reason"] == {"outside_run_date": 1}
    rejected = read(Tables.for_spec(cfg.lake, spec).rejected)
    assert len(rejected) == 1
    r = rejected.iloc[0]
    assert r["reason"] == "outside_run_date"
    assert r["date"] == DAYS[0]  # accounted to the day of its folder
    assert f"date={DAYS[0]}" in r["source_file"]
    assert json.loads(r["raw"])["item_id"] == "960"


def test_file_index_names_each_rows_file_and_its_date(spark, tmp_path):
    """`index_files` gives every row its file's rank among the sorted names, the table that
    names it again, and the date the per-row regex finds in the name (null where none);
    URI-encoded names (a space, a percent sign, non-ASCII) included."""
    from pyspark.sql import functions as F

    from pipelines.source import (
        FILE,
        FILE_DATE,
        FILE_DAY_END,
        FILE_DAY_START,
        FILE_IDX,
        file_date_regex,
        index_files,
    )

    root = tmp_path / "log dir"
    names = {
        "date=2022-04-25": "part 0%1.parquet",
        "date=2022-04-26": "teil-ü.parquet",
        "date=undated": "part-0.parquet",
    }
    for i, (folder, name) in enumerate(names.items()):
        (root / folder).mkdir(parents=True)
        pq.write_table(pa.table({"x": list(range(10 * i, 11 * i + 1))}), root / folder / name)
    template = str(root / "date={date}")
    raw = spark.read.parquet(str(root / "date=*")).select("x", F.input_file_name().alias(FILE))
    got, files = index_files(raw, template)
    assert got.columns == ["x", FILE_IDX, FILE_DATE, FILE_DAY_START, FILE_DAY_END]
    # each dated file's day as epoch-ms bounds (UTC here): 2022-04-25 starts at 1650844800 s
    bounds = {
        r[FILE_DATE]: (r[FILE_DAY_START], r[FILE_DAY_END])
        for r in got.select(FILE_DATE, FILE_DAY_START, FILE_DAY_END).distinct().collect()
    }
    day = 86_400_000
    assert bounds == {
        "2022-04-25": (1_650_844_800_000, 1_650_844_800_000 + day),
        "2022-04-26": (1_650_844_800_000 + day, 1_650_844_800_000 + 2 * day),
        None: (None, None),
    }
    names = sorted({r[FILE] for r in raw.collect()})
    assert [(r[FILE_IDX], r[FILE]) for r in files.orderBy(FILE_IDX).collect()] == list(
        enumerate(names)
    )
    named = got.join(files, FILE_IDX, "left").join(raw.withColumnRenamed(FILE, "_read"), "x")
    regex = F.regexp_extract(F.col(FILE), file_date_regex(template), 1)
    rows = named.select(
        FILE, "_read", FILE_DATE, F.when(regex != "", regex).alias("per_row")
    ).collect()
    assert len(rows) == 6
    assert all(r[FILE] == r["_read"] for r in rows)
    assert [r[FILE_DATE] for r in rows] == [r["per_row"] for r in rows]
    assert sorted(r[FILE_DATE] for r in rows if r[FILE_DATE]) == ["2022-04-25"] + 2 * ["2022-04-26"]
    assert sum(r[FILE_DATE] is None for r in rows) == 3


def test_file_day_bounds_agree_with_sparks_calendar_day(spark):
    """Validation checks a per-date row's time against its file's day bounds instead of
    formatting the row's day: both must put every instant on the same day, at the bounds
    themselves, in zones ahead of and behind UTC, and on days 23 and 25 hours long (DST)."""
    from pyspark.sql import functions as F

    from pipelines.source import _day_bounds, day_string

    cases = [
        ("Asia/Shanghai", "2022-05-01"),
        ("America/New_York", "2022-03-13"),  # 23 hours
        ("America/New_York", "2022-11-06"),  # 25 hours
        ("UTC", "2022-05-01"),
    ]
    for tz, date in cases:
        start, end = _day_bounds(date, tz)
        assert end - start in (23 * 3_600_000, 24 * 3_600_000, 25 * 3_600_000)
        times = [start - 1, start, start + 1, end - 1, end, end + 1]
        rows = spark.createDataFrame([(t,) for t in times], "t long")
        days = [r[0] for r in rows.select(day_string(F.col("t"), tz)).collect()]
        inside = [start <= t < end for t in times]
        assert [d == date for d in days] == inside, (tz, date, days)
    assert _day_bounds("2022-13-40", "UTC") == (0, 0)  # a name's date that is no day


# --------------------------------------------------------------------------- whole-file errors
def _write_csv(path: Path, header: str, rows: list[dict] | None = None) -> Path:
    rows = good_rows()[:3] if rows is None else rows
    cols = header.split(",")
    body = [",".join(str(r.get(c, 1)) for c in cols) for r in rows]
    path.write_text(header + "\n" + "\n".join(body) + "\n")
    return path


def test_unknown_column_is_a_source_error(spark, tmp_path):
    src = _write_csv(tmp_path / "log.csv", HEADER + ",surprise")
    with pytest.raises(SourceError, match="unknown column 'surprise'") as e:
        build(spark, make_spec(src), make_cfg(tmp_path), now_ms=NOW_MS)
    assert str(src) in str(e.value)


def test_missing_column_is_a_source_error(spark, tmp_path):
    src = _write_csv(tmp_path / "log.csv", HEADER.replace(",play_time_ms", ""))
    with pytest.raises(SourceError, match="missing column 'play_time_ms'") as e:
        build(spark, make_spec(src), make_cfg(tmp_path), now_ms=NOW_MS)
    assert str(src) in str(e.value)


def test_differing_headers_are_a_source_error(spark, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    _write_csv(folder / "a.csv", HEADER)
    cols = list(COLUMNS)
    cols[0], cols[1] = cols[1], cols[0]
    _write_csv(folder / "b.csv", ",".join(cols))
    with pytest.raises(SourceError, match="differs") as e:
        build(spark, make_spec(folder), make_cfg(tmp_path), now_ms=NOW_MS)
    assert "b.csv" in str(e.value)


def test_missing_file_is_a_source_error(spark, tmp_path):
    src = tmp_path / "nowhere" / "log.csv"
    with pytest.raises(SourceError, match="no such file") as e:
        build(spark, make_spec(src), make_cfg(tmp_path), now_ms=NOW_MS)
    assert str(src) in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.append_column("surprise", pa.array([1] * len(t))),
            "unknown column 'surprise'",
        ),
        (lambda t: t.drop(["play_time_ms"]), "missing column 'play_time_ms'"),
    ],
    ids=["unknown", "missing"],
)
def test_one_parquet_file_with_other_columns_is_a_source_error(spark, tmp_path, change, message):
    """Spark reads the schema of one file only: a later day's file must still be checked."""
    root = write_days(
        tmp_path / "daily", rows_by_day(), lambda d, t: change(t) if d == DAYS[2] else t
    )
    spec = make_spec(root, fmt="parquet")
    with pytest.raises(SourceError, match=message) as e:
        build(spark, spec, make_cfg(tmp_path), now_ms=NOW_MS)
    assert f"date={DAYS[2]}/part-00000.parquet" in str(e.value)


def test_undeclared_task_column_is_a_spec_error(tmp_path):
    d = spec_dict(tmp_path / "log.csv")
    d["tasks"][0]["column"] = "is_like"
    with pytest.raises(SpecError, match=r"tasks\.0\.column: 'is_like' is not declared"):
        parse_spec(d, "inline.yaml")
    with pytest.raises(SpecError, match="inline.yaml"):
        parse_spec(d, "inline.yaml")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('1,a,3\n2,"b\n', r"users\.csv: malformed line '2,\"b"),
        ("1,a,3\n2,b,three\n", r"users\.csv: column 'tier' has value 'three' that is not a long"),
        ("1,a,3\n1,b,4\n", r"users\.csv: key column 'user_id' value 1 appears 2 times"),
    ],
    ids=["malformed", "bad_cast", "duplicate_key"],
)
def test_side_table_error_names_file_column_and_value(spark, tmp_path, body, message):
    from pipelines.source import read_side_table
    from pipelines.spec import SideTable

    path = tmp_path / "users.csv"
    path.write_text("user_id,segment,tier\n" + body)
    table = SideTable(
        path=str(path),
        format="csv",
        key="user_id",
        columns={"user_id": "long", "segment": "string", "tier": "long"},
    )
    with pytest.raises(SourceError, match=message):
        read_side_table(spark, table)
    good = tmp_path / "good.csv"
    good.write_text("user_id,segment,tier\n1,a,3\n2,b,\n")
    got = read_side_table(spark, table.model_copy(update={"path": str(good)}))
    got = got.orderBy("user_id").collect()
    assert [tuple(r) for r in got] == [(1, "a", 3), (2, "b", None)]


def test_build_with_a_bad_side_table_fails_naming_it_and_writes_nothing(spark, tmp_path):
    """A build checks its side tables beside its first jobs: a duplicate key still fails the
    build with the table's error, before any table is written; the same build over a fixed
    table then goes through (the failed table is read anew)."""
    src = tmp_path / "log.csv"
    src.write_text(HEADER + "\n" + "\n".join(csv_line(r) for r in good_rows()) + "\n")
    users = tmp_path / "users.csv"
    users.write_text("user_id,segment\n1,a\n2,b\n2,c\n3,a\n4,b\n")
    d = spec_dict(src)
    d["user"] = {
        "tables": [
            {
                "path": str(users),
                "format": "csv",
                "key": "user_id",
                "columns": {"user_id": "long", "segment": "string"},
            }
        ],
        "categorical": [{"name": "segment", "column": "segment"}],
    }
    spec, cfg = parse_spec(d), make_cfg(tmp_path)
    with pytest.raises(SourceError, match=r"users\.csv: key column 'user_id' value 2 appears 2"):
        build(spark, spec, cfg, now_ms=NOW_MS)
    assert not (tmp_path / "lake").exists() or not any((tmp_path / "lake").rglob("*.parquet"))
    users.write_text("user_id,segment\n1,a\n2,b\n3,a\n4,b\n")
    summary = build(spark, spec, cfg, now_ms=NOW_MS)
    assert summary["examples"] == len(good_rows())
    ex = read(Tables.for_spec(cfg.lake, spec).examples)
    # every example found its user's segment (indices 1 and 2; 0 would be unknown)
    assert ex.groupby("user_id")["segment"].first().to_dict() == {1: 1, 2: 2, 3: 1, 4: 2}
