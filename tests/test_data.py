"""The training data loader (model/data.py): batches read through the Delta log of `examples`.

Two tables feed the tests: a small hand-made examples table written with delta-rs (fast, every
test), and a table built by the real pipeline from a generated synthetic log (``slow``: the
build takes about a minute and a half on two cores). Values are compared against the table read
independently with ``DeltaTable(...).to_pandas()``.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable, WriterProperties, write_deltalake
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model.data import (
    Batch,
    ExamplesDataset,
    ExamplesTableError,
    PackedBatches,
    benchmark_loader,
    make_loader,
    rank_of,
    spark_xxhash64,
    user_keys,
)
from pipelines.preprocessing import Artifacts
from pipelines.preprocessing import load as load_artifacts
from pipelines.spec import FeatureSpec, TaskKind, load_spec

REPO = Path(__file__).resolve().parents[1]

# Spark 4 `xxhash64(s)` of these strings (seed 42), computed once with pyspark.
SPARK_XXHASH64 = {
    "": -7444071767201028348,
    "1": -928762887014768240,
    "42": -4744849287861989057,
    "300": -7256036307982850010,
    "1234567": -3188848029947885567,
    "12345678": 6863040065134489090,
    "123456789012": 1549582498302756521,
    "abcdefghijklmnopqrstuvwxyz": -3265757659154784300,
    "u_0123456789abcdef0123456789abcdef": 5925803531166926294,
    "x" * 70: 6860793627555721558,
    "é用户-ü": -4388497185133746979,
    "9223372036854775807": 2407216688009111440,
    "-5": -7000261115096548701,
}


# --------------------------------------------------------------------------- tables
def _synthetic_spec(raw: Path | None = None) -> FeatureSpec:
    raw = raw or Path("/nonexistent")
    return load_spec(
        REPO / "feature_specs" / "synthetic.yaml",
        overrides=[
            f"source.path={raw}/events/date={{date}}",
            f"user.tables.0.path={raw}/users.parquet",
            f"item.tables.0.path={raw}/items.parquet",
            "split.train_end=2022-04-27",
            "split.valid_end=2022-04-28",
        ],
    )


FAKE_VOCAB = {
    "user_id": 45,
    "item_id": 60,
    "age_bucket": 7,
    "device": 4,
    "city_tier": 6,
    "category": 17,
    "author_id": 9,
}
FAKE_DATES = ["2022-04-25", "2022-04-26", "2022-04-27", "2022-04-28", "2022-04-29"]


def _fake_artifacts(spec: FeatureSpec) -> Artifacts:
    return Artifacts(
        spec_name=spec.name,
        spec_hash="fake",
        train_dates=FAKE_DATES[:3],
        train_rows=0,
        vocab_sizes=dict(FAKE_VOCAB),
        dense={},
        bins={"dwell": [1.0, 5.0, 20.0]},  # n_bins = 4
        global_means={"click": 0.1, "dwell": 0.2, "purchase": 0.01},
    )


def _fake_examples(seed: int = 0, n_users: int = 40) -> pa.Table:
    """An examples table shaped like the pipeline's (synthetic spec), sorted as it writes it."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, date in enumerate(FAKE_DATES):
        split = "train" if date <= "2022-04-27" else ("valid" if date == "2022-04-28" else "test")
        for u in range(1, n_users + 1):
            for _ in range(int(rng.poisson(0.5 + 6 * (u % 5 == 0)))):
                rows.append(
                    {
                        "date": date,
                        "user_id": u,
                        "split": split,
                        "event_time_ms": 1650844800000 + d * 86_400_000 + int(rng.integers(86e6)),
                    }
                )
    df = pd.DataFrame(rows)
    n = len(df)
    df["item_id"] = rng.integers(1, 300, n)
    df["user_idx"] = np.where(df["user_id"] < FAKE_VOCAB["user_id"], df["user_id"], 0)
    df["item_idx"] = rng.integers(0, FAKE_VOCAB["item_id"], n)
    df["example_id"] = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    for f in ("age_bucket", "device", "city_tier", "category", "author_id"):
        df[f] = rng.integers(0, FAKE_VOCAB[f], n)
    df["register_days"] = rng.normal(size=n).astype(np.float32)
    df["duration_s"] = rng.normal(size=n).astype(np.float32)
    df["label_click"] = rng.integers(0, 2, n).astype(np.int32)
    df["label_dwell"] = rng.exponential(8.0, n)
    df["label_dwell_bin"] = np.searchsorted([1.0, 5.0, 20.0], df["label_dwell"], "right")
    df["label_dwell_bin"] = df["label_dwell_bin"].astype(np.int32)
    df["label_purchase"] = (rng.random(n) < 0.05).astype(np.int32)
    df["n_prev"] = rng.integers(0, 30, n)
    for t in ("click", "dwell", "purchase"):
        df[f"pl_{t}"] = rng.random(n)
    df["n_prev_all"] = df["n_prev"] + rng.integers(0, 5, n)
    for t in ("click", "dwell", "purchase"):
        df[f"pl_all_{t}"] = rng.random(n)
    for s, max_len in (("clicked", 6), ("purchased", 2)):
        lens = rng.integers(0, max_len + 1, n)
        df[f"seq_{s}"] = [rng.integers(1, FAKE_VOCAB["item_id"], k).tolist() for k in lens]
    df = df.sort_values(["date", "user_id", "event_time_ms", "example_id"]).reset_index(drop=True)
    cols = [
        "date", "user_id", "item_id", "user_idx", "item_idx", "event_time_ms", "example_id",
        "split", "age_bucket", "device", "city_tier", "category", "author_id", "register_days",
        "duration_s", "label_click", "label_dwell", "label_dwell_bin", "label_purchase", "n_prev",
        "pl_click", "pl_dwell", "pl_purchase", "n_prev_all", "pl_all_click", "pl_all_dwell",
        "pl_all_purchase", "seq_clicked", "seq_purchased",
    ]  # fmt: skip
    schema = pa.schema(
        [
            pa.field(c, pa.list_(pa.int64()))
            if c.startswith("seq_")
            else pa.field(c, pa.string())
            if c in ("date", "split")
            else pa.field(c, pa.float32())
            if c in ("register_days", "duration_s")
            else pa.field(c, pa.int32())
            if c in ("label_click", "label_dwell_bin", "label_purchase")
            else pa.field(c, pa.float64())
            if c.startswith(("pl_", "label_"))
            else pa.field(c, pa.int64())
            for c in cols
        ]
    )
    return pa.Table.from_pandas(df[cols], schema=schema, preserve_index=False)


