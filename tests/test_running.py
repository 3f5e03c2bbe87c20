"""The running-feature kernel against the naive reference, on generated logs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

from pipelines.running import (
    K_DAY,
    K_REAL,
    K_USER,
    K_W,
    PSEUDO_DAY,
    PSEUDO_TIME,
    KernelPlan,
    compute,
    q_col,
    s_col,
)
from tests.reference import assert_running_equal, naive_running

TASKS = {"click": 1, "dwell": 4}
FALLBACK = {"click": 0.37, "dwell": 0.21}
SEQS = {"clicked": ("click", 1.0, 3), "any": (None, 0.0, 2)}


@st.composite
def event_logs(draw) -> pd.DataFrame:
    n = draw(st.integers(1, 60))
    users = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    # few distinct times so that same-timestamp ties are common
    days = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    secs = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    clicks = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    bins = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    return pd.DataFrame(
        {
            "user": np.array(users, dtype=np.int64) * 7919 - 3,
            "day": days,
            "time": np.array(days, dtype=np.int64) * 86_400_000 + np.array(secs) * 1000,
            "example_id": np.arange(n, dtype=np.int64)[::-1] * 31,
            "item": items,
            "value_click": clicks,
            "value_dwell": bins,
        }
    )


def kernel_input(df: pd.DataFrame) -> dict[str, np.ndarray]:
    s = df.sort_values(["user", "time", "example_id"])
    cols = {
        K_USER: s["user"].to_numpy(),
        "event_time_ms": s["time"].to_numpy(),
        K_DAY: s["day"].to_numpy(),
        K_W: np.ones(len(s), dtype=np.int64),
        K_REAL: np.ones(len(s), dtype=bool),
        "item_idx": s["item"].to_numpy(),
        s_col("click"): s["value_click"].to_numpy(),
        s_col("dwell"): s["value_dwell"].to_numpy(),
        q_col("clicked"): (s["value_click"] == 1).to_numpy(),
        q_col("any"): np.ones(len(s), dtype=bool),
    }
    return cols, s.index


def plan(window: int | None) -> KernelPlan:
    return KernelPlan(
        tasks=list(TASKS),
        divisors=TASKS,
        fallback=FALLBACK,
        window_days=window,
        all_history=True,
        sequences={k: v[2] for k, v in SEQS.items()},
    )


def to_frame(res: dict, index) -> pd.DataFrame:
    return pd.DataFrame(
        {k: (v.to_pylist() if hasattr(v, "to_pylist") else v) for k, v in res.items()}, index=index
    )


@settings(max_examples=150, deadline=None)
@given(event_logs(), st.sampled_from([1, 3, 30]))
def test_kernel_equals_naive_reference(df: pd.DataFrame, window: int) -> None:
    cols, index = kernel_input(df)
    got = to_frame(compute(cols, plan(window)), index)
    want = naive_running(df, TASKS, FALLBACK, window, SEQS).loc[index]
    checked = [
        "n_prev",
        "n_prev_all",
        *[f"pl_{t}" for t in TASKS],
        *[f"pl_all_{t}" for t in TASKS],
        "seq_clicked",
        "seq_any",
    ]
    assert_running_equal(got, want, checked)


@settings(max_examples=60, deadline=None)
@given(event_logs())
def test_all_history_window(df: pd.DataFrame) -> None:
    p = KernelPlan(
        tasks=list(TASKS),
        divisors=TASKS,
        fallback=FALLBACK,
        window_days=None,
        all_history=True,
        sequences={},
    )
    cols, index = kernel_input(df)
    got = to_frame(compute(cols, p), index)
    want = naive_running(df, TASKS, FALLBACK, None, {}).loc[index]
    assert "n_prev_all" not in got  # no window: the primary columns are all-history
    got = got.rename(columns={"n_prev": "n_prev_all", **{f"pl_{t}": f"pl_all_{t}" for t in TASKS}})
    assert_running_equal(got, want, ["n_prev_all", *[f"pl_all_{t}" for t in TASKS]])


@settings(max_examples=100, deadline=None)
@given(event_logs(), st.integers(1, 9), st.sampled_from([2, 30]))
def test_pseudo_rows_continue_history_exactly(df: pd.DataFrame, cut_day: int, window: int) -> None:
    """The nightly path: history before cut_day enters as pseudo-rows (aggregate outside the
    window, one row per window day, sequence items), and the day's rows must come out exactly
    as in one pass over everything."""
    p = plan(window)
    cols, index = kernel_input(df)
    full = to_frame(compute(cols, p), index)
    today = df[df["day"] == cut_day]
    hist = df[df["day"] < cut_day].sort_values(["user", "time", "example_id"])
    if today.empty:
        return
    pseudo = []
    for u, g in hist.groupby("user"):
        win = g[g["day"] >= cut_day - window + 1]
        old = g[g["day"] < cut_day - window + 1]
        pseudo.append(
            {
                "user": u,
                "time": PSEUDO_TIME + 1_000_000,
                "day": PSEUDO_DAY,
                "w": len(old),
                "click": old["value_click"].sum(),
                "dwell": old["value_dwell"].sum(),
            }
        )
        for d, gd in win.groupby("day"):
            pseudo.append(
                {
                    "user": u,
                    "time": PSEUDO_TIME + 2_000_000 + d,
                    "day": d,
                    "w": len(gd),
                    "click": gd["value_click"].sum(),
                    "dwell": gd["value_dwell"].sum(),
                }
            )
        for name, (task, value, max_len) in SEQS.items():
            q = g if task is None else g[g[f"value_{task}"] == value]
            for pos, item in enumerate(q["item"].tolist()[-max_len:]):
                pseudo.append(
                    {
                        "user": u,
                        "time": PSEUDO_TIME + pos,
                        "day": PSEUDO_DAY,
                        "w": 0,
                        "click": 0,
                        "dwell": 0,
                        "item": item,
                        f"q_{name}": True,
                    }
                )
    ps = (
        pd.DataFrame(pseudo)
        if pseudo
        else pd.DataFrame(columns=["user", "time", "day", "w", "click", "dwell"])
    )
    t = today.sort_values(["user", "time", "example_id"])
    real = pd.DataFrame(
        {
            "user": t["user"],
            "time": t["time"],
            "day": t["day"],
            "w": 1,
            "click": t["value_click"],
            "dwell": t["value_dwell"],
            "item": t["item"],
            "q_clicked": t["value_click"] == 1,
            "q_any": True,
            "real": True,
            "ex": t["example_id"],
        }
    )
    both = pd.concat([ps.assign(real=False, ex=-1), real], ignore_index=True)
    for c in ("q_clicked", "q_any"):
        both[c] = both.get(c, False)
        both[c] = both[c].astype("boolean").fillna(False).astype(bool)
    both["item"] = both["item"].fillna(0).astype(np.int64)
    both = both.sort_values(["user", "time", "ex"], kind="stable")
    kin = {
        K_USER: both["user"].to_numpy(np.int64),
        "event_time_ms": both["time"].to_numpy(np.int64),
        K_DAY: both["day"].to_numpy(np.int64),
        K_W: both["w"].to_numpy(np.int64),
        K_REAL: both["real"].to_numpy(bool),
        "item_idx": both["item"].to_numpy(np.int64),
        s_col("click"): both["click"].to_numpy(np.int64),
        s_col("dwell"): both["dwell"].to_numpy(np.int64),
        q_col("clicked"): both["q_clicked"].to_numpy(bool),
        q_col("any"): both["q_any"].to_numpy(bool),
    }
    got = to_frame(compute(kin, p), t.index)
    want = full.loc[t.index]
    for c in got.columns:
        assert got[c].tolist() == want[c].tolist(), c


def _example_rows(seed: int = 3, n: int = 3000) -> pd.DataFrame:
    """Kernel-column rows of 12 users over 4 days (synthetic spec): about 30 clicks per user
    and day, more than a sequence keeps; user 11 never clicks nor buys, so no sequence takes
    any of its rows."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, 4, n)
    df = pd.DataFrame(
        {
            K_USER: rng.integers(0, 12, n),
            K_DAY: day + 19_000,
            "date": [f"2022-01-0{d + 1}" for d in day],
            # few distinct times: the example id orders the ties
            "event_time_ms": day * 86_400_000 + rng.integers(0, 10, n),
            "example_id": rng.permutation(n),
            "item_idx": rng.integers(1, 1000, n),
            s_col("click"): rng.integers(0, 2, n),
            s_col("dwell"): rng.integers(0, 10, n),
            s_col("purchase"): (rng.random(n) < 0.05).astype(int),
        }
    )
    df = df[~((df[K_USER] == 11) & (df[s_col("click")] == 1))]
    df = df[~((df[K_USER] == 11) & (df[s_col("purchase")] == 1))]
    df["user_id"] = df[K_USER] + 100
    df[q_col("clicked")] = df[s_col("click")] == 1
    df[q_col("purchased")] = df[s_col("purchase")] == 1
    return df.reset_index(drop=True)


