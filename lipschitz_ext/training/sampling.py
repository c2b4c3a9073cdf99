"""Text from a trained model: temperature sampling from a prompt."""

from __future__ import annotations

import math

import torch

from ..data.text import DataError
from ..evaluation.metrics import loss_logit_scale, unwrap
from .run import load_run


__all__ = ["generate", "sample_run"]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt_ids: torch.Tensor, n: int, seq_len: int,
             seed: int = 0, temperature: float = 0.8, logit_scale: float = 1.0) -> str:
    """``prompt_ids`` (1-D token ids) followed by ``n`` sampled tokens, decoded by ``tokenizer``.

    Each token is drawn from ``softmax(logits * logit_scale / temperature)`` of the last
    ``seq_len`` tokens (a CPU generator seeded with ``seed``: the same text every time).
    ``logit_scale`` is the run's loss temperature, so sampling sees what training saw. A
    temperature so small that the scaled logits overflow float32 picks the most likely
    token (the limit of sampling as the temperature goes to 0).
    """
    m = unwrap(model)
    was_training = m.training
    m.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = prompt_ids.clone()
    for _ in range(n):
        logits = m(ids[None, -seq_len:].to(next(m.parameters()).device))[0, -1].float().cpu()
        factor = logit_scale / temperature
        z = logits * factor
        if math.isfinite(factor) and bool(torch.isfinite(z).all()):
            nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=g)
        else:  # a temperature so small the scaled logits overflow: its limit, the most likely token
            nxt = logits.argmax().view(1)
        ids = torch.cat([ids, nxt])
    m.train(was_training)
    return tokenizer.decode(ids.tolist())


def sample_run(run_dir: str, prompt: str = "", chars: int = 500, temperature: float = 0.8, seed: int = 0,
               which: str = "best", device: str | torch.device = "cpu") -> str:
    """``prompt`` and ``chars`` tokens sampled from the model of ``run_dir`` (see :func:`generate`;
    the run's loss temperature applies). An empty prompt starts from a newline (token 0
    where the vocabulary has none). Raises ``ValueError`` for bad arguments, a prompt the
    tokenizer cannot encode, or a missing or foreign folder."""
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 0:
        raise ValueError(f"--chars must be an integer >= 0, got {chars!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be finite and > 0, got {temperature!r}")
    run = load_run(run_dir, which=which, device=device)
    tok = run.tokenizer
    try:
        ids = tok.encode(prompt or "\n")
    except DataError as exc:
        if prompt:
            raise ValueError(f"--prompt: {exc}") from None
        ids = [0]  # shard data: no text to encode
    prompt_ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if prompt_ids.numel() == 0:
        prompt_ids = torch.zeros(1, dtype=torch.long)
    text = generate(run.model, tok, prompt_ids, chars, run.config.seq_len, seed, temperature,
                    logit_scale=loss_logit_scale(run.config))
    return text if prompt else text[len(tok.decode(prompt_ids.tolist())):]
