"""Evaluation protocols end to end: --eval-protocol, the final summary's scores under every
protocol and the published formula, and lipschitz-eval accuracy on run folders."""

import json
from types import SimpleNamespace

import pytest
import torch

import lipschitz_ext
from lipschitz_ext.cli import eval as cli
from lipschitz_ext.data import text as D
from lipschitz_ext.certify.published import paper_bound
from lipschitz_ext.evaluation.protocols import IGNORE_INDEX, protocol_batches
from tiny_runs import TINY as TINY_RUN
from tiny_runs import tiny_run, write_corpus

TINY = {**TINY_RUN, "eval_every": 2}  # two evaluations in the run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol-runs")
    corpus = write_corpus(root, lines=400)  # a validation split of ~1.8k characters: holds the paper's windows
    return SimpleNamespace(
        corpus=corpus, val=D.load_data(corpus, seq_len=32).val,
        lip=tiny_run(corpus, root / "lip", TINY), base=tiny_run(corpus, root / "base", TINY, model="baseline"),
        full=tiny_run(corpus, root / "full", TINY, eval_protocol="full"))


def _summary(run_dir):
    return json.loads(open(f"{run_dir}/summary.json", encoding="utf-8").read())


def _reference_accuracy(model, batches):
    """Accuracy counted one scored target at a time (float64 logits)."""
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            pred = model.double()(x).argmax(-1)
            for b in range(y.shape[0]):
                for t in range(y.shape[1]):
                    if y[b, t] != IGNORE_INDEX:
                        right += int(pred[b, t] == y[b, t])
                        total += 1
    model.float()
    return right / total, total


def test_summary_scores_every_protocol_and_the_published_formula(runs):
    s = _summary(runs.lip)
    assert s["eval_protocol"] == "spread"
    assert set(s["protocols"]) == {"spread", "paper", "full"}
    assert s["protocols"]["spread"]["val_accuracy"] == pytest.approx(s["val_accuracy"], abs=1e-12)
    assert s["protocols"]["paper"]["tokens"] == 1280 * 32
    assert s["protocols"]["full"]["tokens"] == len(runs.val) - 1
    model = lipschitz_ext.load_run(runs.lip, which="latest").model
    for p in ("paper", "full"):
        acc, total = _reference_accuracy(model, protocol_batches(runs.val, p, 32))
        assert total == s["protocols"][p]["tokens"]
        assert s["protocols"][p]["val_accuracy"] == pytest.approx(acc, abs=2 / total)  # float32 vs float64 ties
    assert s["paper_bound"] == pytest.approx(paper_bound(model), rel=1e-9)
    assert _summary(runs.base)["paper_bound"] is None


def test_eval_protocol_full_is_used_for_periodic_evals(runs):
    rows = [json.loads(line) for line in open(f"{runs.full}/metrics.jsonl", encoding="utf-8")]
    evals = [r for r in rows if "val_accuracy" in r]
    assert evals and all(r["protocol"] == "full" and r["tokens"] == len(runs.val) - 1 for r in evals)
    s = _summary(runs.full)
    assert s["eval_protocol"] == "full"
    assert s["val_accuracy"] == pytest.approx(s["protocols"]["full"]["val_accuracy"], abs=1e-12)


def test_accuracy_command_rescores_a_run(runs, capsys):
    s = _summary(runs.lip)
    assert cli.eval_main(["accuracy", runs.lip, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == 4 and rep["seq_len"] == 32
    for p in ("spread", "paper", "full"):
        assert rep["protocols"][p]["val_accuracy"] == pytest.approx(s["protocols"][p]["val_accuracy"], abs=1e-12)
        assert rep["protocols"][p]["val_loss"] == pytest.approx(s["protocols"][p]["val_loss"], rel=1e-6)
    assert rep["certified_bound"] == pytest.approx(s["certified_bound"], rel=1e-9)
    assert rep["paper_bound"] == pytest.approx(s["paper_bound"], rel=1e-9)
    assert cli.eval_main(["accuracy", runs.base, "--protocol", "full", "--which", "best"]) == 0
    text = capsys.readouterr().out
    assert "full" in text and "paper " not in text and "certified" not in text


def test_accuracy_command_errors_in_one_line(runs, tmp_path, capsys):
    assert cli.eval_main(["accuracy", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lipschitz-eval: error:")
    with pytest.raises(SystemExit) as exc:
        cli.eval_main(["accuracy", runs.lip, "--protocol", "whole"])
    assert exc.value.code == 2


def test_a_split_too_short_for_the_paper_windows_is_reported_not_fatal(tmp_path):
    corpus = write_corpus(tmp_path, lines=100)
    s = _summary(tiny_run(corpus, tmp_path / "short", TINY, steps=2, eval_every=2))
    assert "needs 1312 validation tokens" in s["protocols"]["paper"]["unavailable"]
    assert s["protocols"]["full"]["val_accuracy"] >= 0