def _write(path: Path, table: pa.Table, **kw) -> str:
    write_deltalake(str(path), table, partition_by=["date"], **kw)
    return str(path)


class Lake:
    def __init__(self, path: str, spec: FeatureSpec, artifacts: Artifacts) -> None:
        self.path, self.spec, self.artifacts = path, spec, artifacts

    def dataset(self, split="train", batch_size=64, rank=0, world_size=1, **kw) -> ExamplesDataset:
        return ExamplesDataset(
            self.path, self.spec, self.artifacts, split, batch_size, rank, world_size, **kw
        )


@pytest.fixture(scope="session")
def fake_lake(tmp_path_factory) -> Lake:
    spec = _synthetic_spec()
    path = _write(tmp_path_factory.mktemp("fake") / "examples", _fake_examples())
    return Lake(path, spec, _fake_artifacts(spec))


@pytest.fixture(scope="session")
def built_lake(tmp_path_factory) -> Lake:
    """The pipeline's build of a generated synthetic log (300 users, 200 items, 5 days)."""
    root = tmp_path_factory.mktemp("built")
    raw, lake = root / "raw", root / "lake"
    py = sys.executable
    gen = [py, "-m", "jobs.generate_logs", "--out", str(raw), "--users", "300", "--items", "200"]
    gen += ["--days", "5", "--seed", "1", "--quiet"]
    subprocess.run(gen, cwd=REPO, check=True)
    build = [py, "-m", "jobs.build_features", "--full", "--spec", "feature_specs/synthetic.yaml"]
    build += ["--set", f"lake={lake}", "--spec-set", f"source.path={raw}/events/date={{date}}"]
    # two partitions for a few thousand rows (the default 8 are four waves of tasks on CI's 2 cores)
    build += [
        "--set",
        "spark.user_partitions=2",
        "--set",
        "spark.conf.spark.sql.shuffle.partitions=2",
    ]
    build += ["--spec-set", f"user.tables.0.path={raw}/users.parquet"]
    build += ["--spec-set", f"item.tables.0.path={raw}/items.parquet"]
    build += [
        "--spec-set",
        "split.train_end=2022-04-27",
        "--spec-set",
        "split.valid_end=2022-04-28",
    ]
    done = subprocess.run(build, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"build_features failed:\n{done.stderr[-4000:]}")
    spec = _synthetic_spec(raw)
    return Lake(
        str(lake / "synthetic" / "examples"),
        spec,
        load_artifacts(lake / "synthetic" / "artifacts", spec, with_vocabs=False),
    )


