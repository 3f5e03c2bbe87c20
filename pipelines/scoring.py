"""Batch scoring: a registered model applied to one day's sessions with Spark.

The day's raw rows are read and validated exactly as the feature build reads them
(``read_validated`` + ``wide_rows``: same sessions, same ``example_id``), renamed back to their
raw column names, and scored by the model's pyfunc inside ``mapInArrow`` (one model load per
Python worker). The running pseudo-labels (used by PLE_stage) come from the day's ``examples``
partition when it exists. Predictions go to a Delta table partitioned by ``date``; a re-run of
the same date replaces that partition in one commit.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import delta_io
from pipelines.build import read_validated, wide_rows
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.preprocessing import spec_hash
from pipelines.spec import FeatureSpec, load_spec

log = logging.getLogger(__name__)

__all__ = [
    "ModelFacts",
    "ScoringError",
    "download_model",
    "model_facts",
    "predictions_path",
    "score_date",
]

_SCORERS: dict[str, Any] = {}


class ScoringError(RuntimeError):
    pass


def predictions_path(cfg: PipelineConfig, spec: FeatureSpec) -> str:
    return str(Tables.for_spec(cfg.lake, spec).root / "predictions")


def download_model(model_uri: str, tracking_uri: str | None, dst: Path) -> tuple[str, dict]:
    """The pyfunc's files in a local folder (executors load it from there), and the registry
    facts of the URI (name, version) when it is a ``models:/`` URI."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    facts: dict[str, Any] = {"model_uri": model_uri}
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        mv = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
        facts |= {"model_name": name, "model_version": str(mv.version)}
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    return local, facts


@dataclass(frozen=True)
class ModelFacts:
    """What the driver needs of a model: the spec it was trained on, its task names (in the
    order of its outputs) and whether it reads the behaviour sequences."""

    spec: FeatureSpec
    tasks: list[str]
    uses_sequences: bool


def model_facts(local_model: str) -> ModelFacts:
    """The facts of the pyfunc in ``local_model``, from its ``MLmodel`` metadata and its
    ``spec.yaml`` (`model.pyfunc_facts`); a model logged without them is loaded instead."""
    from mlflow.models import Model

    from model.pyfunc_facts import METADATA_KEY

    mlmodel = Model.load(local_model)
    facts = (mlmodel.metadata or {}).get(METADATA_KEY)
    if facts is None:
        scorer = _scorer(local_model)
        return ModelFacts(
            scorer.transform.spec, [t.name for t in scorer.tasks], scorer.uses_sequences
        )
    spec_file = Path(local_model) / mlmodel.flavors["python_function"]["artifacts"]["spec"]["path"]
    return ModelFacts(load_spec(spec_file), list(facts["tasks"]), bool(facts["uses_sequences"]))


def _scorer(local_model: str) -> Any:
    if local_model not in _SCORERS:
        import mlflow.pyfunc

        _SCORERS[local_model] = mlflow.pyfunc.load_model(local_model).unwrap_python_model().scorer
    return _SCORERS[local_model]


