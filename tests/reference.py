"""Independent, deliberately naive recomputation of the running features (row by row, pandas).

Used by the leakage tests: for each event it looks only at the same user's events with a
strictly smaller timestamp, exactly as the spec defines them, with no shared code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def naive_running(
    df: pd.DataFrame,
    tasks: dict[str, int],
    fallback: dict[str, float],
    window_days: int | None,
    sequences: dict[str, tuple[str | None, float, int]],
    day_col: str = "day",
) -> pd.DataFrame:
    """df: user, time, example_id, item, day (int), value_<task> (int), one row per event.

    tasks: task -> divisor (1 binary, n_bins - 1 dwell). sequences: name -> (task or None,
    value, max_len). Returns n_prev_all, pl_all_*, n_prev, pl_*, seq_* indexed like df.
    """
    out: dict[str, list] = {"n_prev_all": [], "n_prev": []}
    for t in tasks:
        out[f"pl_all_{t}"] = []
        out[f"pl_{t}"] = []
    for s in sequences:
        out[f"seq_{s}"] = []
    by_user = {u: g.sort_values(["time", "example_id"]) for u, g in df.groupby("user")}
    for _, row in df.iterrows():
        g = by_user[row["user"]]
        prev = g[g["time"] < row["time"]]
        win = prev if window_days is None else prev[prev[day_col] >= row[day_col] - window_days + 1]
        for name, sel in (("all", prev), ("win", win)):
            n = len(sel)
            out["n_prev_all" if name == "all" else "n_prev"].append(n)
            for t, div in tasks.items():
                key = f"pl_all_{t}" if name == "all" else f"pl_{t}"
                out[key].append(sel[f"value_{t}"].sum() / (n * div) if n else fallback[t])
        for s, (task, value, max_len) in sequences.items():
            q = prev if task is None else prev[prev[f"value_{task}"] == value]
            out[f"seq_{s}"].append([int(x) for x in q["item"].tolist()[-max_len:]])
    res = pd.DataFrame(out, index=df.index)
    return res


def assert_running_equal(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    for c in columns:
        g, w = got[c].tolist(), want[c].tolist()
        if c.startswith("seq_"):
            g = [list(x) for x in g]
            assert g == w, (
                f"{c} differs at rows {[i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b][:5]}"
            )
        else:
            np.testing.assert_allclose(
                np.asarray(g, float), np.asarray(w, float), rtol=1e-12, atol=1e-12, err_msg=c
            )