SYNTH_SEQS = {"clicked": 20, "purchased": 10}
# the kernel plan of the synthetic spec's tasks and sequences (dwell in 10 bins)
SYNTH_PLAN = KernelPlan(
    tasks=["click", "dwell", "purchase"],
    divisors={"click": 1, "dwell": 9, "purchase": 1},
    fallback={"click": 0.0, "dwell": 0.0, "purchase": 0.0},
    window_days=30,
    all_history=False,
    sequences=SYNTH_SEQS,
)


def test_kernel_user_days_equal_spark_user_days(spark) -> None:
    """The user-day rows a kernel with a sink hands back (numpy) are those `user_days`
    aggregates in Spark from the examples of a kernel without one."""
    from pipelines.build import user_days
    from pipelines.running import compute_daily
    from pipelines.spec import load_spec

    spec = load_spec("feature_specs/synthetic.yaml")
    df = _example_rows()
    want = user_days(spec, spark.createDataFrame(df)).toPandas()
    s = df.sort_values([K_USER, "event_time_ms", "example_id"]).reset_index(drop=True)
    cols = {c: s[c].to_numpy() for c in s.columns}
    cols[K_REAL] = np.ones(len(s), dtype=bool)
    plan = SYNTH_PLAN
    first, got = compute_daily(cols, plan)
    got_df = pd.DataFrame(
        {
            "user_key": s[K_USER].to_numpy()[first],
            "date": s["date"].to_numpy()[first],
            "user_id": s["user_id"].to_numpy()[first],
            **{k: (v.to_pylist() if hasattr(v, "to_pylist") else v) for k, v in got.items()},
        }
    )
    want = want.sort_values(["user_key", "date"]).reset_index(drop=True)
    assert len(got_df) == len(want) == df.groupby([K_USER, "date"]).ngroups
    for c in ["user_key", "date", "user_id", "cnt", "sum_click", "sum_dwell", "sum_purchase"]:
        assert got_df[c].tolist() == want[c].tolist(), c
    for c in ["dseq_clicked", "dseq_purchased"]:
        assert [list(v) for v in got_df[c]] == [list(v) for v in want[c]], c
    # a day with more clicks than the sequence keeps is cut to its last ones
    assert max(len(v) for v in got_df["dseq_clicked"]) == SYNTH_SEQS["clicked"]