def score_date(
    spark: SparkSession,
    spec: FeatureSpec,
    cfg: PipelineConfig,
    model_uri: str,
    date: str,
    *,
    tracking_uri: str | None = None,
    out_path: str | None = None,
    now_ms: int | None = None,
) -> dict:
    """Score ``date``'s sessions with ``model_uri``; returns a summary (rows, version, path)."""
    t0 = time.time()
    out_path = out_path or predictions_path(cfg, spec)
    with tempfile.TemporaryDirectory(prefix="score-model-") as tmp:
        local, facts = download_model(model_uri, tracking_uri, Path(tmp))
        model = model_facts(local)
        trained = model.spec
        if spec_hash(trained) != spec_hash(spec):
            raise ScoringError(
                f"{model_uri} was trained with another version of spec {trained.name!r} than "
                f"{spec.name!r} here (spec hashes {spec_hash(trained)} != {spec_hash(spec)})"
            )
        tasks = model.tasks
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        validated, _ = read_validated(spark, spec, cfg, date, now_ms)
        rows = wide_rows(spark, spec, validated.accepted).where(F.col("date") == date)
        raw = _raw_columns(spec, rows)
        raw = _with_pseudo_labels(spark, spec, cfg, raw, date, model.uses_sequences)
        id_types = {f.name: f.dataType.simpleString() for f in raw.schema.fields}
        schema = (
            f"example_id long, user_id {id_types['_user_id']}, item_id {id_types['_item_id']}, "
            "event_time_ms long, date string, " + ", ".join(f"score_{t} double" for t in tasks)
        )

        def predict(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            sc = _scorer(local)
            for rb in batches:
                pdf = rb.to_pandas()
                scores = sc.score(pdf)
                out = {
                    "example_id": pdf["example_id"],
                    "user_id": pdf["_user_id"],
                    "item_id": pdf["_item_id"],
                    "event_time_ms": pdf["event_time_ms"],
                    "date": pdf["date"],
                }
                out |= {c: scores[c] for c in scores.columns}
                yield pa.RecordBatch.from_pandas(pd.DataFrame(out), preserve_index=False)

        # Each Python worker that scores loads the model (torch, torchrec: some 15 s on a
        # 2-core machine): the rows are rebalanced into partitions of Spark's advisory size
        # (64 MB: one for a small day) rather than scored in the read's and joins' partitions
        # (a day of 1k rows took three loads, 60 s).
        preds = raw.hint("rebalance").mapInArrow(predict, schema)
        preds = preds.withColumn("model_uri", F.lit(model_uri)).withColumn(
            "model_version", F.lit(facts.get("model_version"))
        )
        version = delta_io.write_delta(
            preds,
            out_path,
            partition_by=["date"],
            mode="overwrite",
            replace_partitions={"date": [date]},
            sort_within=["user_id", "event_time_ms", "example_id"],
            writer=cfg.delta.writer,
            commit_info={"run": f"score {date}", "model_uri": model_uri},
        )
    n = delta_io.read_delta(spark, out_path).where(F.col("date") == date).count()
    summary = {
        "date": date,
        "rows": n,
        "predictions": out_path,
        "table_version": version,
        "seconds": round(time.time() - t0, 1),
        **facts,
    }
    log.info("scored %s: %d rows -> %s (version %d)", date, n, out_path, version)
    return summary


def _raw_columns(spec: FeatureSpec, rows: DataFrame) -> DataFrame:
    """The wide rows with the raw source / side-table column names the pyfunc takes."""
    src = spec.source
    cols = [
        F.col("example_id"),
        F.col("event_time_ms"),
        F.col("date"),
        F.col("user_id").alias("_user_id"),
        F.col("item_id").alias("_item_id"),
    ]
    taken = {"example_id", "event_time_ms", "date", "_user_id", "_item_id"}
    for name, column in [("user_id", src.user_id), ("item_id", src.item_id)] + [
        (f.name, f.column) for f in [*spec.categorical_features, *spec.dense_features]
    ]:
        if column not in taken:
            cols.append(F.col(name).alias(column))
            taken.add(column)
    return rows.select(*cols)


def _with_pseudo_labels(
    spark: SparkSession,
    spec: FeatureSpec,
    cfg: PipelineConfig,
    raw: DataFrame,
    date: str,
    sequences: bool,
) -> DataFrame:
    examples = Tables.for_spec(cfg.lake, spec).examples
    if not delta_io.table_exists(examples) or date not in delta_io.partition_values(
        examples, "date"
    ):
        log.warning("no examples for %s: PLE_stage-like models score without history", date)
        return raw
    pl = [f"pl_{t.name}" for t in spec.tasks] + ["n_prev"]
    if sequences:  # DTRN's inputs (strictly earlier events); other models never read them
        pl += [f"seq_{s.name}" for s in spec.sequences]
    ex = delta_io.read_delta(spark, examples).where(F.col("date") == date)
    return raw.join(ex.select("example_id", *pl), "example_id", "left")
