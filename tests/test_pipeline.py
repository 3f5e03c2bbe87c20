"""TorchRec's ``TrainPipelineSparseDist`` (the step on CUDA) on every model, on CPU: it traces
the training module to find the sharded lookups' inputs, runs each lookup ahead of the step,
and must train exactly as the plain loop does."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torchrec.distributed.types import ShardedModule

from model.base import MultiTaskTrain
from model.config import MODEL_NAMES, load_train_config
from model.trainer import (
    _Step,
    init_distributed,
    pipeline_trace_error,
    release_distributed,
    shard,
    use_sparse_dist,
)
from tests.model_fixtures import random_batch, tiny_layout
from tests.test_models import _model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group for DistributedModelParallel (the one a test run made, if any)."""
    _, _, created = init_distributed(CPU)
    yield
    if created:
        release_distributed()


def _sharded(name: str) -> tuple[nn.Module, object]:
    """The trainer's sharding (planner, fused Adagrad tables, Adam) of the tiny model."""
    return shard(MultiTaskTrain(_model(name)).train(), load_train_config(None), CPU, 1)


def _losses(name: str, pipelined: bool, batches: list) -> tuple[list[float], nn.Module]:
    dmp, optimizer = _sharded(name)
    torch.manual_seed(7)  # HTLNet's Gumbel noise, the Beta sampler's draws: the same per run
    step = _Step(dmp, optimizer, CPU, pipelined)
    it, losses = iter(batches), []
    while True:
        try:
            loss, per_task = step(it)
        except StopIteration:
            break
        assert per_task.shape == (3,)
        losses.append(float(loss))
    step.detach()
    return losses, dmp


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_pipeline_runs_every_lookup_ahead_and_trains_as_the_plain_loop(
    name: str, process_group: None
) -> None:
    batches = [random_batch(tiny_layout(), 32, seed=s, n_users=12, n_pad=s % 3) for s in range(6)]
    plain, plain_dmp = _losses(name, False, batches)
    piped, piped_dmp = _losses(name, True, batches)
    assert pipeline_trace_error(piped_dmp) is None
    sharded = [m for m in piped_dmp.modules() if isinstance(m, ShardedModule)]
    assert len(sharded) == (2 if name == "dtrn" else 1)  # DTRN: its sequence table too
    assert all(getattr(m, "is_pipelined", False) for m in sharded), "a lookup was not pipelined"
    assert len(piped) == len(plain) == len(batches)
    assert piped == pytest.approx(plain, rel=1e-6)
    # after the pipeline lets go of the model, it computes as the plain loop's model
    torch.manual_seed(0)
    a = plain_dmp(batches[0])[0]
    torch.manual_seed(0)
    b = piped_dmp(batches[0])[0]
    assert float(b) == pytest.approx(float(a), rel=1e-6)


class _BranchesOnATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if y.sum() > 0 else -y  # control flow on a value: no fx trace follows it


def test_a_model_the_pipeline_cannot_trace_is_refused_or_runs_the_plain_loop(caplog) -> None:
    module = _BranchesOnATensor()
    why = pipeline_trace_error(module)
    assert why is not None and why.startswith("TraceError")
    with pytest.raises(ValueError, match=r"cannot trace model 'toy'.*TraceError"):
        use_sparse_dist(CPU, "sparse_dist", module, "toy")
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    with caplog.at_level(logging.WARNING, logger="model.trainer"):
        assert use_sparse_dist(cuda, "auto", module, "toy") is False
    assert "plain training loop runs instead" in caplog.text
    assert use_sparse_dist(cuda, "simple", module, "toy") is False
    assert use_sparse_dist(CPU, "auto", module, "toy") is False  # no copy stream to overlap
    assert use_sparse_dist(cuda, "auto", nn.Linear(2, 1), "linear") is True
