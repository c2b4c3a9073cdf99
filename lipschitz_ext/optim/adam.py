"""Adam followed by a weight constraint (embedding tables: per-token RMS cap)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .bucket import gather_cstate, overlaps, scatter_cstate
from .distributed import is_dtensor, local_tensor
from .muon import NONFINITE_POLICIES, NonFiniteGradient
from .state import ConstraintGroupsMixin

__all__ = ["ConstrainedAdam", "nonfinite_grads", "describe_nonfinite"]


def nonfinite_grads(param_groups: list[dict[str, Any]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """``[(group index, [shapes of its parameters with a NaN/inf gradient])]``, groups with
    one only; a per-tensor max and min on the device (NaN propagates, and huge finite
    entries do not overflow as a norm would), one host sync in all."""
    flags, where = [], []
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            g = p.grad
            if g is None or g.numel() == 0 or g.is_sparse:
                continue
            g = local_tensor(g) if is_dtensor(g) else g
            flags.append(torch.isfinite(g.amax()) & torch.isfinite(g.amin()))
            where.append((gi, tuple(p.shape)))
    if not flags:
        return []
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu().tolist()
    bad: dict[int, list[tuple[int, ...]]] = {}
    for (gi, shape), good in zip(where, ok):
        if not good:
            bad.setdefault(gi, []).append(shape)
    return sorted(bad.items())


def describe_nonfinite(bad: list[tuple[int, list[tuple[int, ...]]]]) -> str:
    """One phrase naming the groups and shapes of :func:`nonfinite_grads`'s result."""
    return "non-finite gradient in " + "; ".join(f"param group {gi} (parameters with shapes {shapes})"
                                                 for gi, shapes in bad)


class ConstrainedAdam(ConstraintGroupsMixin, torch.optim.Adam):
    """``torch.optim.Adam``, then each group's constraint on the updated weights.

    Args:
        params: parameters or param-group dicts (a group may set its own ``"constraint"``).
        constraint: default constraint (e.g. ``constraints.EmbeddingRMSCap``) with
            ``apply_(W, *, lr, update_norm, decay, state)``; applied after Adam's step
            to each group's 2-D weights that had a gradient, same-shape weights
            stacked into one ``[k, m, n]`` call; None for none. Vectors and scalars
            are never constrained.
        **adam_kwargs: passed to ``torch.optim.Adam`` (lr, betas, eps, weight_decay, ...).

    ``nonfinite``: what a non-finite (NaN/inf) gradient does, as in
    :class:`~lipschitz_ext.optim.Muon`: ``"raise"`` (default) skips the whole step --
    weights, moments and step counts kept exactly -- and raises :class:`~lipschitz_ext.optim.muon.NonFiniteGradient` (a RuntimeError) naming
    the group and shapes; ``"skip"`` skips it silently (:attr:`skipped_steps` counts it);
    ``"ignore"`` does no check (NaNs reach the weights). The check costs one host sync.

    ``update_norm`` is passed as 0 (Adam's step has no spectral bound), ``decay`` as
    ``lr * weight_decay``; a group with ``lr == 0`` is left exactly as it is (no constraint call). DTensor weights must be sharded on dim 0 (whole rows
    locally, as FSDP2 does) or replicated; the constraint then acts on local rows.
    Constraint state lives in ``self.state[p]["constraint.<key>"]`` (leading dim 1).
    """

    STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
    GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params: Iterable[Any], constraint: Any = None, nonfinite: str = "raise",
                 **adam_kwargs: Any) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"ConstrainedAdam: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        super().__init__(params, **adam_kwargs)
        self.defaults["constraint"] = constraint
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        for g in self.param_groups:
            g.setdefault("constraint", constraint)
            self._check_group(g)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "constraint" in self.defaults:  # not during Adam.__init__ (checked there after)
            self.param_groups[-1].setdefault("constraint", self.defaults["constraint"])
            self._check_group(self.param_groups[-1])

    @staticmethod
    def _check_group(g: dict[str, Any]) -> None:
        c = g["constraint"]
        if c is None:
            return
        if not callable(getattr(c, "apply_", None)):
            raise TypeError(f"ConstrainedAdam: constraint must have an apply_ method, got {type(c).__name__}")
        for p in g["params"]:
            if is_dtensor(p) and p.dim() == 2 and any(
                getattr(pl, "dim", 0) % 2 == 1 for pl in p.placements if pl.is_shard()
            ):
                raise ValueError(
                    "ConstrainedAdam: a constrained DTensor weight must be sharded on dim 0 "
                    f"(whole rows per rank), got placements {p.placements}"
                )

    def check_group_hyper(self, group: dict[str, Any], gi: int) -> None:
        """Refuse a non-finite or negative lr/eps/weight_decay, or betas outside [0, 1).

        torch.optim.Adam checks these only at construction; schedulers and users set
        ``group["lr"]`` later, so every step re-checks.
        """
        for key in ("lr", "eps", "weight_decay"):
            v = float(group[key])
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"ConstrainedAdam: {key} of param group {gi} must be finite and >= 0, "
                                 f"got {group[key]!r}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"ConstrainedAdam: betas of param group {gi} must be two numbers in [0, 1), "
                             f"got {betas!r}")

    def nonfinite_groups(self) -> list[tuple[int, list[tuple[int, ...]]]]:
        """``[(group index, [shapes])]`` of the groups with a NaN/inf gradient now (one host sync)."""
        return nonfinite_grads(self.param_groups)

    @torch.no_grad()
    def step(self, closure=None, *, checked: bool = False):
        """Adam's step, then the constraints; returns ``closure()``'s loss if given. A
        non-finite gradient skips the whole step (``nonfinite``, see the class);
        ``checked=True``: the caller has just found every gradient finite (as
        :class:`~lipschitz_ext.optim.OptimizerSet` does), so the check is not repeated."""
        for gi, group in enumerate(self.param_groups):
            self.check_group_hyper(group, gi)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        else:
            loss = None
        if self.nonfinite != "ignore" and not checked:
            bad = self.nonfinite_groups()
            if bad:
                self.skipped_steps += 1
                if self.nonfinite == "raise":
                    raise NonFiniteGradient(f"ConstrainedAdam: {describe_nonfinite(bad)}; the step was skipped, nothing "
                                       "was changed; pass nonfinite='skip' to skip such steps silently or 'ignore' "
                                       "to disable the check")
                return loss
        super().step()
        for group in self.param_groups:
            c = group["constraint"]
            if c is None:
                continue
            lr = float(group["lr"])
            if lr == 0.0:
                continue  # Adam moved nothing; a constraint would read update_norm 0 as "no bound"
            decay = lr * float(group["weight_decay"])
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None and p.dim() == 2:
                    v = local_tensor(p)
                    buckets.setdefault((tuple(v.shape), v.dtype, v.device), []).append(p)
            for ps in buckets.values():
                values = [local_tensor(p) for p in ps]
                states = [self.state[p] for p in ps]
                pieces = overlaps([1] * len(ps), 0, len(ps))
                W = torch.stack(values)
                cstate = gather_cstate(states, pieces, full=True)
                c.apply_(W, lr=lr, update_norm=0.0, decay=decay, state=cstate)
                torch._foreach_copy_(values, list(W.unbind(0)))
                scatter_cstate(states, pieces, cstate, full=True)
        return loss
