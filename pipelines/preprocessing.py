"""The fitted preprocessing (vocabularies, dense statistics, dwell bins, the pseudo-label
fallback means) as the trainer and the scoring model read it: ``preprocessing.json`` and the
vocabulary Parquet files beside the tables. Fitted by :mod:`pipelines.artifacts` (Spark) on the
training window only; this module needs no Spark, so a training image needs none.

Index 0 of every vocabulary is the reserved OOV index (unknown, rare, or missing values).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.spec import FeatureSpec

OOV = 0


@dataclass
class DenseStats:
    mean: float
    std: float


@dataclass
class Artifacts:
    spec_name: str
    spec_hash: str
    train_dates: list[str]
    train_rows: int
    # vocab table name -> size including the OOV row (embedding table rows)
    vocab_sizes: dict[str, int]
    dense: dict[str, DenseStats]
    # dwell task -> bin boundaries (strictly increasing); n_bins = len + 1
    bins: dict[str, list[float]]
    # task -> mean of the task's [0, 1] value on the training window (pseudo-label fallback)
    global_means: dict[str, float]
    vocab_dir: str = ""
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def n_bins(self, task: str) -> int:
        return len(self.bins[task]) + 1

    def target_divisor(self, task: str) -> int:
        """Turns a task's integer value into its [0, 1] target: n_bins - 1 for a dwell task
        (value = bin index), 1 for a binary task."""
        return self.n_bins(task) - 1 if task in self.bins else 1

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("vocabs")
        d.pop("vocab_dir")
        return d


def spec_hash(spec: FeatureSpec) -> str:
    """Fingerprint of what the preprocessing depends on: the spec without its data locations
    (moving the data does not invalidate the fitted vocabularies and bins)."""
    d = spec.model_dump(mode="json")
    d["source"].pop("path")
    for g in ("user", "item"):
        for t in d[g]["tables"]:
            t.pop("path")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def vocab_tables(spec: FeatureSpec) -> dict[str, list[str]]:
    """Embedding/vocabulary table name -> the example columns it indexes."""
    tables: dict[str, list[str]] = {"user_id": ["user_id"], "item_id": ["item_id"]}
    for f in spec.categorical_features:
        tables.setdefault(f.table or f.name, []).append(f.name)
    return tables


def load(out_dir: Path, spec: FeatureSpec | None = None, with_vocabs: bool = True) -> Artifacts:
    path = out_dir / "preprocessing.json"
    if not path.exists():
        raise FileNotFoundError(f"no fitted preprocessing at {path}")
    d = json.loads(path.read_text())
    d["dense"] = {k: DenseStats(**v) for k, v in d["dense"].items()}
    art = Artifacts(**d, vocab_dir=str(out_dir / "vocab"))
    if spec is not None and art.spec_hash != spec_hash(spec):
        raise ValueError(
            f"{path} was fitted for a different version of spec {spec.name!r} "
            f"({art.spec_hash} != {spec_hash(spec)}): run a full rebuild (--full) to refit"
        )
    if with_vocabs:
        for table in art.vocab_sizes:
            t = pq.read_table(Path(art.vocab_dir) / f"{table}.parquet", columns=["value", "idx"])
            art.vocabs[table] = dict(zip(t["value"].to_pylist(), t["idx"].to_pylist(), strict=True))
    return art


def check_finite(art: Artifacts) -> None:
    for k, s in art.dense.items():
        if not (math.isfinite(s.mean) and math.isfinite(s.std)):
            raise ValueError(f"dense feature {k}: non-finite statistics {s}")
