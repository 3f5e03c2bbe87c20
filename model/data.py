"""Training batches read from the ``examples`` Delta table, through its Delta log.

The examples table (``pipelines/build.py``) holds one row per impression, partitioned by ``date``.
Within a date each user's rows lie in one file, contiguous and in time order (ties in the spec's
tie-break order): the feature kernel writes one file per task and date, its rows in (user key,
time) order (with ``delta.writer=delta-spark`` a date's rows are instead sorted by (user_id, event_time_ms,
example_id)). This module turns it into TorchRec-ready :class:`Batch` objects:

* **Through the log**: ``deltalake.DeltaTable(path, version=...)`` pins one snapshot (time travel
  with ``version``); its files are scanned as a pyarrow dataset, in (date, file) order, with the
  split / date filters pushed down and only the needed columns read. Memory stays bounded by a few
  Arrow record batches; the table is never loaded whole.
* **Vectorised**: a columnar Arrow batch becomes a :class:`Batch` with numpy / torch array ops;
  the sequence KeyedJaggedTensor is built from the Arrow list offsets directly. No per-row Python.
  Rows are converted in blocks of ``CONVERT_ROWS`` and sliced into batches (:meth:`Batch.rows`),
  so small batches do not pay a conversion's per-column costs each.
* **Sharded by user**: row r goes to rank ``user_key mod world_size`` (non-negative modulo), so
  all events of a user are seen by one rank, in stored order: dates ascending, within a date
  files by path, and each user's rows of a day in time order. ``user_key`` is Spark's
  ``xxhash64(cast(user_id as string))`` (seed 42), the key of the pipeline's ``user_state``
  table, recomputed here with a vectorised XXH64.
* **Equal batch counts**: TorchRec's all-to-all collectives hang if one rank runs out of batches
  early. A cheap first pass over the ``user_id`` column (plus the label columns, to check them)
  counts the rows per rank; every rank then yields exactly :attr:`ExamplesDataset.num_batches`
  batches of exactly ``batch_size`` rows. Rows missing on a smaller rank (its last partial batch,
  and whole trailing batches) are *padding rows* with ``mask = 0``: OOV index 0 for every id,
  empty sequences, zero features and labels. Nothing is repeated, so every real row of the split
  is yielded exactly once over all ranks; losses and metrics must weight rows by ``mask``, and the
  per-user state must skip rows with ``mask = 0``. Fixed shapes also suit compiled models.
  With ``drop_last=True`` every rank instead yields ``floor(min_rank_rows / batch_size)`` full
  batches of real rows and no padding (the rows beyond that on each rank are dropped).
* **Resumable**: ``state_dict()`` / ``load_state_dict()`` carry the number of batches already
  yielded (and the Delta version, split, sharding); a resumed iteration skips that many batches.
* **Worker processes**: :func:`make_loader` can read and convert batches in spawned workers.
  Each worker makes chunks of consecutive batches (chunk j of the epoch by worker j mod N) and
  reads only the row groups that hold its chunks' rows, so the workers share the decoding of
  the files; a chunk crosses to the training process as one shared-memory block
  (:class:`PackedBatches`). The workers are started once per loader (``persistent_workers``,
  the default): each iteration's epoch and resume offset reach them through a small
  shared-memory array. The batches and their order are the single process's.

Shapes: B = batch size, F = dense features, T = tasks, K = pooled sparse keys (categorical
features + ``user_id`` + ``item_id``), S = sequences.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from pipelines.spec import FeatureSpec, TaskKind

if TYPE_CHECKING:
    from pipelines.preprocessing import Artifacts

SPLITS = ("history", "train", "valid", "test")
OOV = 0
# Spark's xxhash64 seed (org.apache.spark.sql.catalyst.expressions.XxHash64).
SPARK_XXHASH_SEED = 42
# Rows converted together before being sliced into batches (ExamplesDataset._convert).
CONVERT_ROWS = 65536

__all__ = [
    "Batch",
    "ExamplesDataset",
    "ExamplesLoader",
    "ExamplesTableError",
    "PackedBatches",
    "benchmark_loader",
    "count_rows_per_rank",
    "make_loader",
    "prefetch",
    "rank_of",
    "spark_xxhash64",
    "user_keys",
]


class ExamplesTableError(ValueError):
    """The examples table cannot feed training; the message names the table, column and row."""


# --------------------------------------------------------------------------------------- batch
@dataclass
class Batch(Pipelineable):
    """One training batch, following ``torchrec.datasets.utils.Batch`` (a ``Pipelineable``).

    Attributes:
        sparse_features: pooled ids, keys = categorical feature names + ``user_id`` (user_idx) +
            ``item_id`` (item_idx); exactly one value per sample and key (lengths all 1, int32),
            values int64 indices, 0 = OOV (also the padding rows' value). Length K * B.
        sequences: one key per behaviour sequence ``seq_<name>``, values the item indices of the
            user's earlier events (oldest first), variable lengths (0 for padding rows); ``None``
            when the spec has no sequences.
        dense_features: [B, F] float32, in spec order (``spec.dense_features``).
        labels: [B, T + T_d] float32 in spec task order: binary 0/1; dwell tasks the soft
            target ``bin / (n_bins - 1)`` in [0, 1]; then, per dwell task (T_d of them), its
            continuous value (e.g. play seconds) for regression targets.
        pseudo_labels: [B, T] float32, the running pseudo-labels ``pl_<task>`` (or
            ``pl_all_<task>``), the training window's mean when the user has no history.
        n_prev: [B] int64, the number of earlier events behind the pseudo-labels (0 = fallback).
        user_idx: [B] int64, the user's vocabulary index (0 = OOV).
        user_key: [B] int64, Spark ``xxhash64(cast(user_id as string))``: a stable key of the raw
            user id for the per-user state (equal to ``user_state.user_key`` of the pipeline).
        event_time_ms: [B] int64.
        example_id: [B] int64.
        mask: [B] float32, 1 for real rows, 0 for padding rows.
    """

    sparse_features: KeyedJaggedTensor
    sequences: KeyedJaggedTensor | None
    dense_features: torch.Tensor
    labels: torch.Tensor
    pseudo_labels: torch.Tensor
    n_prev: torch.Tensor
    user_idx: torch.Tensor
    user_key: torch.Tensor
    event_time_ms: torch.Tensor
    example_id: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        """B, padding rows included."""
        return int(self.labels.shape[0])

    def rows(self, start: int, n: int) -> Batch:
        """Rows ``[start, start + n)`` as a batch of n rows: the per-row tensors as views, the
        KJTs' values and lengths gathered key by key (they are key-major)."""
        B = self.batch_size
        rows = slice(start, start + n)

        def kjt_rows(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            n_keys = len(kjt.keys())
            lengths = kjt.lengths().view(n_keys, B)
            offsets = kjt.offsets()
            values = kjt.values()
            parts = [
                values[int(offsets[k * B + start]) : int(offsets[k * B + start + n])]
                for k in range(n_keys)
            ]
            return KeyedJaggedTensor(
                keys=kjt.keys(), values=torch.cat(parts), lengths=lengths[:, rows].reshape(-1)
            )

        return Batch(
            **{
                f.name: None
                if (v := getattr(self, f.name)) is None
                else kjt_rows(v)
                if isinstance(v, KeyedJaggedTensor)
                else v[rows]
                for f in dataclasses.fields(self)
            }
        )

    def _map(self, fn: Any) -> Batch:
        return Batch(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in dataclasses.fields(self)
            }
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on ``device`` (tensors and KJTs moved with ``non_blocking``)."""
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned host memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda x: x.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor and KJT as used by ``stream`` (TorchRec's train pipelines)."""
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            if x is not None:
                x.record_stream(stream)


# ------------------------------------------------------------------------------ user key hash
_M64 = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_U = np.uint64


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U(r)) | (x >> _U(64 - r))


def _round(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotl(acc + lane * _U(_P2), 31) * _U(_P1)


def _lanes(mat: np.ndarray, start: int, width: int, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(mat[:, start : start + width]).view(dtype)[:, 0].astype(np.uint64)


def _xxh64_fixed(mat: np.ndarray, seed: int) -> np.ndarray:
    """XXH64 of each row of ``mat`` ([n, L] uint8, all of one length L) -> [n] uint64."""
    n, length = mat.shape
    pos = 0
    with np.errstate(over="ignore"):
        if length >= 32:
            v = [
                np.full(n, (seed + _P1 + _P2) & _M64, np.uint64),
                np.full(n, (seed + _P2) & _M64, np.uint64),
                np.full(n, seed & _M64, np.uint64),
                np.full(n, (seed - _P1) & _M64, np.uint64),
            ]
            stripes = length // 32
            words = np.ascontiguousarray(mat[:, : stripes * 32]).view("<u8").reshape(n, stripes, 4)
            for s in range(stripes):
                for j in range(4):
                    v[j] = _round(v[j], words[:, s, j].astype(np.uint64))
            h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
            zero = np.zeros(n, np.uint64)
            for j in range(4):
                h = (h ^ _round(zero, v[j])) * _U(_P1) + _U(_P4)
            pos = stripes * 32
        else:
            h = np.full(n, (seed + _P5) & _M64, np.uint64)
        h = h + _U(length)
        zero = np.zeros(n, np.uint64)
        while pos + 8 <= length:
            h = h ^ _round(zero, _lanes(mat, pos, 8, "<u8"))
            h = _rotl(h, 27) * _U(_P1) + _U(_P4)
            pos += 8
        if pos + 4 <= length:
            h = h ^ (_lanes(mat, pos, 4, "<u4") * _U(_P1))
            h = _rotl(h, 23) * _U(_P2) + _U(_P3)
            pos += 4
        while pos < length:
            h = h ^ (mat[:, pos].astype(np.uint64) * _U(_P5))
            h = _rotl(h, 11) * _U(_P1)
            pos += 1
        h = h ^ (h >> _U(33))
        h = h * _U(_P2)
        h = h ^ (h >> _U(29))
        h = h * _U(_P3)
        h = h ^ (h >> _U(32))
    return h


def spark_xxhash64(
    strings: pa.Array | pa.ChunkedArray, seed: int = SPARK_XXHASH_SEED
) -> np.ndarray:
    """Spark's ``xxhash64(col)`` of a string column ([n] int64), vectorised.

    Rows are grouped by UTF-8 byte length and each group is hashed as one [n_L, L] byte matrix, so
    the cost is a few numpy passes per distinct length. Nulls are not allowed.
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if strings.null_count:
        raise ValueError("cannot hash null strings")
    if pa.types.is_large_string(strings.type):
        off_dtype: type = np.int64
    elif pa.types.is_string(strings.type):
        off_dtype = np.int32
    else:
        raise TypeError(f"expected a string array, got {strings.type}")
    n = len(strings)
    out = np.empty(n, np.uint64)
    if n == 0:
        return out.view(np.int64)
    bufs = strings.buffers()
    offsets = np.frombuffer(bufs[1], off_dtype)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    starts = offsets[:-1].astype(np.int64)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        mat = data[starts[rows, None] + np.arange(int(length))]
        out[rows] = _xxh64_fixed(mat.reshape(len(rows), int(length)), seed)
    return out.view(np.int64)


def user_keys(user_id: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """[n] int64 stable user keys: Spark ``xxhash64(cast(user_id as string))`` (any id type)."""
    if not (pa.types.is_string(user_id.type) or pa.types.is_large_string(user_id.type)):
        user_id = pc.cast(user_id, pa.string())
    return spark_xxhash64(user_id)


def rank_of(user_key: np.ndarray, world_size: int) -> np.ndarray:
    """[n] rank of each row: ``user_key mod world_size`` (the non-negative modulo)."""
    return np.mod(user_key, world_size)


# ------------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class _Layout:
    """Which table columns become which Batch fields (derived from the spec and artifacts)."""

    sparse_keys: list[str]  # KJT keys
    sparse_columns: list[str]  # table column per key
    sparse_sizes: list[int]  # embedding rows per key (indices must be < size)
    dense_columns: list[str]
    tasks: list[str]
    label_columns: list[str]  # per task: label_<t> or label_<t>_bin
    label_divisors: list[float]  # per task: 1 or n_bins - 1
    continuous_columns: list[str]  # per dwell task: label_<t>, the value (labels T_s + j)
    check_columns: list[str]  # every label column checked for null / NaN up front
    pl_columns: list[str]
    n_prev_column: str
    seq_columns: list[str]
    item_vocab: int

    @property
    def batch_columns(self) -> list[str]:
        cols = ["user_id", "user_idx", "event_time_ms", "example_id", self.n_prev_column]
        cols += self.sparse_columns + self.dense_columns + self.label_columns + self.pl_columns
        cols += self.continuous_columns
        cols += self.seq_columns
        return list(dict.fromkeys(cols))

    @property
    def needed_columns(self) -> list[str]:
        return list(dict.fromkeys(["split", "date", *self.batch_columns, *self.check_columns]))


def _layout(spec: FeatureSpec, artifacts: Artifacts, pseudo_labels: str) -> _Layout:
    from pipelines.preprocessing import vocab_tables

    table_of = {c: t for t, cols in vocab_tables(spec).items() for c in cols}
    keys = [f.name for f in spec.categorical_features] + ["user_id", "item_id"]
    columns = [f.name for f in spec.categorical_features] + ["user_idx", "item_idx"]
    sizes = []
    for key in keys:
        table = table_of[key]
        if table not in artifacts.vocab_sizes:
            raise ExamplesTableError(f"the artifacts have no vocabulary {table!r} (for {key!r})")
        sizes.append(int(artifacts.vocab_sizes[table]))
    tasks = [t.name for t in spec.tasks]
    label_columns, divisors, checks = [], [], []
    for t in spec.tasks:
        checks.append(f"label_{t.name}")
        if t.kind == TaskKind.DWELL:
            if t.name not in artifacts.bins:
                raise ExamplesTableError(f"the artifacts have no dwell bins for task {t.name!r}")
            label_columns.append(f"label_{t.name}_bin")
            checks.append(f"label_{t.name}_bin")
        else:
            label_columns.append(f"label_{t.name}")
        divisors.append(float(artifacts.target_divisor(t.name)))
    pl, n_prev = pseudo_label_columns(tasks, pseudo_labels)
    return _Layout(
        sparse_keys=keys,
        sparse_columns=columns,
        sparse_sizes=sizes,
        dense_columns=[f.name for f in spec.dense_features],
        tasks=tasks,
        label_columns=label_columns,
        label_divisors=divisors,
        continuous_columns=[f"label_{t.name}" for t in spec.tasks if t.kind == TaskKind.DWELL],
        check_columns=checks,
        pl_columns=pl,
        n_prev_column=n_prev,
        seq_columns=[f"seq_{s.name}" for s in spec.sequences],
        item_vocab=int(artifacts.vocab_sizes["item_id"]),
    )


def pseudo_label_columns(tasks: Sequence[str], pseudo_labels: str) -> tuple[list[str], str]:
    """The examples table's pseudo-label column per task and its history-length column."""
    if pseudo_labels == "window":
        return [f"pl_{t}" for t in tasks], "n_prev"
    if pseudo_labels == "all_history":
        return [f"pl_all_{t}" for t in tasks], "n_prev_all"
    raise ValueError(f"pseudo_labels={pseudo_labels!r}: use 'window' or 'all_history'")


def _open_dataset(path: str, version: int | None) -> tuple[ds.FileSystemDataset, int]:
    from deltalake import DeltaTable

    try:
        table = DeltaTable(path, version=version)
    except Exception as e:  # deltalake raises TableNotFoundError / DeltaError
        at = f" at version {version}" if version is not None else ""
        raise ExamplesTableError(f"cannot open the Delta table {path}{at}: {e}") from e
    return table.to_pyarrow_dataset(), table.version()


def _row_filter(
    splits: Sequence[str],
    start_date: str | None,
    end_date: str | None,
    rows: ds.Expression | None = None,
) -> ds.Expression:
    expr = ds.field("split").isin(list(splits))
    if start_date is not None:
        expr = expr & (ds.field("date") >= start_date)
    if end_date is not None:
        expr = expr & (ds.field("date") <= end_date)
    if rows is not None:
        expr = expr & rows
    return expr


def _ordered(dataset: ds.FileSystemDataset, expr: ds.Expression) -> ds.FileSystemDataset:
    """The files that can hold rows matching ``expr`` (pruned by partition values and the Delta
    file statistics), in (date, path) order."""

    def key(frag: ds.Fragment) -> tuple[str, str]:
        part = ds.get_partition_keys(frag.partition_expression) or {}
        return (str(part.get("date", "")), frag.path)

    frags = sorted(dataset.get_fragments(filter=expr), key=key)
    return ds.FileSystemDataset(frags, dataset.schema, dataset.format, dataset.filesystem)


def _first_bad(values: np.ndarray, bad: np.ndarray) -> Any:
    return values[int(np.flatnonzero(bad)[0])]


def count_rows_per_rank(
    path: str,
    world_size: int,
    *,
    splits: Sequence[str] = ("train",),
    version: int | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
    check_columns: Sequence[str] = (),
    read_rows: int = 1 << 17,
    rows: ds.Expression | None = None,
) -> np.ndarray:
    """[world_size] int64 rows per rank of the selected rows (one pass over ``user_id``).

    ``check_columns`` are read in the same pass and must hold no null or NaN: else
    :class:`ExamplesTableError` naming the column, the row's ``example_id`` and the table.
    """
    dataset, version = _open_dataset(path, version)
    expr = _row_filter(splits, start_date, end_date, rows)
    cols = ["user_id", *(["example_id", *check_columns] if check_columns else [])]
    counts = np.zeros(world_size, np.int64)
    scan = _ordered(dataset, expr).to_batches(
        columns=cols, filter=expr, batch_size=read_rows, batch_readahead=2, fragment_readahead=1
    )
    for rb in scan:
        if rb.num_rows == 0:
            continue
        for c in check_columns:
            arr = rb.column(c)
            null = np.asarray(arr.is_null())
            nan = np.zeros_like(null)
            if pa.types.is_floating(arr.type):
                nan = np.isnan(arr.to_numpy(zero_copy_only=False)) & ~null
            bad = null | nan
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                eid = rb.column("example_id")[first].as_py()
                what = "null" if null[first] else "NaN"
                raise ExamplesTableError(
                    f"label column {c!r} is {what} for example_id {eid} in the examples table "
                    f"{path} (version {version}): fix the table before training"
                )
        uid = rb.column("user_id")
        if uid.null_count:
            raise ExamplesTableError(f"null user_id in the examples table {path}")
        counts += np.bincount(rank_of(user_keys(uid), world_size), minlength=world_size)
    return counts


class ExamplesDataset(IterableDataset):
    """Batches of one rank's share of the examples table (see the module docstring).

    Iterated in a DataLoader worker process it yields :class:`PackedBatches` chunks, which
    :class:`ExamplesLoader` unpacks (use it, or :func:`make_loader`, rather than a plain
    ``DataLoader`` with workers).

    Args:
        path: the examples Delta table (``Tables.for_spec(lake, spec).examples``).
        spec: the feature spec the table was built with.
        artifacts: its fitted preprocessing (vocabulary sizes, dwell bin counts).
        splits: ``"train"``, ``"valid"``, ``"test"`` (``"history"``), or several.
        batch_size: B; every yielded batch has exactly B rows (padding rows have mask 0).
        rank, world_size: this process's shard; rows go to ``user_key mod world_size``.
        version: the Delta version to read (time travel); default the latest, pinned at
            construction so that every rank and a resumed run read the same snapshot.
        drop_last: False: ``ceil(max_rank_rows / B)`` batches, padded; True:
            ``floor(min_rank_rows / B)`` batches of real rows only.
        shuffle: permute rows within windows of ``shuffle_window`` batches (seeded by ``seed`` and
            the epoch, see :meth:`set_epoch`). Coarse date order is kept, the per-user time order
            is not: leave it off for models with per-user state.
        start_date, end_date: optional inclusive ``date`` partition bounds.
        pseudo_labels: ``"window"`` (``pl_<task>``, ``n_prev``) or ``"all_history"``
            (``pl_all_<task>``, ``n_prev_all``).
        check_labels: check in the counting pass that no label is null or NaN.
        rows_per_rank: precomputed :func:`count_rows_per_rank` result (skips the counting pass).
        rows: an extra Arrow filter on the table's columns (e.g. one lifecycle stage,
            :func:`model.stages.stage_expression`); ranks still get equal batch counts.
        read_rows: rows per Arrow record batch read from the files (memory bound); in a loader
            worker, the fewest rows of a chunk (:meth:`_generate_chunks`).
    """

    def __init__(
        self,
        path: str | Path,
        spec: FeatureSpec,
        artifacts: Artifacts,
        splits: str | Sequence[str] = "train",
        batch_size: int = 4096,
        rank: int = 0,
        world_size: int = 1,
        version: int | None = None,
        drop_last: bool = False,
        shuffle: bool = False,
        *,
        seed: int = 0,
        shuffle_window: int = 16,
        start_date: str | None = None,
        end_date: str | None = None,
        pseudo_labels: Literal["window", "all_history"] = "window",
        check_labels: bool = True,
        rows_per_rank: Sequence[int] | None = None,
        read_rows: int = 1 << 16,
        rows: ds.Expression | None = None,
    ) -> None:
        super().__init__()
        self.path = str(path)
        self.splits = [splits] if isinstance(splits, str) else list(splits)
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise ValueError(f"splits={self.splits!r}: use some of {list(SPLITS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_window = max(1, int(shuffle_window))
        self.start_date = start_date
        self.end_date = end_date
        self.read_rows = int(read_rows)
        self.rows = rows
        self._filter = _row_filter(self.splits, start_date, end_date, rows)  # what the scans keep
        self.layout = _layout(spec, artifacts, pseudo_labels)
        self.pseudo_labels = pseudo_labels

        dataset, self.version = _open_dataset(self.path, version)
        present = set(dataset.schema.names)
        for col in self.layout.needed_columns:
            if col not in present:
                raise ExamplesTableError(
                    f"the examples table {self.path} (version {self.version}) has no column "
                    f"{col!r}, needed by spec {spec.name!r}: rebuild it with this spec"
                )
        for col in self.layout.seq_columns:
            typ = dataset.schema.field(col).type
            if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
                raise ExamplesTableError(
                    f"column {col!r} of the examples table {self.path} is {typ}, not a list"
                )
        if rows_per_rank is None:
            rows_per_rank = count_rows_per_rank(
                self.path,
                self.world_size,
                splits=self.splits,
                version=self.version,
                start_date=start_date,
                end_date=end_date,
                check_columns=self.layout.check_columns if check_labels else (),
                rows=rows,
            )
        if len(rows_per_rank) != self.world_size:
            raise ValueError(f"rows_per_rank has {len(rows_per_rank)} entries, not {world_size}")
        self.rows_per_rank = [int(n) for n in rows_per_rank]
        if drop_last:
            self.num_batches = min(self.rows_per_rank) // self.batch_size
        else:
            self.num_batches = math.ceil(max(self.rows_per_rank) / self.batch_size)
        self.epoch = 0
        self._start = 0  # batches to skip at the next iteration (load_state_dict)
        self._position = 0  # batches yielded by the current / last iteration
        # (epoch, start) of the loader's current iteration, for persistent worker processes,
        # whose copy of this object is made once (ExamplesLoader sets it)
        self._iteration: Any | None = None

    # ------------------------------------------------------------------ sizes and state
    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_rows(self) -> int:
        """Real rows this rank yields per epoch."""
        return min(self.rows_per_rank[self.rank], self.num_batches * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (reseeds the shuffle)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The data position: ``batches_yielded`` of the current epoch, and what it refers to."""
        return {
            "batches_yielded": self._position,
            "epoch": self.epoch,
            "num_batches": self.num_batches,
            "version": self.version,
            "splits": list(self.splits),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration skips ``state["batches_yielded"]`` batches.

        The snapshot and the sharding must be the same as when the state was saved (else a
        ``ValueError`` naming the difference): pass ``version=state["version"]`` when resuming.
        """
        for key in ("version", "splits", "rank", "world_size", "batch_size", "shuffle", "seed"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume: the saved data position has {key}={state[key]!r}, this "
                    f"dataset {key}={self.state_dict()[key]!r}"
                )
        start = int(state["batches_yielded"])
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"batches_yielded={start} is outside [0, {self.num_batches}]")
        self.epoch = int(state.get("epoch", self.epoch))
        self._start = start
        self._position = start

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        # Not a generator: the resume offset is taken now (workers get a copy when started).
        info = get_worker_info()
        if info is not None and self._iteration is not None:
            # a persistent worker: the main process wrote this iteration's epoch and offset
            epoch, start = (int(v) for v in self._iteration[:])
            self.epoch = epoch
        else:
            start, self._start = self._start, 0
        self._position = start
        if info is not None:
            return self._generate_chunks(start, info.num_workers, info.id)
        return self._generate(start)

    def _generate(self, start: int) -> Iterator[Batch]:
        B = self.batch_size
        expected = self._real_batches
        n_real = 0

        def tables() -> Iterator[pa.Table]:
            nonlocal n_real
            for i, table in enumerate(self._rank_tables()):
                if i >= self.num_batches:
                    break  # drop_last: the rows beyond num_batches * B are dropped
                n_real = i + 1
                if n_real > expected:
                    self._stale(f"more than {self.rows_per_rank[self.rank]}")
                if i >= start:
                    yield table

        for i, batch in enumerate(self._convert(tables()), start + 1):
            self._position = i
            yield batch
        if n_real < expected:
            self._stale(f"fewer than {self.rows_per_rank[self.rank]}")
        for i in range(max(n_real, start), self.num_batches):
            # Padding batches: this rank has no real rows left, a larger rank still has some.
            self._position = i + 1
            yield self._to_batch(None, B)

    def _convert(self, tables: Iterable[pa.Table]) -> Iterator[Batch]:
        """Consecutive tables of B rows (the last one possibly shorter: padded) -> batches.
        Converted together in blocks of about CONVERT_ROWS rows and sliced: the per-column
        costs of a conversion are paid once a block, not once a batch (at B = 1024 they were
        most of the loader's time)."""
        B = self.batch_size
        per_block = max(1, CONVERT_ROWS // B)
        block: list[pa.Table] = []
        for table in tables:
            if table.num_rows < B:  # the last one
                yield from self._convert_block(block)
                block = []
                yield self._to_batch(table, B - table.num_rows)
                continue
            block.append(table)
            if len(block) == per_block:
                yield from self._convert_block(block)
                block = []
        yield from self._convert_block(block)

    def _convert_block(self, block: list[pa.Table]) -> list[Batch]:
        if len(block) <= 1:
            return [self._to_batch(t, 0) for t in block]
        B = self.batch_size
        big = self._to_batch(pa.concat_tables(block).combine_chunks(), 0)
        return [big.rows(k * B, B) for k in range(len(block))]

    # ------------------------------------------------------------------ worker processes
    def _generate_chunks(self, start: int, workers: int, worker: int) -> Iterator[PackedBatches]:
        """A worker's share: chunks of K consecutive batches, chunk j (from the one holding
        batch ``start``) to worker ``j mod workers``, each its batches packed in one
        shared-memory block (the loader unpacks them; the DataLoader takes items from the
        workers round-robin, so the order is the single process's). A worker reads only the
        row groups that its chunks' rows lie in, found from a pass over the ``split`` (and
        ``user_id``) column per row group: the workers share the reading and decoding of the
        files, not only the conversion."""
        B = self.batch_size
        # the workers are the parallelism: Arrow's pool in each shares the cores among them
        pa.set_cpu_count(max(1, (os.cpu_count() or 1) // workers))
        schema, pieces = self._pieces()
        offsets = np.concatenate([[0], np.cumsum([n for _, n in pieces], dtype=np.int64)])
        real = int(offsets[-1])
        if real != self.rows_per_rank[self.rank]:
            what = "more" if real > self.rows_per_rank[self.rank] else "fewer"
            self._stale(f"{what} than {self.rows_per_rank[self.rank]}")
        real = min(real, self.num_batches * B)  # drop_last drops the rest
        k = self._chunk_batches(max((n for _, n in pieces), default=0))
        window_batches = self.shuffle_window if self.shuffle else 1
        n_chunks = math.ceil(self.num_batches / k)
        for j, c in enumerate(range(start // k, n_chunks)):
            if j % workers != worker:
                continue
            first, stop = c * k, min((c + 1) * k, self.num_batches)
            r0, r1 = min(first * B, real), min(stop * B, real)
            tables: list[pa.Table] = []
            if r1 > r0:
                rows = self._read_rows(schema, pieces, offsets, r0, r1)
                window = window_batches * B  # chunks hold whole shuffle windows (k is a multiple)
                for w in range(0, rows.num_rows, window):
                    tables.extend(self._split(rows.slice(w, window), (r0 + w) // window))
            skip = max(first, start) - first
            batches = list(self._convert(tables[skip:]))
            # padding batches: this rank's real rows ended, a larger rank still has some
            batches += [
                self._to_batch(None, B) for _ in range(stop - max(first, start) - len(batches))
            ]
            self._position = stop
            yield PackedBatches.pack(batches, shared=True)

    def _chunk_batches(self, largest_piece: int) -> int:
        """K: batches per worker chunk, a multiple of the shuffle window: rows enough for the
        largest row group (so that few row groups are read by two workers), at least
        ``read_rows`` and at most ``4 * read_rows`` (a chunk waits whole in shared memory)."""
        rows = min(max(self.read_rows, largest_piece), 4 * self.read_rows)
        k = max(1, math.ceil(rows / self.batch_size))
        if self.shuffle:
            k = math.ceil(k / self.shuffle_window) * self.shuffle_window
        return k

    def _pieces(self) -> tuple[pa.Schema, list[tuple[ds.Fragment, int]]]:
        """The table's schema, and this rank's rows per row group in the scan's order:
        (row-group fragment, rows)."""
        dataset, _ = _open_dataset(self.path, self.version)
        expr = self._filter
        cols = ["user_id"] if self.world_size > 1 else []
        pieces = []
        for frag in _ordered(dataset, expr).get_fragments():
            for group in frag.split_by_row_group(expr, schema=dataset.schema):
                ids = group.to_table(columns=cols, filter=expr, schema=dataset.schema)
                if self.world_size > 1:
                    ranks = rank_of(user_keys(ids.column("user_id")), self.world_size)
                    n = int(np.count_nonzero(ranks == self.rank))
                else:
                    n = ids.num_rows
                pieces.append((group, n))
        return dataset.schema, pieces

    def _read_rows(
        self,
        schema: pa.Schema,
        pieces: list[tuple[ds.Fragment, int]],
        offsets: np.ndarray,
        r0: int,
        r1: int,
    ) -> pa.Table:
        """Rows [r0, r1) of this rank's stream, read from the row groups that hold them."""
        lo = int(np.searchsorted(offsets, r0, side="right")) - 1
        hi = int(np.searchsorted(offsets, r1, side="left"))
        groups = [g for g, n in pieces[lo:hi] if n]
        part = ds.FileSystemDataset(
            groups, schema, groups[0].format, groups[0].filesystem
        ).to_table(columns=self.layout.batch_columns, filter=self._filter)
        if self.world_size > 1:
            keep = rank_of(user_keys(part.column("user_id")), self.world_size) == self.rank
            part = part.filter(pa.array(keep))
        skip = r0 - int(offsets[lo])
        return part.slice(skip, r1 - r0).combine_chunks()

    def _stale(self, what: str) -> None:
        raise ExamplesTableError(
            f"rank {self.rank} found {what} rows in the examples table {self.path} (version "
            f"{self.version}): rows_per_rank does not describe this snapshot and split"
        )

    @property
    def _real_batches(self) -> int:
        return min(self.num_batches, math.ceil(self.rows_per_rank[self.rank] / self.batch_size))

    def _scan(self) -> Iterator[pa.RecordBatch]:
        dataset, _ = _open_dataset(self.path, self.version)
        expr = self._filter
        reader = (
            _ordered(dataset, expr)
            .scanner(
                columns=self.layout.batch_columns,
                filter=expr,
                batch_size=self.read_rows,
                batch_readahead=2,
                fragment_readahead=1,
            )
            .to_reader()
        )
        # Closed however the iteration ends: an epoch left midway would otherwise keep Arrow's
        # read-ahead threads running into the interpreter's exit, which aborts the process.
        try:
            yield from reader
        finally:
            reader.close()

    def _rank_tables(self) -> Iterator[pa.Table]:
        """This rank's rows as Arrow tables of B rows (the last one possibly shorter)."""
        B = self.batch_size
        window = B * (self.shuffle_window if self.shuffle else 1)
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        n_windows = 0
        for rb in self._scan():
            if self.world_size > 1 and rb.num_rows:
                keep = rank_of(user_keys(rb.column("user_id")), self.world_size) == self.rank
                rb = rb.filter(pa.array(keep))
            if rb.num_rows == 0:
                continue
            pending.append(rb)
            n_pending += rb.num_rows
            if n_pending < window:
                continue
            table = pa.Table.from_batches(pending)
            cut = (n_pending // window) * window
            for w in range(0, cut, window):
                yield from self._split(table.slice(w, window), n_windows)
                n_windows += 1
            rest = table.slice(cut)
            pending = rest.to_batches() if rest.num_rows else []
            n_pending = rest.num_rows
        if n_pending:
            yield from self._split(pa.Table.from_batches(pending), n_windows)

    def _split(self, table: pa.Table, window_index: int) -> Iterator[pa.Table]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, window_index])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        for s in range(0, table.num_rows, self.batch_size):
            yield table.slice(s, self.batch_size)

    # ------------------------------------------------------------------ conversion
    def _error(self, msg: str, table: pa.Table, bad: np.ndarray | None = None) -> None:
        eid = ""
        if bad is not None:
            eid = f" for example_id {_first_bad(_np(table, 'example_id'), bad)}"
        raise ExamplesTableError(f"{msg}{eid} in the examples table {self.path}")

    def _to_batch(self, table: pa.Table | None, n_pad: int) -> Batch:
        """[n real rows] Arrow table + n_pad padding rows -> Batch of B = n + n_pad rows."""
        lay = self.layout
        n = 0 if table is None else table.num_rows
        B = n + n_pad
        if table is not None:
            for name in table.column_names:
                col = table.column(name)
                if col.null_count:
                    self._error(f"column {name!r} is null", table, np.asarray(col.is_null()))

        def ids(name: str, size: int) -> np.ndarray:
            out = np.zeros(B, np.int64)
            if n:
                v = _np(table, name)
                bad = (v < 0) | (v >= size)
                if bad.any():
                    self._error(
                        f"column {name!r} holds index {_first_bad(v, bad)} outside [0, {size})",
                        table,
                        bad,
                    )
                out[:n] = v
            return out

        def floats(names: list[str], what: str) -> np.ndarray:
            out = np.zeros((B, len(names)), np.float32)
            for j, name in enumerate(names):
                if n:
                    v = _np(table, name).astype(np.float32, copy=False)
                    bad = ~np.isfinite(v)
                    if bad.any():
                        self._error(f"{what} column {name!r} is NaN or infinite", table, bad)
                    out[:n, j] = v
            return out

        def ints(name: str) -> np.ndarray:
            out = np.zeros(B, np.int64)
            if n:
                out[:n] = _np(table, name)
            return out

        sparse_values = np.concatenate(
            [ids(c, size) for c, size in zip(lay.sparse_columns, lay.sparse_sizes, strict=True)]
        )
        sparse = KeyedJaggedTensor(
            keys=list(lay.sparse_keys),
            values=torch.from_numpy(sparse_values),
            # numpy's fill: torch.ones forks OpenMP threads, which wait for cores Arrow's
            # read-ahead holds (2.5 ms a batch of 8192 on 2 cores, against 0.1 ms)
            lengths=torch.from_numpy(np.ones(len(lay.sparse_keys) * B, np.int32)),
        )

        labels = floats(lay.label_columns, "label")
        for j, div in enumerate(lay.label_divisors):
            col = labels[:n, j]
            bad = (col < 0) | (col > div) | (col != np.round(col))
            if bad.any():
                what = "a dwell bin outside [0, n_bins - 1]" if div != 1 else "not 0/1"
                self._error(f"label column {lay.label_columns[j]!r} is {what}", table, bad)
            if div != 1.0:
                labels[:, j] /= np.float32(div)
        if lay.continuous_columns:
            values = floats(lay.continuous_columns, "label")
            bad = (values[:n] < 0).any(axis=1)
            if bad.any():
                self._error("a continuous label column is negative", table, bad)
            labels = np.concatenate([labels, values], axis=1)

        sequences = None
        if lay.seq_columns:
            values, lengths = [], []
            for name in lay.seq_columns:
                length = np.zeros(B, np.int32)
                if n:
                    arr = table.column(name).combine_chunks()
                    flat = arr.flatten()
                    if flat.null_count:
                        self._error(f"column {name!r} holds a null item", table)
                    off = arr.offsets.to_numpy()
                    length[:n] = np.diff(off)
                    v = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                    if v.size and (v.min() < 0 or v.max() >= lay.item_vocab):
                        self._error(f"column {name!r} holds an item index outside the vocab", table)
                    values.append(v)
                lengths.append(length)
            sequences = KeyedJaggedTensor(
                keys=list(lay.seq_columns),
                values=torch.from_numpy(
                    np.concatenate(values) if values else np.zeros(0, np.int64)
                ),
                lengths=torch.from_numpy(np.concatenate(lengths)),
            )

        user_key = np.zeros(B, np.int64)
        if n:
            user_key[:n] = user_keys(table.column("user_id"))
        mask = np.zeros(B, np.float32)
        mask[:n] = 1.0
        return Batch(
            sparse_features=sparse,
            sequences=sequences,
            dense_features=torch.from_numpy(floats(lay.dense_columns, "dense feature")),
            labels=torch.from_numpy(labels),
            pseudo_labels=torch.from_numpy(floats(lay.pl_columns, "pseudo-label")),
            n_prev=torch.from_numpy(ints(lay.n_prev_column)),
            user_idx=torch.from_numpy(ids("user_idx", lay.sparse_sizes[-2])),
            user_key=torch.from_numpy(user_key),
            event_time_ms=torch.from_numpy(ints("event_time_ms")),
            example_id=torch.from_numpy(ints("example_id")),
            mask=torch.from_numpy(mask),
        )


class PackedBatches:
    """Batches in one contiguous byte buffer: what a loader worker sends for a chunk.

    A tensor crossing processes travels as its own shared-memory block, received with a
    file-descriptor handshake each (about 0.3 ms; 15 tensors a batch). Packed, a chunk of
    batches is one block; :meth:`unpack` gives the batches back as views of it (no copy), and
    :meth:`pin_memory` pins the whole chunk with one call.
    """

    ALIGN = 64

    def __init__(self, buffer: torch.Tensor, layouts: list[list[Any]]) -> None:
        self.buffer = buffer  # [N] uint8
        self.layouts = layouts  # per batch, per Batch field: None, (offset, dtype, shape) or KJT

    @classmethod
    def pack(cls, batches: Sequence[Batch], shared: bool = False) -> PackedBatches:
        """One buffer for ``batches`` (in shared memory with ``shared``: no copy when sent)."""
        placed: list[tuple[int, torch.Tensor]] = []
        size = 0

        def place(t: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
            nonlocal size
            offset = -(-size // cls.ALIGN) * cls.ALIGN
            size = offset + t.numel() * t.element_size()
            placed.append((offset, t))
            return offset, t.dtype, tuple(t.shape)

        layouts: list[list[Any]] = []
        for b in batches:
            layout: list[Any] = []
            for f in dataclasses.fields(Batch):
                v = getattr(b, f.name)
                if v is None:
                    layout.append(None)
                elif isinstance(v, KeyedJaggedTensor):
                    layout.append(("kjt", v.keys(), place(v.values()), place(v.lengths())))
                else:
                    layout.append(place(v))
            layouts.append(layout)
        if shared:
            buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        for offset, t in placed:
            # the destination viewed as the tensor's type: any strides copy
            dest = buffer[offset : offset + t.numel() * t.element_size()]
            dest.view(t.dtype).copy_(t.reshape(-1))
        return cls(buffer, layouts)

    def _tensor(self, slot: tuple[int, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        offset, dtype, shape = slot
        n = math.prod(shape) * dtype.itemsize
        return self.buffer[offset : offset + n].view(dtype).view(shape)

    def unpack(self) -> list[Batch]:
        out = []
        for layout in self.layouts:
            values: list[Any] = []
            for entry in layout:
                if entry is None:
                    values.append(None)
                elif entry[0] == "kjt":
                    _, keys, v, n = entry
                    values.append(
                        KeyedJaggedTensor(
                            keys=keys, values=self._tensor(v), lengths=self._tensor(n)
                        )
                    )
                else:
                    values.append(self._tensor(entry))
            out.append(Batch(*values))
        return out

    def pin_memory(self) -> PackedBatches:
        return PackedBatches(self.buffer.pin_memory(), self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


# ------------------------------------------------------------------------------------- loader
class ExamplesLoader(DataLoader):
    """A ``DataLoader`` over an :class:`ExamplesDataset` that tracks the batches it delivered.

    ``state_dict()`` counts batches handed to the training loop (prefetched ones are not
    counted), also with worker processes; ``load_state_dict()`` makes the next iteration skip
    them. Workers split the batches round-robin, which the DataLoader's in-order collection turns
    back into the single-process order.

    With ``persistent_workers=True`` the workers are started by the first iteration and kept
    until :meth:`close` (or the loader is collected); each later iteration hands them the
    dataset's epoch and resume offset through a shared-memory array written before the
    DataLoader restarts them, so they yield exactly what fresh workers would.
    """

    dataset: ExamplesDataset

    def __init__(self, dataset: ExamplesDataset, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers") and kwargs.get("num_workers", 0) > 0:
            context = kwargs.get("multiprocessing_context")
            if context is None or isinstance(context, str):
                context = multiprocessing.get_context(context)
            # shared with the workers when they are spawned (it is part of the dataset's copy)
            dataset._iteration = context.RawArray("q", 2)
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position = 0

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        start = self.dataset._start
        if self.dataset._iteration is not None:
            # read by the persistent workers when super().__iter__() restarts them
            self.dataset._iteration[:] = [self.dataset.epoch, start]
        it = super().__iter__()
        self.dataset._start = 0  # workers (spawned in super().__iter__) took their copy
        return self._count(it, start)

    def close(self) -> None:
        """Stop persistent worker processes now (a later iteration starts new ones)."""
        it = getattr(self, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._iterator = None

    def _count(self, it: Iterator[Batch | PackedBatches], start: int) -> Iterator[Batch]:
        self._position = start
        for item in it:
            for batch in item.unpack() if isinstance(item, PackedBatches) else (item,):
                self._position += 1
                yield batch

    def state_dict(self) -> dict[str, Any]:
        """The dataset's state with ``batches_yielded`` = batches delivered by this loader."""
        return {**self.dataset.state_dict(), "batches_yielded": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._position = self.dataset._start


def make_loader(
    path: str | Path,
    spec: FeatureSpec,
    artifacts: Artifacts,
    splits: str | Sequence[str] = "train",
    batch_size: int = 4096,
    *,
    rank: int = 0,
    world_size: int = 1,
    version: int | None = None,
    drop_last: bool = False,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str = "spawn",
    persistent_workers: bool = True,
    **dataset_kwargs: Any,
) -> ExamplesLoader:
    """A DataLoader of ready :class:`Batch` objects (``batch_size=None``: no collation).

    ``num_workers > 0`` reads and converts batches in worker processes, each making every
    ``num_workers``-th chunk of consecutive batches from the row groups that hold it
    (:meth:`ExamplesDataset._generate_chunks`). They are started with ``spawn`` (or
    ``forkserver``), never ``fork``: delta-rs's tokio runtime panics in a forked child. Spawning
    costs a few seconds per worker (importing torch, pyarrow and delta-rs), paid once per loader
    with ``persistent_workers`` (the default) and once per epoch without. ``pin_memory=True``
    pins each Batch for asynchronous host-to-device copies.
    """
    dataset = ExamplesDataset(
        path,
        spec,
        artifacts,
        splits,
        batch_size,
        rank,
        world_size,
        version,
        drop_last,
        shuffle,
        **dataset_kwargs,
    )
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        # delta-rs's tokio runtime does not survive fork(): workers are spawned.
        kwargs["multiprocessing_context"] = multiprocessing_context
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return ExamplesLoader(dataset, **kwargs)


@dataclass
class _Failed:
    error: BaseException


_END = object()


def prefetch(items: Iterable[Any], depth: int) -> Generator[Any, None, None]:
    """``items``, read by a background thread up to ``depth`` ahead of the consumer (0: in the
    consumer's thread).

    The loader's Arrow reads and its conversions release the GIL for much of their time, so
    the next batches are made while the step computes (and, on CUDA, while the device works and
    the host waits). An error of the reader is raised in the consumer at the item it stopped
    at; closing the iterator (a consumer that stops early) stops the thread after the item it
    is making."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer
            put(_Failed(e))
            return
        put(_END)

    reader = threading.Thread(target=read, name="batch-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)


def benchmark_loader(
    path: str | Path,
    spec: FeatureSpec,
    artifacts: Artifacts,
    batch_size: int,
    seconds: float,
    *,
    splits: str | Sequence[str] = "train",
    num_workers: int = 0,
    version: int | None = None,
) -> float:
    """Real samples per second delivered by :func:`make_loader` (rank 0 of 1), looping over
    epochs until ``seconds`` have passed (at least one batch after the first; the counting
    pass and the first batch, which waits for worker processes to start, are excluded)."""
    loader = make_loader(
        path, spec, artifacts, splits, batch_size, num_workers=num_workers, version=version
    )
    if loader.dataset.num_batches == 0:
        raise ValueError(f"no rows of splits {splits!r} in {path}")
    samples = 0.0
    t0: float | None = None
    try:
        while True:
            for batch in loader:
                if t0 is None:  # the clock starts at the first batch: workers have started
                    t0 = time.perf_counter()
                    continue
                samples += float(batch.mask.sum())
                if time.perf_counter() - t0 >= seconds:
                    return samples / (time.perf_counter() - t0)
    finally:
        loader.close()
