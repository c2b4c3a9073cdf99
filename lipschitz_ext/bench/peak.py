"""The measured peak of this device: what every figure is a fraction of.

Large GEMMs (bf16, fp32, and fp8 via ``torch._scaled_mm`` on sm_89+) and a
large copy, timed by the same C++ loop as the cases, on random data. The peak
is the best repeat's rate: what the hardware can do when nothing else competes
(on a shared host the median would measure the neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .timing import measure

__all__ = ["PeakProbe", "probe_peak"]


@dataclass
class PeakProbe:
    """Measured rates (None where not measurable here, with the reason in ``skipped``)."""

    bf16_tflops: Optional[float] = None
    fp8_tflops: Optional[float] = None
    fp32_tflops: Optional[float] = None
    copy_tbps: Optional[float] = None
    skipped: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Optional[float]]:
        return {
            "bf16_tflops": self.bf16_tflops,
            "fp8_tflops": self.fp8_tflops,
            "fp32_tflops": self.fp32_tflops,
            "copy_tbps": self.copy_tbps,
        }


def _gemm_tflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [
        (torch.randn(n, n, device=device, generator=gen).to(dtype),
         torch.randn(n, n, device=device, generator=gen).to(dtype))
        for _ in range(2)
    ]
    t = measure(torch.mm, sets, device, warmup=2, repeats=repeats)
    return 2.0 * n**3 / (t.min_ms * 1e-3) / 1e12


def _fp8_tflops(n: int, device: torch.device, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    one = torch.ones((), device=device)

    def operands() -> tuple:
        a = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major.
        b = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn).t()
        return a, b

    def fp8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    t = measure(fp8_mm, [operands(), operands()], device, warmup=2, repeats=repeats)
    return 2.0 * n**3 / (t.min_ms * 1e-3) / 1e12


def _copy_tbps(nbytes: int, device: torch.device, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(dst.copy_, [(src,)], device, warmup=2, repeats=repeats)
    return 2.0 * src.nbytes / (t.min_ms * 1e-3) / 1e12  # read + write


def probe_peak(device: torch.device, small: bool = False) -> PeakProbe:
    """Measure the peaks of ``device``; ``small`` uses tiny sizes (the smoke run)."""
    p = PeakProbe()
    if device.type == "cuda":
        n, n32, copy_bytes, repeats = (1024, 1024, 64 << 20, 5) if small else (8192, 4096, 1 << 30, 20)
        p.bf16_tflops = _gemm_tflops(n, torch.bfloat16, device, repeats)
        p.fp32_tflops = _gemm_tflops(n32, torch.float32, device, repeats)
        p.copy_tbps = _copy_tbps(copy_bytes, device, repeats)
        if torch.cuda.get_device_capability(device) >= (8, 9):
            try:
                p.fp8_tflops = _fp8_tflops(n, device, repeats)
            except (RuntimeError, TypeError) as exc:
                p.skipped["fp8_tflops"] = f"torch._scaled_mm failed: {str(exc).splitlines()[0]}"
        else:
            p.skipped["fp8_tflops"] = "fp8 tensor cores need sm_89 or newer"
    else:
        # Many short repeats rather than a few long ones: on a shared host the
        # best repeat must catch a quiet moment.
        n, copy_bytes, repeats = (384, 16 << 20, 3) if small else (1024, 256 << 20, 15)
        p.fp32_tflops = _gemm_tflops(n, torch.float32, device, repeats)
        # CPU bf16 GEMMs are far slower than fp32 ones without AMX: a smaller size.
        p.bf16_tflops = _gemm_tflops(n if small else n // 2, torch.bfloat16, device, repeats)
        p.copy_tbps = _copy_tbps(copy_bytes, device, repeats)
        p.skipped["fp8_tflops"] = "the fp8 GEMM peak is probed on CUDA (sm_89+) only"
    return p
