"""The nightly run as one chain: build features -> train -> evaluate -> register -> score.

Each step is skipped when its output for the date already exists (unless forced), so a re-run
of the same date is a no-op and a scheduler may simply retry a failed night. A failing step
stops the chain with an error naming the step; earlier outputs stay (every table write is one
atomic Delta commit, the trainer's outputs are complete or resumable).

* build: the date's ``examples`` partition exists. On an empty lake the first run does a full
  build of the source (the history the model trains on), not a one-day chain start.
* train (+ evaluate on the valid / test days): ``<runs_dir>/<date>/metrics.json`` exists. Runs
  ``torchrun`` (``nproc`` > 1) or ``python -m jobs.train`` as a subprocess, optionally warm-started
  from the champion's weights.
* register: the run's decision is recorded in the nightly record (the registry itself never
  gets a second version for one run).
* score: the date's ``predictions`` partition exists.

A JSON record per date (``<lake>/<spec>/nightly/<date>.json``) keeps what each step did.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import delta_io
from pipelines.config import PipelineConfig
from pipelines.lake import Tables
from pipelines.spec import FeatureSpec

log = logging.getLogger(__name__)

STEPS = ("build", "train", "register", "score")
REPO = Path(__file__).resolve().parents[1]

__all__ = ["NightlyError", "NightlyOptions", "run_nightly"]


class NightlyError(RuntimeError):
    """A step failed; the message names it."""


@dataclass
class NightlyOptions:
    date: str
    pipeline_conf: str | None = "conf/pipeline.yaml"
    pipeline_overrides: list[str] = field(default_factory=list)
    spec_overrides: list[str] = field(default_factory=list)
    train_conf: str | None = "conf/train.yaml"
    train_overrides: list[str] = field(default_factory=list)
    runs_dir: str = "out/nightly"
    nproc: int = 1
    warm_start: bool = False
    force: set[str] = field(default_factory=set)


def _record_path(tables: Tables, date: str) -> Path:
    return tables.root / "nightly" / f"{date}.json"


def _has_partition(path: str, date: str) -> bool:
    return delta_io.table_exists(path) and date in delta_io.partition_values(path, "date")


def run_nightly(opts: NightlyOptions) -> dict[str, Any]:
    """Run the chain for ``opts.date``; returns the record of every step."""
    from model.config import load_train_config
    from pipelines.config import load_config
    from pipelines.spec import load_spec

    unknown = opts.force - set(STEPS)
    if unknown:
        raise ValueError(f"--force: unknown steps {sorted(unknown)} (steps: {list(STEPS)})")
    cfg: PipelineConfig = load_config(opts.pipeline_conf, opts.pipeline_overrides)
    spec: FeatureSpec = load_spec(cfg.spec, overrides=opts.spec_overrides)
    tcfg = load_train_config(
        opts.train_conf, [f"spec={cfg.spec}", f"lake={cfg.lake}", *opts.train_overrides]
    )
    tables = Tables.for_spec(cfg.lake, spec)
    record_path = _record_path(tables, opts.date)
    record: dict[str, Any] = (
        json.loads(record_path.read_text()) if record_path.exists() else {"date": opts.date}
    )
    record.setdefault("steps", {})

    def save() -> None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1, default=str))

    spark = None

    def session():
        nonlocal spark
        if spark is None:
            from pipelines.spark import spark_session

            spark = spark_session(cfg.spark)
        return spark

    run_dir = Path(opts.runs_dir) / opts.date
    try:
        for step in STEPS:
            t0 = time.time()
            forced = step in opts.force
            try:
                if step == "build":
                    result = _build(session, spec, cfg, tables, opts.date, forced)
                elif step == "train":
                    result = _train(opts, tcfg, run_dir, forced)
                elif step == "register":
                    result = _register(tcfg, run_dir, record, forced)
                else:
                    result = _score(session, spec, cfg, tcfg, tables, opts.date, forced)
            except Exception as err:
                record["steps"][step] = {"status": "failed", "error": str(err)}
                record["failed_step"] = step
                save()
                raise NightlyError(f"nightly {opts.date}: step {step!r} failed: {err}") from err
            result["seconds"] = round(time.time() - t0, 1)
            record["steps"][step] = result
            record.pop("failed_step", None)
            save()
            log.info("nightly %s: %s %s", opts.date, step, result.get("status"))
    finally:
        if spark is not None:
            spark.stop()
    return record


def _build(session, spec, cfg, tables: Tables, date: str, forced: bool) -> dict[str, Any]:
    from pipelines.build import build

    if _has_partition(tables.examples, date) and not forced:
        return {"status": "skipped", "why": f"{tables.examples} has date={date}"}
    if not delta_io.table_exists(tables.examples):
        log.info("empty lake: the first nightly run builds the whole source history")
        summary = build(session(), spec, cfg, date=None)
        mode = "full"
    else:
        summary = build(session(), spec, cfg, date=date)
        mode = "nightly"
    if not _has_partition(tables.examples, date):
        raise NightlyError(f"the build wrote no examples for {date} (source: {spec.source.path})")
    keep = ("rows_in", "rows_accepted", "rows_rejected")
    return {"status": "done", "mode": mode, **{k: summary.get(k) for k in keep}}


def _train(opts: NightlyOptions, tcfg, run_dir: Path, forced: bool) -> dict[str, Any]:
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and not forced:
        info = json.loads(metrics_path.read_text())
        return {"status": "skipped", "why": f"{metrics_path} exists", "run_id": info.get("run_id")}
    sets = [f"output_dir={run_dir}", f"spec={tcfg.spec}", f"lake={tcfg.lake}"]
    if forced:
        sets.append("train.resume=false")
    if opts.warm_start:
        init = _champion_weights(tcfg, run_dir.parent / "_champion")
        if init is not None:
            sets.append(f"train.init_from={init}")
    from model.launch import train_command

    cmd = train_command(
        opts.nproc,
        [*opts.train_overrides, *sets],
        conf=opts.train_conf,
        spec_sets=opts.spec_overrides,
    )
    log.info("train: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise NightlyError(f"jobs.train exited with {proc.returncode} (its log is above)")
    info = json.loads(metrics_path.read_text())
    if not info.get("run_id"):
        raise NightlyError("the training run logged nothing to MLflow (mlflow.enabled=false?)")
    return {
        "status": "done",
        "run_id": info["run_id"],
        "model_uri": info.get("model_uri"),
        "table_version": info.get("table_version"),
        "warm_start": opts.warm_start,
        tcfg.registry.metric: info["metrics"].get(tcfg.registry.metric),
    }


def _champion_weights(tcfg, dst: Path) -> str | None:
    """The champion's ``model.pt`` (downloaded), or None when there is no champion yet."""
    import mlflow

    mlflow.set_tracking_uri(tcfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(tcfg.registry.model_name, "champion")
    except mlflow.exceptions.MlflowException:
        log.info("warm start: no champion yet, training from scratch")
        return None
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{tcfg.registry.model_name}/{mv.version}", dst_path=str(dst)
    )
    found = list(Path(local).rglob("model.pt"))
    if not found:
        raise NightlyError(f"the champion v{mv.version} has no model.pt artifact")
    return str(found[0])


