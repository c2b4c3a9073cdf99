"""Evaluation protocols: the windows each one scores."""

import numpy as np
import pytest
import torch

from lipschitz_ext.data import text as data
from lipschitz_ext.evaluation.protocols import IGNORE_INDEX, protocol_batches


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
