"""Sessionization of an event stream, checked against an independent pandas computation.

A small synthetic log (plus a few hand-made bad actions) goes through one full build with
`feature_specs/synthetic.yaml`; every impression must become one example whose labels are the
actions that arrived with its impression id within the attribution window, and every action
outside it must be in `rejected` with its reason.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipelines.build import build
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.spec import load_spec
from pipelines.synthetic import EVENTS_SCHEMA, BehaviourModel, SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
START = dt.date(2022, 4, 25)
DAYS = [(START + dt.timedelta(days=i)).isoformat() for i in range(4)]
WINDOW_MS = 1800 * 1000
NOW_MS = int(dt.datetime(2022, 6, 1, tzinfo=dt.UTC).timestamp() * 1000)
# more late actions and purchases than the default model, so that both are well represented
MODEL = BehaviourModel(late_action_prob=0.1, purchase_given_click=(0.2, 0.2, 0.3, 0.3))
CONFIG = SyntheticConfig(
    users=300,
    items=200,
    days=4,
    impressions_per_user_day=6.0,
    start_date=START,
    seed=3,
    model=MODEL,
)


def _inject(out: Path) -> pd.DataFrame:
    """Actions that must be rejected, written as an extra file into the second day's folder."""
    day = out / "events" / f"date={DAYS[1]}"
    ev = pq.read_table(next(day.glob("part-*.parquet"))).to_pandas()
    imp = ev[ev["event_type"] == "impression"].sort_values("event_id").iloc[5]
    other = ev[(ev["event_type"] == "impression") & (ev["user_id"] != imp["user_id"])].iloc[0]
    t = int(imp["event_time_ms"])
    day_start = int(dt.datetime.fromisoformat(DAYS[1]).replace(tzinfo=dt.UTC).timestamp() * 1000)
    base = {"user_id": int(imp["user_id"]), "item_id": int(imp["item_id"]), "dwell_s": None}
    rows = [
        # an impression id that exists nowhere
        {**base, "event_id": 9_000_001, "impression_id": 9_000_000, "event_type": "click",
         "event_time_ms": t + 5_000},
        # an existing impression id, but another user's impression
        {**base, "event_id": 9_000_002, "impression_id": int(other["impression_id"]),
         "event_type": "click", "event_time_ms": int(other["event_time_ms"]) + 5_000},
        # a stay logged before its impression was shown
        {**base, "event_id": 9_000_003, "impression_id": int(imp["impression_id"]),
         "event_type": "stay", "event_time_ms": max(day_start, t - 60_000), "dwell_s": 7.0},
    ]  # fmt: skip
    extra = pd.DataFrame(rows)
    pq.write_table(
        pa.Table.from_pandas(extra, schema=EVENTS_SCHEMA, preserve_index=False),
        day / "part-99999.parquet",
    )
    return extra


