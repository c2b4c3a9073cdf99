"""Weight constraints applied after each optimizer step, in the RMS->RMS frame.

Every constraint acts IN PLACE on a batch of same-shape weights ``W: [k, m, n]``
(or one ``[m, n]``), PyTorch layout: ``m = fan_out``, ``n = fan_in``. Caps are
stated in the RMS->RMS operator norm ``||W||_rms = sqrt(n / m) * sigma_max(W)``,
i.e. on ``W' = W / s`` with ``s = sqrt(m / n)``; the classes fold ``s`` into the
op's parameters (a cap ``b`` on ``W'`` is a cap ``b * s`` on ``W``; a soft-cap
``a`` on ``W'`` is ``a / s^2`` on ``W``), so no extra pass over the weights is made.

The optimizer calls ``constraint.apply_(W, lr=..., update_norm=..., decay=...,
state=...)`` once per bucket of same-shape weights:

* ``lr``: the step's learning rate (used by the weight-decay classes).
* ``update_norm``: ``mu``, an upper bound on the spectral norm of this step's
  change of each ``W'`` (RMS->RMS frame); drives the soft-cap coupling.
* ``decay``: the decoupled weight-decay fraction the optimizer applied this step
  (``lr * weight_decay``), for the coupling ``k = sigma_max (1 - decay) + mu``.
* ``state``: a dict the optimizer keeps per bucket; every tensor stored in it has
  leading dim ``k`` (one slice per matrix), e.g. ``state["u"]: [k, m]`` power
  iteration vectors. Missing or mis-shaped entries are (re)created; ``None``
  means no warm start.

Attributes: ``name`` (the :func:`make_constraint` name) and ``sigma_max``: the
RMS->RMS norm the constraint guarantees after ``apply_`` (``None`` when it
guarantees none). See each class for how exact that guarantee is.
"""
from __future__ import annotations

import abc
import math
from typing import Optional

import torch


State = Optional[dict[str, torch.Tensor]]


def rms_scale(W: torch.Tensor) -> float:
    """``s = sqrt(fan_out / fan_in) = sqrt(m / n)`` for ``W: [..., m, n]``: ``W' = W / s``."""
    return math.sqrt(W.shape[-2] / W.shape[-1])


def _as_batch(W: torch.Tensor, who: str) -> torch.Tensor:
    if W.dim() not in (2, 3):
        raise ValueError(f"{who}.apply_: argument 'W' must be [k, m, n] or [m, n], got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise ValueError(f"{who}.apply_: argument 'W' must be floating point, got {W.dtype}")
    return W if W.dim() == 3 else W.unsqueeze(0)


def _check_nonneg(who: str, name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: argument '{name}' must be finite and >= 0, got {value}")
    return value


class Constraint(abc.ABC):
    """Base class: ``apply_`` modifies ``W`` in place (see the module docstring)."""

    name: str = "constraint"
    sigma_max: Optional[float] = None

    def apply_(
        self,
        W: torch.Tensor,
        *,
        lr: float = 0.0,
        update_norm: float = 0.0,
        decay: float = 0.0,
        state: State = None,
    ) -> None:
        W3 = _as_batch(W, type(self).__name__)
        if W3.numel() == 0:
            return
        out = self._apply(W3, lr=float(lr), update_norm=float(update_norm), decay=float(decay), state=state)
        if out is not None:
            W.copy_(out.reshape(W.shape))

    @abc.abstractmethod
    def _apply(self, W3: torch.Tensor, *, lr: float, update_norm: float, decay: float, state: State):
        """Return the new ``[k, m, n]`` weights, or ``None`` after updating ``W3`` in place."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


#: power iterations used when no warm-start vector is available (first step, no state)
COLD_ITERS = 16


def _warm_u(state: State, W3: torch.Tensor, iters: int) -> tuple[Optional[torch.Tensor], int]:
    """The stored ``u`` if it fits ``W3``, and the iterations to run (``COLD_ITERS`` at least without one)."""
    u = None if state is None else state.get("u")
    if u is None or tuple(u.shape) != tuple(W3.shape[:2]) or u.device != W3.device:
        return None, max(iters, COLD_ITERS)
    # a zero or non-finite row would restart from the op's default vector: give it the cold iterations
    bad = ~torch.isfinite(u).all(dim=-1) | (u == 0).all(dim=-1)
    if bool(bad.any()):
        return u, max(iters, COLD_ITERS)
    return u, iters


def _store_u(state: State, u: torch.Tensor) -> None:
    if state is not None:
        state["u"] = u


class _PowerIterationMixin:
    iters: int

    def _iters(self, state: State, W3: torch.Tensor) -> tuple[int, Optional[torch.Tensor]]:
        u, iters = _warm_u(state, W3, self.iters)
        return iters, u


