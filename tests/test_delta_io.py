"""pipelines.delta_io: executors write Parquet, the driver commits with delta-rs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, LongType, StringType, StructField, StructType

from pipelines import delta_io

SCHEMA = StructType(
    [
        StructField("id", LongType()),
        StructField("score", DoubleType()),
        StructField("name", StringType()),
        StructField("seq", ArrayType(LongType())),
        StructField("date", StringType()),
    ]
)
DAYS = ["2022-04-25", "2022-04-26", "2022-04-27"]


def _rows(ids, day=None, score_offset=0.0):
    out = []
    for i in ids:
        out.append(
            (
                i,
                None if i % 5 == 0 else i * 0.5 + score_offset,
                None if i % 4 == 0 else f"n{i}",
                None if i % 7 == 0 else [i, i + 1, None][: 1 + i % 3],
                day or DAYS[i % 3],
            )
        )
    return out


def _df(spark, rows):
    return spark.createDataFrame(rows, SCHEMA)


def _pdf(df) -> pd.DataFrame:
    """A Spark DataFrame as a pandas frame sorted by id (arrays as lists), columns in SCHEMA order."""
    pdf = df.select(*SCHEMA.fieldNames()).toPandas().sort_values("id").reset_index(drop=True)
    pdf["seq"] = pdf["seq"].map(
        lambda v: None if v is None else [None if pd.isna(x) else x for x in v]
    )
    return pdf


def _expected(rows) -> pd.DataFrame:
    pdf = pd.DataFrame(rows, columns=SCHEMA.fieldNames()).sort_values("id").reset_index(drop=True)
    pdf["seq"] = pdf["seq"].map(lambda v: None if v is None else list(v))
    return pdf


def _assert_same(df, rows) -> None:
    got, exp = _pdf(df), _expected(rows)
    assert got["id"].tolist() == exp["id"].tolist()
    pd.testing.assert_frame_equal(
        got.drop(columns=["seq"]), exp.drop(columns=["seq"]), check_dtype=False
    )
    assert got["seq"].tolist() == exp["seq"].tolist()


def _files_by_day(path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in DeltaTable(str(path)).file_uris():
        day = Path(f).parent.name.split("=", 1)[1]
        out.setdefault(day, set()).add(f)
    return out


def test_round_trip(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = _rows(range(30))
    version = delta_io.write_delta(
        _df(spark, rows), path, partition_by=["date"], mode="append", commit_info={"job": "t"}
    )
    assert version == 0
    assert delta_io.table_exists(path) and delta_io.table_version(path) == 0
    assert delta_io.partition_values(path, "date") == DAYS

    back = delta_io.read_delta(spark, path)
    assert back.columns == SCHEMA.fieldNames()
    assert dict(back.dtypes)["date"] == "string"
    assert dict(back.dtypes)["seq"] == "array<bigint>"
    _assert_same(back, rows)

    # hive-style layout, partition column not stored in the data files, stats in the log
    data_files = list(Path(path).glob("date=*/part-*.parquet"))
    assert {f.parent.name for f in data_files} == {f"date={d}" for d in DAYS}
    assert "date" not in pq.read_schema(data_files[0]).names
    adds = [
        json.loads(line)["add"]
        for line in (Path(path) / "_delta_log" / f"{0:020d}.json").read_text().splitlines()
        if line.startswith('{"add"')
    ]
    stats = [json.loads(a["stats"]) for a in adds]
    assert sum(s["numRecords"] for s in stats) == 30
    assert all({"minValues", "maxValues", "nullCount"} <= set(s) for s in stats)
    assert all("id" in s["minValues"] and "seq" not in s["nullCount"] for s in stats)
    assert delta_io.history(path)[0]["job"] == "t"

    # partition selection goes through the log
    only = delta_io.read_delta(spark, path, partitions={"date": [DAYS[1]]})
    _assert_same(only, [r for r in rows if r[4] == DAYS[1]])


def test_replace_one_partition_leaves_others_untouched(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = _rows(range(30))
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="overwrite")
    before = _files_by_day(path)

    new_rows = _rows(range(100, 110), day=DAYS[1], score_offset=1000.0)
    version = delta_io.write_delta(
        _df(spark, new_rows),
        path,
        partition_by=["date"],
        mode="overwrite",
        replace_partitions={"date": [DAYS[1]]},
        commit_info={"run": "r1"},
    )
    assert version == 1
    after = _files_by_day(path)
    assert after[DAYS[0]] == before[DAYS[0]] and after[DAYS[2]] == before[DAYS[2]]
    assert not after[DAYS[1]] & before[DAYS[1]]
    expected = [r for r in rows if r[4] != DAYS[1]] + new_rows
    _assert_same(delta_io.read_delta(spark, path), expected)

    last = delta_io.history(path)[0]
    assert last["operation"] == "WRITE"
    assert last["operationParameters"]["mode"] == "Overwrite"
    assert last["operationParameters"]["predicate"] == f"date = '{DAYS[1]}'"
    assert last["run"] == "r1"


def test_replace_twice_with_identical_data(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = _rows(range(30))
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="append")
    day_rows = [r for r in rows if r[4] in DAYS[:2]]
    kwargs = {
        "partition_by": ["date"],
        "mode": "overwrite",
        "replace_partitions": {"date": DAYS[:2]},
    }

    delta_io.write_delta(_df(spark, day_rows), path, **kwargs)
    n_history = len(delta_io.history(path))
    version = delta_io.write_delta(_df(spark, day_rows), path, **kwargs)

    assert version == 2
    assert len(delta_io.history(path)) == n_history + 1
    last = delta_io.history(path)[0]
    assert (last["operation"], last["operationParameters"]["mode"]) == ("WRITE", "Overwrite")
    assert last["operationParameters"]["predicate"] == f"date IN ('{DAYS[0]}', '{DAYS[1]}')"
    back = delta_io.read_delta(spark, path)
    assert back.count() == 30
    _assert_same(back, rows)


def test_empty_df_replace_removes_partition_and_empty_table(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = _rows(range(30))
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="overwrite")
    version = delta_io.write_delta(
        _df(spark, []),
        path,
        partition_by=["date"],
        mode="overwrite",
        replace_partitions={"date": [DAYS[0]]},
    )
    assert version == 1
    assert delta_io.partition_values(path, "date") == DAYS[1:]
    assert delta_io.history(path)[0]["operationParameters"]["mode"] == "Overwrite"
    _assert_same(delta_io.read_delta(spark, path), [r for r in rows if r[4] != DAYS[0]])
    assert delta_io.read_delta(spark, path, partitions={"date": [DAYS[0]]}).count() == 0

    empty_path = str(tmp_path / "empty")
    assert (
        delta_io.write_delta(_df(spark, []), empty_path, partition_by=["date"], mode="append") == 0
    )
    empty = delta_io.read_delta(spark, empty_path)
    assert empty.count() == 0
    assert [(f.name, f.dataType) for f in empty.schema] == [(f.name, f.dataType) for f in SCHEMA]
    assert delta_io.partition_values(empty_path, "date") == []


def test_rows_outside_replace_partitions_and_schema_mismatch_raise(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = _rows(range(30))
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="overwrite")
    files_on_disk = set(Path(path).rglob("*.parquet"))

    with pytest.raises(ValueError, match=DAYS[2]):
        delta_io.write_delta(
            _df(spark, rows),
            path,
            partition_by=["date"],
            mode="overwrite",
            replace_partitions={"date": DAYS[:2]},
        )
    assert delta_io.table_version(path) == 0
    assert set(Path(path).rglob("*.parquet")) == files_on_disk  # uncommitted files removed

    wider = _df(spark, rows).withColumn("extra", F.col("id") * 2)
    with pytest.raises(ValueError, match="extra"):
        delta_io.write_delta(wider, path, partition_by=["date"], mode="append")
    retyped = _df(spark, rows).withColumn("score", F.col("score").cast("string"))
    with pytest.raises(ValueError, match="score"):
        delta_io.write_delta(retyped, path, partition_by=["date"], mode="append")
    assert delta_io.table_version(path) == 0


def test_missing_table_time_travel_and_delete(spark, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        delta_io.read_delta(spark, missing)
    assert not delta_io.table_exists(missing)

    path = str(tmp_path / "t")
    rows = _rows(range(30))
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="overwrite")
    more = _rows(range(30, 36))
    assert delta_io.write_delta(_df(spark, more), path, partition_by=["date"], mode="append") == 1
    assert delta_io.history(path)[0]["operationParameters"]["mode"] == "Append"

    _assert_same(delta_io.read_delta(spark, path, version=0), rows)
    _assert_same(delta_io.read_delta(spark, path), rows + more)

    assert delta_io.delete_partitions(path, "date", [DAYS[2], "2030-01-01"]) == 2
    assert delta_io.history(path)[0]["operation"] == "DELETE"
    assert delta_io.delete_partitions(path, "date", ["2030-01-01"]) is None
    assert delta_io.table_version(path) == 2
    assert delta_io.partition_values(path, "date") == DAYS[:2]

    # a whole-table overwrite replaces everything
    assert (
        delta_io.write_delta(_df(spark, more), path, partition_by=["date"], mode="overwrite") == 3
    )
    _assert_same(delta_io.read_delta(spark, path), more)


def test_driver_collects_one_row_per_file(spark, tmp_path, monkeypatch):
    path = str(tmp_path / "t")
    rows = _rows(range(60))
    df = _df(spark, rows).repartition(4)
    collected: list[int] = []
    collect = type(df).collect

    def spy(self):
        out = collect(self)
        collected.append(len(out))
        return out

    monkeypatch.setattr(type(df), "collect", spy)
    delta_io.write_delta(df, path, partition_by=["date"], mode="overwrite", sort_within=["id"])
    monkeypatch.undo()

    files = DeltaTable(path).file_uris()
    assert collected == [len(files)]
    assert len(files) == 3  # repartitioned by date: one file per partition value
    for f in files:
        ids = pq.read_table(f).column("id").to_pylist()
        assert ids == sorted(ids)
    _assert_same(delta_io.read_delta(spark, path), rows)


def test_partition_values_with_special_characters_and_nulls(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = [(1, 1.0, "a", [1], "a:b c/d"), (2, 2.0, "b", [2], None), (3, 3.0, "c", [3], "x")]
    delta_io.write_delta(_df(spark, rows), path, partition_by=["date"], mode="append")
    assert delta_io.partition_values(path, "date") == ["a:b c/d", "x"]
    _assert_same(delta_io.read_delta(spark, path), rows)
    only = delta_io.read_delta(spark, path, partitions={"date": ["a:b c/d"]})
    assert [r.id for r in only.collect()] == [1]


def test_split_by_partition_keeps_every_row_once_in_order():
    """A task's batch is cut into one batch per partition-value combination (nulls included),
    each holding exactly that combination's rows in their original order."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(3)
    n = 5000
    day = rng.choice(np.array(["2024-01-01", "2024-01-02", "2024-01-03"], dtype=object), n)
    day[rng.random(n) < 0.05] = None
    region = rng.choice(np.array(["eu", "us"], dtype=object), n)
    batch = pa.RecordBatch.from_pydict(
        {
            "row": pa.array(np.arange(n)),
            "date": pa.array(day, pa.string()),
            "region": pa.array(region, pa.string()),
            "seq": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64())),
        }
    )
    groups = list(delta_io._split_by_partition(batch, ["date", "region"]))
    assert len(groups) == 8 and len({k for k, _ in groups}) == 8
    seen = []
    for (d, r), part in groups:
        want = [i for i in range(n) if day[i] == d and region[i] == r]
        assert part.column("row").to_pylist() == want
        assert part.column("seq").to_pylist() == [[i, i + 1] for i in want]
        seen += want
    assert sorted(seen) == list(range(n))
    ((key, whole),) = delta_io._split_by_partition(batch.slice(0, 1), ["date", "region"])
    assert key == (day[0], region[0]) and whole.num_rows == 1


