"""The synthetic log generator: layout, schemas, determinism, consistency, lifecycle signal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate_logs import main as cli_main
from jobs.generate_logs import parse_count
from pipelines.synthetic import (
    ATTRIBUTION_WINDOW_MS,
    DAY_MS,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    STAGES,
    TRUTH_SCHEMA,
    USERS_SCHEMA,
    BehaviourModel,
    Simulator,
    SyntheticConfig,
    generate,
    read_events,
    read_truth,
)

BASE = SyntheticConfig(
    users=1500,
    items=800,
    days=4,
    impressions_per_user_day=8.0,
    start_date=dt.date(2022, 4, 25),
    seed=11,
    chunk_users=128,
    rng_block_users=64,
)


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    return {
        "events": read_events(out).to_pandas(),
        "truth": read_truth(out).to_pandas(),
        "users": pd.read_parquet(out / "users.parquet"),
        "items": pd.read_parquet(out / "items.parquet"),
    }


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@pytest.fixture(scope="module")
def base_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "base"
    generate(BASE, out)
    return out


@pytest.fixture(scope="module")
def base(base_out: Path) -> dict[str, pd.DataFrame]:
    return _frames(base_out)


def _schema(path: Path) -> pa.Schema:
    return pq.read_schema(path).remove_metadata()


def test_layout_and_schemas(base_out: Path) -> None:
    dates = [(BASE.start_date + dt.timedelta(days=d)).isoformat() for d in range(BASE.days)]
    for root, schema in (
        (base_out / "events", EVENTS_SCHEMA),
        (base_out / "truth" / "user_stage", TRUTH_SCHEMA),
    ):
        assert sorted(p.name for p in root.iterdir()) == [f"date={d}" for d in dates]
        for folder in root.iterdir():
            parts = sorted(folder.glob("*.parquet"))
            assert parts and parts[0].name == "part-00000.parquet"
            for part in parts:
                assert _schema(part).equals(schema), (part, _schema(part))
    assert _schema(base_out / "users.parquet").equals(USERS_SCHEMA)
    assert _schema(base_out / "items.parquet").equals(ITEMS_SCHEMA)
    assert json.loads((base_out / "manifest.json").read_text())["params"]["seed"] == BASE.seed


def test_rows_live_in_their_utc_day_folder(base: dict[str, pd.DataFrame]) -> None:
    ev = base["events"]
    day = pd.to_datetime(ev["event_time_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%d")
    assert (day == ev["date"]).all()
    assert set(ev["event_type"]) == set(EVENT_TYPES)


def test_side_tables(base: dict[str, pd.DataFrame]) -> None:
    users, items, truth = base["users"], base["items"], base["truth"]
    assert users["user_id"].tolist() == list(range(1, BASE.users + 1))
    assert (users["register_days"] >= 0).all() and users["city_tier"].between(1, 5).all()
    assert items["item_id"].tolist() == list(range(1, BASE.items + 1))
    assert (items["duration_s"] > 0).all()
    assert items["popularity"].sum() == pytest.approx(1.0)
    assert len(truth) == BASE.users * BASE.days
    assert set(truth["stage"]) <= set(STAGES)
    assert truth.groupby("date")["user_id"].nunique().eq(BASE.users).all()


def test_ids_unique_and_actions_point_to_earlier_impressions(base: dict[str, pd.DataFrame]) -> None:
    ev = base["events"]
    assert ev["event_id"].is_unique
    assert (ev["event_id"] > 0).all() and ev["user_id"].between(1, BASE.users).all()
    assert ev["item_id"].between(1, BASE.items).all()
    imp = ev[ev["event_type"] == "impression"]
    assert imp["impression_id"].is_unique
    assert (imp["event_id"] == imp["impression_id"]).all()
    act = ev[ev["event_type"] != "impression"]
    j = act.merge(
        imp[["impression_id", "user_id", "item_id", "event_time_ms"]],
        on="impression_id",
        how="left",
        suffixes=("", "_imp"),
        validate="many_to_one",
    )
    assert j["user_id_imp"].notna().all(), "action without its impression"
    assert (j["user_id"] == j["user_id_imp"]).all()
    assert (j["item_id"] == j["item_id_imp"]).all()
    assert (j["event_time_ms"] >= j["event_time_ms_imp"]).all()


def test_action_structure_and_dwell(base: dict[str, pd.DataFrame]) -> None:
    ev = base["events"]
    by_type = {t: ev.loc[ev["event_type"] == t, "impression_id"] for t in EVENT_TYPES}
    clicked = set(by_type["click"])
    assert by_type["click"].is_unique and by_type["purchase"].is_unique
    assert set(by_type["stay"]) <= clicked, "a stay implies a click"
    assert set(by_type["purchase"]) <= clicked, "a purchase implies a click"
    # Every click leads to a stay, except a few cut off by the end of the log.
    assert len(clicked - set(by_type["stay"])) < 0.01 * len(clicked)
    stays_per_imp = by_type["stay"].value_counts()
    assert stays_per_imp.max() == 2 and (stays_per_imp == 2).mean() > 0.05
    assert len(by_type["click"]) >= by_type["stay"].nunique()
    stay = ev["event_type"] == "stay"
    assert (ev.loc[stay, "dwell_s"] > 0).all()
    assert ev.loc[~stay, "dwell_s"].isna().all()
    # Regular actions arrive inside the attribution window; ~0.5 % are late.
    imp_t = ev[ev["event_type"] == "impression"].set_index("impression_id")["event_time_ms"]
    act = ev[ev["event_type"] != "impression"]
    lag = act["event_time_ms"].to_numpy() - imp_t.loc[act["impression_id"]].to_numpy()
    late = (lag > ATTRIBUTION_WINDOW_MS).mean()
    assert 0.001 < late < 0.02, late


def test_loyal_users_click_more_than_new_users(base: dict[str, pd.DataFrame]) -> None:
    ev, truth = base["events"], base["truth"]
    imp = ev[ev["event_type"] == "impression"][["impression_id", "user_id", "date"]]
    clicked = set(ev.loc[ev["event_type"] == "click", "impression_id"])
    imp = imp.assign(click=imp["impression_id"].isin(clicked)).merge(truth, on=["user_id", "date"])
    ctr = imp.groupby("stage")["click"].mean()
    assert ctr["loyal"] > 1.5 * ctr["new"], ctr
    per_user_day = imp.groupby("stage").size() / truth.groupby("stage").size()
    assert per_user_day["loyal"] > per_user_day["new"] > per_user_day["wandering"]


def test_stage_transitions_follow_the_matrix(base: dict[str, pd.DataFrame]) -> None:
    t = base["truth"].pivot(index="user_id", columns="date", values="stage")
    code = {s: i for i, s in enumerate(STAGES)}
    m = np.array(BehaviourModel().transition)
    a = t.to_numpy()
    for d in range(a.shape[1] - 1):
        for src, dst in zip(a[:, d], a[:, d + 1], strict=True):
            assert m[code[src], code[dst]] > 0, (src, dst)
    assert (a[:, 0] == "new").mean() > 0.1


def test_manifest_counts_match_rows(base_out: Path, base: dict[str, pd.DataFrame]) -> None:
    manifest = json.loads((base_out / "manifest.json").read_text())
    counts = manifest["counts"]
    ev = base["events"]
    actual = ev.groupby(["date", "event_type"]).size()
    for date, per_type in counts["events_by_day"].items():
        for t in EVENT_TYPES:
            assert per_type[t] == actual.get((date, t), 0), (date, t)
        assert per_type["total"] == (ev["date"] == date).sum()
    assert counts["events"]["total"] == len(ev)
    for t in EVENT_TYPES:
        assert counts["events"][t] == (ev["event_type"] == t).sum()
    assert counts["truth_user_stage"] == len(base["truth"])
    assert counts["users"] == len(base["users"]) and counts["items"] == len(base["items"])


def test_deterministic_by_seed(tmp_path: Path, base: dict[str, pd.DataFrame]) -> None:
    generate(BASE, tmp_path / "again")
    _assert_same(base, _frames(tmp_path / "again"))
    generate(dataclasses.replace(BASE, seed=BASE.seed + 1), tmp_path / "other")
    other = _frames(tmp_path / "other")
    for name in ("events", "truth", "users", "items"):
        assert not base[name].equals(other[name]), name


def test_content_independent_of_chunk_size(tmp_path: Path, base: dict[str, pd.DataFrame]) -> None:
    tiny = dataclasses.replace(BASE, chunk_users=1, max_rows_per_file=2000)  # 1 block per chunk
    generate(tiny, tmp_path / "tiny")
    assert len(list((tmp_path / "tiny" / "events").glob("date=*/part-00001.parquet"))) == BASE.days
    _assert_same(base, _frames(tmp_path / "tiny"))
    generate(dataclasses.replace(BASE, chunk_users=10**6), tmp_path / "big")
    _assert_same(base, _frames(tmp_path / "big"))


def test_first_users_do_not_depend_on_user_count(
    tmp_path: Path, base: dict[str, pd.DataFrame]
) -> None:
    fewer = dataclasses.replace(BASE, users=640)  # 10 whole RNG blocks
    generate(fewer, tmp_path / "fewer")
    ev = read_events(tmp_path / "fewer").to_pandas()
    ref = base["events"]
    ref = ref[ref["user_id"] <= 640].reset_index(drop=True)
    pd.testing.assert_frame_equal(ev, ref, check_exact=True)


def test_late_actions_spill_over_midnight_and_past_the_end(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        BASE, users=400, model=dataclasses.replace(BASE.model, late_action_prob=0.3)
    )
    manifest = generate(cfg, tmp_path / "late")
    ev = read_events(tmp_path / "late").to_pandas()
    imp = ev[ev["event_type"] == "impression"].set_index("impression_id")
    act = ev[ev["event_type"] != "impression"]
    imp_date = imp.loc[act["impression_id"], "date"].to_numpy()
    assert (act["date"].to_numpy() > imp_date).sum() > 10  # next-day folder
    assert manifest["counts"]["dropped_after_end"]["total"] > 0
    assert manifest["counts"]["events"]["total"] == len(ev)
    day = (ev["event_time_ms"] - cfg.start_ms) // DAY_MS
    assert day.between(0, cfg.days - 1).all()


def test_item_sampler_matches_inverse_cdf() -> None:
    sim = Simulator(dataclasses.replace(BASE, items=5000))
    items = sim.items
    rng = np.random.default_rng(0)
    n = 200_000
    u = np.concatenate([rng.random(n), [0.0, 1.0 - 1e-16]])
    code = np.concatenate([rng.integers(0, BASE.model.n_categories + 1, n), [16, 16]])
    got = items.sample(u, code)
    lo = items._lo[code]
    target = lo + u * (items._hi[code] - lo)
    ref = items._order[np.minimum(np.searchsorted(items._cum, target, side="right"), 4999)]
    np.testing.assert_array_equal(got, ref)
    # Global draws follow popularity.
    freq = np.bincount(items.sample(rng.random(n), np.full(n, 16)), minlength=5000) / n
    top = np.argsort(items.popularity)[-5:]
    np.testing.assert_allclose(freq[top], items.popularity[top], rtol=0.1)


def test_cli_sizes_users_for_target_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_count("1e7") == 10_000_000 and parse_count("2_500") == 2500
    out = tmp_path / "cli"
    argv = [
        "--out",
        str(out),
        "--events",
        "3e4",
        "--items",
        "500",
        "--days",
        "3",
        "--impressions-per-user-day",
        "6",
        "--start-date",
        "2022-04-25",
        "--seed",
        "5",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and "ETA" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0.8 * 3e4 < manifest["counts"]["events"]["total"] < 1.2 * 3e4
    assert manifest["params"]["days"] == 3
    assert cli_main(argv) == 2  # refuses to overwrite
    assert cli_main([*argv, "--overwrite", "--quiet"]) == 0
