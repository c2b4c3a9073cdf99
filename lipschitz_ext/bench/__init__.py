"""Benchmarks of lipschitz_ext's ops against their best plain-PyTorch alternatives.

The timing loop is C++ (:mod:`lipschitz_ext._bench`: CUDA events on a GPU, a
steady clock on the host); cases live in ``lipschitz_ext/bench/suites/bench_<suite>.py``
(shipped with the package) and are built from :class:`Case`, :class:`Setup`, :class:`Skip`
and :class:`SuiteConfig`;
``lipschitz-bench`` (:func:`lipschitz_ext.cli.bench.main`) runs them.
"""

from .peak import PeakProbe, probe_peak
from .registry import SUITES, Case, Factory, Setup, Skip, SuiteConfig, load_suite
from .timing import Timing, measure, rotation_sets

__all__ = [
    "SUITES",
    "Case",
    "Factory",
    "PeakProbe",
    "Setup",
    "Skip",
    "SuiteConfig",
    "Timing",
    "load_suite",
    "measure",
    "probe_peak",
    "rotation_sets",
]
