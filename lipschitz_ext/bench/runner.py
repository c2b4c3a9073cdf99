"""Run one case: our implementation and each baseline through the same C++ loop."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .peak import PeakProbe
from .registry import Case, Factory, Skip
from .results import case_record
from .timing import Timing, measure, rotation_sets

__all__ = ["CaseRun", "run_case"]


@dataclass
class CaseRun:
    """A case's outcome: its JSON record (None when ours failed) and what was skipped."""

    case: Case
    record: Optional[dict[str, Any]]
    ours: Optional[Timing] = None
    baselines: dict[str, Timing] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # impl name -> reason
    error: Optional[str] = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _time(factory: Factory, n_sets: int, device: torch.device, warmup: int, repeats: int) -> Timing:
    setup = factory(n_sets)
    try:
        return measure(setup.fn, setup.inputs, device, warmup=warmup, repeats=repeats)
    finally:
        del setup
        _release(device)


def run_case(case: Case, device: torch.device, peak: PeakProbe, warmup: int, repeats: int) -> CaseRun:
    """Time ``case.ours`` and every baseline. A baseline that raises (a :class:`Skip`
    or any error, e.g. a failed ``torch.compile``) is recorded as skipped with its
    reason; if ours raises, the case has no record and ``error`` says why."""
    n_sets = rotation_sets(case.bytes, device)
    run = CaseRun(case=case, record=None)
    try:
        run.ours = _time(case.ours, n_sets, device, warmup, repeats)
    except Exception as exc:  # noqa: BLE001 - reported, and the CLI exits non-zero
        run.error = _one_line(exc)
        _release(device)
        return run
    for name, factory in case.baselines.items():
        try:
            run.baselines[name] = _time(factory, n_sets, device, warmup, repeats)
        except Skip as exc:
            run.skipped[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a baseline failing is data, not a crash
            run.skipped[name] = _one_line(exc)
            _release(device)
    run.record = case_record(case, run.ours, run.baselines, peak)
    return run