def _task_files(target: delta_io.WriteTarget, task: int, rows: list[tuple]) -> list[dict]:
    """The files one task writes for ``rows`` (as the kernel's tasks do)."""
    import pyarrow as pa

    writer = target.task_writer()
    writer.task = task  # outside Spark every writer is task 0
    names = SCHEMA.fieldNames()
    writer.write(
        pa.RecordBatch.from_pylist([dict(zip(names, r, strict=True)) for r in rows], target.schema)
    )
    return writer.finish()


def test_small_files_of_a_partition_are_merged_before_the_commit(tmp_path):
    """Each task writes a file per date; a date's small files become one file (in task order,
    with its own Delta statistics) before the commit, a large one stays as written, and the
    merged inputs are gone from the disk."""
    path = str(tmp_path / "t")
    target = delta_io.write_target(path, SCHEMA, ["date"])
    rows = {task: _rows(range(task * 30, task * 30 + 30)) for task in range(3)}
    rows[3] = _rows(range(90, 3090), day=DAYS[0])  # one large file of the first date
    files = [f for task in range(4) for f in _task_files(target, task, rows[task])]
    assert len(files) == 10
    big = max(f["size"] for f in files)
    merged = delta_io.merge_small_files(
        target, files, small_bytes=big, target_bytes=100 * big, threads=2
    )
    by_date: dict[str, list[dict]] = {}
    for f in merged:
        by_date.setdefault(json.loads(f["partition_values"])["date"], []).append(f)
    assert {d: len(v) for d, v in by_date.items()} == {DAYS[0]: 2, DAYS[1]: 1, DAYS[2]: 1}
    kept = [f for f in files if f["size"] == big]
    assert [f for f in merged if f["path"] == kept[0]["path"]] == kept
    for f in files:
        assert Path(path, f["path"]).exists() == (f in kept)
    delta_io.commit_files(target, merged, mode="overwrite")
    for f in merged:
        ids = pq.read_table(Path(path, f["path"])).column("id").to_pylist()
        stats = json.loads(f["stats"])
        assert stats["numRecords"] == f["num_records"] == len(ids)
        assert (stats["minValues"]["id"], stats["maxValues"]["id"]) == (min(ids), max(ids))
        assert ids == sorted(ids)  # the inputs' rows in task order
    all_rows = [r for task in range(4) for r in rows[task]]
    assert sorted(DeltaTable(path).to_pyarrow_table().column("id").to_pylist()) == [
        r[0] for r in all_rows
    ]
    # a run of small files is cut where it would pass target_bytes
    again = [f for task in range(3) for f in _task_files(target, task, rows[task])]
    small = max(f["size"] for f in again)
    cut = delta_io.merge_small_files(
        target, again, small_bytes=big, target_bytes=2 * small, threads=1
    )
    assert sorted(f["num_records"] for f in cut) == sorted([20, 10] * 3)