@pytest.fixture(params=["fake", pytest.param("built", marks=pytest.mark.slow)])
def lake(request) -> Lake:
    return request.getfixturevalue(f"{request.param}_lake")


# --------------------------------------------------------------------------- helpers
def _reference(lake: Lake, splits=("train",), version: int | None = None) -> pd.DataFrame:
    """The snapshot's rows of ``splits`` in stored order: files by (date, path), then file order."""
    frames = []
    uris = DeltaTable(lake.path, version=version).file_uris()
    for uri in sorted(uris, key=lambda u: (Path(u).parent.name, u)):
        df = pq.read_table(uri).to_pandas()
        frames.append(df.assign(date=Path(uri).parent.name.removeprefix("date=")))
    df = pd.concat(frames, ignore_index=True)
    return df[df["split"].isin(list(splits))].reset_index(drop=True)


def _real(batches: list[Batch]) -> dict[str, np.ndarray]:
    """The real rows of ``batches`` as columns, in yield order."""
    m = np.concatenate([b.mask.numpy() for b in batches]) > 0
    cat = {
        f: np.concatenate([getattr(b, f).numpy() for b in batches])[m]
        for f in ("example_id", "user_key", "user_idx", "event_time_ms", "n_prev")
    }
    for f in ("labels", "pseudo_labels", "dense_features"):
        cat[f] = np.concatenate([getattr(b, f).numpy() for b in batches])[m]
    return cat


def _pooled(b: Batch) -> dict[str, np.ndarray]:
    return {k: jt.values().numpy() for k, jt in b.sparse_features.to_dict().items()}


def _seqs(b: Batch) -> dict[str, list[list[int]]]:
    assert b.sequences is not None
    return {k: [t.tolist() for t in jt.to_dense()] for k, jt in b.sequences.to_dict().items()}


# --------------------------------------------------------------------------- hash, Batch
def test_user_key_is_sparks_xxhash64():
    got = spark_xxhash64(pa.array(list(SPARK_XXHASH64)))
    assert got.tolist() == list(SPARK_XXHASH64.values())
    # long ids hash as their decimal string, as in the pipeline's user_state.user_key
    ids = pa.array([1, 300, -5, 9223372036854775807], pa.int64())
    want = [SPARK_XXHASH64[s] for s in ("1", "300", "-5", "9223372036854775807")]
    assert user_keys(ids).tolist() == want
    assert user_keys(pa.chunked_array([ids[:2], ids[2:]])).tolist() == want
    assert rank_of(np.array(want), 3).min() >= 0


def _tiny_batch(B: int = 3) -> Batch:
    kjt = KeyedJaggedTensor(
        keys=["a", "user_id"],
        values=torch.arange(2 * B),
        lengths=torch.ones(2 * B, dtype=torch.int32),
    )
    seq = KeyedJaggedTensor(
        keys=["seq_x"], values=torch.tensor([1, 2]), lengths=torch.tensor([2] + [0] * (B - 1))
    )
    z = torch.zeros(B, dtype=torch.int64)
    f = torch.zeros
    return Batch(kjt, seq, f(B, 2), f(B, 3), f(B, 3), z, z, z, z, z, torch.ones(B))


def test_batch_to_and_record_stream():
    b = _tiny_batch()
    assert b.batch_size == 3
    c = b.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(c, Batch) and torch.equal(c.sparse_features.values(), torch.arange(6))
    assert c.sequences is not None and c.sequences.keys() == ["seq_x"]
    fields = {f: mock.Mock() for f in Batch.__dataclass_fields__}
    stream = object()
    Batch(**fields).record_stream(stream)  # type: ignore[arg-type]
    for m in fields.values():
        m.record_stream.assert_called_once_with(stream)
    fields["sequences"] = None
    Batch(**fields).record_stream(stream)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_batch_pin_memory():
    b = _tiny_batch().pin_memory()
    assert b.labels.is_pinned() and b.sparse_features.values().is_pinned()


