"""Where a run executes: the device, torchrun ranks, mixed precision of the training
forward, whether the training step is compiled, and SIGINT/SIGTERM turned into a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..ops.choices import native_bf16_matmul

__all__ = ["AUTOCAST_DTYPES", "native_bf16", "resolve_autocast", "training_autocast", "AUTO_COMPILE_MIN_STEPS",
           "AUTO_COMPILE_MIN_SECONDS", "AUTO_COMPILE_DEVICES", "resolve_compile", "compile_counters", "Dist", "init_distributed",
           "resolve_device", "StopRequest"]


#: ``--autocast`` value -> the dtype of the training forward's matmuls (None: float32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (faster than float32): CUDA
    with bf16 support, or a CPU with AVX512-BF16 or AMX. The one probe
    (:func:`lipschitz_ext.ops.choices.native_bf16_matmul`) that also picks Muon's
    Newton-Schulz dtype, so autocast and the optimizer always agree."""
    return native_bf16_matmul(device)


def resolve_autocast(cfg, device: torch.device) -> str:
    """``cfg.autocast`` (a TrainConfig's) with ``"auto"`` resolved for ``device``: ``"bf16"`` or ``"none"``."""
    if cfg.autocast == "auto":
        return "bf16" if native_bf16(device) else "none"
    return cfg.autocast


def training_autocast(mode: str, device: torch.device):
    """The context the training forward runs in: ``torch.autocast`` at the dtype of
    ``mode`` (a resolved ``--autocast`` value, see :func:`resolve_autocast`), or a no-op
    for ``"none"``. Gradients come back in the parameters' float32."""
    dtype = AUTOCAST_DTYPES[mode]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: ``--compile auto`` compiles CUDA runs of at least this many planned steps (a compilation
#: of tens of seconds against launch-bound small-model steps, the modded-nanogpt setting).
AUTO_COMPILE_MIN_STEPS = 2000
#: ... and, when a ``--time-budget`` is set, at least this many seconds of it.
AUTO_COMPILE_MIN_SECONDS = 300.0
#: Devices on which ``--compile auto`` may compile. Not the CPU: on the 2-core dev VM
#: (shakespeare-cpu, bf16 autocast, 2 threads) the compiled forward+backward alone is ~1.17x
#: faster, but whole training steps are not (7.71 compiled vs 7.96 eager steps/s over
#: 500 steps of the CLI; 112.8 vs 104.0 ms in ``lipschitz-bench --suite train``):
#: docs/results.md, "Training speed".
AUTO_COMPILE_DEVICES = ("cuda",)


def resolve_compile(cfg, device: torch.device) -> str:
    """``cfg.compile`` (a TrainConfig's) with ``"auto"`` resolved: ``"model"`` or ``"none"``.

    ``auto`` compiles where it pays: on a device of :data:`AUTO_COMPILE_DEVICES`, a run
    planned for at least :data:`AUTO_COMPILE_MIN_STEPS` steps and, under a ``--time-budget``,
    at least :data:`AUTO_COMPILE_MIN_SECONDS` seconds; never with the fp8 attention backend
    (its static scales change at every evaluation, which would recompile). The rule reads
    only the config and the device, not the remaining steps, so a resumed run resolves as it
    did when it started (bit-exact resume needs the same compiled or eager step)."""
    if cfg.compile != "auto":
        return cfg.compile
    if cfg.attention == "fp8" or torch.device(device).type not in AUTO_COMPILE_DEVICES:
        return "none"
    long_enough = cfg.steps >= AUTO_COMPILE_MIN_STEPS and (
        cfg.time_budget == 0 or cfg.time_budget >= AUTO_COMPILE_MIN_SECONDS)
    return "model" if long_enough else "none"


def compile_counters() -> dict[str, int]:
    """Dynamo's process-wide counts so far: ``frames`` (Python frames it compiled, a
    recompilation included), ``graphs`` (unique graphs) and ``graph_breaks``. A run reads
    them before and after to count its own compilations: one frame and one graph, no
    break, for a compiled training step that never recompiles."""
    from torch._dynamo.utils import counters  # dynamo is heavy to import and only needed when a run compiles

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@dataclass
class Dist:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run created the process group (and tears it down)

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes the run folder)."""
        return self.rank == 0

    def clock(self, elapsed: float, shared: bool, device: torch.device) -> float:
        """``elapsed`` seconds, replaced by rank 0's when ``shared`` and there are several
        ranks: every rank then stops at the time budget at the same step and follows the
        same time-based lr."""
        if not shared or self.world_size == 1:
            return elapsed
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def close(self) -> None:
        """Destroy the process group this run created, once every rank is done (rank 0
        writes the summary, sample and plot last): a process that exits with gloo/NCCL
        threads still running can abort ("terminate called without an active exception")."""
        if self.owns_group:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), owns)


def resolve_device(name: str) -> torch.device:
    """``--device`` (auto | cpu | cuda) as a torch device (cuda: this rank's ``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked once per step (then a clean checkpoint)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
