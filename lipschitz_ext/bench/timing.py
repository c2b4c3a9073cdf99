"""Timing through the C++ loop (lipschitz_ext._bench) and the statistics of a run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _bench

__all__ = ["Timing", "cache_bytes", "measure", "rotation_sets"]

# Each timed repeat runs enough calls to last this long, so event and clock
# overheads stay far below the measured time of a small case.
_TARGET_REPEAT_MS = 1.0
_MAX_INNER = 50


@dataclass(frozen=True)
class Timing:
    """Per-call milliseconds of ``repeats`` repeats (each the mean of ``inner`` calls)."""

    samples: tuple[float, ...]
    inner: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples)

    @property
    def min_ms(self) -> float:
        return min(self.samples)

    @property
    def max_ms(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: the run-to-run noise."""
        if len(self.samples) < 4:
            return (self.max_ms - self.min_ms) / self.median_ms
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median_ms


def _device_index(device: torch.device) -> int:
    if device.type == "cpu":
        return -1
    if device.type != "cuda":
        raise ValueError(f"measure: argument 'device' must be cpu or cuda, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def measure(
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    inner: int | None = None,
) -> Timing:
    """Time ``fn(*inputs[k])`` (``k`` cycling) in the C++ loop on ``device``.

    Warm-up covers every argument set at least once (so lazy compilation and
    allocator growth happen before timing). ``inner=None`` picks the calls per
    repeat from one calibration repeat so each repeat lasts about 1 ms.
    """
    dev = _device_index(device)
    inputs = [tuple(a) for a in inputs]
    warmup = max(warmup, len(inputs))
    if inner is None:
        first = _bench.time_callable(fn, inputs, warmup, 1, dev, 1)[0]
        inner = min(_MAX_INNER, max(1, math.ceil(_TARGET_REPEAT_MS / max(first, 1e-6))))
        warmup = 1
    samples = _bench.time_callable(fn, inputs, warmup, repeats, dev, inner)
    return Timing(samples=tuple(samples), inner=inner)


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size of ``device`` (L2 on a GPU), 32 MiB when unknown."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or 32 << 20
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


def rotation_sets(set_bytes: float, device: torch.device, budget_bytes: int = 2 << 30) -> int:
    """How many input sets to rotate through: together at least 3x the cache
    (2 to 8 sets), within ``budget_bytes``."""
    if set_bytes <= 0:
        return 2
    n = max(2, min(8, math.ceil(3 * cache_bytes(device) / set_bytes)))
    return max(1, min(n, int(budget_bytes // set_bytes)))