# --------------------------------------------------------------------------- values
def test_batch_fields_shapes_and_dtypes(lake: Lake):
    d = lake.dataset(batch_size=64)
    b = next(iter(d))
    spec, B = lake.spec, 64
    F, T = len(spec.dense_features), len(spec.tasks)
    T_d = sum(t.kind == TaskKind.DWELL for t in spec.tasks)  # continuous values after the T
    keys = [f.name for f in spec.categorical_features] + ["user_id", "item_id"]
    assert b.batch_size == B
    assert b.sparse_features.keys() == keys
    assert b.sparse_features.values().dtype == torch.int64
    assert b.sparse_features.values().shape == (len(keys) * B,)
    assert torch.all(b.sparse_features.lengths() == 1) and b.sparse_features.stride() == B
    assert b.sequences is not None and b.sequences.keys() == [
        f"seq_{s.name}" for s in spec.sequences
    ]
    assert b.sequences.stride() == B and b.sequences.values().dtype == torch.int64
    expect = {
        "dense_features": ((B, F), torch.float32),
        "labels": ((B, T + T_d), torch.float32),
        "pseudo_labels": ((B, T), torch.float32),
        "n_prev": ((B,), torch.int64),
        "user_idx": ((B,), torch.int64),
        "user_key": ((B,), torch.int64),
        "event_time_ms": ((B,), torch.int64),
        "example_id": ((B,), torch.int64),
        "mask": ((B,), torch.float32),
    }
    for name, (shape, dtype) in expect.items():
        t = getattr(b, name)
        assert tuple(t.shape) == shape and t.dtype == dtype, name