def test_merges_run_as_spark_tasks_and_keep_their_inputs_until_all_succeed(spark, tmp_path):
    """With a session the merges are a Spark job (a task per merged file) whose files equal the
    driver threads' merge; a failed merge leaves every input in place (a retried task, or a
    re-run, still finds them) and no partial merged file."""
    rows = {task: _rows(range(task * 30, task * 30 + 30)) for task in range(3)}

    def merged_by(path: str, **how) -> tuple[list[dict], list[list]]:
        target = delta_io.write_target(path, SCHEMA, ["date"])
        files = [f for task in range(3) for f in _task_files(target, task, rows[task])]
        big = max(f["size"] for f in files) + 1
        out = delta_io.merge_small_files(
            target, files, small_bytes=big, target_bytes=100 * big, **how
        )
        assert not any(Path(path, f["path"]).exists() for f in files)
        ids = [pq.read_table(Path(path, f["path"])).column("id").to_pylist() for f in out]
        return sorted(out, key=lambda f: f["partition_values"]), ids

    sc = spark.sparkContext
    sc.setJobGroup("merge-test", "merge small files")
    try:
        by_spark, spark_ids = merged_by(str(tmp_path / "s"), spark=spark)
        assert len(sc.statusTracker().getJobIdsForGroup("merge-test")) == 1
    finally:
        sc.setJobGroup("", "")
    by_threads, thread_ids = merged_by(str(tmp_path / "t"), threads=2)
    assert len(by_spark) == len(by_threads) == 3
    drop = ("modification_time", "path")
    for a, b in zip(by_spark, by_threads, strict=True):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    assert sorted(spark_ids) == sorted(thread_ids)

    path = str(tmp_path / "f")
    target = delta_io.write_target(path, SCHEMA, ["date"])
    files = [f for task in range(3) for f in _task_files(target, task, rows[task])]
    gone = next(f for f in files if json.loads(f["partition_values"])["date"] == DAYS[1])
    Path(path, gone["path"]).unlink()  # a lost input: that date's merge fails
    big = max(f["size"] for f in files) + 1
    with pytest.raises(Exception, match="No such file|not found|FileNotFound"):
        delta_io.merge_small_files(
            target, files, small_bytes=big, target_bytes=100 * big, spark=spark
        )
    assert all(Path(path, f["path"]).exists() for f in files if f is not gone)
    assert not list(Path(path).glob(f"date={DAYS[1]}/*merged*"))