def expected(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per impression with its labels, one row per action with its reason or None)."""
    imps = events[events["event_type"] == "impression"]
    assert imps["impression_id"].is_unique
    acts = events[events["event_type"] != "impression"].merge(
        imps[["impression_id", "user_id", "item_id", "event_time_ms"]],
        on="impression_id",
        how="left",
        suffixes=("", "_imp"),
    )
    delay = acts["event_time_ms"] - acts["event_time_ms_imp"]
    orphan = (
        acts["event_time_ms_imp"].isna()
        | (acts["user_id"] != acts["user_id_imp"])
        | (acts["item_id"] != acts["item_id_imp"])
    )
    acts["reason"] = np.select(
        [orphan, delay < 0, delay > WINDOW_MS],
        ["orphan_action", "action_before_impression", "late_action"],
        None,
    )
    ok = acts[acts["reason"].isna()]
    typ = ok["event_type"]
    labels = (
        pd.DataFrame(
            {
                "impression_id": ok["impression_id"],
                "label_click": (typ == "click").astype(int),
                "label_purchase": (typ == "purchase").astype(int),
                "label_dwell": ok["dwell_s"].where(typ == "stay", 0.0).fillna(0.0),
            }
        )
        .groupby("impression_id")
        .agg({"label_click": "max", "label_purchase": "max", "label_dwell": "sum"})
    )
    sessions = imps.merge(labels, on="impression_id", how="left")
    sessions[["label_click", "label_purchase"]] = (
        sessions[["label_click", "label_purchase"]].fillna(0).astype(int)
    )
    sessions["label_dwell"] = sessions["label_dwell"].fillna(0.0)
    return sessions, acts


@pytest.fixture(scope="module")
def synth(spark, tmp_path_factory):
    """The generated log (+ injected bad actions), its pandas truth and one full build."""
    tmp = tmp_path_factory.mktemp("sessions")
    out = tmp / "synthetic"
    manifest = generate(CONFIG, out)
    extra = _inject(out)
    events = pd.concat(
        [pd.read_parquet(f) for f in sorted((out / "events").glob("date=*/part-*.parquet"))],
        ignore_index=True,
    )
    assert len(events) == manifest["counts"]["events"]["total"] + len(extra)
    spec = load_spec(
        REPO / "feature_specs" / "synthetic.yaml",
        overrides=[
            f"source.path={out}/events/date={{date}}",
            f"user.tables.0.path={out}/users.parquet",
            f"item.tables.0.path={out}/items.parquet",
            f"split.train_end={DAYS[1]}",
            f"split.valid_end={DAYS[2]}",
        ],
    )
    # keep the user state of every day, so that any single day can be re-run nightly
    cfg = PipelineConfig(
        lake=str(tmp / "lake"), spark={"user_partitions": 2}, full_state_snapshots=len(DAYS)
    )
    summary = build(spark, spec, cfg, now_ms=NOW_MS)
    return events, spec, cfg, summary


def _rejected(path: str) -> pd.DataFrame:
    rej = DeltaTable(path).to_pandas()
    rej["event_id"] = rej["raw"].map(lambda r: int(json.loads(r)["event_id"]))
    return rej.set_index("event_id").sort_index()


@pytest.mark.slow
def test_sessions_match_pandas(synth):
    events, spec, cfg, summary = synth
    sessions, acts = expected(events)
    reasons = acts["reason"].value_counts().to_dict()
    # the data exercise every path
    assert reasons["late_action"] > 10 and reasons["orphan_action"] == 2
    assert reasons["action_before_impression"] == 1
    assert sessions["label_purchase"].sum() > 10
    tables = Tables.for_spec(cfg.lake, spec)

    # accounting: every raw event is a session, an attributed action, or rejected
    n_ok = int(acts["reason"].isna().sum())
    assert summary["rows_in"] == len(events)
    assert summary["rows_in_counted_independently"]
    assert summary["sessions"] == summary["examples"] == len(sessions)
    assert summary["actions_attributed"] == n_ok
    assert summary["rows_accepted"] == len(sessions) + n_ok
    assert summary["rows_in"] == summary["rows_accepted"] + summary["rows_rejected"]
    assert summary["rejected_by_reason"] == reasons

    # rejected: exactly the actions pandas rejects, each with the same reason and its day
    rej = _rejected(tables.rejected)
    bad = acts[acts["reason"].notna()]
    want = bad.set_index("event_id")["reason"].sort_index()
    pd.testing.assert_series_equal(rej["reason"], want, check_dtype=False)
    rej_day = rej["date"]
    want_day = pd.to_datetime(bad.set_index("event_id")["event_time_ms"], unit="ms").dt.strftime(
        "%Y-%m-%d"
    )
    pd.testing.assert_series_equal(rej_day, want_day.sort_index(), check_names=False)

    # examples: one per impression, labels from the actions inside the window
    ex = DeltaTable(tables.examples).to_pandas()
    key = ["user_id", "item_id", "event_time_ms"]
    assert not sessions.duplicated(key).any(), "the test needs a unique impression key"
    m = ex.merge(sessions, on=key, how="outer", suffixes=("", "_want"), indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][key]
    assert len(m) == len(ex) == len(sessions)
    assert (m["label_click"] == m["label_click_want"]).all()
    assert (m["label_purchase"] == m["label_purchase_want"]).all()
    np.testing.assert_allclose(m["label_dwell"], m["label_dwell_want"], rtol=1e-12, atol=1e-9)
    day = pd.to_datetime(m["event_time_ms"], unit="ms").dt.strftime("%Y-%m-%d")
    assert (m["date"] == day).all()
    split = m["date"].map({DAYS[0]: "train", DAYS[1]: "train", DAYS[2]: "valid", DAYS[3]: "test"})
    assert (m["split"] == split).all()
    # clicks inside the window exist but late ones were not counted
    assert 0 < m["label_click"].sum() < (events["event_type"] == "click").sum()


@pytest.mark.slow
def test_nightly_rejects_like_full_build(spark, synth, tmp_path):
    """The nightly run of one day files the same rows under the same reasons as the full build
    (late actions crossing midnight included)."""
    events, spec, cfg0, _summary = synth
    shutil.copytree(cfg0.lake, tmp_path / "lake")  # reuse the fitted preprocessing
    cfg = PipelineConfig(lake=str(tmp_path / "lake"), spark={"user_partitions": 2})
    tables = Tables.for_spec(cfg.lake, spec)
    day = DAYS[1]
    full = _rejected(tables.rejected)
    full = full[full["date"] == day]
    summary = build(spark, spec, cfg, date=day, now_ms=NOW_MS)

    sessions, _acts = expected(events)
    n_day = int((_days(events["event_time_ms"]) == day).sum())
    if summary["rows_in"] != n_day or n_day != summary["rows_accepted"] + summary["rows_rejected"]:
        pytest.fail(f"nightly accounting broken: {n_day} rows of {day}, summary {summary}")
    ex = DeltaTable(tables.examples).to_pandas()
    ex = ex[ex["date"] == day]
    want = sessions[_days(sessions["event_time_ms"]) == day]
    key = ["user_id", "item_id", "event_time_ms"]
    m = ex.merge(want, on=key, suffixes=("", "_want"))
    if not len(m) == len(ex) == len(want) or not (
        (m["label_click"] == m["label_click_want"]).all()
        and (m["label_purchase"] == m["label_purchase_want"]).all()
        and np.allclose(m["label_dwell"], m["label_dwell_want"], rtol=1e-12, atol=1e-9)
    ):
        pytest.fail(f"nightly sessions of {day} differ from the pandas truth")

    nightly = _rejected(tables.rejected)
    nightly = nightly[nightly["date"] == day]
    diff = nightly["reason"].compare(full["reason"], result_names=("nightly", "full"))
    assert diff.empty, diff.value_counts()


def _days(time_ms: pd.Series) -> pd.Series:
    return pd.to_datetime(time_ms, unit="ms").dt.strftime("%Y-%m-%d")


@pytest.mark.slow
def test_duckdb_build_writes_the_same_examples(synth, tmp_path):
    """The single-machine comparison of `jobs.benchmark pipeline` (DuckDB SQL) writes the Spark
    build's examples row for row and rejects the same events for the same reasons; a change of
    one value in its output is caught (the benchmark's equality check can fail)."""
    from pipelines.duckdb_build import build_duckdb, compare_examples, compare_rejected
    from pipelines.preprocessing import load as load_artifacts

    events, spec, cfg, summary = synth
    tables = Tables.for_spec(cfg.lake, spec)
    duck = tmp_path / "duck"
    s = build_duckdb(spec, duck, now_ms=NOW_MS, threads=2, progress=False)
    assert (s["rows_in"], s["sessions"], s["rows_rejected"]) == (
        summary["rows_in"],
        summary["sessions"],
        summary["rows_rejected"],
    )
    art = load_artifacts(tables.artifacts, spec)
    assert s["bin_boundaries"] == art.bins and s["vocab_sizes"] == art.vocab_sizes
    for t, m in art.global_means.items():
        assert s["global_means"][t] == pytest.approx(m, rel=1e-12)

    same = compare_examples(tables.examples, duck / "examples")
    assert same["equal"], same["mismatches"]
    assert same["rows_compared"] == len(expected(events)[0])
    ex = DeltaTable(tables.examples).to_pandas()
    # the features compared are not trivial: histories, windows and sequences are filled
    assert (ex["n_prev"] > 0).mean() > 0.5 and (ex["seq_clicked"].map(len) > 0).mean() > 0.3
    assert compare_rejected(tables.rejected, duck / "rejected.parquet")["equal"]
    duck_rej = pd.read_parquet(duck / "rejected.parquet").set_index("event_id")["reason"]
    pd.testing.assert_series_equal(
        duck_rej.sort_index(), _rejected(tables.rejected)["reason"], check_dtype=False
    )

    # one pseudo-label and one sequence item changed in a copy of the DuckDB output
    bad = tmp_path / "bad"
    shutil.copytree(duck / "examples", bad)
    f = sorted(bad.glob("date=*/*.parquet"))[-1]
    t = pq.read_table(f)
    pl = t["pl_click"].to_numpy().copy()
    pl[0] += 1e-6
    seqs = t["seq_clicked"].to_pylist()
    i = next(k for k, q in enumerate(seqs) if q)
    seqs[i] = [seqs[i][0] + 1, *seqs[i][1:]]
    t = t.set_column(t.schema.get_field_index("pl_click"), "pl_click", pa.array(pl))
    t = t.set_column(
        t.schema.get_field_index("seq_clicked"),
        "seq_clicked",
        pa.array(seqs, t.schema.field("seq_clicked").type),
    )
    pq.write_table(t, f)
    res = compare_examples(tables.examples, bad)
    assert not res["equal"]
    assert res["mismatches"]["pl_click"]["rows"] == 1
    assert res["mismatches"]["seq_clicked"]["rows"] == 1
    assert set(res["mismatches"]) == {"pl_click", "seq_clicked"}


def test_spark_xxhash64_of_longs(spark):
    """The DuckDB build names its examples with Spark's hash of the impression id."""
    from pyspark.sql import functions as F

    from pipelines.duckdb_build import spark_xxhash64_long

    values = [0, 1, -1, 2**63 - 1, -(2**63), 123_456_789_012_345, 9_000_000]
    df = spark.createDataFrame([(v,) for v in values], "v long")
    want = [r["h"] for r in df.select(F.xxhash64("v").alias("h")).collect()]
    assert spark_xxhash64_long(np.array(values, dtype=np.int64)).tolist() == want


def _validate_one_day(spark, tmp_path: Path, rows: list[tuple], *overrides: str):
    """The validated sessions of one day of hand-written events (EVENTS_SCHEMA tuples)."""
    from pipelines.build import read_validated

    day_dir = tmp_path / "events" / "date=2022-04-25"
    day_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(
        [dict(zip(EVENTS_SCHEMA.names, r, strict=True)) for r in rows], schema=EVENTS_SCHEMA
    )
    pq.write_table(table, day_dir / "part-0.parquet")
    spec = load_spec(
        REPO / "feature_specs" / "synthetic.yaml",
        overrides=[f"source.path={tmp_path}/events/date={{date}}", *overrides],
    )
    cfg = PipelineConfig(lake=str(tmp_path / "lake"))
    validated, _ = read_validated(spark, spec, cfg, "2022-04-25", NOW_MS)
    return validated


def test_rows_without_impression_id_are_rejected_and_spread(spark, tmp_path):
    """A day whose impression ids are mostly null: every such row is rejected with its reason,
    none is lost, and they do not gather in one window group (one huge buffer in one task)."""
    n_bad, t0 = 3000, int(dt.datetime(2022, 4, 25, 8, tzinfo=dt.UTC).timestamp() * 1000)
    good = [
        (1, 100, 7, 11, "impression", t0, None),
        (2, 100, 7, 11, "click", t0 + 5_000, None),
        (3, 101, 8, 12, "impression", t0 + 1_000, None),
    ]
    bad = [(10 + i, None, 7 + i % 5, 11, "click", t0 + i, None) for i in range(n_bad)]
    validated = _validate_one_day(spark, tmp_path, good + bad)
    rejected = validated.rejected.toPandas()
    assert (rejected["reason"] == "null_value:impression_id").sum() == n_bad
    assert len(rejected) == n_bad
    assert sorted(validated.accepted.select("impression_id").toPandas()["impression_id"]) == [
        100,
        101,
    ]
    per_row = validated.cached[-1]
    largest = (
        per_row.groupBy("impression_id", "_imp_spread").count().agg({"count": "max"}).first()[0]
    )
    assert largest < n_bad / 10, largest
    for frame in validated.cached:
        frame.unpersist()


def test_kept_exact_duplicates_still_give_one_session_per_impression(spark, tmp_path):
    """A source that keeps exact duplicates (reject_exact_duplicates: false): a doubled
    impression row is one session, its copy rejected as a duplicate impression id, and a doubled
    action counts twice; every row is accounted for."""
    t0 = int(dt.datetime(2022, 4, 25, 8, tzinfo=dt.UTC).timestamp() * 1000)
    imp = (1, 100, 7, 11, "impression", t0, None)
    stay = (2, 100, 7, 11, "stay", t0 + 5_000, 3.0)
    rows = [imp, imp, stay, stay, (3, 101, 8, 12, "impression", t0 + 1_000, None)]
    validated = _validate_one_day(spark, tmp_path, rows, "source.reject_exact_duplicates=false")
    sessions = validated.accepted.toPandas().sort_values("impression_id")
    assert sessions["impression_id"].tolist() == [100, 101]
    assert sessions["value_stay"].tolist() == [6.0, 0.0]
    assert validated.rejected.toPandas()["reason"].tolist() == ["duplicate_impression_id"]
    assert validated.actions.count() == 2
    for frame in validated.cached:
        frame.unpersist()


@pytest.mark.parametrize("max_distinct", [10_000, 3], ids=["exact counts", "sketch"])
def test_dwell_boundaries_are_the_inverted_cdf(spark, max_distinct):
    """Bin boundaries are the training values at ranks ceil(i / n_bins * n), per task, whether
    taken from per-value counts or (too many distinct values) from percentile_approx."""
    from pipelines.artifacts import dwell_boundaries

    rng = np.random.default_rng(7)
    # many ties (zeros, repeated values) and a heavy tail, as dwell times have
    stay = np.where(rng.random(997) < 0.6, 0.0, np.round(rng.lognormal(2, 1.5, 997), 1))
    watch = rng.integers(0, 40, 997).astype(float) * 250.0
    df = spark.createDataFrame(
        pd.DataFrame({"label_stay": stay, "label_watch": watch, "label_click": 1})
    )
    got, exact = dwell_boundaries(df, {"stay": 10, "watch": 4}, max_distinct=max_distinct)
    assert set(exact) == ({"stay", "watch"} if max_distinct > 3 else set())
    for name, x, n_bins in (("stay", stay, 10), ("watch", watch, 4)):
        qs = [i / n_bins for i in range(1, n_bins)]
        want = [float(np.quantile(x, q, method="inverted_cdf")) for q in qs]
        assert got[name] == want, name
        if exact:
            values, counts = np.unique(x, return_counts=True)
            assert dict(zip(*exact[name], strict=True)) == dict(zip(values, counts, strict=True))


SHARED = ["user.categorical.1.table=shared", "item.categorical.0.table=shared"]
# what the fit does in Spark: nothing; the weighing of the side tables (their counts or side
# tables too many for the driver); that and the vocabularies' ranking and the side tables'
# moments
SPARK_PATHS = {
    "none": [],
    "weighing": ["DRIVER_COUNTS_MAX_ROWS"],
    "all": ["DRIVER_COUNTS_MAX_ROWS", "DRIVER_RANK_MAX_VALUES", "DRIVER_MOMENTS_MAX_ROWS"],
}


@pytest.mark.parametrize(
    ("shared", "in_spark"),
    [([], "none"), (SHARED, "none"), (SHARED, "weighing"), ([], "all")],
    ids=["driver", "shared-vocabulary", "shared-vocabulary-spark-weighing", "spark"],
)
def test_side_tables_fitted_and_applied_on_the_tables_equal_the_joined_rows(
    spark, tmp_path, monkeypatch, shared, in_spark
):
    """The fit weighs a side table's values by each id's count of training rows, and apply maps
    them on the table before joining: vocabularies, dense statistics and every applied column
    equal those of the rows joined with the side tables, with ids the tables lack (OOV, the
    fill value), null side values, side rows no session has, a user table joined through a
    shuffle (broadcasting off), and a vocabulary shared by a user and an item feature."""
    from pyspark.sql import functions as F

    from pipelines import artifacts as arts
    from pipelines.build import _in_train

    for bound in SPARK_PATHS[in_spark]:
        monkeypatch.setattr(arts, bound, 0)
    # a fill value that is not 0: the ids the user table lacks and its null values take it
    overrides = [*shared, "user.dense.0.fill=30"]
    spec = load_spec(REPO / "feature_specs" / "synthetic.yaml", overrides=overrides)
    rng = np.random.default_rng(11)
    n = 3000
    rows = pd.DataFrame(
        {
            "user_id": rng.integers(0, 60, n),  # users 50..59 are not in the user table
            "item_id": rng.integers(0, 400, n),  # items 300..399 are not in the item table
            "event_time_ms": rng.integers(0, 10**9, n),
            "date": rng.choice(["2022-04-26", "2022-04-28", "2022-05-06"], n),
            "example_id": np.arange(n),
            "label_click": rng.integers(0, 2, n).astype(np.int32),
            "label_dwell": np.round(rng.exponential(20, n), 1),
            "label_purchase": (rng.random(n) < 0.1).astype(np.int32),
        }
    )
    users = pd.DataFrame(
        {
            "_key": np.r_[np.arange(50), np.arange(100, 105)],  # 100..104: no sessions
            "age_bucket": rng.choice(["18-24", "25-34", None], 55),
            "device": rng.choice(["ios", "android"], 55),
            "city_tier": rng.integers(1, 4, 55),
            "register_days": np.where(rng.random(55) < 0.1, np.nan, rng.integers(0, 900, 55)),
        }
    )
    items = pd.DataFrame(
        {
            "_key": np.arange(300),
            # values shared with the users' device: a shared vocabulary adds their counts up
            "category": rng.choice(["ios", "android", *(f"c{i}" for i in range(10))], 300),
            "author_id": rng.integers(0, 40, 300),
            "duration_s": rng.exponential(60, 300),
        }
    )

    def frame(pdf: pd.DataFrame):
        return spark.createDataFrame(pdf.astype(object).where(pdf.notna(), None))

    sessions = frame(rows)
    sides = [
        arts.SideLookup(
            "user_id", frame(users).withColumn("register_days", F.col("register_days").cast("long"))
        ),
        arts.SideLookup("item_id", frame(items), broadcast=True),
    ]
    joined = sessions
    for side in sides:
        joined = side.join(joined)
    want = arts.fit(spec, joined.where(_in_train(spec)), tmp_path / "joined")
    got = arts.fit(spec, sessions.where(_in_train(spec)), tmp_path / "sides", sides)
    assert got.vocabs == want.vocabs and got.vocab_sizes == want.vocab_sizes
    assert got.bins == want.bins and got.train_rows == want.train_rows
    for t, m in want.global_means.items():
        assert got.global_means[t] == pytest.approx(m, rel=1e-12)
    for f, stats in want.dense.items():
        assert got.dense[f].mean == pytest.approx(stats.mean, rel=1e-12), f
        assert got.dense[f].std == pytest.approx(stats.std, rel=1e-12), f
    if in_spark != "none":
        return  # what follows does not depend on where the fit sums

    # The build computes the fit's own aggregates in its statistics job, over every session
    # with the training window as a condition: the same artifacts, and the fit uses them.
    side_features = {name for side in sides for name in side.features}
    aggs = arts.row_aggregates(spec, side_features, where=_in_train(spec))
    row_stats = sessions.agg(*aggs.values()).first().asDict()
    assert set(row_stats) == {"min_dwell", "mean_click", "mean_purchase"}
    folded = arts.fit(spec, sessions.where(_in_train(spec)), tmp_path / "f", sides, row_stats)
    assert folded.to_json() == got.to_json() and folded.vocabs == got.vocabs
    shifted = arts.fit(
        spec,
        sessions.where(_in_train(spec)),
        tmp_path / "s",
        sides,
        shifted_stats := {**row_stats, "mean_click": 0.5},
    )
    assert shifted.global_means["click"] == 0.5
    # without one of them it takes them all from the rows
    partial = {k: v for k, v in shifted_stats.items() if k != "min_dwell"}
    again = arts.fit(spec, sessions.where(_in_train(spec)), tmp_path / "p", sides, partial)
    assert again.to_json() == got.to_json()

    def applied(df) -> pd.DataFrame:
        cols = ["example_id", "user_idx", "item_idx", "label_dwell_bin"]
        cols += [f.name for f in spec.categorical_features + spec.dense_features]
        return df.select(*cols).toPandas().sort_values("example_id").reset_index(drop=True)

    expected = applied(arts.apply(spec, joined, want))
    assert (expected["age_bucket"] == arts.OOV).any() and (expected["category"] == 0).any()
    key = "spark.sql.autoBroadcastJoinThreshold"
    before = spark.conf.get(key)
    # the side tables (2 and 3 categoricals) mapped on the driver, then (a bound of 0 rows) by
    # joins in Spark
    monkeypatch.setattr(arts, "DRIVER_SIDE_MIN_CATEGORICALS", 1)
    for side_rows in (arts.DRIVER_SIDE_MAX_ROWS, 0):
        monkeypatch.setattr(arts, "DRIVER_SIDE_MAX_ROWS", side_rows)
        for threshold in (before, "-1"):
            spark.conf.set(key, threshold)
            try:
                pd.testing.assert_frame_equal(
                    applied(arts.apply(spec, sessions, want, sides)), expected
                )
            finally:
                spark.conf.set(key, before)


def test_fit_counts_are_pandas_value_counts(spark):
    """`count_values` (the fit's one group-by): a shared table counts the values of all its
    columns together, integer tables count numbers, string tables strings, dwell values and
    rows per date are counted too, and nulls nowhere."""
    from pipelines.artifacts import DATE, DWELL, VOCAB, count_values

    rng = np.random.default_rng(3)
    n = 500
    pdf = pd.DataFrame(
        {
            "src": rng.integers(0, 30, n),
            "dst": rng.integers(20, 50, n),  # overlaps src: shared values must add up
            "city": rng.choice(["a", "b", "c", None], n),
            "label_stay": np.where(rng.random(n) < 0.2, np.nan, rng.integers(0, 9, n) * 0.5),
            "date": rng.choice(["2022-04-25", "2022-04-26"], n),
        }
    )
    df = spark.createDataFrame(pdf.astype(object).where(pdf.notna(), None))
    got = count_values(
        df,
        vocab={"node": (["src", "dst"], True), "city": (["city"], False)},
        dwell=["stay"],
        by_date=True,
    ).toPandas()

    def part(kind: int, tbl: str, field: str) -> dict:
        mine = got[(got["kind"] == kind) & (got["tbl"] == tbl)]
        return dict(zip(mine[field], mine["count"], strict=True))

    node = pd.concat([pdf["src"], pdf["dst"]]).value_counts()
    assert part(VOCAB, "node", "num") == node.to_dict()
    assert part(VOCAB, "city", "str") == pdf["city"].value_counts().to_dict()
    assert part(DWELL, "stay", "dbl") == pdf["label_stay"].value_counts().to_dict()
    assert part(DATE, "", "str") == pdf["date"].value_counts().to_dict()
    assert len(got) == len(node) + 3 + pdf["label_stay"].nunique() + 2


@pytest.mark.parametrize("max_driver_values", [5_000_000, 0], ids=["driver", "spark"])
def test_vocabularies_rank_by_count_then_value(spark, max_driver_values):
    """`rank_vocabularies` against pandas: values counted at least min_count times, the
    max_vocab most frequent, ties broken by the value as a string (an integer table's 10
    before 9), indices from 1; the same whether the driver ranks them or a Spark window."""
    from pipelines.artifacts import count_values, rank_vocabularies

    rng = np.random.default_rng(5)
    n = 4000
    pdf = pd.DataFrame(
        {
            # few values, many ties of count; every value of 0..39 at least once
            "node": np.r_[np.arange(40), rng.integers(0, 40, n - 40)],
            "city": rng.choice([f"c{i}" for i in range(30)] + ["\u00e9", "Z", "a"], n),
        }
    )
    df = spark.createDataFrame(pdf)
    counts = count_values(df, vocab={"node": (["node"], True), "city": (["city"], False)})
    limits = {"node": (25, 1), "city": (1000, 120)}
    got = rank_vocabularies(counts, limits, max_driver_values=max_driver_values)

    def want(col: str, max_vocab: int, min_count: int) -> pd.DataFrame:
        vc = pdf[col].astype(str).value_counts()
        vc = vc[vc >= min_count]
        order = sorted(vc.items(), key=lambda kv: (-kv[1], kv[0].encode()))[:max_vocab]
        return pd.DataFrame(
            {
                "value": [v for v, _ in order],
                "idx": np.arange(1, len(order) + 1, dtype=np.int32),
                "count": np.array([c for _, c in order], dtype=np.int64),
            }
        )

    for table, (max_vocab, min_count) in limits.items():
        expected = want(table, max_vocab, min_count)
        pd.testing.assert_frame_equal(got[table].to_pandas(), expected, check_dtype=True)
    assert len(got["node"]) == 25  # capped
    # ties among the counted node values are common here, so their order is exercised
    assert pdf["node"].value_counts().duplicated().any()
    assert 0 < len(got["city"]) < pdf["city"].nunique()  # min_count dropped some


@pytest.mark.slow
def test_nightly_reads_neighbour_days_typed_differently(spark, synth, tmp_path):
    """A Parquet column already of its declared type is read as it is; when the days a nightly
    run reads type a column differently (here the next day's dwell as text, one value not a
    number), they meet as strings and the day's examples and rejected rows are the full
    build's."""
    events, spec0, cfg0, _summary = synth
    src = Path(spec0.source.path.replace("/date={date}", ""))
    data = shutil.copytree(src, tmp_path / "events")
    for f in sorted((data / f"date={DAYS[2]}").glob("part-*.parquet")):
        t = pq.read_table(f)
        dwell = [None if v is None else repr(v) for v in t["dwell_s"].to_pylist()]
        dwell[0] = "n/a"
        t = t.set_column(t.schema.get_field_index("dwell_s"), "dwell_s", pa.array(dwell))
        pq.write_table(t, f)
    spec = spec0.model_copy(
        update={"source": spec0.source.model_copy(update={"path": f"{data}/date={{date}}"})}
    )
    shutil.copytree(cfg0.lake, tmp_path / "lake")  # reuse the fitted preprocessing
    cfg = PipelineConfig(lake=str(tmp_path / "lake"), spark={"user_partitions": 2})
    tables, full_tables = Tables.for_spec(cfg.lake, spec), Tables.for_spec(cfg0.lake, spec0)
    full_ex = DeltaTable(full_tables.examples).to_pandas()
    full_rej = _rejected(full_tables.rejected)
    build(spark, spec, cfg, date=DAYS[1], now_ms=NOW_MS)
    ex = DeltaTable(tables.examples).to_pandas()
    key = ["example_id"]
    got = ex[ex["date"] == DAYS[1]].sort_values(key).reset_index(drop=True)
    want = full_ex[full_ex["date"] == DAYS[1]].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[sorted(got.columns)], want[sorted(want.columns)])
    rej = _rejected(tables.rejected)
    rej = rej[rej["date"] == DAYS[1]]
    assert rej["reason"].tolist() == full_rej[full_rej["date"] == DAYS[1]]["reason"].tolist()
    assert rej["raw"].tolist() == full_rej[full_rej["date"] == DAYS[1]]["raw"].tolist()