def test_batches_equal_the_delta_table(lake: Lake):
    """Every real row, in order, equals the table read with DeltaTable.to_pandas()."""
    d = lake.dataset(batch_size=100)
    batches = list(d)
    ref = _reference(lake)
    got = _real(batches)
    assert len(batches) == d.num_batches == -(-len(ref) // 100)
    assert all(b.batch_size == 100 for b in batches)
    assert np.array_equal(got["example_id"], ref["example_id"])
    assert np.array_equal(got["user_idx"], ref["user_idx"])
    assert np.array_equal(got["event_time_ms"], ref["event_time_ms"])
    assert np.array_equal(got["n_prev"], ref["n_prev"])
    want_keys = user_keys(pa.array(ref["user_id"].astype(str).tolist()))
    assert np.array_equal(got["user_key"], want_keys)
    for j, t in enumerate(lake.spec.tasks):
        if t.kind == TaskKind.DWELL:
            n_bins = lake.artifacts.n_bins(t.name)
            want = ref[f"label_{t.name}_bin"].to_numpy() / (n_bins - 1)
            assert n_bins > 1 and 0 <= want.min() and want.max() <= 1
        else:
            want = ref[f"label_{t.name}"].to_numpy()
        np.testing.assert_allclose(got["labels"][:, j], want, rtol=1e-6)
        np.testing.assert_allclose(got["pseudo_labels"][:, j], ref[f"pl_{t.name}"], rtol=1e-6)
    # then each dwell task's continuous value (seconds), the regression target
    dwell = [t.name for t in lake.spec.tasks if t.kind == TaskKind.DWELL]
    T = len(lake.spec.tasks)
    for j, name in enumerate(dwell):
        np.testing.assert_allclose(got["labels"][:, T + j], ref[f"label_{name}"], rtol=1e-6)
    for j, f in enumerate(lake.spec.dense_features):
        np.testing.assert_allclose(got["dense_features"][:, j], ref[f.name], rtol=1e-6)
    # pooled ids and sequences, sample by sample
    keys = list(_pooled(batches[0]))
    pooled = {k: np.concatenate([_pooled(b)[k][b.mask.numpy() > 0] for b in batches]) for k in keys}
    for f in lake.spec.categorical_features:
        assert np.array_equal(pooled[f.name], ref[f.name])
    assert np.array_equal(pooled["user_id"], ref["user_idx"])
    assert np.array_equal(pooled["item_id"], ref["item_idx"])
    for s in lake.spec.sequences:
        col = f"seq_{s.name}"
        seqs = [
            x for b in batches for x, m in zip(_seqs(b)[col], b.mask.tolist(), strict=True) if m
        ]
        assert seqs == [list(x) for x in ref[col]]
    # padding rows of the last batch: mask 0, OOV ids, empty sequences, zeros
    last = batches[-1]
    pad = last.mask.numpy() == 0
    assert pad.sum() == len(batches) * 100 - len(ref)
    assert all((_pooled(last)[k][pad] == 0).all() for k in keys)
    assert all(x == [] for v in _seqs(last).values() for x, p in zip(v, pad, strict=True) if p)
    assert not last.labels.numpy()[pad].any() and not last.user_key.numpy()[pad].any()


def test_all_history_pseudo_labels_and_several_splits(fake_lake: Lake):
    d = fake_lake.dataset(["valid", "test"], batch_size=50, pseudo_labels="all_history")
    got = _real(list(d))
    ref = _reference(fake_lake, ["valid", "test"])
    assert np.array_equal(got["example_id"], ref["example_id"])
    assert np.array_equal(got["n_prev"], ref["n_prev_all"])
    np.testing.assert_allclose(got["pseudo_labels"][:, 0], ref["pl_all_click"], rtol=1e-6)
    d = fake_lake.dataset("train", batch_size=50, start_date="2022-04-26", end_date="2022-04-26")
    got = _real(list(d))
    ref = _reference(fake_lake)
    assert np.array_equal(got["example_id"], ref[ref["date"] == "2022-04-26"]["example_id"])


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_yield_equal_batches_and_partition_users(lake: Lake, world_size: int):
    B = 128
    ranks = [lake.dataset(batch_size=B, rank=r, world_size=world_size) for r in range(world_size)]
    out = [list(d) for d in ranks]
    assert len({len(x) for x in out}) == 1  # the same number of batches on every rank
    assert {d.num_batches for d in ranks} == {len(out[0])}
    assert all(b.batch_size == B for x in out for b in x)
    ref = _reference(lake)
    real = [_real(x) for x in out]
    assert sum(ranks[0].rows_per_rank) == len(ref) and min(ranks[0].rows_per_rank) > 0
    assert [len(r["example_id"]) for r in real] == ranks[0].rows_per_rank
    ids = np.concatenate([r["example_id"] for r in real])
    assert len(ids) == len(ref) and set(ids) == set(ref["example_id"])  # each row exactly once
    users = [set(r["user_key"]) for r in real]
    for i in range(world_size):
        assert set(rank_of(np.array(sorted(users[i])), world_size)) <= {i}
        for j in range(i + 1, world_size):
            assert not users[i] & users[j]  # no user on two ranks
    for r in real:  # within a rank, a user's rows are in time order
        df = pd.DataFrame({"u": r["user_key"], "t": r["event_time_ms"]})
        assert df.groupby("u")["t"].apply(lambda t: t.is_monotonic_increasing).all()


def test_drop_last_yields_only_full_real_batches(fake_lake: Lake):
    ranks = [fake_lake.dataset(batch_size=64, rank=r, world_size=2, drop_last=True) for r in (0, 1)]
    n = min(ranks[0].rows_per_rank) // 64
    for d in ranks:
        out = list(d)
        assert len(out) == d.num_batches == n
        assert all(float(b.mask.min()) == 1.0 for b in out)


def test_rank_with_no_rows_yields_padding_batches(fake_lake: Lake):
    d = fake_lake.dataset(batch_size=16, world_size=64)  # 40 users: some ranks have none
    empty = d.rows_per_rank.index(0)
    out = list(fake_lake.dataset(batch_size=16, rank=empty, world_size=64))
    assert len(out) == d.num_batches > 0 and all(float(b.mask.sum()) == 0 for b in out)
    assert all(torch.all(b.sparse_features.values() == 0) for b in out)
    assert all(b.sequences is not None and b.sequences.values().numel() == 0 for b in out)


def test_stale_rows_per_rank_is_an_error(fake_lake: Lake):
    rows = fake_lake.dataset(batch_size=16, world_size=2).rows_per_rank
    for wrong in ([rows[0] - 40, rows[1]], [rows[0] + 40, rows[1]]):
        d = fake_lake.dataset(batch_size=16, world_size=2, rows_per_rank=wrong)
        with pytest.raises(ExamplesTableError, match="rows_per_rank does not describe"):
            list(d)


def test_shuffle_permutes_rows_within_windows(fake_lake: Lake):
    plain = _real(list(fake_lake.dataset(batch_size=32)))["example_id"]
    d = fake_lake.dataset(batch_size=32, shuffle=True, shuffle_window=4, seed=3)
    a = _real(list(d))["example_id"]
    assert len(a) == len(plain) and set(a) == set(plain) and not np.array_equal(a, plain)
    assert set(a[:128]) == set(plain[:128])  # the first window stays the first
    assert np.array_equal(_real(list(d))["example_id"], a)  # same epoch, same order
    d.set_epoch(1)
    assert not np.array_equal(_real(list(d))["example_id"], a)


# --------------------------------------------------------------------------- Delta versions
def test_time_travel_reads_an_older_version(lake: Lake, tmp_path: Path):
    path = tmp_path / "examples"
    shutil.copytree(lake.path, path)
    v0 = DeltaTable(str(path)).version()
    old = DeltaTable(str(path)).to_pyarrow_table()
    day = sorted(set(_reference(lake)["date"]))[1]
    part = old.filter(pc.equal(old["date"], day))
    part = part.slice(0, part.num_rows // 2)
    write_deltalake(str(path), part, mode="overwrite", predicate=f"date = '{day}'")
    moved = Lake(str(path), lake.spec, lake.artifacts)
    latest, older = moved.dataset(batch_size=64), moved.dataset(batch_size=64, version=v0)
    assert latest.version == v0 + 1 and older.version == v0
    ref_old, ref_new = _reference(moved, version=v0), _reference(moved)
    assert len(ref_new) < len(ref_old)
    assert np.array_equal(_real(list(older))["example_id"], ref_old["example_id"])
    assert np.array_equal(_real(list(latest))["example_id"], ref_new["example_id"])


# --------------------------------------------------------------------------- errors
def test_missing_column_is_a_clear_error(fake_lake: Lake, tmp_path: Path):
    table = _fake_examples().drop_columns(["label_click"])
    path = _write(tmp_path / "examples", table)
    with pytest.raises(ExamplesTableError, match=rf"{path}.*no column 'label_click'"):
        Lake(path, fake_lake.spec, fake_lake.artifacts).dataset()
    path2 = _write(tmp_path / "examples2", _fake_examples().drop_columns(["seq_purchased"]))
    with pytest.raises(ExamplesTableError, match="'seq_purchased'"):
        Lake(path2, fake_lake.spec, fake_lake.artifacts).dataset("test")
    with pytest.raises(ExamplesTableError, match="cannot open the Delta table"):
        Lake(str(tmp_path / "nothing"), fake_lake.spec, fake_lake.artifacts).dataset()


@pytest.mark.parametrize("column", ["label_dwell", "label_click"])
def test_nan_or_null_label_is_a_clear_error(fake_lake: Lake, tmp_path: Path, column: str):
    table = _fake_examples()
    i = 7
    values = table[column].to_pylist()
    values[i] = float("nan") if column == "label_dwell" else None
    table = table.set_column(
        table.schema.get_field_index(column),
        column,
        pa.array(values, table.schema.field(column).type),
    )
    eid = table["example_id"][i].as_py()
    path = _write(tmp_path / "examples", table)
    lk = Lake(path, fake_lake.spec, fake_lake.artifacts)
    what = "NaN" if column == "label_dwell" else "null"
    with pytest.raises(ExamplesTableError, match=rf"'{column}' is {what} for example_id {eid}"):
        lk.dataset()
    # without the up-front check, the batch conversion still refuses a null label
    if column == "label_click":
        with pytest.raises(ExamplesTableError, match=rf"'{column}' is null for example_id {eid}"):
            list(lk.dataset(check_labels=False))


def test_index_outside_the_vocabulary_is_a_clear_error(fake_lake: Lake):
    art = _fake_artifacts(fake_lake.spec)
    art.vocab_sizes["category"] = 3
    with pytest.raises(ExamplesTableError, match="'category' holds index .* outside"):
        list(Lake(fake_lake.path, fake_lake.spec, art).dataset())


# --------------------------------------------------------------------------- resume, loader
def test_state_dict_resumes_at_the_right_batch(lake: Lake):
    full = [b.example_id for b in lake.dataset(batch_size=64)]
    k = 3
    loader = make_loader(lake.path, lake.spec, lake.artifacts, "train", 64)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    assert state["batches_yielded"] == k and state["version"] == loader.dataset.version
    fresh = make_loader(lake.path, lake.spec, lake.artifacts, "train", 64)
    fresh.load_state_dict(state)
    rest = [b.example_id for b in fresh]
    assert len(rest) == len(full) - k
    assert all(torch.equal(a, b) for a, b in zip(rest, full[k:], strict=True))
    assert fresh.state_dict()["batches_yielded"] == len(full)
    assert len([b for b in fresh]) == len(full)  # the next epoch starts at 0 again
    # the dataset alone keeps the same position when iterated directly
    d = lake.dataset(batch_size=64)
    d.load_state_dict(state)
    assert [b.example_id.tolist() for b in d] == [b.tolist() for b in full[k:]]
    with pytest.raises(ValueError, match="world_size"):
        lake.dataset(batch_size=64, world_size=2).load_state_dict(state)


@pytest.mark.slow  # spawns worker processes (each imports torch and torchrec)
def test_loader_workers_keep_the_order_and_resume(fake_lake: Lake):
    args = (fake_lake.path, fake_lake.spec, fake_lake.artifacts, "train", 32)
    one = [b.example_id for b in make_loader(*args)]
    loader = make_loader(*args, num_workers=2)
    loader.load_state_dict({**loader.state_dict(), "batches_yielded": 3})
    rest = [b.example_id for b in loader]
    assert len(rest) == len(one) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, one[3:], strict=True))
    assert loader.state_dict()["batches_yielded"] == len(one)


