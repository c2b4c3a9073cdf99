"""Tokenizers, text/shard loading, the default corpus and batch sampling."""

import numpy as np
import pytest
import torch

from lipschitz_ext.data import text as data


def test_char_tokenizer_round_trip_and_split(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 20
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    d = data.load_data(str(p), seq_len=8)
    assert d.vocab_size == len(set(text))
    n = len(text)
    assert len(d.train) == int(0.9 * n) and len(d.val) == n - int(0.9 * n)
    assert d.tokenizer.decode(d.train) + d.tokenizer.decode(d.val) == text
    # deterministic: same file, same split and vocabulary
    d2 = data.load_data(str(p), seq_len=8)
    assert np.array_equal(d.train, d2.train) and d.tokenizer.to_dict() == d2.tokenizer.to_dict()
    tok = data.tokenizer_from_dict(d.tokenizer.to_dict())
    assert tok.decode(tok.encode("be or not")) == "be or not"
    with pytest.raises(data.DataError, match="not in the tokenizer's vocabulary"):
        tok.encode("Z")


def test_byte_tokenizer_handles_any_utf8(tmp_path):
    text = "naïve café — ünïcödé ✓ " * 30
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    d = data.load_data(str(p), tokenizer="byte", seq_len=8)
    assert d.vocab_size == 256
    raw = text.encode("utf-8")
    assert bytes(np.concatenate([d.train, d.val]).astype(np.uint8)) == raw


@pytest.mark.parametrize("content, match", [("", "is empty"), ("abc", "too short")])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(data.DataError, match=match):
        data.load_data(str(p), seq_len=16)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_data(str(tmp_path / "nope.txt"))
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(data.DataError, match="not valid UTF-8"):
        data.load_data(str(p))


def _write_shard(path, tokens, header=True):
    tokens = np.asarray(tokens, dtype=np.uint16)
    with open(path, "wb") as fh:
        if header:
            h = np.zeros(256, dtype=np.int32)
            h[:3] = [data.SHARD_MAGIC, 1, len(tokens)]
            fh.write(h.tobytes())
        fh.write(tokens.tobytes())


def test_shards_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    a, b, v = (rng.integers(0, 1000, size=n) for n in (5000, 3000, 1000))
    _write_shard(tmp_path / "fw_train_000.bin", a)
    _write_shard(tmp_path / "fw_train_001.bin", b, header=False)  # raw nanoGPT format
    _write_shard(tmp_path / "fw_val_000.bin", v)
    d = data.load_data(str(tmp_path / "*.bin"), seq_len=64, vocab_size=1024)
    assert isinstance(d.train, data.TokenStream) and len(d.train) == 8000 and len(d.val) == 1000
    assert all(isinstance(p, np.memmap) for p in d.train.parts)
    s = data.BatchSampler(d.train, batch_size=16, seq_len=64, seed=3)
    x, y = s.next()
    assert x.shape == (16, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every window is a real contiguous slice of one shard
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        found = any(
            np.array_equal(part[i:i + 65], row)
            for part in (a, b)
            for i in np.flatnonzero(part[: len(part) - 64] == row[0])
        )
        assert found
    with pytest.raises(data.DataError, match=">= vocab_size"):
        data.load_data(str(tmp_path / "*.bin"), seq_len=64, vocab_size=500)


def test_bad_shards(tmp_path):
    p = tmp_path / "odd.bin"
    p.write_bytes(b"\x00\x01\x02")
    with pytest.raises(data.DataError, match="even size"):
        data.load_data(str(p))
    h = np.zeros(256, dtype=np.int32)
    h[:3] = [data.SHARD_MAGIC, 1, 100]
    (tmp_path / "short.bin").write_bytes(h.tobytes() + b"\x00\x00" * 10)
    with pytest.raises(data.DataError, match="header says 100 tokens"):
        data.load_data(str(tmp_path / "short.bin"))
    with pytest.raises(data.DataError, match="no shard files match"):
        data.load_data(str(tmp_path / "none_*.bin"))


def test_sampler_resumes_exactly():
    tokens = np.arange(10000, dtype=np.uint16)
    s = data.BatchSampler(tokens, 4, 32, seed=7)
    s.next()
    state = s.state_dict()
    want = [s.next()[0] for _ in range(3)]
    s2 = data.BatchSampler(tokens, 4, 32, seed=99)
    s2.load_state_dict(state)
    got = [s2.next()[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # different ranks draw different streams
    r1 = data.BatchSampler(tokens, 4, 32, seed=7, rank=1, world_size=2).next()[0]
    assert not torch.equal(r1, data.BatchSampler(tokens, 4, 32, seed=7).next()[0])


def test_eval_batches_deterministic_and_cover_split():
    tokens = np.arange(5000, dtype=np.uint16)
    b1 = list(data.eval_batches(tokens, 8, 50, 3))
    b2 = list(data.eval_batches(tokens, 8, 50, 3))
    assert len(b1) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(b1, b2))
    starts = torch.cat([x[:, 0] for x, _ in b1])
    assert starts.min() == 0 and starts.max() == 5000 - 51


def test_default_corpus():
    d = data.load_data(None, seq_len=256)
    assert d.source == data.DEFAULT_CORPUS
    assert len(d.train) > 8_000_000 and d.vocab_size < 100
    assert "Hamlet" in d.tokenizer.decode(d.train[:2_000_000])
