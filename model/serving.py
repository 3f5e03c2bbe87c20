"""The trained model as an MLflow pyfunc: raw feature columns in, one score per task out.

The pyfunc applies the preprocessing the feature pipeline fitted on the training window (the
stored vocabularies, dense statistics) exactly as ``pipelines.artifacts.apply`` does in Spark, so
that scoring a raw row gives the trainer's own score for that row. It needs neither Spark nor
torchrun: the model is the unsharded one gathered at the end of training (``model.pt``).

Input: a pandas DataFrame with the raw columns named as in the source log and side tables
(``RawFeatureTransform.input_columns``): the user and item id columns and every feature's
column. Optional: ``pl_<task>`` / ``n_prev`` (the running pseudo-labels, needed by PLE_stage only;
missing ones take the training window's mean and ``n_prev = 0``), and ``seq_<name>`` (the
behaviour sequences as the examples table holds them: lists of item indices, used by DTRN;
a missing column or null row is an empty sequence).

Conventions: a null feature value, and an id or category never seen in the training window, map
to the OOV index 0 (as in training); a null dense value takes the spec's ``fill``. A missing
column, or a value that is not of the column's declared type, raises :class:`ScoringInputError`
naming the column and the row.
"""

from __future__ import annotations

import decimal
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model.base import MultiTaskModel, TaskConfig
from model.data import Batch
from pipelines.preprocessing import Artifacts, vocab_tables
from pipelines.preprocessing import load as load_artifacts
from pipelines.spec import DenseTransform, FeatureSpec, TaskKind

__all__ = [
    "RankerModel",
    "RawFeatureTransform",
    "ScoringInputError",
    "java_double_str",
    "load_scorer",
]

OOV = 0
INTEGER_TYPES = {"int", "long", "integer", "bigint", "short", "smallint", "byte", "tinyint"}
FLOAT_TYPES = {"double", "float"}


class ScoringInputError(ValueError):
    """Bad input to the scorer; the message names the column and the row."""


