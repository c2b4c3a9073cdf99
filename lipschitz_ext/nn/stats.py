"""activation_stats: per-layer output magnitudes (the "max activation" figure)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def activation_stats(model: nn.Module, idx: torch.Tensor) -> dict[str, dict[str, float]]:
    """Run ``model(idx)`` and record every submodule's output.

    Args:
        model: a ``LipschitzGPT`` or ``BaselineGPT`` (any module whose submodules
            return tensors works).
        idx: token ids ``[B, T]`` (long).

    Returns:
        ``{qualified module name: {"max_abs", "rms", "max_token_rms"}}`` in the order the
        modules ran, for every named submodule except containers (``ModuleList``):
        ``max_abs`` = largest ``|entry|``, ``rms`` = ``sqrt(mean(entry^2))`` over the
        whole output, ``max_token_rms`` = largest per-token RMS over the last dim
        (floats, computed in float64). A module called more than once keeps the max.
    """
    stats: dict[str, dict[str, float]] = {}
    handles = []

    def hook(name: str):
        def record(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            out = output.detach().double()
            new = {
                "max_abs": out.abs().max().item(),
                "rms": out.pow(2).mean().sqrt().item(),
                "max_token_rms": out.pow(2).mean(dim=-1).sqrt().max().item(),
            }
            old = stats.get(name)
            stats[name] = new if old is None else {k: max(old[k], new[k]) for k in new}

        return record

    for name, module in model.named_modules():
        if name and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    return stats
