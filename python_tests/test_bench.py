"""The benchmark runner: the C++ timing loop, the CLI smoke run and its JSON.

The smoke test is the CI guard that keeps ``lipschitz-bench`` from rotting: it
runs the real CLI entry on CPU and validates the file against the format of docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import textwrap
import time

import pytest
import torch

from lipschitz_ext import _bench
from lipschitz_ext.cli.bench import main

TOP_KEYS = {"device", "torch", "cuda", "commit", "created", "peak", "cases"}
PEAK_KEYS = {"bf16_tflops", "fp8_tflops", "copy_tbps"}
CASE_KEYS = {"name", "shape", "dtype", "params", "impl", "median_ms", "min_ms", "max_ms",
             "tflops", "floor_ms", "baselines", "speedup"}


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _load_single_json(directory):
    files = sorted(directory.glob("*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def test_time_callable_cpu_rotates_inputs_and_measures_sleep():
    seen = []

    def fn(ms):
        seen.append(ms)
        time.sleep(ms / 1e3)

    out = _bench.time_callable(fn, [(2.0,), (6.0,)], 1, 4)
    assert len(out) == 4
    # warm-up took set 0, so the repeats see 6, 2, 6, 2 ms.
    assert seen == [2.0, 6.0, 2.0, 6.0, 2.0]
    for got, want in zip(out, [6.0, 2.0, 6.0, 2.0]):
        assert want <= got < want + 50.0
    # inner calls per repeat: per-call time is the mean over them.
    seen.clear()
    out = _bench.time_callable(fn, [(1.0,)], 0, 2, -1, 3)
    assert len(seen) == 6 and all(1.0 <= t < 50.0 for t in out)


def test_time_callable_errors():
    with pytest.raises(ZeroDivisionError):
        _bench.time_callable(lambda: 1 / 0, [()], 0, 2)
    with pytest.raises(ValueError, match="'inputs'"):
        _bench.time_callable(lambda: None, [], 0, 2)
    with pytest.raises(TypeError, match="'inputs'"):
        _bench.time_callable(lambda: None, [1], 0, 2)
    with pytest.raises(TypeError, match="'fn'"):
        _bench.time_callable(3, [()], 0, 2)
    with pytest.raises(ValueError, match="'repeats'"):
        _bench.time_callable(lambda: None, [()], 0, 0)
    with pytest.raises(ValueError, match="'inner'"):
        _bench.time_callable(lambda: None, [()], 0, 1, -1, 0)
    if not _bench.has_cuda():
        with pytest.raises(ValueError, match="without CUDA"):
            _bench.time_callable(lambda: None, [()], 0, 1, 0)


@pytest.mark.cuda
def test_time_callable_cuda_events_track_work():
    assert _bench.has_cuda()
    small = [(torch.randn(256, 256, device="cuda"),) for _ in range(2)]
    large = [(torch.randn(4096, 4096, device="cuda"),) for _ in range(2)]
    t_small = _bench.time_callable(lambda a: a @ a, small, 3, 10, torch.cuda.current_device())
    t_large = _bench.time_callable(lambda a: a @ a, large, 3, 10, torch.cuda.current_device())
    assert all(t > 0 for t in t_small + t_large)
    assert sorted(t_large)[5] > 5 * sorted(t_small)[5]


def test_console_script_is_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "lipschitz-bench" and ep.value == "lipschitz_ext.cli.bench:main" for ep in eps)


def _check_design_json(res: dict, device_type: str) -> None:
    """Every key of the format, positive finite numbers, speedup == baseline / ours,
    and the orthogonalize figures recomputed from their definitions."""
    assert TOP_KEYS <= res.keys() and PEAK_KEYS <= res["peak"].keys()
    assert res["torch"] == torch.__version__ and res["cuda"] == torch.version.cuda
    assert isinstance(res["commit"], str) and res["commit"]
    assert all(v is None or _positive_finite(v) for v in res["peak"].values())
    for key in ("bf16_tflops", "fp32_tflops", "copy_tbps"):
        assert _positive_finite(res["peak"][key]), key
    ortho = [c for c in res["cases"] if c["name"] == "orthogonalize"]
    assert len(ortho) >= 3
    for c in res["cases"]:
        assert CASE_KEYS <= c.keys(), CASE_KEYS - c.keys()
        assert all(isinstance(s, int) and s > 0 for s in c["shape"])
        for k in ("median_ms", "min_ms", "max_ms"):
            assert _positive_finite(c[k]), (k, c[k])
        assert c["min_ms"] <= c["median_ms"] <= c["max_ms"]
        assert c["baselines"].keys() == c["speedup"].keys()
        for k, ms in c["baselines"].items():
            assert _positive_finite(ms)
            assert c["speedup"][k] == pytest.approx(ms / c["median_ms"], rel=1e-12)
    # CPU kernels compute in float32; CUDA ones in bf16 (the suite's default dtype there).
    dtype, peak_key = ("float32", "fp32_tflops") if device_type == "cpu" else ("bfloat16", "bf16_tflops")
    for c in ortho:
        assert c["dtype"] == dtype and c["params"] == {"steps": 5, "coefficients": "polar_express"}
        assert _positive_finite(c["tflops"]) and _positive_finite(c["floor_ms"])
        b, m, n = c["shape"]
        m, n = min(m, n), max(m, n)
        flops = b * 5 * (4 * m * m * n + 2 * m**3)
        assert c["tflops"] == pytest.approx(flops / (c["median_ms"] * 1e-3) / 1e12, rel=1e-9)
        compute_floor = flops / (res["peak"][peak_key] * 1e12) * 1e3
        assert c["floor_ms"] >= compute_floor * (1 - 1e-9)
        assert c["peak_fraction"] == pytest.approx(c["floor_ms"] / c["median_ms"], rel=1e-12)
        assert "torch_eager" in c["baselines"]
        assert ("torch_optim_muon" in c["baselines"]) == hasattr(torch.optim, "Muon")
    # The compile baseline is off in the smoke, and the file says why.
    assert any("torch_compile_baddbmm" in s["what"] and "disabled" in s["reason"] for s in res["skipped"])


@pytest.mark.slow
def test_smoke_writes_design_json(tmp_path):
    threads = torch.get_num_threads()
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    path, res = _load_single_json(tmp_path)
    assert path.name.endswith("-all-smoke.json") and path.name[:8].isdigit()
    assert res["device"].startswith("cpu: ") and res["cpu_threads"] == 1
    _check_design_json(res, "cpu")


@pytest.mark.cuda
def test_smoke_on_cuda_writes_design_json(tmp_path):
    assert main(["--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 0
    path, res = _load_single_json(tmp_path)
    assert res["device"] == torch.cuda.get_device_name()
    _check_design_json(res, "cuda")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert _positive_finite(res["peak"]["fp8_tflops"])


PLUGIN_SUITE = '''
import torch
from lipschitz_ext.bench import Case, Setup, Skip


def _ours(n_sets):
    return Setup(torch.mm, [(torch.randn(32, 32), torch.randn(32, 32)) for _ in range(n_sets)])


def _slower(n_sets):
    a = torch.randn(32, 32)
    return Setup(lambda: [a @ a for _ in range(3)], [()])


def _broken(n_sets):
    return Setup(lambda: torch.mm(torch.ones(2, 3), torch.ones(2, 3)))


def _absent(n_sets):
    raise Skip("not available here")


def cases(cfg):
    assert cfg.smoke and cfg.device.type == "cpu"
    return [Case(name="plugin_mm", shape=(32, 32), dtype=torch.float32, ours=_ours,
                 baselines={"three_mm": _slower, "broken": _broken, "absent": _absent},
                 params={"k": 1}, flops=2 * 32**3)]
'''


def test_plugin_suite_file_and_failing_baselines(tmp_path):
    cases_dir, out = tmp_path / "cases", tmp_path / "out"
    cases_dir.mkdir()
    (cases_dir / "bench_constraints.py").write_text(textwrap.dedent(PLUGIN_SUITE))
    argv = ["--smoke", "--suite", "constraints", "--cases-dir", str(cases_dir), "--out", str(out)]
    assert main(argv) == 0
    path, res = _load_single_json(out)
    assert path.name.endswith("-constraints-smoke.json")
    (case,) = res["cases"]
    assert case["name"] == "plugin_mm" and case["shape"] == [32, 32] and case["params"] == {"k": 1}
    assert list(case["baselines"]) == ["three_mm"] and case["speedup"]["three_mm"] > 0
    assert case["floor_ms"] is not None and case["tflops"] > 0
    reasons = {s["what"]: s["reason"] for s in res["skipped"]}
    assert reasons["plugin_mm 32x32 float32 vs absent"] == "not available here"
    assert reasons["plugin_mm 32x32 float32 vs broken"].startswith("RuntimeError")


def test_missing_suite_file_and_bad_options_are_reported(tmp_path):
    with pytest.raises(SystemExit, match="bench_optim.py"):
        main(["--smoke", "--suite", "optim", "--cases-dir", str(tmp_path), "--out", str(tmp_path)])
    for bad, match in ((["--repeats", "0"], "--repeats"), (["--threads", "0"], "--threads"),
                       (["--dtype", "float99"], "float99"), (["--filter", "no-such-case"], "no cases")):
        with pytest.raises(SystemExit, match=match):
            main(["--smoke", "--out", str(tmp_path), *bad])
    assert not list(tmp_path.glob("*.json"))


def test_every_suite_file_is_a_runner_suite():
    """One harness: every packaged lipschitz_ext/bench/suites/bench_<suite>.py is a suite the
    runner knows (its name is its file name) and defines cases(cfg), with no timing loop or
    CLI of its own; every suite the runner knows is packaged."""
    from lipschitz_ext.bench import SUITES, load_suite
    from lipschitz_ext.bench.registry import default_cases_dir

    files = sorted(default_cases_dir().glob("bench_*.py"))
    assert {f.stem[len("bench_"):] for f in files} == set(SUITES)
    for f in files:
        suite = f.stem[len("bench_"):]
        assert suite in SUITES and load_suite(suite) is not None, f
        text = f.read_text()
        assert "def main(" not in text and "perf_counter" not in text, f



def test_train_step_split_times_both_halves_in_one_loop():
    """``bench_train step-split``: forward+backward and the optimizer step of the shakespeare-cpu
    preset, timed back to back per step; the ratio is their sum over the forward+backward."""
    from lipschitz_ext.bench.suites import bench_train

    before = torch.get_num_threads()
    r = bench_train.step_split(1, steps=3, warmup=1)
    assert torch.get_num_threads() == before
    assert r["threads"] == 1 and r["steps"] == 3 and r["forward_backward_ms"] > 0 and r["optimizer_step_ms"] > 0
    assert math.isclose(r["ratio"], (r["forward_backward_ms"] + r["optimizer_step_ms"]) / r["forward_backward_ms"])