def java_double_str(x: float) -> str:
    """``cast(double as string)`` in Spark (Java's ``Double.toString``): the shortest digits,
    in plain notation for 1e-3 <= |x| < 1e7, else ``d.dddE±n``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    a = abs(x)
    if 1e-3 <= a < 1e7:
        r = repr(float(x))
        return r if ("." in r or "e" in r) else r + ".0"
    sign, digits, exp = decimal.Decimal(repr(float(x))).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    e = exp + len(digits) - 1  # type: ignore[operator]
    mant = ds[0] + "." + (ds[1:] or "0")
    return ("-" if sign else "") + f"{mant}E{e}"


class RawFeatureTransform:
    """Raw columns -> the model's inputs, with the fitted preprocessing (vocabularies loaded).

    Attributes:
        input_columns: raw column -> declared type (the pyfunc's input schema).
    """

    def __init__(self, spec: FeatureSpec, artifacts: Artifacts) -> None:
        if not artifacts.vocabs:
            raise ValueError("the artifacts were loaded without their vocabularies")
        self.spec = spec
        self.artifacts = artifacts
        src = spec.source
        types = self.input_types(spec)
        table_of = {c: t for t, cols in vocab_tables(spec).items() for c in cols}
        # (feature name, raw column, declared type, vocab table) per sparse key, loader order
        by_name = {
            f.name: (f.name, f.column, types[f.column], table_of[f.name])
            for f in spec.categorical_features
        }
        self.sparse: list[tuple[str, str, str, str]] = [
            by_name[f.name] for f in spec.categorical_features
        ]
        self.sparse.append(("user_id", src.user_id, types[src.user_id], "user_id"))
        self.sparse.append(("item_id", src.item_id, types[src.item_id], "item_id"))
        self.dense: list[tuple[str, str, Any]] = [
            (f.name, f.column, f) for f in spec.dense_features
        ]
        self.input_columns = types
        self.tasks = [t.name for t in spec.tasks]
        self.n_dwell = sum(t.kind == TaskKind.DWELL for t in spec.tasks)
        self.sequence_columns = [f"seq_{s.name}" for s in spec.sequences]

    @staticmethod
    def input_types(spec: FeatureSpec) -> dict[str, str]:
        """Raw input column -> declared type: the ids, then every feature's column."""
        src = spec.source
        types = {src.user_id: src.columns[src.user_id], src.item_id: src.columns[src.item_id]}
        for g in ("user", "item", "context"):
            group = getattr(spec, g)
            owner = group.column_owner() if group.tables else {}
            for f in [*group.categorical, *group.dense]:
                if group.tables:
                    types[f.column] = group.tables[owner[f.column]].columns[f.column]
                else:
                    types[f.column] = src.columns[f.column]
        return types

    def sequences(self, df: pd.DataFrame) -> KeyedJaggedTensor | None:
        """The ``seq_<name>`` columns (lists of item indices) as a KJT; None without any."""
        if not self.sequence_columns:
            return None
        rows = int(self.artifacts.vocab_sizes["item_id"])
        values, lengths = [], []
        for col in self.sequence_columns:
            if col not in df.columns:
                lengths.append(np.zeros(len(df), np.int64))
                continue
            empty = np.zeros(0, np.int64)
            cells = [empty if c is None or len(c) == 0 else np.asarray(c) for c in df[col]]
            length = np.fromiter((c.size for c in cells), np.int64, len(cells))
            not_int = [i for i, c in enumerate(cells) if c.dtype.kind not in "iu"]
            flat = np.concatenate(cells) if cells and not not_int else empty
            # range checked once per column; the first bad item names its row
            out_of_range = np.flatnonzero((flat < 0) | (flat >= rows))
            if not_int or len(out_of_range):
                i = (
                    not_int[0]
                    if not_int
                    else int(np.searchsorted(np.cumsum(length), out_of_range[0], side="right"))
                )
                raise ScoringInputError(
                    f"input column {col!r}, row {i}: expected a list of item indices in "
                    f"[0, {rows}), got {df[col].iloc[i]!r:.80}"
                )
            values.append(flat.astype(np.int64, copy=False))
            lengths.append(length)
        return KeyedJaggedTensor(
            keys=list(self.sequence_columns),
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        )

    # ------------------------------------------------------------------ columns
    def _column(self, df: pd.DataFrame, column: str) -> pd.Series:
        if column not in df.columns:
            raise ScoringInputError(
                f"input column {column!r} is missing (expected columns: {sorted(self.input_columns)})"
            )
        return df[column]

    def _numeric(self, s: pd.Series, column: str, typ: str) -> pd.Series:
        if pd.api.types.is_bool_dtype(s):
            s = s.astype("Int64")
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna() & s.notna()
        if typ in INTEGER_TYPES:
            frac = num.notna() & np.isfinite(num.astype("float64")) & (num != np.floor(num))
            bad |= frac
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = s.iloc[row]
            value = value.item() if hasattr(value, "item") else value
            raise ScoringInputError(
                f"input column {column!r}, row {row}: {value!r} is not a {typ} value"
            )
        return num

    def _as_spark_strings(self, s: pd.Series, column: str, typ: str) -> pd.Series:
        """The values as Spark's ``cast(<declared type> as string)`` writes them (NaN = null).

        Each distinct value is formatted once (categorical columns have few), not each row.
        """
        if typ == "string":
            values, fmt = s.where(s.notna()), str
        else:
            values = self._numeric(s, column, typ)
            if typ in INTEGER_TYPES:
                fmt = lambda v: str(int(v))  # noqa: E731
            elif typ in FLOAT_TYPES:
                fmt = lambda v: java_double_str(float(v))  # noqa: E731
            else:
                values, fmt = s.where(s.notna()), str
        return values.map({v: fmt(v) for v in pd.unique(values.dropna())})

    # ------------------------------------------------------------------ transform
    def sparse_indices(self, df: pd.DataFrame) -> np.ndarray:
        """[K, n] int64 vocabulary indices (OOV = 0) in the loader's key order."""
        out = np.zeros((len(self.sparse), len(df)), np.int64)
        for k, (_, column, typ, table) in enumerate(self.sparse):
            strings = self._as_spark_strings(self._column(df, column), column, typ)
            vocab = self.artifacts.vocabs[table]
            out[k] = strings.map(vocab).fillna(OOV).astype(np.int64).to_numpy()
        return out

    def dense_values(self, df: pd.DataFrame) -> np.ndarray:
        """[n, F] float32, as ``pipelines.artifacts.apply``."""
        out = np.zeros((len(df), len(self.dense)), np.float32)
        for j, (name, column, f) in enumerate(self.dense):
            typ = self.input_columns[column]
            x = self._numeric(self._column(df, column), column, typ).astype("float64")
            x = x.fillna(f.fill).to_numpy()
            if f.transform in (DenseTransform.LOG1P, DenseTransform.LOG1P_STANDARDIZE):
                x = np.log1p(np.maximum(x, 0.0))
            if f.transform in (DenseTransform.STANDARDIZE, DenseTransform.LOG1P_STANDARDIZE):
                st = self.artifacts.dense[name]
                x = (x - st.mean) / st.std
            out[:, j] = x.astype(np.float32)
        return out

    def batch(
        self, df: pd.DataFrame, pseudo_labels: str = "window", sequences: bool = True
    ) -> Batch:
        """A :class:`Batch` of the rows (labels zero, every row real)."""
        n = len(df)
        sparse = self.sparse_indices(df)
        keys = [s[0] for s in self.sparse]
        prefix, n_prev_col = (
            ("pl_", "n_prev") if pseudo_labels == "window" else ("pl_all_", "n_prev_all")
        )
        pl = np.zeros((n, len(self.tasks)), np.float32)
        for j, t in enumerate(self.tasks):
            col = f"{prefix}{t}"
            if col in df.columns:
                v = self._numeric(df[col], col, "double").astype("float64")
                pl[:, j] = v.fillna(self.artifacts.global_means[t]).to_numpy()
            else:
                pl[:, j] = self.artifacts.global_means[t]
        n_prev = np.zeros(n, np.int64)
        if n_prev_col in df.columns:
            n_prev = (
                self._numeric(df[n_prev_col], n_prev_col, "long")
                .fillna(0)
                .astype(np.int64)
                .to_numpy()
            )
        return Batch(
            sparse_features=KeyedJaggedTensor(
                keys=keys,
                values=torch.from_numpy(sparse.reshape(-1)),
                lengths=torch.ones(len(keys) * n, dtype=torch.int32),
            ),
            sequences=self.sequences(df) if sequences else None,
            dense_features=torch.from_numpy(self.dense_values(df)),
            labels=torch.zeros(n, len(self.tasks) + self.n_dwell),
            pseudo_labels=torch.from_numpy(pl),
            n_prev=torch.from_numpy(n_prev),
            user_idx=torch.from_numpy(sparse[keys.index("user_id")].copy()),
            user_key=torch.zeros(n, dtype=torch.long),
            event_time_ms=torch.zeros(n, dtype=torch.long),
            example_id=torch.arange(n),
            mask=torch.ones(n),
        )


class Scorer:
    """The unsharded model + its preprocessing: ``score(df)`` -> DataFrame of ``score_<task>``."""

    def __init__(
        self,
        model: MultiTaskModel,
        transform: RawFeatureTransform,
        tasks: list[TaskConfig],
        pseudo_labels: str,
        batch_size: int = 8192,
    ) -> None:
        self.model = model.eval()
        self.transform = transform
        self.tasks = tasks
        self.pseudo_labels = pseudo_labels
        self.batch_size = batch_size
        # only DTRN reads the behaviour sequences: others skip building them
        self.uses_sequences = model.uses_sequences

    @torch.no_grad()
    def score(self, df: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for start in range(0, len(df), self.batch_size):
            chunk = df.iloc[start : start + self.batch_size]
            batch = self.transform.batch(chunk, self.pseudo_labels, self.uses_sequences)
            parts.append(self.model.scores(batch).numpy())
        scores = np.concatenate(parts) if parts else np.zeros((0, len(self.tasks)), np.float32)
        return pd.DataFrame(
            {f"score_{t.name}": scores[:, i].astype(np.float64) for i, t in enumerate(self.tasks)},
            index=df.index,
        )


def load_scorer(model_pt: str | Path, spec_yaml: str | Path, preprocessing: str | Path) -> Scorer:
    """A :class:`Scorer` from a run's files: ``model.pt``, the resolved spec, the artifacts dir."""
    from model.config import TrainConfig
    from model.registry import model_from_saved

    saved = torch.load(model_pt, weights_only=False)
    spec = FeatureSpec.model_validate(yaml.safe_load(Path(spec_yaml).read_text()))
    artifacts = load_artifacts(Path(preprocessing), spec, with_vocabs=True)
    model = model_from_saved(saved, spec, artifacts)
    pseudo_labels = TrainConfig.model_validate(saved["config"]).model.pseudo_labels
    return Scorer(model, RawFeatureTransform(spec, artifacts), model.tasks, pseudo_labels)


try:  # the pyfunc wrapper needs mlflow; the rest of this module does not
    import mlflow.pyfunc

    class RankerModel(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: ``predict(DataFrame of raw columns) -> DataFrame of score_<task>``."""

        def load_context(self, context: Any) -> None:
            a = context.artifacts
            self.scorer = load_scorer(a["model"], a["spec"], a["preprocessing"])

        def predict(
            self, context: Any, model_input: pd.DataFrame, params: Any = None
        ) -> pd.DataFrame:
            if not isinstance(model_input, pd.DataFrame):
                raise ScoringInputError(
                    f"the model takes a pandas DataFrame, not {type(model_input).__name__}"
                )
            return self.scorer.score(model_input)

except ImportError:  # pragma: no cover
    RankerModel = None  # type: ignore[assignment,misc]


# MLflow enforces the signature strictly (int64 -> int32 is "unsafe"): every integer type is
# declared long and every floating type double. An integer column with missing values must be
# passed as pandas' nullable Int64 (MLflow refuses NaN in a long column).
_MLFLOW_TYPES = {"string": "string", "double": "double", "float": "double"}
_MLFLOW_TYPES |= {t: "long" for t in INTEGER_TYPES}


def pyfunc_signature(spec: FeatureSpec, tasks: list[str]) -> Any:
    """Input: the raw columns with their declared types (``pl_<task>`` / ``n_prev`` optional);
    output: ``score_<task>`` doubles."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    transform_types = RawFeatureTransform.input_types(spec)
    inputs = [ColSpec(_MLFLOW_TYPES.get(t, "string"), c) for c, t in transform_types.items()]
    inputs += [ColSpec("double", f"pl_{t}", required=False) for t in spec_tasks(spec)]
    inputs.append(ColSpec("long", "n_prev", required=False))
    inputs += [
        ColSpec(Array(DataType.long), f"seq_{s.name}", required=False) for s in spec.sequences
    ]
    outputs = [ColSpec("double", f"score_{t}") for t in tasks]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def spec_tasks(spec: FeatureSpec) -> list[str]:
    return [t.name for t in spec.tasks]
