"""Benchmark cases and the suites that hold them.

A *suite* is a module ``lipschitz_ext/bench/suites/bench_<suite>.py``, shipped with
the package, defining ``cases(cfg: SuiteConfig) -> list[Case]``. The CLI imports the
packaged suites only: nothing in the current folder is ever run. A folder of suite files
given explicitly (``lipschitz-bench --suite-dir DIR``, :func:`load_suite` with a
``cases_dir``) is loaded by path instead, e.g. to try a suite before adding it.
A *case* is one op at one shape: a factory for our implementation and a dict of
baseline factories, each timed in the same run by the same C++ loop.

A suite file, e.g. ``lipschitz_ext/bench/suites/bench_constraints.py``::

    from lipschitz_ext.bench import Case, Setup, Skip, SuiteConfig

    def cases(cfg: SuiteConfig) -> list[Case]:
        shape = (2, 16, 16) if cfg.smoke else (48, 768, 768)
        dtype = cfg.dtype or (torch.bfloat16 if cfg.is_cuda else torch.float32)
        def ours(n_sets):   # n_sets argument tuples, same shapes, separate storage
            return Setup(ops.spectral_soft_cap, [(randn(shape),) for _ in range(n_sets)])
        def svd_cap(n_sets):
            return Setup(svd_cap_reference, [(randn(shape),) for _ in range(n_sets)])
        return [Case(name="spectral_soft_cap", shape=shape, dtype=dtype, ours=ours,
                     baselines={"svd_cap": svd_cap}, params={"alpha": 0.1},
                     flops=..., bytes=...)]
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

__all__ = [
    "SUITES",
    "Case",
    "Factory",
    "Setup",
    "Skip",
    "SuiteConfig",
    "default_cases_dir",
    "default_results_dir",
    "load_suite",
    "peak_key_for",
]

#: Suite names the CLI knows, in run order for ``--suite all``.
SUITES = ("orthogonalize", "constraints", "optim", "fp8_attention", "train")


class Skip(Exception):
    """Raised by a baseline factory that cannot run here; the reason is recorded."""


@dataclass(frozen=True)
class Setup:
    """What the timer calls: ``fn(*inputs[k])`` with ``k`` cycling over ``inputs``.

    ``inputs`` holds several argument tuples with the same shapes but separate
    storage, so repeated calls do not find their operands warm in cache. Use
    ``[()]`` for a callable without arguments.
    """

    fn: Callable[..., Any]
    inputs: Sequence[tuple] = ((),)


#: A factory builds a ready-to-time Setup holding ``n_sets`` argument sets
#: (fewer is allowed, at least one). It may raise :class:`Skip`.
Factory = Callable[[int], Setup]


@dataclass(frozen=True)
class SuiteConfig:
    """How a suite should build its cases for this run.

    Attributes:
        device: where inputs live and ops run.
        dtype: the ``--dtype`` override, or None for the suite's own default.
        smoke: build a few tiny cases (the CI smoke: seconds on CPU).
        compile: whether ``torch.compile`` baselines may run (off in ``--smoke``).
        seed: seed for the inputs.
    """

    device: torch.device
    dtype: Optional[torch.dtype] = None
    smoke: bool = False
    compile: bool = True
    seed: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Case:
    """One op at one shape, with its baselines.

    Attributes:
        name: the op or step timed (JSON ``name``), e.g. ``"orthogonalize"``.
        shape: the problem shape (JSON ``shape``), e.g. ``(48, 768, 768)``.
        dtype: the input dtype (JSON ``dtype``, written without ``torch.``).
        ours: factory for this package's implementation.
        baselines: name -> factory for each alternative (JSON ``baselines`` keys).
        params: JSON-serializable settings that distinguish the case.
        flops: floating-point operations per call (0: not compute-bound).
        bytes: minimal memory traffic per call in bytes (also sizes the input
            rotation; 0: not memory-bound).
        peak: key of the measured peak that bounds ``flops`` (``"bf16_tflops"``,
            ``"fp8_tflops"``, ``"fp32_tflops"``); None picks it from ``dtype``.
        impl: JSON ``impl`` of ``ours``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    ours: Factory
    baselines: Mapping[str, Factory] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    flops: float = 0.0
    bytes: float = 0.0
    peak: Optional[str] = None
    impl: str = "lipschitz_ext"

    @property
    def label(self) -> str:
        """Short human label, e.g. ``orthogonalize 48x768x768 bfloat16``."""
        return f"{self.name} {'x'.join(map(str, self.shape))} {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_key_for(case: Case) -> str:
    """The measured-peak key bounding ``case.flops``."""
    if case.peak is not None:
        return case.peak
    if case.dtype in (torch.bfloat16, torch.float16):
        return "bf16_tflops"
    if case.dtype.is_floating_point and case.dtype.itemsize == 1:
        return "fp8_tflops"
    return "fp32_tflops"


def default_results_dir() -> Path:
    """Where results go by default: ``bench/results`` of the source checkout this package
    was imported from, else ``./bench/results`` (results are written, never run)."""
    repo_bench = Path(__file__).resolve().parents[2] / "bench"
    return (repo_bench if repo_bench.is_dir() else Path.cwd() / "bench") / "results"


def default_cases_dir() -> Path:
    """The folder of the packaged suites (``lipschitz_ext/bench/suites``)."""
    return Path(__file__).resolve().parent / "suites"


def load_suite(suite: str, cases_dir: Optional[Path] = None) -> Optional[ModuleType]:
    """The suite ``suite``: the packaged module ``lipschitz_ext.bench.suites.bench_<suite>``
    when ``cases_dir`` is None, else the file ``<cases_dir>/bench_<suite>.py`` (a folder the
    caller named explicitly: its code runs). None when it does not exist.

    The module must define ``cases(cfg: SuiteConfig) -> list[Case]``.
    """
    if cases_dir is None:
        if suite not in SUITES:
            return None
        module = importlib.import_module(f"{__package__}.suites.bench_{suite}")
        path: Any = module.__file__
    else:
        path = Path(cases_dir) / f"bench_{suite}.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(f"lipschitz_bench_suites.{suite}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not callable(getattr(module, "cases", None)):
        raise TypeError(f"{path}: a benchmark suite must define cases(cfg) -> list[Case]")
    return module
