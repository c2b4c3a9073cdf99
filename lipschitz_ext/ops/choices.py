"""What ``"auto"`` resolves to: one table of rules keyed by device, dtype, thread count and shape.

Four choices are made here and nowhere else:

- ``"hard_cap_method"``: :func:`lipschitz_ext.ops.spectral_hard_cap`'s method for
  :class:`lipschitz_ext.constraints.SpectralHardCap` ``(method="auto")``;
- ``"orthogonal_project_method"``: ``"msign"`` (standard Newton-Schulz) or ``"gram"``
  (Gram Newton-Schulz) for :func:`lipschitz_ext.ops.orthogonal_project` ``(method="auto")``;
- ``"ns_dtype"``: the GEMM dtype of Muon's Newton-Schulz (``Muon(ns_dtype="auto")``);
- ``"ns_algorithm"``: ``"standard"`` or ``"gram"`` for
  :func:`lipschitz_ext.ops.orthogonalize` ``(algorithm="auto")`` (Muon passes ``"auto"``).

:data:`TABLE` is read top to bottom; the first row whose conditions all hold gives the
value. Each row says what established it (``source``): a benchmark run (the command that
regenerates the measurement is in docs/benchmarks.md) or ``"default"`` (the choice made
before any measurement: the previous behaviour, kept until a run on a quiet machine shows
another choice is faster). docs/benchmarks.md shows the same table; a test checks that
:func:`choose` picks what that page says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["CHOICES", "Rule", "TABLE", "choose", "choose_rule", "native_bf16_matmul"]

#: choice -> the values it may take
CHOICES: dict[str, tuple[str, ...]] = {
    "hard_cap_method": ("msign", "polynomial", "eigh"),
    "orthogonal_project_method": ("msign", "gram"),
    "ns_dtype": ("bfloat16", "float32"),
    "ns_algorithm": ("standard", "gram"),
}



def native_bf16_matmul(device: Union[torch.device, str]) -> bool:
    """Whether bf16 GEMMs (fp32 accumulation) run natively, faster than float32, on ``device``.

    CUDA: where ``torch.cuda.is_bf16_supported()``. CPU: an x86 core with AVX512-BF16
    or AMX (torch's ``torch.cpu`` probes; oneDNN then multiplies bf16 natively);
    without them oneDNN emulates bf16 and float32 is faster. Other devices: False.
    ``lipschitz_ext.training.runtime.native_bf16`` (which picks autocast) calls this one.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


@torch.compiler.assume_constant_result
def _intra_op_threads() -> int:
    # a compiled graph is specialized to the rule's pick at trace time, like any other shape choice
    return torch.get_num_threads()


@dataclass(frozen=True)
class Rule:
    """One row: ``value`` for ``choice`` where every condition holds.

    ``device``: ``"cpu"``, ``"cuda"`` or ``"*"``; ``dtype``: the weights' dtype name
    (``"float32"``, ``"bfloat16"``, ...; for ``ns_algorithm`` the Newton-Schulz compute dtype)
    or ``"*"``; ``threads``: inclusive range of ``torch.get_num_threads()``;
    ``min_small``: the small side ``k = min(m, n)`` at least this; ``min_aspect``:
    ``max(m, n) / k`` at least this; ``native_bf16``: if not None, whether the device
    multiplies bf16 natively (:func:`native_bf16_matmul`).
    """

    choice: str
    value: str
    device: str = "*"
    dtype: str = "*"
    threads: tuple[int, int] = (1, 1 << 20)
    min_small: int = 0
    min_aspect: float = 0.0
    native_bf16: Optional[bool] = None
    source: str = "default"

    def matches(self, device: torch.device, dtype: torch.dtype, threads: int, shape: tuple[int, int],
                native: Optional[bool]) -> bool:
        k, big = min(shape), max(shape)
        return ((self.device in ("*", device.type))
                and (self.dtype in ("*", str(dtype).removeprefix("torch.")))
                and self.threads[0] <= threads <= self.threads[1]
                and k >= self.min_small
                and (self.min_aspect == 0.0 or (k > 0 and big / k >= self.min_aspect))
                and (self.native_bf16 is None or self.native_bf16 == native))


#: The benchmark run the measured rows come from (``python -m lipschitz_ext.bench.suites.bench_constraints ratios``:
#: a 2-core AVX512-BF16 CPU, float32 weights, 1 and 2 threads; docs/benchmarks.md).
CPU_RATIOS = "bench/results/20261207-0740-cpu-constraint-ratios.json"

#: The rules, first match wins; every choice ends with a catch-all row.
TABLE: tuple[Rule, ...] = (
    Rule("hard_cap_method", "eigh", device="cpu", dtype="float32", threads=(1, 2), source=CPU_RATIOS),
    Rule("hard_cap_method", "eigh", device="cpu"),
    Rule("hard_cap_method", "msign"),
    Rule("orthogonal_project_method", "gram", device="cpu", dtype="float32", threads=(1, 2), min_aspect=3.06,
         source=CPU_RATIOS),
    Rule("orthogonal_project_method", "msign", device="cpu", dtype="float32", threads=(1, 2), source=CPU_RATIOS),
    Rule("orthogonal_project_method", "msign"),
    Rule("ns_dtype", "bfloat16", device="cpu", dtype="float32", threads=(1, 2), native_bf16=True,
         source=CPU_RATIOS),
    Rule("ns_dtype", "bfloat16", native_bf16=True),
    Rule("ns_dtype", "float32"),
    # dtype: the Newton-Schulz compute dtype
    Rule("ns_algorithm", "gram", device="cpu", dtype="float32", threads=(1, 2), min_aspect=3.06, source=CPU_RATIOS),
    Rule("ns_algorithm", "standard", device="cpu", dtype="float32", threads=(1, 2), source=CPU_RATIOS),
    Rule("ns_algorithm", "gram", device="cpu", dtype="bfloat16", threads=(1, 2), min_aspect=3.06, source=CPU_RATIOS),
    Rule("ns_algorithm", "standard", device="cpu", dtype="bfloat16", threads=(1, 2), source=CPU_RATIOS),
    Rule("ns_algorithm", "standard"),
)


def choose(choice: str, device: Union[torch.device, str], dtype: torch.dtype, shape: tuple[int, int],
           threads: Optional[int] = None, table: Optional[tuple[Rule, ...]] = None) -> str:
    """The value of ``choice`` (a key of :data:`CHOICES`) for ``shape = (m, n)`` weights of
    ``dtype`` on ``device`` with ``threads`` intra-op threads (default: the current
    ``torch.get_num_threads()``), by ``table`` (default :data:`TABLE`; the benchmark passes
    the rows a run implies)."""
    return choose_rule(choice, device, dtype, shape, threads, table).value


def choose_rule(choice: str, device: Union[torch.device, str], dtype: torch.dtype, shape: tuple[int, int],
                threads: Optional[int] = None, table: Optional[tuple[Rule, ...]] = None) -> Rule:
    """The row of ``table`` that decides :func:`choose` (its ``value`` and ``source``)."""
    if choice not in CHOICES:
        raise ValueError(f"choose: argument 'choice' must be one of {tuple(CHOICES)}, got {choice!r}")
    dev = torch.device(device)
    n_threads = _intra_op_threads() if threads is None else int(threads)
    m, n = (int(s) for s in shape[-2:])
    native = None
    for rule in TABLE if table is None else table:
        if rule.choice != choice:
            continue
        if rule.native_bf16 is not None and native is None:
            native = native_bf16_matmul(dev)
        if rule.matches(dev, dtype, n_threads, (m, n), native):
            return rule
    raise AssertionError(f"choose: no rule for {choice!r} matched (the table ends every choice with a catch-all)")
