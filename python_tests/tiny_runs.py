"""Tiny training runs for the command tests: a small repetitive corpus and a few-step run."""

from __future__ import annotations

import os

from lipschitz_ext.training import config as C
from lipschitz_ext.training import loop as T


#: A 4-step run of a one-block d=32 model in float32 on one thread (seconds on a CPU).
TINY = dict(target_bound=0.0, d_model=32, n_layers=1, residual_scale=1.0, n_heads=2, seq_len=32, batch_size=8, steps=4, eval_every=4,
            eval_batches=2, log_every=2, sample_chars=0, head_sigma_max=4.0, device="cpu", threads=1,
            autocast="none")


def corpus_text(lines: int = 400) -> str:
    """A text a tiny model learns something from in a few dozen steps."""
    return "".join(f"{i} little pigs went to market, and {i * 7 % 13} came home.\n" for i in range(lines))


def write_corpus(folder, lines: int = 400) -> str:
    """``folder/corpus.txt`` holding :func:`corpus_text`; its path."""
    path = os.path.join(str(folder), "corpus.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(corpus_text(lines))
    return path


def tiny_run(corpus: str, out, settings: dict, **kw) -> str:
    """Train preset shakespeare-cpu with ``settings`` and ``kw`` on ``corpus`` into ``out``; its path."""
    T.train(C.config_from_preset("shakespeare-cpu", data=corpus, out=str(out), **{**settings, **kw}), quiet=True)
    return str(out)