def test_user_state_is_counts_sums_and_last_taken_items(spark) -> None:
    """`update_state` from scratch over `user_days` rows: per user the row count, the task sums
    and, per sequence, the items of the last max_len rows it takes in (time, example_id)
    order, across days, oldest first; a user no sequence takes has empty sequences (the
    state's own and a pandas reference over the examples)."""
    from pipelines.build import update_state, user_days
    from pipelines.spec import load_spec

    spec = load_spec("feature_specs/synthetic.yaml")
    df = _example_rows()
    got = update_state(spec, None, user_days(spec, spark.createDataFrame(df))).toPandas()
    _check_state(got, df)
    assert list(got.loc[got["user_key"] == 11, "seq_clicked"].iloc[0]) == []


def _check_state(got: pd.DataFrame, df: pd.DataFrame) -> None:
    """User state rows ``got`` against a pandas reference over the example rows ``df``."""
    assert sorted(got["user_key"]) == sorted(df[K_USER].unique())
    for user, rows in df.sort_values(["event_time_ms", "example_id"]).groupby(K_USER):
        row = got[got["user_key"] == user].iloc[0]
        assert row["user_id"] == user + 100 and row["cnt_all"] == len(rows)
        for t in ("click", "dwell", "purchase"):
            assert row[f"sum_{t}"] == rows[s_col(t)].sum()
        for name, max_len in SYNTH_SEQS.items():
            want = rows.loc[rows[q_col(name)], "item_idx"].tolist()[-max_len:]
            assert list(row[f"seq_{name}"]) == want


