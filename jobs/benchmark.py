"""Benchmarks that print figures (never asserted in tests).

    python -m jobs.benchmark pipeline --events 1e6,1e7          # full build + DuckDB beside it
    python -m jobs.benchmark pipeline --incremental 2,10,30     # nightly cost vs history length
    python -m jobs.benchmark pipeline --kuairand                # the real data, full + one night
    python -m jobs.benchmark train --models stan,ple --batch-sizes 512,2048   # loader + trainer
    python -m jobs.benchmark train --configs paper --device cuda --batch-sizes 2048,8192,32768 \
        --precisions fp32,tf32,bf16 --parity                    # GPU: MFU, and AUC parity

Each figure is measured end to end in a fresh process (Spark start included), as a scheduler
would run it. Results go to stdout as a markdown table and to <out>/pipeline.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from model.launch import train_command

REPO = Path(__file__).resolve().parents[1]


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the JVM and Python workers)."""
    total = 0
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total / 2**20


def timed(cmd: list[str], log: Path) -> dict:
    """Run a command, return wall seconds and the peak RSS of its process tree."""
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0.0
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_mb(proc.pid))
                stop.wait(1.0)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); log {log}:\n{tail}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak)}


def _py() -> str:
    return sys.executable


def generate(out: Path, events: float, days: int, seed: int = 7) -> dict:
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("bench_key") == [events, days, seed]:
            return m
        shutil.rmtree(out)
    cmd = [
        _py(),
        "-m",
        "jobs.generate_logs",
        "--out",
        str(out),
        "--events",
        str(events),
        "--days",
        str(days),
        "--items",
        "200000",
        "--seed",
        str(seed),
        "--quiet",
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    m = json.loads(manifest.read_text())
    m["bench_key"] = [events, days, seed]
    manifest.write_text(json.dumps(m))
    return m


def _total_events(manifest: dict) -> int:
    return int(manifest["counts"]["events"]["total"])


def spec_args(data: Path, start: dt.date, days: int) -> list[str]:
    train_end = start + dt.timedelta(days=max(days - 3, 0))
    valid_end = start + dt.timedelta(days=max(days - 2, 0))
    return [
        "--spec",
        "feature_specs/synthetic.yaml",
        "--spec-set",
        f"source.path={data}/events/date={{date}}",
        "--spec-set",
        f"user.tables.0.path={data}/users.parquet",
        "--spec-set",
        f"item.tables.0.path={data}/items.parquet",
        "--spec-set",
        f"split.train_end={train_end}",
        "--spec-set",
        f"split.valid_end={valid_end}",
    ]


def build_cmd(lake: Path, extra: list[str], partitions: int) -> list[str]:
    return [
        _py(),
        "-m",
        "jobs.build_features",
        "--set",
        f"lake={lake}",
        "--set",
        f"spark.user_partitions={partitions}",
        "--set",
        f"spark.conf.spark.sql.shuffle.partitions={partitions}",
        *extra,
    ]


def _build_row(bench: str, n: int, days: int, res: dict, summary: dict, cores: int) -> dict:
    return {
        "bench": bench,
        "events": n,
        "sessions": summary["sessions"],
        "days": days,
        **res,
        "events_per_s": round(n / res["seconds"]),
        "events_per_s_per_core": round(n / res["seconds"] / cores),
        "build_seconds": summary["seconds"],
    }


def duckdb_cmd(out: Path, extra: list[str], threads: int) -> list[str]:
    return [_py(), "-m", "jobs.benchmark", "duckdb-build", "--out", str(out),
            "--threads", str(threads), *extra]  # fmt: skip


def bench_full(work: Path, events_list: list[float], days: int, duckdb: bool = True) -> list[dict]:
    """Full builds on generated logs; beside each, the same features built by DuckDB in a fresh
    process on the same cores, and both outputs compared row by row."""
    from pipelines.duckdb_build import compare_examples, compare_rejected

    rows = []
    cores = os.cpu_count() or 1
    for events in events_list:
        data = work / f"synthetic_{events:g}"
        m = generate(data, events, days)
        n = _total_events(m)
        lake = work / f"lake_full_{events:g}"
        shutil.rmtree(lake, ignore_errors=True)
        parts = max(4, int(n // 500_000))
        start = dt.date.fromisoformat(m["params"].get("start_date", "2022-04-25"))
        res = timed(
            build_cmd(lake, ["--full", *spec_args(data, start, days)], parts),
            work / f"full_{events:g}.log",
        )
        summary = json.loads((lake / "synthetic" / "summaries" / "full.json").read_text())
        rows.append(_build_row("full build (synthetic events)", n, days, res, summary, cores))
        print(json.dumps(rows[-1]), flush=True)
        if not duckdb:
            continue
        duck = work / f"duckdb_{events:g}"
        shutil.rmtree(duck, ignore_errors=True)
        dres = timed(
            duckdb_cmd(duck, spec_args(data, start, days), cores), work / f"duckdb_{events:g}.log"
        )
        same = compare_examples(lake / "synthetic" / "examples", duck / "examples")
        same_rej = compare_rejected(lake / "synthetic" / "rejected", duck / "rejected.parquet")
        dsum = json.loads((duck / "summary.json").read_text())
        rows.append(
            {
                **_build_row(f"same features in {dsum['engine']}", n, days, dres, dsum, cores),
                "spark_over_duckdb": round(res["seconds"] / dres["seconds"], 2),
                "outputs_equal": same["equal"] and same_rej["equal"],
                "examples_compared": same["rows_compared"],
                "mismatches": {**same["mismatches"], **same_rej["differences"]},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def duckdb_build_main(args: argparse.Namespace) -> int:
    """The DuckDB build as its own process (timed by bench_full like the Spark job)."""
    from pipelines.duckdb_build import build_duckdb
    from pipelines.spec import load_spec

    spec = load_spec(args.spec, overrides=args.spec_overrides)
    summary = build_duckdb(
        spec,
        args.out,
        now_ms=args.now_ms or int(time.time() * 1000),
        threads=args.threads,
        memory_limit=args.memory_limit,
    )
    print(json.dumps(summary, indent=2))
    return 0


def warm_class_archive(work: Path) -> str:
    """Every timed build starts from the driver's class-data archive (`pipelines.spark`):
    where there is none yet, an untimed build of a small log records it first (the recording
    run starts slower and writes the archive at its exit)."""
    from pipelines.spark import archive_path

    path = archive_path({})
    if path is None:
        return "none (no java binary found)"
    if path.exists():
        return f"used ({path})"
    data = work / "synthetic_warmup"
    m = generate(data, 2e4, 3)
    start = dt.date.fromisoformat(m["params"].get("start_date", "2022-04-25"))
    lake = work / "lake_warmup"
    shutil.rmtree(lake, ignore_errors=True)
    timed(build_cmd(lake, ["--full", *spec_args(data, start, 3)], 4), work / "warmup.log")
    return f"recorded by an untimed build, then used ({path})" if path.exists() else "none"


def bench_incremental(work: Path, at_days: list[int], events_per_day: float) -> list[dict]:
    """Nightly cost of day k after a history of k-1 days, at equal daily volume."""
    horizon = max(at_days)
    data = work / f"synthetic_daily_{events_per_day:g}x{horizon}"
    m = generate(data, events_per_day * horizon, horizon)
    start = dt.date.fromisoformat(m["params"].get("start_date", "2022-04-25"))
    rows = []
    for k in at_days:
        day = start + dt.timedelta(days=k - 1)
        # A view of the log with the days before k: the history a nightly chain has built.
        view = work / f"view_{k}"
        shutil.rmtree(view, ignore_errors=True)
        (view / "events").mkdir(parents=True)
        for i in range(k):
            d = (start + dt.timedelta(days=i)).isoformat()
            (view / "events" / f"date={d}").symlink_to(data / "events" / f"date={d}")
        for f in ("users.parquet", "items.parquet"):
            (view / f).symlink_to(data / f)
        hist = view / "history_only"
        (hist / "events").mkdir(parents=True)
        for i in range(k - 1):
            d = (start + dt.timedelta(days=i)).isoformat()
            (hist / "events" / f"date={d}").symlink_to(data / "events" / f"date={d}")
        for f in ("users.parquet", "items.parquet"):
            (hist / f).symlink_to(data / f)
        lake = work / f"lake_inc_{k}"
        shutil.rmtree(lake, ignore_errors=True)
        sargs = spec_args(view, start, horizon)
        hargs = spec_args(hist, start, horizon)
        timed(build_cmd(lake, ["--full", *hargs], 4), work / f"inc_{k}_history.log")
        res = timed(build_cmd(lake, ["--date", day.isoformat(), *sargs], 4), work / f"inc_{k}.log")
        summary = json.loads((lake / "synthetic" / "summaries" / f"{day}.json").read_text())
        rows.append(
            {
                "bench": f"nightly run of day {k}",
                "history_days": k - 1,
                "events": summary["rows_in"],
                **res,
                "build_seconds": summary["seconds"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_kuairand(work: Path) -> list[dict]:
    lake = work / "lake_kuairand"
    shutil.rmtree(lake, ignore_errors=True)
    full = timed(build_cmd(lake, ["--full"], 8), work / "kuairand_full.log")
    night = timed(build_cmd(lake, ["--date", "2022-05-08"], 8), work / "kuairand_night.log")
    s_full = json.loads((lake / "kuairand" / "summaries" / "full.json").read_text())
    s_night = json.loads((lake / "kuairand" / "summaries" / "2022-05-08.json").read_text())
    return [
        {
            "bench": "KuaiRand full rebuild (15 days)",
            "events": s_full["rows_in"],
            **full,
            "build_seconds": s_full["seconds"],
        },
        {
            "bench": "KuaiRand nightly run (2022-05-08)",
            "events": s_night["rows_in"],
            **night,
            "build_seconds": s_night["seconds"],
        },
    ]


# ------------------------------------------------------------------------------ training
TRAIN_CONFIGS = {
    # what the tests and the CPU demo use
    "cpu": [],
    # the STAN paper's settings (Sec. 4.1.3): embedding dim 128, hidden units <= 1024
    "paper": [
        "model.embedding_dim=128",
        "model.bottom_hidden=[1024,512]",
        "model.expert_hidden=[1024,512]",
        "model.tower_hidden=[256]",
        "model.ple={layers: 1, task_experts: 1, shared_experts: 3}",
        "model.stan.preference_hidden=[256]",
        "model.stan.heads=4",
    ],
}


# Parity of a reduced precision with fp32 on each task's valid AUC (same seed and data): a
# task fails when its difference exceeds PARITY_AUC_TOLERANCE by more than PARITY_Z standard
# errors of a paired DeLong test, that is when the valid rows show the models' AUCs to differ
# by more than the tolerance (a rare label's AUC moves by more than any fixed tolerance on a
# small split).
PARITY_AUC_TOLERANCE = 0.002
PARITY_Z = 1.96


def run_sets(
    lake: str,
    out: Path,
    model: str,
    config: str,
    batch_size: int,
    steps: int,
    parity: bool,
    device: str,
    precision: str,
    num_workers: int = 0,
    prefetch_batches: int = 0,
    profile_steps: int = 0,
) -> list[str]:
    """The ``--set`` overrides of one measured ``jobs.train`` run."""
    return [
        f"lake={lake}",
        f"output_dir={out}",
        f"model.name={model}",
        f"train.batch_size={batch_size}",
        f"train.max_steps={steps}",
        # as many epochs as steps: a large batch takes all the steps asked for even where an
        # epoch of the table is a few batches
        f"train.epochs={steps}",
        "train.eval_splits=[valid]" if parity else "train.eval_splits=[]",
        "train.resume=false",
        "mlflow.enabled=false",
        f"train.device={device}",
        f"train.precision={precision}",
        f"train.num_workers={num_workers}",
        f"train.prefetch_batches={prefetch_batches}",
        f"train.profile_steps={profile_steps}",
        *TRAIN_CONFIGS[config],
    ]


def bench_train(
    work: Path,
    lake: str,
    models: list[str],
    configs: list[str],
    batch_sizes: list[int],
    steps: int,
    nproc: int,
    device: str,
    precisions: list[str],
    loader_seconds: float,
    parity: bool = False,
    parity_tolerance: float = PARITY_AUC_TOLERANCE,
    num_workers: int = 0,
    prefetch_batches: int = 0,
    profile_steps: int = 0,
) -> list[dict]:
    """Trainer samples/s per model, config, batch size and precision (a fresh ``jobs.train``
    process each, warm-up steps excluded), and the loader's own samples/s at the same batch
    sizes. ``parity``: each run also evaluates on the valid split, and each precision other
    than fp32 is compared with the fp32 run of the same model, config and batch
    (`precision_parity`): the same seed and data, so the AUCs differ by the precision alone
    (and, on a GPU, the kernels' non-deterministic sums). The evaluation comes after the timed
    steps: the samples/s are the training steps' either way. ``num_workers``: the loader's
    worker processes, for the loader alone and for every run (``train.num_workers``);
    ``prefetch_batches``: ``train.prefetch_batches`` of every run; ``profile_steps``: each run
    also profiles that many steps after its warm-up (``train.profile_steps``, not timed) and
    reports the operators and device kernels per step (`model.profiling`)."""
    rows: list[dict] = []
    if loader_seconds > 0:
        from model.data import benchmark_loader
        from pipelines.lake import Tables
        from pipelines.preprocessing import load as load_artifacts
        from pipelines.spec import load_spec

        spec = load_spec(REPO / "feature_specs" / "kuairand.yaml")
        tables = Tables.for_spec(lake, spec)
        art = load_artifacts(tables.artifacts, spec, with_vocabs=False)
        for b in batch_sizes:
            rate = benchmark_loader(
                tables.examples, spec, art, b, loader_seconds, num_workers=num_workers
            )
            what = f"loader ({num_workers} workers)" if num_workers else "loader (1 process)"
            rows.append({"bench": what, "batch": b, "samples_per_s": round(rate)})
            print(json.dumps(rows[-1]), flush=True)
    for config in configs:
        for model in models:
            for b in batch_sizes:
                evaluated: dict[str, Path] = {}
                for precision in precisions:
                    out = work / f"train_{config}_{model}_{b}_{precision}"
                    shutil.rmtree(out, ignore_errors=True)
                    sets = run_sets(
                        lake, out, model, config, b, steps, parity, device, precision,
                        num_workers, prefetch_batches, profile_steps,
                    )  # fmt: skip
                    if nproc > 1:
                        sets.append(f"train.threads={max(1, (os.cpu_count() or 1) // nproc)}")
                    cmd = train_command(nproc, sets, python=_py())
                    out.mkdir(parents=True, exist_ok=True)
                    run = timed(cmd, out.parent / f"{out.name}.log")
                    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
                    row = {
                        "bench": f"train {model} ({config}, {nproc} proc, {device})",
                        "precision": precision,
                        "batch": b,
                        "samples_per_s": round(metrics["train/samples_per_s"]),
                        "steps": steps,
                        "seconds": run["seconds"],
                        "peak_rss_mb": run["peak_rss_mb"],
                    }
                    if "train/gpu_peak_mem_gb" in metrics:
                        row["gpu_peak_mem_gb"] = round(metrics["train/gpu_peak_mem_gb"], 2)
                    for key in ("aten_ops_per_step", "device_kernels_per_step", "host_ms_per_step"):
                        if f"train/profile/{key}" in metrics:
                            row[key] = round(metrics[f"train/profile/{key}"], 1)
                    row |= utilisation(sets, b, row["samples_per_s"], metrics, precision)
                    if parity:
                        evaluated[precision] = out
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                fp32_dir = evaluated.pop("fp32", None)
                for precision, run_dir in evaluated.items() if fp32_dir else ():
                    check = precision_parity(fp32_dir, run_dir, parity_tolerance)
                    rows.append(
                        {
                            "bench": f"parity {model} ({config}): {precision} against fp32",
                            "precision": precision,
                            "batch": b,
                            "steps": steps,
                            **check,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def precision_parity(
    fp32_dir: Path, other_dir: Path, tolerance: float = PARITY_AUC_TOLERANCE
) -> dict:
    """A run's valid AUCs against the fp32 run's, from the two runs' predictions of the same
    valid rows (``predictions_valid.parquet``): per task the difference, the standard error of
    the difference (`model.metrics.paired_auc_difference`) and whether it is within
    ``tolerance`` plus `PARITY_Z` errors; ``parity_ok`` when every task is. The tasks are those
    with a valid AUC in the fp32 run's metrics (binary tasks, and dwell tasks binarised as
    the trainer does: target above 1/2)."""
    import numpy as np
    import pyarrow.parquet as pq

    from model.metrics import paired_auc_difference

    metrics = json.loads((fp32_dir / "metrics.json").read_text())["metrics"]
    tasks = [k.split("/")[1] for k in metrics if k.startswith("valid/") and k.endswith("/auc")]
    if not tasks:
        raise ValueError(f"{fp32_dir}: no valid AUC to compare (train.eval_splits lacks valid)")
    a = pq.read_table(fp32_dir / "predictions_valid.parquet")
    b = pq.read_table(other_dir / "predictions_valid.parquet")
    if not a["example_id"].equals(b["example_id"]):
        raise ValueError(f"{fp32_dir} and {other_dir} predicted other valid rows")
    per_task = {}
    for t in sorted(tasks):
        y = (np.asarray(a[f"target_{t}"]) > 0.5).astype(np.float64)
        auc_a, auc_b, se = paired_auc_difference(
            y, np.asarray(a[f"score_{t}"]), np.asarray(b[f"score_{t}"])
        )
        diff = auc_b - auc_a
        per_task[t] = {
            "auc_fp32": round(auc_a, 6),
            "auc": round(auc_b, 6),
            "diff": round(diff, 6),
            "se": round(se, 6),
            "ok": bool(abs(diff) <= tolerance + PARITY_Z * se),
        }
    return {
        "auc_parity": per_task,
        "max_abs_auc_diff": max(abs(v["diff"]) for v in per_task.values()),
        "tolerance": tolerance,
        "parity_ok": all(v["ok"] for v in per_task.values()),
    }


def utilisation(
    sets: list[str], batch_size: int, samples_per_s: float, metrics: dict, precision: str
) -> dict:
    """Dense FLOPs per sample (counted on one real step of the unsharded model), the achieved
    TFLOP/s, and on a known GPU the MFU against its peak for the precision used."""
    import torch

    from model.config import load_train_config
    from model.data import make_loader
    from model.flops import dense_flops_per_sample, peak_tflops
    from model.trainer import prepare
    from pipelines.lake import Tables

    cfg = load_train_config(REPO / "conf" / "train.yaml", sets)
    bundle = prepare(cfg)
    torch.manual_seed(0)
    model = bundle.build()
    loader = make_loader(Tables.for_spec(cfg.lake, bundle.spec).examples, bundle.spec,
                         bundle.artifacts, "train", min(batch_size, 1024),
                         pseudo_labels=cfg.model.pseudo_labels)  # fmt: skip
    flops = dense_flops_per_sample(model, next(iter(loader)))["train"]
    achieved = flops * samples_per_s / 1e12
    out = {"dense_gflop_per_sample": round(flops / 1e9, 4), "achieved_tflops": round(achieved, 3)}
    if "train/gpu_peak_mem_gb" in metrics and torch.cuda.is_available():
        peak = peak_tflops(torch.cuda.get_device_name(0), precision)
        if peak:
            out["mfu"] = round(achieved / peak, 4)
    return out


def train_markdown(rows: list[dict]) -> str:
    cols = ["bench", "precision", "batch", "samples_per_s", "steps", "seconds", "peak_rss_mb",
            "gpu_peak_mem_gb", "dense_gflop_per_sample", "achieved_tflops", "mfu",
            "aten_ops_per_step", "device_kernels_per_step", "host_ms_per_step",
            "max_abs_auc_diff", "parity_ok"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    cols = ["bench", "events", "seconds", "events_per_s_per_core", "peak_rss_mb", "build_seconds",
            "spark_over_duckdb", "outputs_equal"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("pipeline", help="feature build benchmarks")
    pp.add_argument(
        "--events", default="", help="comma list of event counts for full builds, e.g. 1e6,1e7"
    )
    pp.add_argument("--days", type=int, default=14)
    pp.add_argument("--incremental", default="", help="comma list of days k: nightly cost of day k")
    pp.add_argument("--events-per-day", type=float, default=2e5)
    pp.add_argument("--kuairand", action="store_true")
    pp.add_argument(
        "--no-duckdb", action="store_true", help="skip the DuckDB build beside the full builds"
    )
    pp.add_argument("--work", default="/tmp/lifecycle-bench")
    dp = sub.add_parser("duckdb-build", help="the full build in DuckDB (run by `pipeline`)")
    dp.add_argument("--spec", required=True)
    dp.add_argument("--spec-set", dest="spec_overrides", action="append", default=[])
    dp.add_argument("--out", required=True)
    dp.add_argument("--threads", type=int, default=None)
    dp.add_argument("--memory-limit", default=None, help="DuckDB memory_limit, e.g. 16GB")
    dp.add_argument("--now-ms", type=int, default=None)
    tp = sub.add_parser("train", help="loader and trainer samples/s")
    tp.add_argument("--lake", default="lake", help="a lake with the KuaiRand examples built")
    tp.add_argument("--models", default="stan", help="comma list of model names")
    tp.add_argument("--configs", default="cpu", help="comma list of: cpu, paper")
    tp.add_argument("--batch-sizes", default="1024", help="comma list")
    tp.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    tp.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    tp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tp.add_argument(
        "--precisions",
        default="fp32",
        help="comma list of train.precision values: fp32, tf32 (CUDA only), bf16",
    )
    tp.add_argument(
        "--parity",
        action="store_true",
        help="evaluate every run on the valid split and compare each precision's AUCs with fp32's",
    )
    tp.add_argument("--parity-tolerance", type=float, default=PARITY_AUC_TOLERANCE)
    tp.add_argument("--loader-seconds", type=float, default=15.0, help="0: skip the loader")
    tp.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="the loader's worker processes (train.num_workers)",
    )
    tp.add_argument(
        "--prefetch-batches", type=int, default=0, help="train.prefetch_batches of every run"
    )
    tp.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps of every run (operators and device kernels per step)",
    )
    tp.add_argument("--work", default="/tmp/lifecycle-bench")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.what == "duckdb-build":
        return duckdb_build_main(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }
    if args.what == "train":
        import torch

        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name(0)
        rows = bench_train(
            work,
            args.lake,
            args.models.split(","),
            args.configs.split(","),
            [int(x) for x in args.batch_sizes.split(",")],
            args.steps,
            args.nproc,
            args.device,
            args.precisions.split(","),
            args.loader_seconds,
            parity=args.parity,
            parity_tolerance=args.parity_tolerance,
            num_workers=args.num_workers,
            prefetch_batches=args.prefetch_batches,
            profile_steps=args.profile_steps,
        )
        (work / "train.json").write_text(
            json.dumps({"machine": machine, "results": rows}, indent=2)
        )
        print(f"\nmachine: {machine}\n")
        print(train_markdown(rows))
        return 0
    if args.kuairand or args.events or args.incremental:
        machine["jvm_class_archive"] = warm_class_archive(work)
    if args.kuairand:
        rows += bench_kuairand(work)
    if args.events:
        rows += bench_full(
            work, [float(x) for x in args.events.split(",")], args.days, not args.no_duckdb
        )
    if args.incremental:
        rows += bench_incremental(
            work, [int(x) for x in args.incremental.split(",")], args.events_per_day
        )
    out = {"machine": machine, "results": rows}
    (work / "pipeline.json").write_text(json.dumps(out, indent=2))
    print(f"\nmachine: {machine}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
