"""Checks the fake (meta) kernels share with the C++ ones.

A meta tensor next to a real one sends the whole call to the fake kernel, which would
return uninitialized memory on the real tensor's device: refuse mixed devices there.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_same_device(op: str, first: str, tensors: dict[str, Optional[torch.Tensor]]) -> None:
    """ValueError naming the argument when a tensor in ``tensors`` is not on ``tensors[first]``'s device."""
    ref = tensors[first].device
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != ref:
            raise ValueError(f"{op}: argument '{name}' must be on {first}'s device ({ref}), got {t.device}")