@pytest.mark.slow  # spawns worker processes (each imports torch and torchrec)
def test_persistent_workers_follow_the_epoch_and_the_resume_offset(fake_lake: Lake):
    args = (fake_lake.path, fake_lake.spec, fake_lake.artifacts, "train", 32)
    shuffled = {"shuffle": True, "shuffle_window": 2}

    def in_process(epoch: int, start: int = 0) -> list[list[int]]:
        d = make_loader(*args, **shuffled)
        d.load_state_dict({**d.state_dict(), "epoch": epoch, "batches_yielded": start})
        return [b.example_id.tolist() for b in d]

    assert in_process(0) != in_process(1)  # the epoch reseeds the shuffle: it must reach them
    loader = make_loader(*args, num_workers=2, **shuffled)
    try:
        assert [b.example_id.tolist() for b in loader] == in_process(0)
        workers = list(loader._iterator._workers)
        loader.dataset.set_epoch(1)
        it = iter(loader)
        head = [next(it).example_id.tolist() for _ in range(2)]  # the epoch is left midway
        state = loader.state_dict()
        assert state["epoch"] == 1 and state["batches_yielded"] == 2
        loader.load_state_dict(state)
        rest = [b.example_id.tolist() for b in loader]
        assert head + rest == in_process(1)
        assert rest == in_process(1, start=2)
        loader.dataset.set_epoch(2)
        assert [b.example_id.tolist() for b in loader] == in_process(2)
        assert loader._iterator._workers == workers  # started once
    finally:
        loader.close()
    assert loader._iterator is None and not any(w.is_alive() for w in workers)


