"""The ``auto`` rules (lipschitz_ext.ops.choices): the table in docs/benchmarks.md is what
``choose`` picks, every choice has a catch-all, and the callers resolve ``auto`` through it."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from lipschitz_ext import constraints, ops
from lipschitz_ext.ops.choices import CHOICES, TABLE, Rule, choose
from lipschitz_ext.optim import resolve_ns_dtype

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _doc_rows() -> list[list[str]]:
    text = DOC.read_text()
    block = re.search(r"<!-- auto-rules:begin -->(.*?)<!-- auto-rules:end -->", text, re.S)
    assert block, "docs/benchmarks.md lost its auto-rules table"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.group(1).strip().splitlines()]
    return [r for r in rows[2:] if r and r[0]]


def test_docs_table_is_what_choose_picks():
    rows = _doc_rows()
    assert {r[0] for r in rows} >= {"hard_cap_method", "orthogonal_project_method", "ns_algorithm"}
    for choice, device, dtypes, threads, shapes, picks, _source in rows:
        for dt, t, shape in itertools.product(dtypes.split(","), threads.split(","), shapes.split(",")):
            m, n = (int(x) for x in shape.strip().split("x"))
            got = choose(choice, device, getattr(torch, dt.strip()), (m, n), threads=int(t))
            assert got == picks, (choice, device, dt, t, shape, got, picks)


def test_every_choice_has_a_catch_all_and_valid_values():
    for choice, values in CHOICES.items():
        rows = [r for r in TABLE if r.choice == choice]
        assert rows and all(r.value in values for r in rows)
        last = rows[-1]
        assert (last.device, last.dtype, last.min_small, last.min_aspect) == ("*", "*", 0, 0.0)
    with pytest.raises(ValueError, match="argument 'choice'"):
        choose("nope", "cpu", torch.float32, (4, 4))


def test_conditions_of_a_row():
    r = Rule("ns_algorithm", "gram", device="cpu", dtype="float32", threads=(2, 4), min_small=64, min_aspect=3.0)
    cpu = torch.device("cpu")
    assert r.matches(cpu, torch.float32, 2, (128, 1024), None)
    assert r.matches(cpu, torch.float32, 4, (1024, 128), None)  # tall: the same small side and aspect
    assert not r.matches(cpu, torch.float32, 1, (128, 1024), None)  # threads
    assert not r.matches(cpu, torch.float32, 5, (128, 1024), None)
    assert not r.matches(cpu, torch.bfloat16, 2, (128, 1024), None)  # dtype
    assert not r.matches(torch.device("meta"), torch.float32, 2, (128, 1024), None)  # device
    assert not r.matches(cpu, torch.float32, 2, (32, 1024), None)  # small side
    assert not r.matches(cpu, torch.float32, 2, (256, 512), None)  # aspect


def test_callers_resolve_auto_through_the_rule():
    W = torch.randn(3, 40, 24)
    cap = constraints.SpectralHardCap(1.0)
    assert cap.method_for(W) == choose("hard_cap_method", "cpu", torch.float32, (40, 24))
    want = choose("ns_dtype", "cpu", torch.float32, (40, 24))
    assert resolve_ns_dtype("auto", "cpu", torch.float32, (40, 24)) == getattr(torch, want)
    assert resolve_ns_dtype("auto", "cpu", torch.float64, (40, 24)) == torch.float64
    method = choose("orthogonal_project_method", "cpu", torch.float32, (40, 24))
    torch.testing.assert_close(ops.orthogonal_project(W), ops.orthogonal_project(W, method=method))
    G = ops.orthogonal_project(W, method="gram")
    torch.testing.assert_close(G, ops.orthogonal_project(W, method="msign"), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="argument 'method'"):
        ops.orthogonal_project(W, method="svd")


def _bucket(cap, proj, ns32, ns16):
    """One bucket's timings (ms) per method, as the ratios benchmark records them."""
    ms = {f"hard_cap_{k}": v for k, v in zip(("msign", "polynomial", "eigh"), cap)}
    ms |= {"orthogonal_msign": proj[0], "orthogonal_gram": proj[1]}
    ms |= {"ns_float32_standard": ns32[0], "ns_float32_gram": ns32[1],
           "ns_bfloat16_standard": ns16[0], "ns_bfloat16_gram": ns16[1]}
    return ms


