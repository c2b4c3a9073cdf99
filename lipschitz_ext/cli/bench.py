"""``lipschitz-bench``: time this package's ops against their baselines.

Prints a table and writes ``<out>/<YYYYMMDD>-<device-slug>-<suite>.json``
(format: docs/benchmarks.md). ``--smoke`` is the CI configuration: tiny CPU cases of every
suite present, a few repeats, seconds in all, written like any other run
(label ``<suite>-smoke``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..bench.peak import PeakProbe, probe_peak
from ..bench.registry import SUITES, SuiteConfig, default_cases_dir, default_results_dir, load_suite
from ..bench.results import result_path, run_header, write_json
from ..bench.runner import CaseRun, run_case


__all__ = ["main"]


class _UsageError(SystemExit):
    """A bad flag: exit status 2 like argparse's own errors; ``str()`` is the message
    (printed as one line by :func:`main`)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipschitz-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=(*SUITES, "all"), default=None,
                   help="which suite to run (default: orthogonalize; all with --smoke)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="input dtype for every case, e.g. bfloat16 or float32 (default: per suite)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the JSON (default: bench/results of the source checkout, else "
                        "./bench/results)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration that runs in seconds")
    p.add_argument("--filter", default="", help="only cases whose label contains this text")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 with --smoke)")
    p.add_argument("--suite-dir", "--cases-dir", dest="cases_dir", type=Path, default=None,
                   help="run the bench_<suite>.py files of this folder instead of the suites shipped with the "
                        "package (their code runs: name only a folder you trust; default: the packaged suites, "
                        "nothing from the current folder)")
    return p


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise _UsageError(f"lipschitz-bench: --dtype: unknown dtype '{name}'")
    return dt


def _device(name: Optional[str], smoke: bool) -> torch.device:
    if smoke and name is None:
        return torch.device("cpu")
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # torch's message lists every backend it knows, not what we accept
        raise _UsageError(f"lipschitz-bench: --device must be cpu, cuda or cuda:N, got '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("lipschitz-bench: --device cuda, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise _UsageError(f"lipschitz-bench: --device must be cpu, cuda or cuda:N, got '{name}'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _UsageError(f"lipschitz-bench: --device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable now, so a bad ``--out`` costs no timings."""
    if out_dir.exists() and not out_dir.is_dir():
        raise _UsageError(f"lipschitz-bench: --out {out_dir}: exists and is not a directory")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise _UsageError(f"lipschitz-bench: --out {out_dir}: not writable ({exc.strerror or exc})") from None


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _print_peak(peak: PeakProbe) -> None:
    items = [f"{k} {_fmt(v, '.2f')}" for k, v in peak.as_json().items()]
    print("measured peak: " + ", ".join(items))


def _print_run(run: CaseRun) -> None:
    c, r = run.case, run.record
    if r is None:
        print(f"{c.label:<40} FAILED: {run.error}")
        return
    pct = "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%"
    print(f"{c.label:<40} {r['median_ms']:>10.4f} ms [{r['min_ms']:.4f}-{r['max_ms']:.4f}] "
          f"+-{100 * run.ours.spread:.0f}%  {_fmt(r['tflops'], '.3f')} TFLOP/s  {pct} of peak  "
          f"floor {_fmt(r['floor_ms'], '.4f')} ms")
    for name, ms in r["baselines"].items():
        print(f"{'':<6}vs {name:<28} {ms:>10.4f} ms  speedup {r['speedup'][name]:.2f}x")
    for name, why in run.skipped.items():
        print(f"{'':<6}vs {name:<28} skipped: {why}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lipschitz-bench`` / ``python -m lipschitz_ext.cli.bench``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _threaded(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        raise


def _threaded(args: argparse.Namespace) -> int:
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if threads is not None and threads < 1:
        raise _UsageError("lipschitz-bench: --threads must be >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:  # callers (tests) keep their own thread count
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    smoke = args.smoke
    suite = args.suite or ("all" if smoke else "orthogonalize")
    device = _device(args.device, smoke)
    cfg = SuiteConfig(device=device, dtype=_dtype(args.dtype), smoke=smoke,
                      compile=not (smoke or args.no_compile))
    repeats = args.repeats if args.repeats is not None else (3 if smoke else 30 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5 if device.type == "cuda" else 2)
    if repeats < 1 or warmup < 0:
        raise _UsageError("lipschitz-bench: --repeats must be >= 1 and --warmup >= 0")
    cases_dir = args.cases_dir  # None: the packaged suites
    where = cases_dir if cases_dir is not None else default_cases_dir()
    out_dir = args.out or default_results_dir()
    _check_out_dir(out_dir)
    skipped: list[dict[str, Any]] = []

    cases = []
    for name in SUITES if suite == "all" else (suite,):
        module = load_suite(name, cases_dir)
        if module is None:
            if suite != "all":
                raise _UsageError(f"lipschitz-bench: no suite file {where}/bench_{name}.py")
            skipped.append({"what": f"suite {name}", "reason": f"no bench_{name}.py in {where}"})
            continue
        cases += [c for c in module.cases(cfg) if args.filter in c.label]
    if not cases:
        raise _UsageError("lipschitz-bench: no cases selected")

    torch.manual_seed(cfg.seed)
    print(f"lipschitz-bench: {len(cases)} cases on {device}, torch {torch.__version__}, "
          f"{'smoke, ' if smoke else ''}repeats {repeats}, warmup {warmup}, "
          f"{torch.get_num_threads()} CPU threads")
    peak = probe_peak(device, small=smoke)
    _print_peak(peak)
    skipped += [{"what": f"peak {k}", "reason": why} for k, why in peak.skipped.items()]

    records, failed = [], 0
    for case in cases:
        run = run_case(case, device, peak, warmup=warmup, repeats=repeats)
        _print_run(run)
        skipped += [{"what": f"{case.label} vs {k}", "reason": why} for k, why in run.skipped.items()]
        if run.record is None:
            failed += 1
            skipped.append({"what": f"{case.label} {case.impl}", "reason": f"failed: {run.error}"})
        else:
            records.append(run.record)

    result = run_header(device, peak, default_results_dir().parent)  # the package's checkout
    result["cases"] = records
    result["skipped"] = skipped
    label = f"{suite}-smoke" if smoke else suite
    path = result_path(out_dir, device, label, _dt.datetime.now(_dt.timezone.utc))
    write_json(path, result)
    print(f"wrote {path}")
    if failed:
        print(f"lipschitz-bench: {failed} case(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