@pytest.fixture(scope="module")
def grouped_lake(tmp_path_factory) -> Lake:
    """The fake examples in row groups of 37 rows, two files a date."""
    table = _fake_examples(seed=3, n_users=120)
    path = tmp_path_factory.mktemp("grouped") / "examples"
    props = WriterProperties(max_row_group_size=37)
    half = table.num_rows // 2
    _write(path, table.slice(0, half), writer_properties=props)
    _write(path, table.slice(half), writer_properties=props, mode="append")
    files = DeltaTable(str(path)).file_uris()
    assert max(pq.ParquetFile(f).metadata.num_row_groups for f in files) > 3
    return Lake(str(path), _synthetic_spec(), _fake_artifacts(_synthetic_spec()))


def _round_robin(d: ExamplesDataset, start: int, workers: int) -> list[Batch]:
    """What the DataLoader hands over from ``workers`` workers: one item from each in turn,
    skipping the exhausted ones (the items are chunks: lists of batches)."""
    chunks = [d._generate_chunks(start, workers, w) for w in range(workers)]
    out: list[Batch] = []
    alive = list(range(workers))
    turn = 0
    while alive:
        w = alive[turn % len(alive)]
        try:
            out.extend(next(chunks[w]).unpack())
            turn += 1
        except StopIteration:
            alive.remove(w)  # the next worker in turn takes its place
    return out


def _assert_same_batch(a: Batch, b: Batch) -> None:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, KeyedJaggedTensor):
            assert x.keys() == y.keys(), f.name
            assert torch.equal(x.values(), y.values()), f.name
            assert torch.equal(x.lengths(), y.lengths()), f.name
        elif x is None:
            assert y is None, f.name
        else:
            assert torch.equal(x, y), f.name


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize(
    "options", [{}, {"shuffle": True, "shuffle_window": 2}, {"drop_last": True}]
)
def test_worker_chunks_are_the_single_process_batches(
    grouped_lake: Lake, workers: int, rank: int, world_size: int, options: dict
):
    """Workers read only the row groups of their chunks; interleaved as the DataLoader does,
    their chunks are the single process's batches, padding and resume offset included."""
    for start in (0, 5):
        d = grouped_lake.dataset("train", 16, rank, world_size, read_rows=40, **options)
        d.set_epoch(1)
        one = list(d._generate(start))
        many = _round_robin(d, start, workers)
        assert d._chunk_batches(37) == (4 if options.get("shuffle") else 3)
        assert d._chunk_batches(10**6) == 10  # 4 * read_rows: bounded shared memory
        assert len(many) == len(one) == d.num_batches - start > 10
        for a, b in zip(one, many, strict=True):
            _assert_same_batch(a, b)


