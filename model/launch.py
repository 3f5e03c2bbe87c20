"""The command line that launches ``jobs.train``: ``torchrun`` for several processes, plain
``python`` for one. Shared by the jobs that train as a subprocess (nightly, experiment,
benchmark). `run_training` runs one for a job that trains many times (the experiment)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from pathlib import Path

__all__ = ["run_training", "train_command"]

# What a training imports before its first step: torch, torchrec, fbgemm, mlflow's SQL store
# and pyfunc. About 15 s of a 35 s tiny training on a 2-core machine; `run_training` imports
# them once, in a forkserver, and each one-process training is a fork of it.
TRAIN_PRELOAD = [
    "jobs.train",
    "model.trainer",
    "model.serving",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
]


def train_command(
    nproc: int,
    sets: Sequence[str],
    *,
    conf: str | None = None,
    spec_sets: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """``[python -m torch.distributed.run --standalone --nproc-per-node N | python] -m jobs.train
    [--conf C] --set ... --spec-set ...``."""
    if nproc > 1:
        cmd = [python, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(nproc), "-m", "jobs.train"]
    else:
        cmd = [python, "-m", "jobs.train"]
    return cmd + _train_args(sets, conf, spec_sets)


def _train_args(sets: Sequence[str], conf: str | None, spec_sets: Sequence[str]) -> list[str]:
    """``jobs.train``'s own arguments: ``[--conf C] --set ... --spec-set ...``."""
    args = ["--conf", conf] if conf else []
    for s in sets:
        args += ["--set", s]
    for s in spec_sets:
        args += ["--spec-set", s]
    return args


@functools.cache
def _forkserver() -> BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(TRAIN_PRELOAD)
    return context


def _train_in_fork(argv: list[str], cwd: str) -> None:
    """A forkserver child: `jobs.train.main` as ``python -m jobs.train`` in ``cwd`` would run it,
    its stdout (the JSON summary) discarded as `run_training`'s subprocesses' is."""
    os.chdir(cwd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    os.dup2(devnull, 1)
    os.close(devnull)
    from jobs.train import main

    sys.exit(main(argv))


def run_training(
    nproc: int,
    sets: Sequence[str],
    *,
    conf: str | None = None,
    spec_sets: Sequence[str] = (),
    cwd: str | Path = ".",
) -> int:
    """Run one training to its end, its stdout discarded (it writes ``metrics.json`` in its
    output directory); returns its exit code. Several processes: ``torchrun`` as a subprocess.
    One: a fork of a server that has imported what a training needs (`TRAIN_PRELOAD`), which
    saves that import in every training but the first. The fork sees the environment and
    ``sys.path`` of the moment the server started (the first such training); the server
    imports no more than modules (no torch thread pool, no process group) before forking."""
    if nproc > 1:
        cmd = train_command(nproc, sets, conf=conf, spec_sets=spec_sets)
        return subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL).returncode
    argv = _train_args(sets, conf, spec_sets)
    process = _forkserver().Process(target=_train_in_fork, args=(argv, str(cwd)))
    process.start()
    process.join()
    assert process.exitcode is not None
    return process.exitcode
