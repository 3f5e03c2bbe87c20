"""The command line that launches ``jobs.train``: ``torchrun`` for several processes, plain
``python`` for one. Shared by the jobs that train as a subprocess (nightly, experiment,
benchmark)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["train_command"]


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
    if conf:
        cmd += ["--conf", conf]
    for s in sets:
        cmd += ["--set", s]
    for s in spec_sets:
        cmd += ["--spec-set", s]
    return cmd