def test_worker_chunks_read_only_their_row_groups(grouped_lake: Lake):
    d = grouped_lake.dataset("train", 16, read_rows=40)
    _, pieces = d._pieces()
    assert sum(n for _, n in pieces) == d.rows_per_rank[0] and len(pieces) > 10
    read: list[int] = []
    real = d._read_rows
    with mock.patch.object(
        d,
        "_read_rows",
        lambda s, p, o, r0, r1: read.append(r1 - r0) or real(s, p, o, r0, r1),
    ):
        first = [c.unpack() for c in d._generate_chunks(0, 3, 0)]
    # worker 0 of 3 converts chunks 0, 3, 6, ... of 3 batches (48 rows) each
    assert [len(c) for c in first[:-1]] == [3] * (len(first) - 1)
    assert sum(read) < d.rows_per_rank[0] / 2


def test_packed_batches_are_views_of_one_shared_buffer(fake_lake: Lake):
    batches = list(fake_lake.dataset(batch_size=32))[:3]
    batches.append(dataclasses.replace(batches[0], sequences=None))
    packed = PackedBatches.pack(batches, shared=True)
    assert packed.buffer.is_shared() and len(packed) == 4
    out = packed.unpack()
    for a, b in zip(batches, out, strict=True):
        _assert_same_batch(a, b)
    base = packed.buffer.untyped_storage().data_ptr()
    for b in out:
        assert b.labels.untyped_storage().data_ptr() == base
        assert b.sparse_features.values().untyped_storage().data_ptr() == base


@pytest.mark.parametrize("convert_rows", [1, 20, 16384])
@pytest.mark.parametrize("batch_size", [7, 64])
@pytest.mark.parametrize("options", [{}, {"shuffle": True, "shuffle_window": 3}])
def test_batches_converted_in_blocks_equal_batches_converted_one_by_one(
    grouped_lake: Lake, convert_rows: int, batch_size: int, options: dict
):
    """Blocks of rows are converted together and sliced (Batch.rows): the batches are those
    converted one by one, the last partial one and the padding batches of the smaller rank
    included, in process and in worker chunks."""
    padded = False
    for rank in (0, 1):
        d = grouped_lake.dataset("train", batch_size, rank, 2, read_rows=40, **options)
        d.set_epoch(2)
        one_by_one = [d._to_batch(t, batch_size - t.num_rows) for t in d._rank_tables()]
        one_by_one += [d._to_batch(None, batch_size)] * (d.num_batches - len(one_by_one))
        with mock.patch("model.data.CONVERT_ROWS", convert_rows):
            in_blocks = list(d._generate(0))
            resumed = list(d._generate(3))
            chunks = _round_robin(d, 0, 2)
        assert len(in_blocks) == len(one_by_one) == d.num_batches
        padded |= bool(one_by_one[-1].mask.sum() < batch_size)
        for got in (in_blocks, resumed, chunks):
            for a, b in zip(one_by_one[len(one_by_one) - len(got) :], got, strict=True):
                _assert_same_batch(a, b)
    assert padded  # a padded batch is part of the check


def test_benchmark_loader_reports_samples_per_second(fake_lake: Lake):
    rate = benchmark_loader(fake_lake.path, fake_lake.spec, fake_lake.artifacts, 64, 0.2)
    assert rate > 0


def test_negative_continuous_label_is_a_clear_error(fake_lake: Lake, tmp_path: Path):
    """A dwell task's value (HTLNet's regression target) must not be negative."""
    table = _fake_examples()
    i = 11
    values = table["label_dwell"].to_pylist()
    values[i] = -3.0
    table = table.set_column(
        table.schema.get_field_index("label_dwell"),
        "label_dwell",
        pa.array(values, table.schema.field("label_dwell").type),
    )
    eid = table["example_id"][i].as_py()
    lk = Lake(_write(tmp_path / "examples", table), fake_lake.spec, fake_lake.artifacts)
    with pytest.raises(ExamplesTableError, match=rf"negative for example_id {eid}"):
        list(lk.dataset())


def test_prefetch_hands_over_every_item_in_order_errors_included_and_stops_when_closed() -> None:
    import threading

    from model.data import prefetch

    assert list(prefetch(iter(range(50)), 3)) == list(range(50))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield from range(4)
        raise ExamplesTableError("row 4 is bad")

    got = []
    with pytest.raises(ExamplesTableError, match="row 4 is bad"):
        for item in prefetch(failing(), 2):
            got.append(item)
    assert got == [0, 1, 2, 3]  # every item before the error

    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 1  # at most depth ahead, plus the one it was making