def test_ratios_derive_rules_from_timings():
    """The benchmark's derivation: one value where it is within 10% of the best everywhere,
    an aspect split where the winner changes with the aspect, per thread count."""
    from lipschitz_ext.bench import load_suite
    from lipschitz_ext.bench.registry import default_cases_dir

    suite = load_suite("constraints", default_cases_dir())

    square = _bucket((9, 5, 1), (1.0, 1.3), (1.0, 1.2), (2.0, 2.5))
    wide = _bucket((9, 5, 1), (2.0, 1.0), (2.0, 1.0), (4.0, 3.0))
    measured = {"threads": {1: {"buckets": {"1x256x256": square, "4x128x1024": wide, "1x10x256": wide}},
                            2: {"buckets": {"1x256x256": square, "4x128x1024": square}}}}
    rules = suite.derive_rules(measured)
    assert 'Rule("hard_cap_method", "eigh", device="cpu", dtype="float32", threads=(1, 2), source=SRC)' in rules
    assert 'Rule("ns_dtype", "float32", device="cpu", dtype="float32", threads=(1, 2), source=SRC)' in rules
    # bf16 Newton-Schulz: Gram where it wins by more than 10% (aspect 8, 1 thread), else standard
    assert ('Rule("ns_algorithm", "gram", device="cpu", dtype="bfloat16", threads=(1, 1), min_aspect=8, '
            'source=SRC)') in rules
    assert 'Rule("ns_algorithm", "standard", device="cpu", dtype="bfloat16", threads=(2, 2), source=SRC)' in rules
    # 1 thread: Gram from aspect 8 up (the 10x256 bucket is too small to count); 2 threads: standard
    assert ('Rule("orthogonal_project_method", "gram", device="cpu", dtype="float32", threads=(1, 1), '
            'min_aspect=8, source=SRC)') in rules
    assert ('Rule("orthogonal_project_method", "msign", device="cpu", dtype="float32", threads=(1, 1), '
            'source=SRC)') in rules
    assert ('Rule("orthogonal_project_method", "msign", device="cpu", dtype="float32", threads=(2, 2), '
            'source=SRC)') in rules


def test_benchmark_regenerates_the_docs_table():
    """The rows the ratios benchmark prints for docs/benchmarks.md are what ``choose`` picks with
    the rules the same run implies (parsed as the docs test parses the page)."""
    from lipschitz_ext.bench import load_suite
    from lipschitz_ext.bench.registry import default_cases_dir

    suite = load_suite("constraints", default_cases_dir())

    square = _bucket((9, 1, 5), (1.0, 1.3), (1.0, 1.2), (0.5, 2.5))
    wide = _bucket((9, 5, 1), (2.0, 1.0), (2.0, 1.0), (4.0, 3.0))
    measured = {"threads": {1: {"buckets": {"1x256x256": square, "4x128x1024": wide}},
                            2: {"buckets": {"1x256x256": square, "4x128x1024": square}}}}
    rules = tuple(r for r in suite.derive_table(measured, "run") if not isinstance(r, str)) + TABLE
    text = suite.auto_table_markdown(measured, "run")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]
    assert {r[0] for r in rows} == {"hard_cap_method", "orthogonal_project_method", "ns_dtype", "ns_algorithm"}
    seen = set()
    for choice, device, dtype, threads, shapes, picks, source in rows:
        assert source == "run"
        for shape in shapes.split(","):
            m, n = (int(x) for x in shape.strip().split("x"))
            seen.add((choice, int(threads), (m, n), picks))
            assert choose(choice, device, getattr(torch, dtype), (m, n), threads=int(threads), table=rules) == picks
    # the timings above: 1 thread, the polynomial at the square bucket and eigh at aspect 8;
    # 2 threads, the polynomial everywhere (both orientations of each bucket are listed);
    # Newton-Schulz in bf16 where it won (the square bucket), float32 at aspect 8
    assert ("hard_cap_method", 1, (256, 256), "polynomial") in seen
    assert ("hard_cap_method", 1, (1024, 128), "eigh") in seen
    assert ("hard_cap_method", 2, (128, 1024), "polynomial") in seen
    assert ("ns_dtype", 1, (256, 256), "bfloat16") in seen and ("ns_dtype", 1, (128, 1024), "float32") in seen
