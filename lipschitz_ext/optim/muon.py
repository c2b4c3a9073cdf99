"""Muon with shape bucketing and weight constraints (REFERENCE.md sections 2-3).

One step of a param group:

1. momentum on every parameter at once (``torch._foreach_lerp_``):
   ``buf <- mu buf + (1 - mu) g``; the direction is ``(1 - mu) g + mu buf`` with
   Nesterov (as torch.optim.Muon and the paper's PyTorch runs) or ``buf`` (EMA);
2. same-shape matrices are stacked into ``[K, m, n]`` buckets and each bucket is
   orthogonalized by ONE ``lipschitz_ext.ops.orthogonalize`` call;
3. ``W <- (1 - lr wd) W - lr * scale * O`` with ``scale`` from ``update_scale``
   (default ``sqrt(fan_out / fan_in)``: a unit RMS->RMS step);
4. ONE constraint call per bucket: ``constraint.apply_(W, lr=lr, update_norm=mu,
   decay=lr*wd, state=...)`` with ``mu = lr * p_max * scale / sqrt(m / n) * 1.05``,
   the bound on the step's change of ``W' = W / sqrt(m / n)`` (``p_max`` =
   :func:`lipschitz_ext.ops.ns_max_gain`), so the soft-cap coupling is automatic.

Distributed (see :mod:`lipschitz_ext.optim.distributed`): replicated parameters
(DDP) split each bucket's matrices over the ranks and all-gather the results;
FSDP2 parameters (DTensor, sharded on a matrix dim) are redistributed by
all-to-all so each rank owns whole matrices, then sent back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..ops import ns_max_gain, orthogonalize
from . import distributed as _dist
from .bucket import Bucket, Entry, gather_cstate, overlaps, scatter_cstate, stack
from .state import ConstraintGroupsMixin

__all__ = ["Muon", "UPDATE_SCALES", "update_scale_factor"]

#: Accepted values of ``update_scale``.
UPDATE_SCALES = ("fan_ratio", "none", "original", "match_rms_adamw")
NONFINITE_POLICIES = ("raise", "skip", "ignore")
DISTRIBUTED_MODES = ("auto", "replicated", "none")


def update_scale_factor(mode: str, m: int, n: int) -> float:
    """The factor multiplying ``lr * orthogonalize(M)`` for an ``m x n`` matrix.

    ``"fan_ratio"``: ``sqrt(m / n)`` (``m`` = fan_out), the paper's RMS->RMS-unit step;
    ``"none"``: 1; ``"original"``: ``sqrt(max(1, m / n))`` and ``"match_rms_adamw"``:
    ``0.2 * sqrt(max(m, n))`` -- torch.optim.Muon's ``adjust_lr_fn`` modes.
    """
    if mode == "fan_ratio":
        return math.sqrt(m / n)
    if mode == "none":
        return 1.0
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"Muon: update_scale must be one of {UPDATE_SCALES}, got {mode!r}")


def _real(group: dict[str, Any], key: str, gi: int) -> float:
    v = group[key]
    try:
        x = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"Muon: {key} of param group {gi} must be a real number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"Muon: {key} of param group {gi} must be finite, got {v!r}")
    return x


def check_hyper(group: dict[str, Any], gi: int) -> None:
    """Refuse a param group's bad hyper-parameters with a ValueError/TypeError naming them.

    Run when a group is added and again at every step, since schedulers and users
    change ``group["lr"]`` etc. after construction.
    """
    if not _real(group, "lr", gi) >= 0.0:
        raise ValueError(f"Muon: lr of param group {gi} must be >= 0, got {group['lr']}")
    if not 0.0 <= _real(group, "momentum", gi) < 1.0:
        raise ValueError(f"Muon: momentum of param group {gi} must be in [0, 1), got {group['momentum']}")
    if not _real(group, "weight_decay", gi) >= 0.0:
        raise ValueError(f"Muon: weight_decay of param group {gi} must be >= 0, got {group['weight_decay']}")
    if not _real(group, "eps", gi) >= 0.0:
        raise ValueError(f"Muon: eps of param group {gi} must be >= 0, got {group['eps']}")
    if not _real(group, "update_norm_safety", gi) > 0.0:
        raise ValueError(f"Muon: update_norm_safety of param group {gi} must be > 0, "
                         f"got {group['update_norm_safety']}")
    if int(group["ns_steps"]) < 1:
        raise ValueError(f"Muon: ns_steps of param group {gi} must be >= 1, got {group['ns_steps']!r}")
    if group["update_scale"] not in UPDATE_SCALES:
        raise ValueError(f"Muon: update_scale must be one of {UPDATE_SCALES}, got {group['update_scale']!r}")
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(f"Muon: nonfinite must be one of {NONFINITE_POLICIES}, got {group['nonfinite']!r}")


def _coeff_key(coefficients) -> Any:
    if isinstance(coefficients, str):
        return coefficients
    return tuple(tuple(float(x) for x in t) for t in coefficients)


def _local(t: torch.Tensor) -> torch.Tensor:
    return _dist.local_tensor(t)


class Muon(ConstraintGroupsMixin, torch.optim.Optimizer):
    """Batched, constraint-aware Muon for 2-D and batched ``[..., m, n]`` weights.

    Args:
        params: parameters or param-group dicts. Every parameter needs ``ndim >= 2``
            (the last two dims are ``(fan_out, fan_in)``, PyTorch's Linear layout;
            leading dims are independent matrices). Any dtype; sparse and complex
            are rejected.
        lr: learning rate (float >= 0; LR schedulers work on ``group["lr"]``; every
            step re-checks the groups' hyper-parameters and refuses bad ones). With
            ``lr == 0`` momentum still accumulates but weights are left exactly as
            they are (no constraint call).
        momentum: ``mu`` in ``buf <- mu buf + (1 - mu) g`` (schedule it through
            ``group["momentum"]`` for the paper's 0.85 -> 0.95 warm-up).
        nesterov: direction ``(1 - mu) g + mu buf`` (True) or ``buf`` (False, EMA).
        ns_steps, coefficients, eps: passed to :func:`lipschitz_ext.ops.orthogonalize`
            (eps is added to the Frobenius normalizer; torch.optim.Muon clamps by it
            instead, a difference below 1e-7 relative for non-tiny gradients).
        weight_decay: decoupled, ``W <- (1 - lr * weight_decay) W`` before the update.
        constraint: a ``lipschitz_ext.constraints.Constraint`` (anything with
            ``apply_(W, *, lr, update_norm, decay, state)``), a name for
            ``constraints.make_constraint``, or None.
        update_scale: one of :data:`UPDATE_SCALES`, see :func:`update_scale_factor`.
        update_norm_safety: multiplies the update-norm bound passed to the constraint.
        nonfinite: what a non-finite gradient in a group does: ``"raise"`` (default,
            RuntimeError naming the parameters; costs one host sync per group and
            step), ``"skip"`` (the group's step is skipped -- momentum and weights
            untouched -- and ``self.skipped_steps`` counts it), or ``"ignore"`` (no
            check, no sync: NaNs propagate).
        distributed: ``"auto"`` (default): DTensor parameters use their mesh
            (FSDP2 sharded or replicated), plain parameters are treated as
            replicated (DDP) when torch.distributed is initialized with more than
            one rank in ``process_group``; ``"replicated"`` demands that;
            ``"none"`` never communicates for plain parameters.
        process_group: group for plain replicated parameters (default WORLD).

    State per parameter ``p`` (``self.state[p]``): ``"momentum_buffer"`` (like ``p``,
    a DTensor for DTensor params) and ``"constraint.<key>"`` for each tensor the
    constraint keeps (leading dim = number of ``p``'s matrices that this rank
    stores state for: all of them, except FSDP2-sharded matrices whose state lives
    on the rank that owns the matrix). ``state_dict()`` stores a group's constraint
    by its name; ``load_state_dict`` keeps the constraint objects of this optimizer
    and restores constraint state tensors in their saved dtype.
    """

    STATE_KEYS = ("momentum_buffer",)
    GROUP_KEYS = ("lr", "momentum", "nesterov", "ns_steps", "coefficients", "weight_decay", "update_scale")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        coefficients: Union[str, Iterable[Iterable[float]]] = "polar_express",
        weight_decay: float = 0.0,
        constraint: Any = None,
        update_scale: str = "fan_ratio",
        *,
        eps: float = 1e-7,
        update_norm_safety: float = 1.05,
        nonfinite: str = "raise",
        distributed: str = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"Muon: distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")
        self.distributed = distributed
        self.process_group = process_group
        self.skipped_steps = 0
        self._pmax_cache: dict[Any, float] = {}
        self._layout_cache: dict[Any, dict] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            coefficients=coefficients,
            weight_decay=weight_decay,
            constraint=constraint,
            update_scale=update_scale,
            eps=eps,
            update_norm_safety=update_norm_safety,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if isinstance(g["constraint"], str):
            from .. import constraints  # lazy: optim must import without it

            g["constraint"] = constraints.make_constraint(g["constraint"])
        c = g["constraint"]
        if c is not None and not callable(getattr(c, "apply_", None)):
            raise TypeError(f"Muon: constraint must have an apply_ method, got {type(c).__name__}")
        check_hyper(g, len(self.param_groups) - 1)
        for i, p in enumerate(g["params"]):
            if p.dim() < 2:
                raise ValueError(
                    f"Muon: parameter {i} of param group {len(self.param_groups) - 1} has shape "
                    f"{tuple(p.shape)}; Muon needs matrices [..., fan_out, fan_in]. Optimize "
                    "vectors and scalars with Adam (lipschitz_ext.optim.build_optimizers does this)."
                )
            if p.is_complex():
                raise ValueError(f"Muon: parameter {i} is complex; Muon supports real weights only")
            if not _local(p).is_contiguous():
                raise ValueError(
                    f"Muon: parameter {i} (shape {tuple(p.shape)}) is not contiguous; the optimizer "
                    "updates weights through [count, m, n] views"
                )
            _dist.check_placements(p)

    def check_group_hyper(self, group: dict[str, Any], gi: int) -> None:
        """:func:`check_hyper` (used after ``load_state_dict``)."""
        check_hyper(group, gi)

    def p_max(self, ns_steps: int, coefficients) -> float:
        """Cached :func:`lipschitz_ext.ops.ns_max_gain` for a group's settings."""
        key = (int(ns_steps), _coeff_key(coefficients))
        if key not in self._pmax_cache:
            self._pmax_cache[key] = ns_max_gain(int(ns_steps), coefficients)
        return self._pmax_cache[key]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every param group; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _step_group(self, gi: int, group: dict[str, Any]) -> None:
        check_hyper(group, gi)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon: sparse gradients are not supported (use dense gradients)")
        modes = [_dist.classify(p, self.distributed, self.process_group) for p in params]
        grads = [_local(p.grad) for p in params]
        if group["nonfinite"] != "ignore" and not self._grads_finite(gi, group, params, grads, modes):
            return
        mom = float(group["momentum"])
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(_local(st["momentum_buffer"]))
        torch._foreach_lerp_(bufs, grads, 1.0 - mom)

        buckets: dict[tuple, Bucket] = {}
        for p, g, b, mode in zip(params, grads, bufs, modes):
            v = _local(p)
            a, bb = v.shape[-2], v.shape[-1]
            count = math.prod(v.shape[:-2])
            m, n = p.shape[-2], p.shape[-1]
            key = (mode, m, n, p.dtype, v.device)
            shape3 = (count, a, bb)
            e = Entry(p, v.view(shape3), g.reshape(shape3), b.view(shape3), count, self.state[p])
            buckets.setdefault(key, Bucket(key)).entries.append(e)
        for key, bucket in buckets.items():
            self._step_bucket(gi, group, bucket, key[0])

    def _grads_finite(self, gi, group, params, grads, modes) -> bool:
        # max |g| (not the 2-norm): it is inf/NaN only for a non-finite entry, never
        # by overflow of finite ones (the 2-norm of float32 entries ~4e18 is inf).
        nonempty = [g for g in grads if g.numel() > 0]
        amax = torch._foreach_norm(nonempty, float("inf")) if nonempty else []
        it = iter(amax)
        bad = ~torch.isfinite(torch.stack(
            [next(it).float() if g.numel() > 0 else torch.zeros((), device=g.device) for g in grads]))
        flag = bad.any().to(torch.int32)
        for pg in _dist.groups_of(modes):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        if not bool(flag):
            return True
        if group["nonfinite"] == "skip":
            self.skipped_steps += 1
            return False
        where = [f"{tuple(p.shape)}" for p, b in zip(params, bad.tolist()) if b]
        raise RuntimeError(
            f"Muon: non-finite gradient in param group {gi} "
            f"(local parameters with shapes {where or 'on another rank'}); "
            "pass nonfinite='skip' to skip such steps or 'ignore' to disable the check"
        )

    def bucket_hyper(self, group: dict[str, Any], m: int, n: int) -> dict[str, Any]:
        """Per-bucket scalars: lr, decay, update scale and the update-norm bound ``mu``."""
        lr = float(group["lr"])
        wd = float(group["weight_decay"])
        scale = update_scale_factor(group["update_scale"], m, n)
        p_max = self.p_max(group["ns_steps"], group["coefficients"])
        mu = lr * p_max * (scale / math.sqrt(m / n)) * float(group["update_norm_safety"])
        return dict(lr=lr, wd=wd, scale=scale, mu=mu)

    def direction(self, group: dict[str, Any], entries: list[Entry], pieces) -> torch.Tensor:
        """Stack the momentum directions of ``pieces`` into ``[k, a, b]``."""
        bufs = [e.buf for e in entries]
        if not group["nesterov"]:
            return stack(bufs, pieces)
        G = stack([e.grad for e in entries], pieces)
        return G.lerp_(stack(bufs, pieces).to(G.dtype), float(group["momentum"]))

    def update_(self, group: dict[str, Any], W: torch.Tensor, G: torch.Tensor, hyper: dict,
                cstate: dict) -> None:
        """``W <- constraint((1 - lr wd) W - lr scale orthogonalize(G))`` for a stack, in place."""
        if W.shape[0] == 0:
            return
        O = orthogonalize(G, group["ns_steps"], group["coefficients"], group["eps"])
        lr, wd = hyper["lr"], hyper["wd"]
        W.mul_(1.0 - lr * wd)
        W.add_(O.to(W.dtype), alpha=-lr * hyper["scale"])
        c = group["constraint"]
        if c is not None:
            c.apply_(W, lr=lr, update_norm=hyper["mu"], decay=lr * wd, state=cstate)

    def _step_bucket(self, gi: int, group: dict[str, Any], bucket: Bucket, mode) -> None:
        m, n = bucket.key[1], bucket.key[2]
        hyper = self.bucket_hyper(group, m, n)
        if hyper["lr"] == 0.0:
            # lr = 0 moves no weight: no update and no constraint call (a zero update
            # norm would read as "no bound given" and the soft cap would shrink W).
            # Every rank sees the same lr, so the collectives stay matched.
            return
        if mode.kind == "replicated":
            _dist.replicated_step(self, gi, group, bucket, hyper, mode)
        elif mode.kind == "sharded":
            _dist.sharded_step(self, gi, group, bucket, hyper, mode)
        else:
            self._local_step(group, bucket, hyper)

    def _local_step(self, group: dict[str, Any], bucket: Bucket, hyper: dict) -> None:
        entries = bucket.entries
        pieces = overlaps([e.count for e in entries], 0, bucket.size)
        G = self.direction(group, entries, pieces)
        values = [e.value for e in entries]
        if group["constraint"] is None:
            # No constraint: update the parameters in place, no weight stack.
            O = orthogonalize(G, group["ns_steps"], group["coefficients"], group["eps"])
            lr, wd = hyper["lr"], hyper["wd"]
            torch._foreach_mul_(values, 1.0 - lr * wd)
            Os = [o.to(v.dtype) for o, v in zip(O.split([e.count for e in entries]), values)]
            torch._foreach_add_(values, Os, alpha=-lr * hyper["scale"])
            return
        states = [e.state for e in entries]
        W = stack(values, pieces)
        cstate = gather_cstate(states, pieces, full=True)
        self.update_(group, W, G, hyper, cstate)
        torch._foreach_copy_(values, list(W.split([e.count for e in entries])))
        scatter_cstate(states, pieces, cstate, full=True)
