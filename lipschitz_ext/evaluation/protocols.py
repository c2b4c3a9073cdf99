"""Evaluation protocols: which validation windows an accuracy figure is measured on.

Accuracy on a character-level corpus depends strongly on *which* characters are
scored, so every figure this package reports names its protocol:

- ``spread`` (our default during training): ``batches x batch`` windows of
  ``seq_len`` tokens whose starts are spread evenly over the whole validation
  split (the same windows at every evaluation); every position of every window
  is scored.
- ``paper``: the evaluation of Newhouse et al. (2025)'s public training code.
  Its validation loader is not shuffled and yields stride-1 windows starting at
  0, 1, 2, ...; each evaluation reads the first ``val_iters = 20`` batches of
  ``64``, i.e. the windows starting at ``0 .. 1279``. Only the first
  ``1280 + seq_len`` characters of the validation split are ever seen (1,536 at
  the paper's context 256; 1,408 at 128), so the passage scored depends on
  ``seq_len``. On tiny Shakespeare it is the opening of a *Taming of the Shrew*
  scene, with many repeated speaker names: it reads several points higher than
  the whole split.
- ``full``: every validation token predicted exactly once. Non-overlapping
  windows tile the split; the first token of the split is never a target (it has
  no context inside the split). When the targets do not divide into whole
  windows, one last window ends at the split's last token and only its targets
  not scored before count (the rest carry :data:`IGNORE_INDEX`), so the tail is
  scored with up to ``seq_len - 1`` tokens of context instead of being dropped.

A batch is ``(x, y)``, both ``int64 [B, T]``; targets equal to :data:`IGNORE_INDEX`
are not scored (``F.cross_entropy``'s default ``ignore_index``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..data.text import DataError, TokenStream, eval_batches


__all__ = [
    "EVAL_PROTOCOLS",
    "PROTOCOL_HELP",
    "PAPER_BATCH_SIZE",
    "PAPER_VAL_ITERS",
    "IGNORE_INDEX",
    "protocol_batches",
    "paper_window_starts",
    "score",
    "evaluate_protocols",
]

EVAL_PROTOCOLS = ("spread", "paper", "full")
PROTOCOL_HELP = {
    "spread": "windows spread evenly over the whole validation split (eval_batches x batch)",
    "paper": "the paper's windows: stride-1 starts 0..1279 (20 batches of 64) of the validation split",
    "full": "every validation token predicted exactly once (non-overlapping windows, tail included)",
}
#: The paper's sweep settings: batch 64, ``val_iters`` 20.
PAPER_BATCH_SIZE = 64
PAPER_VAL_ITERS = 20
IGNORE_INDEX = -100
#: Windows per batch of the ``full`` protocol (compute only; the figure does not depend on it).
FULL_BATCH_SIZE = 64


def _stream(tokens) -> TokenStream:
    return tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])


def paper_window_starts() -> np.ndarray:
    """The starts ``0 .. 1279`` of the paper's 20 x 64 stride-1 validation windows."""
    return np.arange(PAPER_BATCH_SIZE * PAPER_VAL_ITERS, dtype=np.int64)


def _paper_batches(tokens, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    stream = _stream(tokens)
    starts = paper_window_starts()
    first = stream.lengths[0] if len(stream.lengths) else 0
    need = int(starts[-1]) + seq_len + 1
    if first < need:
        # a silent clip would score a different passage than the paper's
        raise DataError(f"protocol 'paper' needs {need} validation tokens in its first part "
                        f"(windows 0..{int(starts[-1])} of {seq_len} + 1), have {int(first)}")
    for b in range(PAPER_VAL_ITERS):
        w = torch.from_numpy(stream.windows(starts[b * PAPER_BATCH_SIZE:(b + 1) * PAPER_BATCH_SIZE], seq_len + 1))
        yield w[:, :-1], w[:, 1:]


def _full_windows(length: int, seq_len: int) -> list[tuple[int, int, int]]:
    """``(start, width, skip)`` per window of one part: targets ``start+1+skip .. start+width-1``."""
    if length < 2:
        return []
    if length < seq_len + 1:  # a part shorter than one window: one shorter window
        return [(0, length, 0)]
    n_targets = length - 1
    out = [(s, seq_len + 1, 0) for s in range(0, n_targets - seq_len + 1, seq_len)]
    done = len(out) * seq_len
    if done < n_targets:
        out.append((length - 1 - seq_len, seq_len + 1, seq_len - (n_targets - done)))
    return out


def _full_batches(tokens, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    stream = _stream(tokens)
    pending: list[torch.Tensor] = []
    pending_skip: list[int] = []

    def flush():
        w = torch.stack(pending)
        x, y = w[:, :-1], w[:, 1:].clone()
        for i, skip in enumerate(pending_skip):
            y[i, :skip] = IGNORE_INDEX
        pending.clear()
        pending_skip.clear()
        return x, y

    for part in stream.parts:
        for start, width, skip in _full_windows(len(part), seq_len):
            w = torch.from_numpy(np.asarray(part[start:start + width], dtype=np.int64))
            if pending and (len(pending) == FULL_BATCH_SIZE or pending[0].numel() != width):
                yield flush()
            pending.append(w)
            pending_skip.append(skip)
    if pending:
        yield flush()


def protocol_batches(tokens, protocol: str, seq_len: int, batch_size: int = 64,
                     max_batches: int = 20) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation batches ``(x, y)`` (``int64 [B, T]``) of ``protocol``.

    ``batch_size`` and ``max_batches`` apply to ``spread`` only; ``paper`` always reads
    20 batches of 64 stride-1 windows, ``full`` every token once.
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {protocol!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if protocol == "spread":
        return eval_batches(tokens, batch_size, seq_len, max_batches)
    if protocol == "paper":
        return _paper_batches(tokens, seq_len)
    return _full_batches(tokens, seq_len)


@torch.no_grad()
def score(model: torch.nn.Module, batches, device: torch.device | str = "cpu",
          logit_scale: float = 1.0) -> dict[str, float]:
    """Validation loss (of ``logit_scale * logits``, nats per token) and top-1 accuracy of
    ``model`` (ids ``[B, T]`` -> logits ``[B, T, V]``) over ``batches``, in float32.

    Returns ``{"val_loss", "val_accuracy", "tokens"}`` (``tokens``: targets scored).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            keep = y != IGNORE_INDEX
            loss_sum += torch.nn.functional.cross_entropy(
                logit_scale * logits.flatten(0, 1), y.flatten(), reduction="sum",
                ignore_index=IGNORE_INDEX).item()
            correct += ((logits.argmax(-1) == y) & keep).sum().item()
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the evaluation windows score no tokens")
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count, "tokens": count}


def evaluate_protocols(model: torch.nn.Module, tokens, seq_len: int, protocols=EVAL_PROTOCOLS,
                       device: torch.device | str = "cpu", logit_scale: float = 1.0,
                       batch_size: int = 64, max_batches: int = 20) -> dict[str, dict[str, float]]:
    """:func:`score` under each of ``protocols`` on the validation ``tokens``:
    ``{protocol: {"val_loss", "val_accuracy", "tokens"}}``."""
    return {p: score(model, protocol_batches(tokens, p, seq_len, batch_size, max_batches), device, logit_scale)
            for p in protocols}