def _register(tcfg, run_dir: Path, record: dict, forced: bool) -> dict[str, Any]:
    from model.lifecycle import register_candidate

    info = json.loads((run_dir / "metrics.json").read_text())
    previous = record["steps"].get("register", {})
    if previous.get("run_id") == info["run_id"] and previous.get("status") in ("done", "skipped"):
        if not forced:
            return {**previous, "status": "skipped", "why": "this run is registered already"}
    decision = register_candidate(
        info["run_id"],
        tcfg.registry.model_name,
        tcfg.registry.metric,
        greater_is_better=tcfg.registry.greater_is_better,
        model_uri=info.get("model_uri"),
        tracking_uri=tcfg.mlflow.tracking_uri,
    )
    return {"status": "done", **decision.to_dict()}


def _score(session, spec, cfg, tcfg, tables: Tables, date: str, forced: bool) -> dict[str, Any]:
    from pipelines.scoring import predictions_path, score_date

    out = predictions_path(cfg, spec)
    if _has_partition(out, date) and not forced:
        return {"status": "skipped", "why": f"{out} has date={date}"}
    uri = f"models:/{tcfg.registry.model_name}@champion"
    summary = score_date(session(), spec, cfg, uri, date, tracking_uri=tcfg.mlflow.tracking_uri)
    return {"status": "done", **summary}
