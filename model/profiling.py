"""What a training step launches: a profile of a few steps for the benchmark and a trace.

On a GPU a small dense arch is bound by the host dispatching its operators and launching their
kernels, not by its FLOPs: the operators and kernels per step (and the trace, to see where the
host waits on the device) tell whether a faster device would make the step any faster.
``train.profile_steps`` profiles that many steps right after the warm-up; they are left out of
``train/samples_per_s`` (the profiler slows the host down).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

__all__ = ["StepProfiler", "step_counts"]


def step_counts(events: list, steps: int) -> dict[str, float]:
    """Per step: the top-level ATen operators the host dispatched (an operator called inside
    another one is counted once, with its caller) and the device kernels (CUDA events: kernels,
    copies and memsets; 0 on CPU)."""
    ops = kernels = 0
    for e in events:
        if e.device_type == DeviceType.CUDA:
            kernels += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        ops += parent is None
    n = max(steps, 1)
    return {"aten_ops_per_step": ops / n, "device_kernels_per_step": kernels / n}


class StepProfiler:
    """``start()`` before the first profiled step, ``stop()`` after the last: writes
    ``rank<r>_ops.txt`` (the operators by self time) and ``rank<r>_trace.json`` (a Chrome /
    Perfetto trace) under ``out_dir`` and returns the per-step figures (`step_counts`, and the
    host's wall time per profiled step, profiler overhead included)."""

    def __init__(self, out_dir: Path, device: torch.device, rank: int) -> None:
        self.out_dir, self.device, self.rank = Path(out_dir), device, rank
        self.active = False
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._t0 = 0.0

    def start(self) -> None:
        self._prof.__enter__()
        self.active = True
        self._t0 = time.perf_counter()

    def stop(self, steps_done: int) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.active = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=sort, row_limit=60)
        (self.out_dir / f"rank{self.rank}_ops.txt").write_text(table)
        self._prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_trace.json"))
        figures = step_counts(self._prof.events(), steps_done)
        figures["host_ms_per_step"] = 1e3 * wall / max(steps_done, 1)
        figures["steps"] = float(steps_done)
        return figures