@pytest.mark.parametrize("engine", ["spark", "kernel partitions"])
def test_state_snapshots_are_the_state_up_to_each_date(spark, engine: str) -> None:
    """A full build's user state at its last dates, from `user_days` rows: Spark's
    `state_snapshots` (one aggregation), and `kernel_state_snapshots` (numpy in partitions
    that hold whole users, as the kernel's output does). At each date, per user with rows up
    to it, what the state of those rows is (pandas reference); a user whose first day is
    later has no row before it; both give the same schema (the nightly runs append to it)."""
    from pipelines.build import kernel_state_snapshots, state_snapshots, user_days
    from pipelines.spec import load_spec

    spec = load_spec("feature_specs/synthetic.yaml")
    df = _example_rows()
    df = df[~((df[K_USER] == 5) & (df["date"] < "2022-01-03"))]
    dates = ["2022-01-02", "2022-01-03", "2022-01-04"]
    days = user_days(spec, spark.createDataFrame(df))
    want_schema = state_snapshots(spec, days, dates).schema
    if engine == "spark":
        snaps = state_snapshots(spec, days, dates)
    else:
        # several partitions, each with every day of its users, in no particular order
        whole_users = days.repartition(3, "user_key").sortWithinPartitions(F.rand(seed=2))
        snaps = kernel_state_snapshots(spec, SYNTH_PLAN, whole_users, dates)
        assert snaps.schema == want_schema
    got = snaps.toPandas()
    assert sorted(got["state_date"].unique()) == dates
    for d in dates:
        _check_state(got[got["state_date"] == d], df[df["date"] <= d])
    assert 5 not in got.loc[got["state_date"] == dates[0], "user_key"].tolist()


def test_user_days_leave_out_pseudo_rows() -> None:
    """A nightly run's history rows (not real) count in no user-day row: a user's day is its
    own events only, and a chunk of pseudo rows alone gives no rows."""
    from pipelines.running import compute_daily

    plan = KernelPlan(
        tasks=["click"],
        divisors={"click": 1},
        fallback={"click": 0.0},
        window_days=3,
        all_history=False,
        sequences={"clicked": 2},
    )
    cols = {
        K_USER: np.array([4, 4, 4, 4, 9]),
        K_DAY: np.array([PSEUDO_DAY, 19_000, 19_001, 19_001, 19_001]),
        K_REAL: np.array([False, True, True, True, True]),
        K_W: np.array([5, 1, 1, 1, 1]),
        s_col("click"): np.array([3, 1, 0, 1, 1]),
        q_col("clicked"): np.array([True, True, False, True, True]),
        "item_idx": np.array([70, 71, 72, 73, 90]),
    }
    first, got = compute_daily(cols, plan)
    assert first.tolist() == [1, 2, 4]
    assert got["cnt"].tolist() == [1, 2, 1]
    assert got["sum_click"].tolist() == [1, 1, 1]
    assert got["dseq_clicked"].to_pylist() == [[71], [73], [90]]
    only_pseudo = {c: v[:1] for c, v in cols.items()}
    first, got = compute_daily(only_pseudo, plan)
    assert first.size == 0 and got["cnt"].size == 0 and len(got["dseq_clicked"]) == 0
