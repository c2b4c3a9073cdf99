"""The results file: one JSON per run in the format of docs/benchmarks.md.

Keys beyond the base format, all additive: ``peak.fp32_tflops``, ``cpu_threads``,
``cases[].peak_fraction`` (floor_ms / median_ms: the fraction of the measured
peak reached) and a top-level ``skipped`` list (baselines or peaks that could
not run here, with the reason).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

from ..storage.files import json_safe
from .peak import PeakProbe
from .registry import Case, dtype_name, peak_key_for
from .timing import Timing

__all__ = ["case_record", "device_name", "device_slug", "git_commit", "result_path", "run_header"]


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a GPU, ``"cpu: <model>"`` for the host."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine() or 'unknown'}"


def device_slug(name: str) -> str:
    """File-name form of a device name: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-7b13``."""
    s = re.sub(r"\((R|TM|tm|r)\)", "", name)
    s = re.sub(r"\bCPU\b|@.*$|\d+-Core Processor", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s or "unknown"


def git_commit(repo: Path) -> str:
    """``git rev-parse HEAD`` of ``repo``; else ``$LIPSCHITZ_BENCH_COMMIT`` (a source
    tarball run by CI, e.g. from ``git archive``); else ``"unknown"``."""
    fallback = os.environ.get("LIPSCHITZ_BENCH_COMMIT") or "unknown"
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else fallback


def run_header(device: torch.device, peak: PeakProbe, repo: Path) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(repo),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "peak": peak.as_json(),
        "cpu_threads": torch.get_num_threads(),
    }


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def floor_ms(case: Case, peak: PeakProbe) -> Optional[float]:
    """Roofline floor: the larger of FLOPs / measured FLOP peak and bytes / measured copy rate."""
    peak_json = peak.as_json()
    floors = []
    rate = peak_json.get(peak_key_for(case))
    if case.flops > 0 and rate:
        floors.append(case.flops / (rate * 1e12) * 1e3)
    if case.bytes > 0 and peak.copy_tbps:
        floors.append(case.bytes / (peak.copy_tbps * 1e12) * 1e3)
    return max(floors) if floors else None


def case_record(case: Case, ours: Timing, baselines: dict[str, Timing], peak: PeakProbe) -> dict[str, Any]:
    """One entry of ``cases``: our timing, the roofline, and each baseline beside it."""
    med = ours.median_ms
    floor = floor_ms(case, peak)
    return {
        "name": case.name,
        "shape": list(case.shape),
        "dtype": dtype_name(case.dtype),
        "params": dict(case.params),
        "impl": case.impl,
        "median_ms": med,
        "min_ms": ours.min_ms,
        "max_ms": ours.max_ms,
        "tflops": _finite_or_none(case.flops / (med * 1e-3) / 1e12) if case.flops > 0 else None,
        "floor_ms": floor,
        "baselines": {k: t.median_ms for k, t in baselines.items()},
        "speedup": {k: t.median_ms / med for k, t in baselines.items()},
        "peak_fraction": floor / med if floor is not None else None,
    }


def result_path(out_dir: Path, device: torch.device, label: str, when: _dt.datetime) -> Path:
    """``<out_dir>/<YYYYMMDD>-<device-slug>-<label>.json``."""
    return Path(out_dir) / f"{when:%Y%m%d}-{device_slug(device_name(device))}-{label}.json"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")  # strict JSON
