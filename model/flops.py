"""FLOPs of a model's dense arch, counted from its layers, for model FLOPs utilisation (MFU).

The count is torch's ``FlopCounterMode`` over one real training step of the unsharded model
(forward, loss and backward): every matmul, batched matmul and attention the layers run, at
the batch's real shapes (DTRN's padded sequence length included). Embedding lookups are memory
bound and not counted, as is usual for recommendation MFU.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from model.base import MultiTaskModel, MultiTaskTrain
from model.data import Batch

__all__ = ["PEAK_TFLOPS", "dense_flops_per_sample", "peak_tflops"]

# Dense (no sparsity) peak tensor throughput per device and precision, TFLOP/s (vendor sheets).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The peak of a CUDA device by its name (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


def dense_flops_per_sample(model: MultiTaskModel, batch: Batch) -> dict[str, float]:
    """{"forward": F, "train": F + backward} FLOPs per sample of one step on ``batch``."""
    model.train()
    train = MultiTaskTrain(model)
    n = float(batch.mask.sum())
    with FlopCounterMode(display=False) as fwd:
        loss, _ = train(batch)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": forward / n, "train": (forward + bwd.get_total_flops()) / n}
