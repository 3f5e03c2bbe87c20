"""The paper-comparison experiment: every model under the same budget, several seeds, a
hyper-parameter search on the valid days only, and a results table on the test days.

Each training is a ``jobs.train`` process (a fork of a server that has imported it, ``torchrun``
when ``nproc`` > 1: `model.launch.run_training`) logged as an MLflow child run of one parent
run. The search runs evaluate on the valid split only, so test metrics are never computed for a
configuration that was not selected. The table reports, per model and
task, test AUC, GAUC, NDCG@k and LogLoss as mean ± std over seeds, RelaImpr of the mean AUC and
NDCG against the base model (MLP_single), and a paired t-test (over seeds) of STAN against the
best baseline (the non-STAN model with the best mean valid AUC).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.config import MODEL_NAMES, TrainConfig
from model.launch import run_training, train_command
from model.metrics import rela_impr_auc, rela_impr_ndcg
from model.stages import STAGES

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
METRICS = ("auc", "gauc", "ndcg", "logloss")
# a continuous target (HTLNet's core task): its own table
REGRESSION_METRICS = ("nrmse", "nmae", "gini", "spearman")
# the paper's baselines: the paired t-test compares STAN with the best of these
PAPER_BASELINES = ("mlp_single", "mlp_shared", "mmoe", "ple", "aitm", "ple_stage")

__all__ = ["ExperimentPlan", "results_tables", "run_experiment", "stage_single_table"]


@dataclass
class ExperimentPlan:
    models: list[str]
    seeds: list[int]
    out_dir: Path
    # config path -> candidate values, searched on the valid days with the first seed
    search: dict[str, list[str]] = field(default_factory=dict)
    train_conf: str | None = "conf/train.yaml"
    overrides: list[str] = field(default_factory=list)
    spec_overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    base_model: str = "mlp_single"
    stan_model: str = "stan"
    # extra rows: name -> (model name, config overrides), e.g. the paper's ablations
    variants: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    # t-SNE / silhouette / stage shift of STAN's and PLE's user representations (seed 0)
    stage_analysis: bool = True
    # Stage_single: this model (or variant) also trained on each rule-based stage's rows alone,
    # against the same model trained on all rows and evaluated on that stage (None: skip)
    stage_single: str | None = None

    def __post_init__(self) -> None:
        for name, (model, _) in self.variants.items():
            if model not in MODEL_NAMES:
                raise ValueError(f"variant {name!r}: unknown model {model!r}")
        unknown = [m for m in self.models if m not in MODEL_NAMES and m not in self.variants]
        if unknown:
            raise ValueError(f"--models: unknown {unknown} (models: {list(MODEL_NAMES)})")
        if not self.seeds:
            raise ValueError("--seeds: at least one seed")
        if self.stage_single is not None and self.stage_single not in self.models:
            raise ValueError(
                f"--stage-single {self.stage_single!r}: not among the models {self.models}"
            )


def _train(plan: ExperimentPlan, out: Path, sets: list[str]) -> dict[str, Any]:
    sets = [*plan.overrides, *sets, f"output_dir={out}", "train.resume=false"]
    code = run_training(
        plan.nproc, sets, conf=plan.train_conf, spec_sets=plan.spec_overrides, cwd=REPO
    )
    if code != 0:
        cmd = train_command(plan.nproc, sets, conf=plan.train_conf, spec_sets=plan.spec_overrides)
        raise RuntimeError(f"training failed ({code}): {' '.join(cmd)}")
    return json.loads((out / "metrics.json").read_text())


def _valid_score(metrics: dict[str, float]) -> float:
    """Selection criterion: the mean valid AUC over the tasks that have one."""
    vals = [v for k, v in metrics.items() if k.startswith("valid/") and k.endswith("/auc")]
    return float(np.mean(vals)) if vals else float("nan")


def run_experiment(plan: ExperimentPlan, cfg: TrainConfig) -> dict[str, Any]:
    """Run the plan; write results.csv / results.md / runs.json under ``plan.out_dir``."""
    import mlflow

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    if mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
        mlflow.create_experiment(
            cfg.mlflow.experiment,
            artifact_location=Path(cfg.mlflow.artifact_location).resolve().as_uri(),
        )
    mlflow.set_experiment(cfg.mlflow.experiment)
    t0 = time.time()
    runs: list[dict[str, Any]] = []
    with mlflow.start_run(run_name="experiment") as parent:
        mlflow.log_params(
            {
                "models": ",".join(plan.models),
                "seeds": ",".join(map(str, plan.seeds)),
                "search": json.dumps(plan.search),
                "overrides": json.dumps(plan.overrides)[:500],
            }
        )
        child = [f"mlflow.parent_run_id={parent.info.run_id}"]
        for model in plan.models:
            base, extra = plan.variants.get(model, (model, []))
            chosen: list[str] = []
            if plan.search:
                keys = list(plan.search)
                best = (-math.inf, [])
                for values in itertools.product(*(plan.search[k] for k in keys)):
                    combo = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
                    tag = "_".join(
                        f"{k.split('.')[-1]}{v}" for k, v in zip(keys, values, strict=True)
                    )
                    info = _train(
                        plan,
                        plan.out_dir / "search" / model / tag,
                        [f"model.name={base}", *extra, f"train.seed={plan.seeds[0]}",
                         "train.eval_splits=[valid]", f"mlflow.run_name={model}-search-{tag}",
                         *combo, *child],
                    )  # fmt: skip
                    score = _valid_score(info["metrics"])
                    runs.append(
                        {"model": model, "phase": "search", "params": combo, "valid": score}
                    )
                    log.info("search %s %s: mean valid AUC %.5f", model, combo, score)
                    if score > best[0]:
                        best = (score, combo)
                chosen = best[1]
            # the stage-only trainings reuse the selected configuration of the full model
            stages = STAGES if model == plan.stage_single else ()
            for subset, seed in itertools.product((None, *stages), plan.seeds):
                name = model if subset is None else f"{model}@{subset}"
                run_dir = plan.out_dir / "runs" / name / f"seed{seed}"
                sets = ["train.metrics_by_stage=true"]
                if subset is not None:
                    sets.append(f"train.stage_subset={subset}")
                info = _train(
                    plan,
                    run_dir,
                    [f"model.name={base}", *extra, f"train.seed={seed}", *sets,
                     "train.eval_splits=[valid,test]", f"mlflow.run_name={name}-seed{seed}",
                     *chosen, *child],
                )  # fmt: skip
                runs.append(
                    {
                        "model": model,
                        "phase": "final" if subset is None else "stage_single",
                        "stage": subset,
                        "seed": seed,
                        "params": chosen,
                        "run_id": info.get("run_id"),
                        "output_dir": str(run_dir),
                        "valid": _valid_score(info["metrics"]),
                        "metrics": info["metrics"],
                    }
                )
                log.info("%s seed %d done (%.0f s so far)", name, seed, time.time() - t0)
        (plan.out_dir / "runs.json").write_text(json.dumps(runs, indent=1))
        long, md = results_tables(runs, cfg.train.ndcg_k, plan.base_model, plan.stan_model)
        long.to_csv(plan.out_dir / "results.csv", index=False)
        if plan.stage_single is not None:
            single, single_md = stage_single_table(runs, plan.stage_single)
            single.to_csv(plan.out_dir / "stage_single.csv", index=False)
            md += "\n\n" + single_md
        md += f"\n\nWall time: {time.time() - t0:.0f} s for {len(runs)} trainings.\n"
        (plan.out_dir / "results.md").write_text(md)
        if plan.stage_analysis:
            md += _stage_analysis(plan, runs)
            (plan.out_dir / "results.md").write_text(md)
        for name in ("results.csv", "results.md", "runs.json", "stage_single.csv"):
            if (plan.out_dir / name).exists():
                mlflow.log_artifact(str(plan.out_dir / name))
        mlflow.log_metric("wall_seconds", time.time() - t0)
    return {"runs": runs, "results": long, "markdown": md}


def results_tables(
    runs: list[dict[str, Any]], k: int, base_model: str, stan_model: str
) -> tuple[pd.DataFrame, str]:
    """(long table: model, task, metric, mean, std, n; markdown report)."""
    final = [r for r in runs if r["phase"] == "final"]
    rows = []
    for r in final:
        for key, value in r["metrics"].items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "test":
                continue
            _, task, metric = parts
            metric = "ndcg" if metric == f"ndcg@{k}" else metric
            if metric in METRICS or metric in REGRESSION_METRICS:
                rows.append({"model": r["model"], "seed": r["seed"], "task": task,
                             "metric": metric, "value": value})  # fmt: skip
    per_seed = pd.DataFrame(rows)
    if per_seed.empty:
        raise ValueError("no test metrics in the runs")
    long = (
        per_seed.groupby(["model", "task", "metric"], sort=False)["value"]
        .agg(mean="mean", std=lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0, n="count")
        .reset_index()
    )
    means = long.set_index(["model", "task", "metric"])["mean"]
    relas = []
    if base_model in long["model"].values:
        for (model, task, metric), value in means.items():
            base = means.get((base_model, task, metric))
            if base is None:
                continue
            if metric == "auc" and base != 0.5:
                relas.append((model, task, "relaimpr_auc", rela_impr_auc(value, base)))
            elif metric == "ndcg" and base != 0:
                relas.append((model, task, "relaimpr_ndcg", rela_impr_ndcg(value, base)))
    rela = pd.DataFrame(relas, columns=["model", "task", "metric", "mean"])
    rela["std"], rela["n"] = np.nan, np.nan
    long = pd.concat([long, rela], ignore_index=True)

    tasks = list(dict.fromkeys(long["task"]))
    models = list(dict.fromkeys(long["model"]))
    lines = [f"Test days; mean ± std over seeds; NDCG@{k}; RelaImpr against {base_model}.", ""]
    for task in tasks:
        regression = long[(long.task == task) & long.metric.isin(REGRESSION_METRICS)]
        if len(regression):
            lines += [f"### {task} (continuous target)", "",
                      "| model | NRMSE | NMAE | Gini | Spearman |", "|---|---|---|---|---|"]  # fmt: skip
            for model in dict.fromkeys(regression["model"]):
                cell = []
                for metric in REGRESSION_METRICS:
                    m = regression[(regression.model == model) & (regression.metric == metric)]
                    cell.append(
                        f"{m['mean'].iloc[0]:.4f} ± {m['std'].iloc[0]:.4f}" if len(m) else ""
                    )
                lines.append(f"| {model} | " + " | ".join(cell) + " |")
            lines.append("")
        models_with_task = set(long[(long.task == task) & long.metric.isin(METRICS)]["model"])
        if not models_with_task:
            continue
        lines += [f"### {task}", "",
                  "| model | AUC | GAUC | NDCG | LogLoss | RelaImpr AUC | RelaImpr NDCG |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for model in models:
            if model not in models_with_task:
                continue
            cell = []
            for metric in METRICS:
                m = long[(long.model == model) & (long.task == task) & (long.metric == metric)]
                cell.append(f"{m['mean'].iloc[0]:.4f} ± {m['std'].iloc[0]:.4f}" if len(m) else "")
            for metric in ("relaimpr_auc", "relaimpr_ndcg"):
                m = long[(long.model == model) & (long.task == task) & (long.metric == metric)]
                cell.append(f"{100 * m['mean'].iloc[0]:+.2f}%" if len(m) else "")
            lines.append(f"| {model} | " + " | ".join(cell) + " |")
        lines.append("")
    lines += _ttest_section(final, per_seed, stan_model)
    return long, "\n".join(lines)


def stage_single_table(runs: list[dict[str, Any]], model: str) -> tuple[pd.DataFrame, str]:
    """Stage_single: per stage and task, the test AUC of ``model`` trained on all rows and
    evaluated on the stage's rows (``on_all``), against ``model`` trained on that stage's rows
    alone (``on_stage``), means over seeds. A stage whose test rows hold one class for a task
    has no AUC there (NaN)."""
    aucs, sizes = [], {}
    for r in runs:
        if r["model"] != model or r["phase"] not in ("final", "stage_single"):
            continue
        trained_on = "on_all" if r["phase"] == "final" else "on_stage"
        for key, value in r["metrics"].items():
            parts = key.split("/")
            if parts[0] != "test" or not parts[1].startswith("stage_"):
                continue
            stage = parts[1].removeprefix("stage_")
            if len(parts) == 3 and parts[2] == "rows" and trained_on == "on_all":
                sizes[stage] = int(value)
            elif len(parts) == 4 and parts[3] == "auc":
                if trained_on == "on_stage" and stage != r["stage"]:
                    continue
                aucs.append({"stage": stage, "task": parts[2], "trained_on": trained_on,
                             "auc": value})  # fmt: skip
    df = pd.DataFrame(aucs, columns=["stage", "task", "trained_on", "auc"])
    table = df.pivot_table(index=["stage", "task"], columns="trained_on", values="auc",
                           aggfunc="mean").reset_index()  # fmt: skip
    for col in ("on_all", "on_stage"):
        if col not in table:
            table[col] = np.nan
    table["difference"] = table["on_stage"] - table["on_all"]
    table["test_rows"] = table["stage"].map(sizes)
    table["order"] = table["stage"].map({s: i for i, s in enumerate(STAGES)})
    table = table.sort_values(["order", "task"]).drop(columns="order").reset_index(drop=True)
    lines = [f"### Stage_single: {model} trained on one stage's rows vs on all rows", "",
             "Test AUC on the stage's test rows, mean over seeds.", "",
             "| stage | test rows | task | trained on all rows | trained on the stage | "
             "difference |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in table.itertuples():
        lines.append(f"| {r.stage} | {r.test_rows} | {r.task} | {r.on_all:.4f} | "
                     f"{r.on_stage:.4f} | {r.difference:+.4f} |")  # fmt: skip
    return table, "\n".join(lines)


def _ttest_section(final: list[dict], per_seed: pd.DataFrame, stan_model: str) -> list[str]:
    from scipy import stats

    baselines = [r for r in final if r["model"] in PAPER_BASELINES]
    if stan_model not in per_seed["model"].values or not baselines:
        return ["(no paired t-test: STAN and a baseline are both needed)"]
    valid = pd.DataFrame([{"model": r["model"], "valid": r["valid"]} for r in baselines])
    best = valid.groupby("model")["valid"].mean().idxmax()
    lines = [f"### Paired t-test: {stan_model} vs the best baseline ({best}, by mean valid AUC)",
             "", "| task | metric | mean difference | t | p | seeds |", "|---|---|---|---|---|---|"]  # fmt: skip
    auc = per_seed[per_seed.metric == "auc"]
    for task in dict.fromkeys(auc["task"]):
        a = auc[(auc.model == stan_model) & (auc.task == task)].set_index("seed")["value"]
        b = auc[(auc.model == best) & (auc.task == task)].set_index("seed")["value"]
        seeds = sorted(set(a.index) & set(b.index))
        diff = float(np.mean(a[seeds].to_numpy() - b[seeds].to_numpy())) if seeds else float("nan")
        if len(seeds) >= 2:
            t, p = stats.ttest_rel(a[seeds], b[seeds])
            lines.append(f"| {task} | AUC | {diff:+.4f} | {t:.3f} | {p:.4f} | {len(seeds)} |")
        else:
            lines.append(f"| {task} | AUC | {diff:+.4f} | n/a | n/a (one seed) | {len(seeds)} |")
    return lines


ABLATIONS: dict[str, tuple[str, list[str]]] = {
    # STAN's f as a DNN instead of self-attention (the paper's experiments used a DNN)
    "stan_dnn_f": ("stan", ["model.stan.f=dnn"]),
    # pseudo-labels over all history instead of the 30-day window
    "stan_all_history": ("stan", ["model.pseudo_labels=all_history"]),
}


def _stage_analysis(plan: ExperimentPlan, runs: list[dict[str, Any]]) -> str:
    """Run the stage analysis on the first seed's STAN and PLE runs; log the PNGs."""
    import mlflow

    from model.stage_analysis import analyse_runs

    first = {
        r["model"]: r["output_dir"]
        for r in runs
        if r["phase"] == "final" and r["seed"] == plan.seeds[0] and r["model"] in ("stan", "ple")
    }
    if not first:
        return ""
    out = plan.out_dir / "stage_analysis"
    result = analyse_runs(first, out)
    for fig in result["figures"]:
        mlflow.log_artifact(fig, "stage_analysis")
    mlflow.log_metrics({f"silhouette_{k}": v for k, v in result["silhouette"].items()
                        if math.isfinite(v)})  # fmt: skip
    lines = ["", "### Stage analysis (first seed)", "",
             "Silhouette of the rule-based stages in the user representation space "
             "(higher separates the stages better): "
             + ", ".join(f"{k} {v:.4f}" for k, v in result["silhouette"].items()), "",
             f"Users per stage (training window): {result.get('stage_counts')}", "",
             "Stage shift of the same users, first week (rows) to last week (columns):", "",
             _markdown_matrix(result["stage_shift"]) if "stage_shift" in result else "", ""]  # fmt: skip
    return "\n".join(lines)


def _markdown_matrix(df: pd.DataFrame) -> str:
    lines = ["| | " + " | ".join(map(str, df.columns)) + " |", "|---" * (len(df.columns) + 1) + "|"]
    for idx, row in df.iterrows():
        lines.append(f"| {idx} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)
