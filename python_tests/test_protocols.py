"""Evaluation protocols: the windows each one scores."""

import numpy as np
import pytest
import torch

from lipschitz_ext.data import text as data
from lipschitz_ext.evaluation.protocols import IGNORE_INDEX, protocol_batches
import json
from types import SimpleNamespace
import lipschitz_ext
from lipschitz_ext.cli import eval as cli
from lipschitz_ext.data import text as D
from lipschitz_ext.certify import paper_bound
from tiny_runs import TINY as TINY_RUN
from tiny_runs import tiny_run, write_corpus


def _targets(batches):
    """Multiset of scored target positions, from token ids equal to their position."""
    out = []
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == y.dtype == torch.int64
        keep = y != IGNORE_INDEX
        # y is x shifted by one wherever both are real tokens
        assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == IGNORE_INDEX, x[:, 1:], y[:, :-1]))
        out.append(y[keep])
    return torch.cat(out).sort().values


def test_paper_windows_are_starts_0_to_1279_in_20_batches_of_64():
    tokens = np.arange(5000, dtype=np.int64)
    for seq_len in (128, 256):
        batches = list(protocol_batches(tokens, "paper", seq_len))
        assert len(batches) == 20 and all(x.shape == (64, seq_len) for x, _ in batches)
        starts = torch.cat([x[:, 0] for x, _ in batches])
        assert torch.equal(starts, torch.arange(1280))
        x, y = batches[-1]
        assert int(y.max()) == 1279 + seq_len  # the last character read: 1536 characters at 256
        assert torch.equal(y, x + 1)


def test_paper_refuses_a_short_split():
    with pytest.raises(data.DataError, match="paper.*needs 1536"):
        list(protocol_batches(np.arange(1500), "paper", 256))


@pytest.mark.parametrize("n,seq_len", [(1000, 128), (1025, 128), (129, 128), (130, 128), (500, 7), (50, 128)])
def test_full_scores_every_token_but_the_first_exactly_once(n, seq_len):
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(protocol_batches(tokens, "full", seq_len))
    assert torch.equal(_targets(batches), torch.arange(1, n))
    assert all(x.shape[0] <= 64 for x, _ in batches)


def test_full_over_shards_never_crosses_a_part():
    a, b = np.arange(0, 300, dtype=np.uint16), np.arange(1000, 1410, dtype=np.uint16)
    stream = data.TokenStream([a, b])
    batches = list(protocol_batches(stream, "full", 64))
    want = torch.cat([torch.arange(1, 300), torch.arange(1001, 1410)]).sort().values
    assert torch.equal(_targets(batches), want)
    for x, y in batches:  # a window is consecutive ids: it lies inside one part
        assert torch.all(x[:, 1:] - x[:, :-1] == 1)


def test_spread_is_the_training_default():
    tokens = np.arange(5000, dtype=np.uint16)
    got = list(protocol_batches(tokens, "spread", 50, batch_size=8, max_batches=3))
    want = list(data.eval_batches(tokens, 8, 50, 3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


def test_bad_arguments():
    with pytest.raises(ValueError, match="protocol must be one of spread, paper, full"):
        protocol_batches(np.arange(100), "whole", 8)
    with pytest.raises(ValueError, match="seq_len"):
        protocol_batches(np.arange(100), "full", 0)


class _Bigram(torch.nn.Module):
    """Predicts token (id + 1) mod V: exactly right on an arange corpus except at wrap-around."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.nn.functional.one_hot((x + 1) % self.vocab, self.vocab).double() * 5.0


def test_score_counts_only_scored_targets():
    from lipschitz_ext.evaluation.protocols import evaluate_protocols

    vocab = 300
    tokens = np.arange(2000, dtype=np.int64) % vocab
    m = _Bigram(vocab).train()
    out = evaluate_protocols(m, tokens, 100)
    assert m.training
    assert out["full"]["tokens"] == 1999 and out["paper"]["tokens"] == 1280 * 100
    for p, r in out.items():
        assert r["val_accuracy"] == 1.0, p
        # float64 reference: every scored position has logit 5 on the right token, 0 elsewhere
        ref = -torch.log_softmax(torch.tensor([5.0] + [0.0] * (vocab - 1), dtype=torch.float64), 0)[0]
        assert r["val_loss"] == pytest.approx(float(ref), rel=1e-6)


# ---------------------------------------------------------------------------
# Evaluation protocols end to end: --eval-protocol, the final summary's scores under every
# ---------------------------------------------------------------------------
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
