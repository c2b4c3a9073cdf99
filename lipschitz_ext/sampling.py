"""Text from a trained model: temperature sampling from a prompt."""

from __future__ import annotations

import torch

from .evaluate import unwrap

__all__ = ["generate"]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt_ids: torch.Tensor, n: int, seq_len: int,
             seed: int = 0, temperature: float = 0.8, logit_scale: float = 1.0) -> str:
    """``prompt_ids`` (1-D token ids) followed by ``n`` sampled tokens, decoded by ``tokenizer``.

    Each token is drawn from ``softmax(logits * logit_scale / temperature)`` of the last
    ``seq_len`` tokens (a CPU generator seeded with ``seed``: the same text every time).
    ``logit_scale`` is the run's loss temperature, so sampling sees what training saw.
    """
    m = unwrap(model)
    was_training = m.training
    m.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = prompt_ids.clone()
    for _ in range(n):
        logits = m(ids[None, -seq_len:].to(next(m.parameters()).device))[0, -1].float().cpu()
        probs = torch.softmax(logits * (logit_scale / temperature), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)])
    m.train(was_training)
    return tokenizer.decode(ids.tolist())
