"""The feature build on a slice of the real KuaiRand log: leakage, incremental = full,
training-window-only fitting, idempotence.

The slice keeps every 8th user and the days up to 2022-04-28 (Beijing time), with the
pseudo-label window shortened to 3 days so that window eviction happens inside the slice.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import delta_io
from pipelines.build import build
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.preprocessing import load as load_artifacts
from pipelines.spec import load_spec
from tests.reference import assert_running_equal, naive_running

pytestmark = pytest.mark.slow

LAST_DAY = "2022-04-28"
DAYS = [f"2022-04-{d}" for d in range(24, 29)]
WINDOW = 3
TASKS = ["click", "dwell", "like", "long_view", "follow"]
SEQS = {
    "clicked": ("click", 1.0, 50),
    "not_clicked": ("click", 0.0, 50),
    "liked": ("like", 1.0, 50),
    "long_viewed": ("long_view", 1.0, 50),
    "followed": ("follow", 1.0, 50),
}


@pytest.fixture(scope="module")
def raw_slice(kuairand_dir: Path, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    log = pd.read_csv(kuairand_dir / "log_standard_4_25_to_5_08_pure.csv.gz")
    local = pd.to_datetime(log["time_ms"], unit="ms", utc=True).dt.tz_convert("Asia/Shanghai")
    keep = (log["user_id"] % 8 == 0) & (local.dt.strftime("%Y-%m-%d") <= LAST_DAY)
    sl = log[keep].reset_index(drop=True)
    path = tmp_path_factory.mktemp("kuairand_slice") / "log.csv.gz"
    with gzip.open(path, "wt") as fh:
        sl.to_csv(fh, index=False)
    return path, sl


@pytest.fixture(scope="module")
def spec(raw_slice):
    path, _ = raw_slice
    return load_spec(
        "feature_specs/kuairand.yaml",
        overrides=[
            f"source.path={path}",
            "split.train_end=2022-04-26",
            "split.valid_end=2022-04-27",
            f"pseudo_labels.window_days={WINDOW}",
        ],
    )


def _cfg(lake: Path) -> PipelineConfig:
    return PipelineConfig(lake=str(lake), spark={"user_partitions": 3})


@pytest.fixture(scope="module")
def full_lake(spark, spec, tmp_path_factory) -> Tables:
    lake = tmp_path_factory.mktemp("full")
    build(spark, spec, _cfg(lake))
    return Tables.for_spec(lake, spec)


@pytest.fixture(scope="module")
def nightly_lake(spark, spec, tmp_path_factory, full_lake) -> Tables:
    lake = tmp_path_factory.mktemp("nightly")
    tables = Tables.for_spec(lake, spec)
    # The nightly runs use the preprocessing fitted once on the training window (as in
    # production, where it is fitted by the full build or the first run).
    shutil.copytree(full_lake.artifacts, tables.artifacts)
    for day in DAYS:
        build(spark, spec, _cfg(lake), date=day)
    return tables


def _table(path: str, sort: list[str]) -> pd.DataFrame:
    df = DeltaTable(path).to_pandas()
    df = df.sort_values(sort).reset_index(drop=True)
    return df[sorted(df.columns)]


def _assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c].tolist(), b[c].tolist()
        if x and isinstance(x[0], (list, np.ndarray)):
            x = [list(v) for v in x]
            y = [list(v) for v in y]
        assert x == y, f"column {c} differs"


def test_nightly_day_by_day_equals_full_rebuild(full_lake: Tables, nightly_lake: Tables) -> None:
    for name, key in (
        ("examples", ["example_id"]),
        ("user_daily", ["date", "user_key"]),
        ("rejected", ["date", "raw"]),
    ):
        _assert_frames_equal(
            _table(getattr(full_lake, name), key), _table(getattr(nightly_lake, name), key)
        )
    # the full rebuild keeps the state as of its last two dates; so does the nightly chain
    full_state = _table(full_lake.user_state, ["state_date", "user_key"])
    assert sorted(full_state["state_date"].unique()) == DAYS[-2:]
    nightly = _table(nightly_lake.user_state, ["state_date", "user_key"])
    nightly = nightly[nightly["state_date"].isin(DAYS[-2:])].reset_index(drop=True)
    _assert_frames_equal(full_state, nightly)


def test_summary_describes_the_examples_written(spec, full_lake: Tables, nightly_lake: Tables):
    """The run summary's examples, users, items, label rates and split sizes are those of the
    examples table (of the run's date, for a nightly run)."""
    for tables, name in ((full_lake, "full"), (nightly_lake, DAYS[-1]), (nightly_lake, DAYS[2])):
        summary = json.loads((tables.summaries / f"{name}.json").read_text())
        ex = DeltaTable(tables.examples).to_pandas()
        if name != "full":
            ex = ex[ex["date"] == name]
        assert summary["examples"] == len(ex) > 0
        assert summary["users"] == ex["user_id"].nunique()
        assert summary["items"] == ex["item_id"].nunique()
        assert summary["examples_by_split"] == ex["split"].value_counts().to_dict()
        for t in spec.tasks:
            want = ex[f"label_{t.name}"].astype(float).mean()
            assert summary["label_rates"][t.name] == pytest.approx(want, rel=1e-12), t.name


def test_rows_are_the_raw_log_without_exact_duplicates(raw_slice, full_lake: Tables) -> None:
    _, sl = raw_slice
    ex = DeltaTable(full_lake.examples).to_pandas()
    rej = DeltaTable(full_lake.rejected).to_pandas()
    dedup = sl.drop_duplicates()
    assert len(ex) == len(dedup) and len(rej) == len(sl) - len(dedup)
    assert set(rej["reason"]) <= {"exact_duplicate"}
    key = ["user_id", "video_id", "time_ms", "is_click", "play_time_ms"]
    want = dedup[key].sort_values(key).to_numpy()
    got = ex.assign(
        video_id=ex["item_id"],
        time_ms=ex["event_time_ms"],
        is_click=ex["label_click"],
        play_time_ms=(ex["label_dwell"] * 1000).round().astype(np.int64),
    )[key]
    np.testing.assert_array_equal(got.sort_values(key).to_numpy(), want)


def test_examples_files_keep_each_users_day_in_time_order(full_lake: Tables, nightly_lake: Tables):
    """What the loader relies on: within a date a user's rows lie in one file, contiguous and in
    time order; files are named part-<task>-<uuid> as Spark names them."""
    for tables in (full_lake, nightly_lake):
        files = DeltaTable(tables.examples).file_uris()
        assert files and all(Path(f).name.startswith("part-") for f in files)
        owner: dict[tuple[str, int], str] = {}
        for f in files:
            date = Path(f).parent.name.removeprefix("date=")
            df = pq.read_table(f, columns=["user_id", "event_time_ms"]).to_pandas()
            for user, rows in df.groupby("user_id", sort=False):
                assert owner.setdefault((date, int(user)), f) == f, (date, user)
                assert rows["event_time_ms"].is_monotonic_increasing, (f, user)
            # a user's rows are contiguous in the file
            runs = (df["user_id"] != df["user_id"].shift()).sum()
            assert runs == df["user_id"].nunique(), f
    # The kernel writes the files as it runs: had it run twice (its output recomputed instead of
    # read from the cache), the first run's files would lie beside the committed ones.
    on_disk = {str(p) for p in Path(full_lake.examples).rglob("*.parquet")}
    assert on_disk == {str(Path(f)) for f in DeltaTable(full_lake.examples).file_uris()}


@pytest.fixture(scope="module")
def examples(full_lake: Tables) -> pd.DataFrame:
    return DeltaTable(full_lake.examples).to_pandas()


@pytest.fixture(scope="module")
def reference_input(examples: pd.DataFrame, full_lake: Tables) -> pd.DataFrame:
    """The events as the reference sees them: raw ids, times, labels; values derived here."""
    art = load_artifacts(full_lake.artifacts)
    item_vocab = pq.read_table(Path(art.vocab_dir) / "item_id.parquet").to_pandas()
    item_idx = dict(zip(item_vocab["value"], item_vocab["idx"], strict=True))
    df = pd.DataFrame(
        {
            "user": examples["user_id"],
            "time": examples["event_time_ms"],
            "item": examples["item_id"].astype(str).map(item_idx).fillna(0).astype(np.int64),
            "day": (
                pd.to_datetime(examples["event_time_ms"], unit="ms", utc=True)
                .dt.tz_convert("Asia/Shanghai")
                .dt.normalize()
                .dt.tz_localize(None)
                - pd.Timestamp("1970-01-01")
            ).dt.days,
        },
        index=examples.index,
    )
    # tie-break: (time, video_id, example_id), expressed as one rank column
    df["example_id"] = (
        examples[["item_id", "example_id"]]
        .apply(tuple, axis=1)
        .rank(method="dense")
        .astype(np.int64)
    )
    for t in TASKS:
        if t == "dwell":
            bounds = np.asarray(art.bins["dwell"])
            df["value_dwell"] = np.searchsorted(
                bounds, examples["label_dwell"].to_numpy(), side="right"
            )
        else:
            df[f"value_{t}"] = examples[f"label_{t}"].astype(np.int64)
    return df


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_running_features_equal_naive_recomputation(
    data, examples, reference_input, full_lake
) -> None:
    art = load_artifacts(full_lake.artifacts, with_vocabs=False)
    users = sorted(examples["user_id"].unique())
    chosen = data.draw(st.lists(st.sampled_from(users), min_size=1, max_size=25, unique=True))
    inp = reference_input[examples["user_id"].isin(chosen)]
    divisors = {t: (art.n_bins("dwell") - 1 if t == "dwell" else 1) for t in TASKS}
    want = naive_running(inp, divisors, art.global_means, WINDOW, SEQS)
    got = examples.loc[inp.index]
    cols = ["n_prev", "n_prev_all", *[f"pl_{t}" for t in TASKS], *[f"pl_all_{t}" for t in TASKS]]
    assert_running_equal(got, want, cols + [f"seq_{s}" for s in SEQS])


def test_preprocessing_is_fitted_on_the_training_window_only(examples, full_lake, spec) -> None:
    art = load_artifacts(full_lake.artifacts)
    train = examples[examples["date"] <= spec.split.train_end.isoformat()]
    later = examples[examples["date"] > spec.split.train_end.isoformat()]
    assert art.train_dates == sorted(train["date"].unique())
    assert art.train_rows == len(train)
    # item vocabulary = exactly the items seen in training; later-only items map to OOV (0)
    assert set(art.vocabs["item_id"]) == set(train["item_id"].astype(str))
    unseen = ~later["item_id"].isin(train["item_id"])
    assert unseen.any(), "the slice should contain items first seen after the training window"
    assert (later.loc[unseen, "item_idx"] == 0).all()
    assert (later.loc[~unseen, "item_idx"] > 0).all()
    # dwell bins: equal-frequency boundaries of the training window's values
    x = np.sort(train["label_dwell"].to_numpy())
    qs = [i / 10 for i in range(1, 10)]
    want = sorted({float(np.quantile(x, q, method="inverted_cdf")) for q in qs} - {float(x.min())})
    np.testing.assert_allclose(art.bins["dwell"], want)
    counts = np.bincount(train["label_dwell_bin"], minlength=len(want) + 1)
    assert counts.min() > 0
    # a dense standardisation uses training statistics only
    assert (
        abs(train["duration_ms"].mean()) < 1e-3 and abs(train["duration_ms"].std(ddof=0) - 1) < 1e-3
    )
    assert abs(later["duration_ms"].mean()) > 1e-3
    # global means for the no-history fallback come from the training rows
    assert art.global_means["click"] == pytest.approx(train["label_click"].mean())


def test_rerunning_a_date_replaces_it(spark, spec, nightly_lake: Tables) -> None:
    before = _table(nightly_lake.examples, ["example_id"])
    version = delta_io.table_version(nightly_lake.examples)
    build(spark, spec, _cfg(nightly_lake.root.parent), date=LAST_DAY)
    after = _table(nightly_lake.examples, ["example_id"])
    _assert_frames_equal(before, after)
    assert delta_io.table_version(nightly_lake.examples) == version + 1
    last = delta_io.history(nightly_lake.examples)[0]
    assert last["operation"] == "WRITE"
    assert last["operationParameters"]["mode"] == "Overwrite"
    assert LAST_DAY in last["operationParameters"]["predicate"]


def test_rerunning_the_last_date_after_a_full_rebuild(
    spark, spec, full_lake: Tables, tmp_path
) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(full_lake.root, lake / spec.name)
    tables = Tables.for_spec(lake, spec)
    before = _table(tables.examples, ["example_id"])
    build(spark, spec, _cfg(lake), date=LAST_DAY)
    _assert_frames_equal(before, _table(tables.examples, ["example_id"]))


def test_a_gap_in_the_nightly_chain_is_an_error(spark, spec, nightly_lake: Tables) -> None:
    from pipelines.build import BuildError

    with pytest.raises(BuildError, match="no snapshot for 2022-05-02"):
        build(spark, spec, _cfg(nightly_lake.root.parent), date="2022-05-03")


def test_small_tables_are_one_file_per_date(full_lake: Tables, nightly_lake: Tables) -> None:
    """The user-day and rejected rows (a few thousand a day here) are written as one file per
    date, not one per kernel task (3 here): a nightly run reads 29 days of user_daily, and
    Spark lists more than 32 files in a job of its own. The examples' files too (their tasks'
    small files merged before the commit): the trainer's loader pays per file and column."""
    for tables in (full_lake, nightly_lake):
        for path in (tables.user_daily, tables.rejected, tables.examples):
            per_date: dict[str, int] = {}
            for f in DeltaTable(path).file_uris():
                date = Path(f).parent.name.removeprefix("date=")
                per_date[date] = per_date.get(date, 0) + 1
            assert per_date and set(per_date.values()) == {1}, (path, per_date)
