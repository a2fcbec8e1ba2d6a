"""Timing GPU work from the host: warm-up excluded, the device synchronised, the median of repeats.
Used by the benchmark (src/bench.py) and by the first training step's choice of ways (model.choose_layer_impls)."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(step, device: torch.device, warmup: int, steps: int, repeats: int) -> float:
    """Median seconds per call of `step` over `repeats` timed runs of `steps` calls each, after
    `warmup` calls (compilation, cuDNN's algorithm search, caches)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        times.append((time.perf_counter() - tic) / steps)
    return statistics.median(times)
