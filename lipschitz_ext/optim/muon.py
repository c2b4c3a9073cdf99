"""Muon with shape bucketing and weight constraints (docs/theory.md, sections 2-4).

One step of a param group:

1. momentum, per same-shape bucket ``[K, m, n]`` in one op: the momentum buffers
   of a bucket's parameters are views into one stacked tensor, prepared once
   (:class:`_BucketPlan`), the gradients are stacked into a buffer also prepared
   once; ``buf <- mu buf + (1 - mu) g``; the direction is ``(1 - mu) g + mu buf``
   with Nesterov (as torch.optim.Muon and the paper's PyTorch runs) or ``buf`` (EMA);
2. each bucket is orthogonalized by ONE ``lipschitz_ext.ops.orthogonalize`` call,
   in bf16 (fp32 accumulation) where the hardware multiplies bf16 natively
   (``ns_dtype="auto"``, :func:`resolve_ns_dtype`), else float32;
3. ``W <- (1 - lr wd) W - lr * scale * O`` with ``scale`` from ``update_scale``
   (default ``sqrt(fan_out / fan_in)``: a unit RMS->RMS step);
4. ONE constraint call per bucket: ``constraint.apply_(W, lr=lr, update_norm=mu,
   decay=lr*wd, state=...)`` with ``mu = lr * p_max * scale / sqrt(m / n) * 1.05``,
   the bound on the step's change of ``W' = W / sqrt(m / n)`` (``p_max`` =
   :func:`lipschitz_ext.ops.ns_max_gain`), so the soft-cap coupling is automatic.

No host syncs: the non-finite-gradient check runs on the device and a bad step
is skipped there (weights, momentum and constraint state kept bit for bit);
``nonfinite="raise"`` reports it at the next ``step()`` (or
:meth:`Muon.check_nonfinite`), so a step is capturable in a CUDA graph.

Distributed (see :mod:`lipschitz_ext.optim.distributed`): replicated parameters
(DDP) split each bucket's matrices over the ranks and all-gather the results;
FSDP2 parameters (DTensor, sharded on a matrix dim) are redistributed by
all-to-all so each rank owns whole matrices, then sent back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union, get_args

import torch
import torch.distributed as dist

import functools
from dataclasses import dataclass, field

from .. import constraints
from ..constraints import Constraint
from ..ops import ns_max_gain, orthogonalize
from ..ops.choices import choose
from . import distributed as _dist
from .bucket import Bucket, Entry, gather_cstate, overlaps, scatter_cstate, stack
from .state import ConstraintGroupsMixin

__all__ = ["Muon", "NonFiniteGradient", "NS_DTYPES", "UPDATE_SCALES", "DISTRIBUTED_MODES", "NONFINITE_POLICIES",
           "UpdateScale", "NsDtype", "DistributedMode", "NonFinitePolicy", "resolve_ns_dtype", "update_scale_factor"]

#: How the orthogonalized update is scaled for an ``m x n`` matrix (:func:`update_scale_factor`).
UpdateScale = Literal["fan_ratio", "none", "original", "match_rms_adamw"]
#: What a step does with a NaN/inf gradient.
NonFinitePolicy = Literal["raise", "skip", "ignore"]
#: How parameters are laid out across ranks (``"auto"``: from the parameters and torch.distributed).
DistributedMode = Literal["auto", "replicated", "none"]
#: The Newton-Schulz compute dtype (``"auto"``: the measured rule of :mod:`lipschitz_ext.ops.choices`).
NsDtype = Literal["auto", "bfloat16", "float32"]

#: Accepted values of ``update_scale``.
UPDATE_SCALES: tuple[str, ...] = get_args(UpdateScale)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)


class NonFiniteGradient(RuntimeError):
    """A step skipped for a NaN/inf gradient under ``nonfinite="raise"`` (nothing was changed)."""
DISTRIBUTED_MODES: tuple[str, ...] = get_args(DistributedMode)
#: Accepted values of ``ns_dtype`` (the Newton-Schulz compute dtype).
NS_DTYPES: tuple[str, ...] = get_args(NsDtype)


@functools.lru_cache(maxsize=None)
def _resolve(ns_dtype: str, device: str, param_dtype: torch.dtype, shape: tuple[int, int],
             threads: int) -> torch.dtype:
    if ns_dtype == "bfloat16":
        return torch.bfloat16
    if ns_dtype == "float32":
        return torch.float32
    if param_dtype == torch.float64:
        return torch.float64
    return getattr(torch, choose("ns_dtype", device, param_dtype, shape, threads))


def resolve_ns_dtype(ns_dtype: str, device: Union[torch.device, str] = "cpu",
                     param_dtype: torch.dtype = torch.float32,
                     shape: Optional[tuple[int, int]] = None) -> torch.dtype:
    """The dtype Muon's Newton-Schulz GEMMs run in for ``ns_dtype`` on ``device``.

    ``"bfloat16"`` / ``"float32"``: that dtype. ``"auto"``: float64 for float64
    parameters, else the measured rule ``lipschitz_ext.ops.choices.choose("ns_dtype", ...)``
    for ``device``, the parameters' dtype, the current thread count and ``shape`` (the
    ``(m, n)`` of the matrices; None: a rule independent of the shape). docs/benchmarks.md
    shows the table.
    """
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"Muon: ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
    m, n = (0, 0) if shape is None else (int(shape[-2]), int(shape[-1]))
    return _resolve(ns_dtype, str(torch.device(device)), param_dtype, (m, n), torch.get_num_threads())


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
    if not isinstance(group["ns_dtype"], str) or group["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"Muon: ns_dtype of param group {gi} must be one of {NS_DTYPES}, got {group['ns_dtype']!r}")


def _coeff_key(coefficients) -> Any:
    if isinstance(coefficients, str):
        return coefficients
    return tuple(tuple(float(x) for x in t) for t in coefficients)


def _local(t: torch.Tensor) -> torch.Tensor:
    return _dist.local_tensor(t)


@dataclass
class _BucketPlan:
    """One same-shape bucket of a local param group, prepared once.

    ``buf`` is the stacked momentum ``[K, a, b]``: each parameter's
    ``state["momentum_buffer"]`` is a view of it (``views``), so momentum is one op
    per bucket; ``gbuf`` receives the stacked gradients every step.
    """

    key: tuple
    params: list
    counts: list
    shape3: list
    buf: torch.Tensor
    gbuf: torch.Tensor
    views: list

    @property
    def m(self) -> int:
        return self.key[1]

    @property
    def n(self) -> int:
        return self.key[2]


@dataclass
class _GroupPlan:
    """The buckets of one param group for one set of parameters with gradients."""

    params: tuple
    local: bool
    modes: list
    buckets: list = field(default_factory=list)
    matrices: int = 0


@dataclass
class _NonFinite:
    """Device-side record of a group's skipped steps (read lazily: no sync per step).

    ``count``: group-steps skipped; ``bad``: per stacked matrix of ``plan``, whether
    its gradient was non-finite in any skipped step; ``host`` mirrors ``count`` on
    the host (an async copy on CUDA, landed when ``event`` has completed).
    """

    count: torch.Tensor
    bad: Optional[torch.Tensor] = None
    plan: Optional[_GroupPlan] = None
    host: Optional[torch.Tensor] = None
    event: Any = None
    reported: int = 0


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
        ns_dtype: the Newton-Schulz compute dtype, one of :data:`NS_DTYPES`:
            ``"auto"`` (default: the measured rule of docs/benchmarks.md per device,
            dtype, thread count and shape -- bf16 GEMMs with fp32 accumulation where
            the hardware multiplies bf16 natively, float32 elsewhere, until a
            measurement says otherwise -- float64 for float64 weights;
            :func:`resolve_ns_dtype`),
            ``"bfloat16"`` or ``"float32"``. The constraint runs in its own precision
            either way. :attr:`ns_dtype_resolved` names what it resolved to.
        update_norm_safety: multiplies the update-norm bound passed to the constraint
            (it also covers bf16 Newton-Schulz: singular values within ~1% of ``p_max``).
        nonfinite: what a non-finite gradient in a group does. The check runs on the
            device (max and min per matrix: huge finite entries pass) and costs no
            host sync; a bad group's step is skipped
            there -- momentum, weights and constraint state kept bit for bit (a
            first step's momentum buffer is created as zeros). ``"raise"``
            (default): the next ``step()`` raises RuntimeError naming the group and
            parameters before it touches anything (on CUDA, the first step after the
            flag's asynchronous copy has landed, normally the next one; under CUDA
            graph capture only :meth:`check_nonfinite`); :meth:`check_nonfinite`
            raises at once (one sync). ``"skip"``: skipped silently,
            :attr:`skipped_steps` counts it. ``"ignore"``: no check: NaNs propagate.
        distributed: ``"auto"`` (default): DTensor parameters use their mesh
            (FSDP2 sharded or replicated), plain parameters are treated as
            replicated (DDP) when torch.distributed is initialized with more than
            one rank in ``process_group``; ``"replicated"`` demands that;
            ``"none"`` never communicates for plain parameters.
        process_group: group for plain replicated parameters (default WORLD).

    State per parameter ``p`` (``self.state[p]``): ``"momentum_buffer"`` (like ``p``,
    a DTensor for DTensor params; for local parameters a view into its bucket's
    stacked buffer) and ``"constraint.<key>"`` for each tensor the
    constraint keeps (leading dim = number of ``p``'s matrices that this rank
    stores state for: all of them, except FSDP2-sharded matrices whose state lives
    on the rank that owns the matrix). ``state_dict()`` stores a group's constraint
    by its name; ``load_state_dict`` keeps the constraint objects of this optimizer
    and restores constraint state tensors in their saved dtype; loaded momentum is
    copied into fresh stacked buffers at the next step (bit-exact resume).

    CUDA graphs: after a warm-up step (which prepares the buckets and state), a
    step of local parameters launches no host sync and allocates only
    intermediates, so it can be captured and replayed; python-float hyper-parameters
    (lr, momentum) are baked into the graph at capture time.
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
        constraint: Constraint | str | None = None,
        update_scale: UpdateScale = "fan_ratio",
        *,
        ns_dtype: NsDtype = "auto",
        eps: float = 1e-7,
        update_norm_safety: float = 1.05,
        nonfinite: NonFinitePolicy = "raise",
        distributed: DistributedMode = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"Muon: distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")
        if not isinstance(ns_dtype, str) or ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon: ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
        self.distributed = distributed
        self.process_group = process_group
        self._pmax_cache: dict[Any, float] = {}
        self._layout_cache: dict[Any, dict] = {}
        self._plans: dict[int, _GroupPlan] = {}
        self._nonfinite: dict[int, _NonFinite] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            coefficients=coefficients,
            weight_decay=weight_decay,
            constraint=constraint,
            update_scale=update_scale,
            ns_dtype=ns_dtype,
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
            g["constraint"] = constraints.make_constraint(g["constraint"])
        c = g["constraint"]
        if c is not None and not callable(getattr(c, "apply_", None)):
            raise TypeError(f"Muon: constraint must have an apply_ method, got {type(c).__name__}")
        check_hyper(g, len(self.param_groups) - 1)
        self.p_max(g["ns_steps"], g["coefficients"])  # a host computation: not inside step()
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does; the buckets are prepared again at the next step.

        Momentum buffers are copied now (a live optimizer's state dict shares its
        tensors) and go into fresh stacked buffers at the next step.
        """
        super().load_state_dict(state_dict)
        self._plans.clear()
        for st in self.state.values():
            buf = st.get("momentum_buffer")
            if isinstance(buf, torch.Tensor) and not _dist.is_dtensor(buf):
                st["momentum_buffer"] = buf.clone()

    def p_max(self, ns_steps: int, coefficients) -> float:
        """Cached :func:`lipschitz_ext.ops.ns_max_gain` for a group's settings."""
        key = (int(ns_steps), _coeff_key(coefficients))
        if key not in self._pmax_cache:
            self._pmax_cache[key] = ns_max_gain(int(ns_steps), coefficients)
        return self._pmax_cache[key]

    @property
    def ns_dtype_resolved(self) -> str:
        """The Newton-Schulz compute dtype(s) in use, e.g. ``"bfloat16"``.

        Resolved per group from ``group["ns_dtype"]`` and its parameters' device and
        dtype (:func:`resolve_ns_dtype`); several distinct values are joined by
        ``","`` in sorted order. For a run folder's record.
        """
        names = set()
        for g in self.param_groups:
            for p in g["params"]:
                v = _local(p)
                names.add(str(resolve_ns_dtype(g["ns_dtype"], v.device, v.dtype)).removeprefix("torch."))
        return ",".join(sorted(names))

    @property
    def skipped_steps(self) -> int:
        """Group-steps skipped for non-finite gradients (``"skip"`` or ``"raise"``).

        Counted on the device; reading this is one host sync per group.
        """
        return sum(int(nf.count.item()) for nf in self._nonfinite.values())

    def check_nonfinite(self) -> None:
        """Raise now (RuntimeError) for a skipped non-finite step of a ``"raise"`` group
        not yet reported; one host sync per such group."""
        for gi, nf in self._nonfinite.items():
            if gi < len(self.param_groups) and self.param_groups[gi]["nonfinite"] == "raise":
                self._report(gi, nf, int(nf.count.item()))

    def _report(self, gi: int, nf: _NonFinite, count: int) -> None:
        if count <= nf.reported:
            return
        nf.reported = count
        where = "on another rank"
        if nf.bad is not None and nf.plan is not None:
            flags = iter(nf.bad.tolist())
            shapes = []
            if nf.plan.local:  # one flag per stacked matrix, bucket by bucket
                for b in nf.plan.buckets:
                    for p, c in zip(b.params, b.counts):
                        if any([next(flags) for _ in range(c)]):
                            shapes.append(f"{tuple(p.shape)}")
            else:  # one flag per parameter
                shapes = [f"{tuple(p.shape)}" for p, bad in zip(nf.plan.params, flags) if bad]
            where = shapes or where
        raise NonFiniteGradient(
            f"Muon: non-finite gradient in param group {gi} "
            f"(local parameters with shapes {where}); the step was skipped, nothing was changed; "
            "pass nonfinite='skip' to skip such steps silently or 'ignore' to disable the check"
        )

    def _raise_deferred(self) -> None:
        """Report a ``"raise"`` group's skipped step whose host copy has landed (no sync)."""
        for gi, nf in self._nonfinite.items():
            if nf.host is None or gi >= len(self.param_groups) or self.param_groups[gi]["nonfinite"] != "raise":
                continue
            if nf.event is not None and not nf.event.query():
                continue  # not landed yet: the next step looks again
            self._report(gi, nf, int(nf.host.numpy()[0]))  # a host tensor: no device sync

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every param group; returns ``closure()``'s loss if given."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._raise_deferred()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, capturing)
        return loss

    def _plan(self, gi: int, params: list) -> _GroupPlan:
        """The group's buckets for this parameter set (cached; rebuilt when it changes)."""
        key = tuple(params)
        plan = self._plans.get(gi)
        if plan is not None and len(plan.params) == len(key) and all(a is b for a, b in zip(plan.params, key)):
            if not plan.local or all(self._views_current(b) for b in plan.buckets):
                return plan
            return self._rebuild(gi, plan)
        modes = [_dist.classify(p, self.distributed, self.process_group) for p in params]
        local = all(m.kind == "local" for m in modes) and not any(_dist.is_dtensor(p) for p in params)
        plan = _GroupPlan(key, local, modes)
        return self._rebuild(gi, plan)

    def _views_current(self, b: _BucketPlan) -> bool:
        return all(self.state[p].get("momentum_buffer") is v for p, v in zip(b.params, b.views))

    def _rebuild(self, gi: int, plan: _GroupPlan) -> _GroupPlan:
        plan.buckets = []
        if plan.local:
            groups: dict[tuple, list] = {}
            for p in plan.params:
                groups.setdefault((_dist.LOCAL, p.shape[-2], p.shape[-1], p.dtype, p.device), []).append(p)
            for key, ps in groups.items():
                m, n = key[1], key[2]
                counts = [math.prod(p.shape[:-2]) for p in ps]
                K = sum(counts)
                buf = torch.zeros((K, m, n), dtype=key[3], device=key[4])
                views, lo = [], 0
                for p, c in zip(ps, counts):
                    old = self.state[p].get("momentum_buffer")
                    view = buf[lo:lo + c].view(p.shape)
                    if old is not None:
                        view.copy_(old)  # loaded / earlier momentum, bit for bit
                    self.state[p]["momentum_buffer"] = view
                    views.append(view)
                    lo += c
                plan.buckets.append(_BucketPlan(key, ps, counts, [(c, m, n) for c in counts], buf,
                                                torch.empty_like(buf), views))
            plan.matrices = sum(sum(b.counts) for b in plan.buckets)
        self._plans[gi] = plan
        return plan

    def _step_group(self, gi: int, group: dict[str, Any], capturing: bool = False) -> None:
        check_hyper(group, gi)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon: sparse gradients are not supported (use dense gradients)")
        plan = self._plan(gi, params)
        gated = group["nonfinite"] != "ignore"
        if plan.local:
            self._local_group_step(gi, group, plan, gated, capturing)
        else:
            self._distributed_group_step(gi, group, plan, gated, capturing)

    # ---------------------------------------------------------- non-finite gate
    def _record(self, gi: int, group: dict, plan: _GroupPlan, ok: torch.Tensor, bad: Optional[torch.Tensor],
                capturing: bool) -> None:
        """Count a skipped step on the device and mirror the count to the host asynchronously."""
        nf = self._nonfinite.get(gi)
        if nf is None:
            nf = self._nonfinite[gi] = _NonFinite(torch.zeros((), dtype=torch.int64, device=ok.device))
        nf.count += (~ok).to(torch.int64)
        if bad is not None:
            if nf.plan is not plan or nf.bad is None or nf.bad.shape != bad.shape:
                nf.plan, nf.bad = plan, torch.zeros_like(bad)
            nf.bad |= bad
        if capturing or group["nonfinite"] != "raise":
            return
        if nf.count.device.type == "cuda":
            if nf.host is None:
                nf.host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            nf.host.copy_(nf.count.view(1), non_blocking=True)
            nf.event = torch.cuda.Event()
            nf.event.record()
        else:
            nf.host = nf.count.view(1)  # already on the host

    # ---------------------------------------------------------- local (fast) path
    def _local_group_step(self, gi: int, group: dict, plan: _GroupPlan, gated: bool, capturing: bool) -> None:
        mom = float(group["momentum"])
        grads = []
        for b in plan.buckets:
            gs = [p.grad.view(s) if p.grad.is_contiguous() else p.grad.reshape(s) for p, s in zip(b.params, b.shape3)]
            if len(gs) == 1:
                b.gbuf.copy_(gs[0])
            else:
                torch.cat(gs, out=b.gbuf)
            grads.append(b.gbuf)
        ok = None
        if gated:
            # per-matrix max and min (NaN propagates): finite iff every entry is, and
            # no overflow of finite entries (unlike a 2-norm)
            finite = [torch.isfinite(g.amax(dim=(-2, -1))) & torch.isfinite(g.amin(dim=(-2, -1))) for g in grads]
            dev0 = grads[0].device
            allfinite = torch.cat([x.to(dev0, non_blocking=True) for x in finite]) if len(finite) > 1 else finite[0]
            ok = allfinite.all()
            self._record(gi, group, plan, ok, ~allfinite, capturing)
        for b, G in zip(plan.buckets, grads):
            gate = None
            if ok is not None:
                okb = ok.to(G.device, non_blocking=True)
                gate = okb.to(G.dtype)  # 1 / 0, exact in every float dtype
                # a skipped step takes g := buf, which leaves buf exactly as it is
                G.nan_to_num_(0.0, 0.0, 0.0).lerp_(b.buf, 1.0 - gate)
            b.buf.lerp_(G, 1.0 - mom)
            hyper = self.bucket_hyper(group, b.m, b.n)
            if hyper["lr"] == 0.0:
                # lr = 0 moves no weight: no update and no constraint call (a zero update
                # norm would read as "no bound given" and the soft cap would shrink W).
                continue
            D = G.lerp_(b.buf, mom) if group["nesterov"] else b.buf
            if gate is not None:
                hyper["gate"], hyper["ok"] = gate, okb
            self._local_bucket_update(group, b, D, hyper)

    def _local_bucket_update(self, group: dict, b: _BucketPlan, D: torch.Tensor, hyper: dict) -> None:
        values = [p.view(s) for p, s in zip(b.params, b.shape3)]
        lr, wd, f = hyper["lr"], hyper["wd"], hyper["gate"]
        if group["constraint"] is None:
            # No constraint: update the parameters in place, no weight stack.
            O = self._orthogonalize(group, D).to(b.buf.dtype)
            if wd != 0.0:
                decay = 1.0 - lr * wd
                fd = None if f is None else f if f.dtype in (torch.float32, torch.float64) else f.float()
                torch._foreach_mul_(values, decay if fd is None else fd * (decay - 1.0) + 1.0)
            alpha = -lr * hyper["scale"]
            if f is None:
                torch._foreach_add_(values, list(O.split(b.counts)), alpha=alpha)
            else:
                for v, o in zip(values, O.split(b.counts)):
                    v.addcmul_(o, f, value=alpha)  # O finite: a skipped step adds exactly zero
            return
        states = [self.state[p] for p in b.params]
        pieces = overlaps(b.counts, 0, sum(b.counts))
        W = torch.cat(values) if len(values) > 1 else values[0].clone()
        cstate = gather_cstate(states, pieces, full=True)
        self.update_(group, W, D, hyper, cstate, commit_to=None)
        if f is None:
            torch._foreach_copy_(values, list(W.split(b.counts)))
        else:
            for v, w in zip(values, W.split(b.counts)):
                v.lerp_(w, f)  # f = 1: exactly w; f = 0: exactly v (both finite)
        scatter_cstate(states, pieces, cstate, full=True)

    def _orthogonalize(self, group: dict, G: torch.Tensor) -> torch.Tensor:
        dt = resolve_ns_dtype(group["ns_dtype"], G.device, G.dtype, tuple(G.shape[-2:]))
        # algorithm="auto": Gram Newton-Schulz where the measured rule says it is faster
        return orthogonalize(G, group["ns_steps"], group["coefficients"], group["eps"], compute_dtype=dt,
                             algorithm="auto")

    # ---------------------------------------------------------- distributed path
    def _distributed_group_step(self, gi: int, group: dict, plan: _GroupPlan, gated: bool, capturing: bool) -> None:
        params, modes = list(plan.params), plan.modes
        grads = [_local(p.grad) for p in params]
        ok = None
        if gated:
            ok, bad = self._grads_finite(params, grads, modes)
            self._record(gi, group, plan, ok, bad, capturing)
            grads = [torch.nan_to_num(g, 0.0, 0.0, 0.0) for g in grads]
        mom = float(group["momentum"])
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(_local(st["momentum_buffer"]))
        if ok is not None:
            # a skipped step takes g := buf, which leaves buf exactly as it is
            grads = [g.lerp_(b, 1.0 - ok.to(device=g.device, dtype=g.dtype)) for g, b in zip(grads, bufs)]
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
            self._step_bucket(gi, group, bucket, key[0], ok)

    def _grads_finite(self, params, grads, modes) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ok, bad)`` on the device: all gradients finite (agreed over the ranks), per-parameter flags."""
        # float64 sums, not the 2-norm: NaN/inf only for a non-finite entry, never
        # by overflow of finite ones (the 2-norm of float32 entries ~4e18 is inf).
        dev = grads[0].device
        bad = ~torch.stack([torch.isfinite(g.sum(dtype=torch.float64)).to(dev) for g in grads])
        flag = bad.any().to(torch.int32)
        for pg in _dist.groups_of(modes):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        return flag == 0, bad

    def bucket_hyper(self, group: dict[str, Any], m: int, n: int) -> dict[str, Any]:
        """Per-bucket scalars: lr, decay, update scale and the update-norm bound ``mu``."""
        lr = float(group["lr"])
        wd = float(group["weight_decay"])
        scale = update_scale_factor(group["update_scale"], m, n)
        p_max = self.p_max(group["ns_steps"], group["coefficients"])
        mu = lr * p_max * (scale / math.sqrt(m / n)) * float(group["update_norm_safety"])
        if not (math.isfinite(lr * scale) and math.isfinite(mu) and math.isfinite(lr * wd)):
            raise ValueError(f"Muon: lr {lr:g} is too large: the step lr x update scale ({scale:g}) or its norm "
                             f"bound overflows float64 for a {m}x{n} matrix")
        return dict(lr=lr, wd=wd, scale=scale, mu=mu, gate=None, ok=None)

    def direction(self, group: dict[str, Any], entries: list[Entry], pieces) -> torch.Tensor:
        """Stack the momentum directions of ``pieces`` into ``[k, a, b]``."""
        bufs = [e.buf for e in entries]
        if not group["nesterov"]:
            return stack(bufs, pieces)
        G = stack([e.grad for e in entries], pieces)
        return G.lerp_(stack(bufs, pieces).to(G.dtype), float(group["momentum"]))

    def update_(self, group: dict[str, Any], W: torch.Tensor, G: torch.Tensor, hyper: dict,
                cstate: dict, commit_to: Any = "self") -> None:
        """``W <- constraint((1 - lr wd) W - lr scale orthogonalize(G))`` for a stack, in place.

        With ``hyper["gate"]`` (a 0-dim 1.0 / 0.0 tensor: the group's gradients were
        finite / not), a gated-off step leaves ``W`` and ``cstate`` exactly as they were
        (``commit_to=None``: the caller commits ``W``, keeping its own copy of the old).
        """
        if W.shape[0] == 0:
            return
        f, ok = hyper.get("gate"), hyper.get("ok")
        W_old = W.clone() if f is not None and commit_to is not None else None
        old_state = {k: v.clone() for k, v in cstate.items()} if f is not None else None
        O = self._orthogonalize(group, G)
        lr, wd = hyper["lr"], hyper["wd"]
        if wd != 0.0:
            W.mul_(1.0 - lr * wd)
        W.add_(O.to(W.dtype), alpha=-lr * hyper["scale"])
        c = group["constraint"]
        if c is not None:
            c.apply_(W, lr=lr, update_norm=hyper["mu"], decay=lr * wd, state=cstate)
        if W_old is not None:
            W.copy_(W_old.lerp_(W, f))
        if old_state:
            for k, old in old_state.items():
                new = cstate.get(k)
                if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape:
                    cstate[k] = torch.where(ok.to(new.device), new, old.to(new.dtype))

    def _step_bucket(self, gi: int, group: dict[str, Any], bucket: Bucket, mode, ok=None) -> None:
        m, n = bucket.key[1], bucket.key[2]
        hyper = self.bucket_hyper(group, m, n)
        if hyper["lr"] == 0.0:
            # lr = 0 moves no weight: no update and no constraint call (a zero update
            # norm would read as "no bound given" and the soft cap would shrink W).
            # Every rank sees the same lr, so the collectives stay matched.
            return
        if ok is not None:
            dev = bucket.entries[0].value.device
            hyper["ok"] = ok.to(dev)
            hyper["gate"] = hyper["ok"].to(bucket.key[3])  # 1 / 0, exact in every float dtype
        if mode.kind == "replicated":
            _dist.replicated_step(self, gi, group, bucket, hyper, mode, self._layout_cache)
        elif mode.kind == "sharded":
            _dist.sharded_step(self, gi, group, bucket, hyper, mode)
        else:
            self._local_step(group, bucket, hyper)

    def _local_step(self, group: dict[str, Any], bucket: Bucket, hyper: dict) -> None:
        """A local bucket inside a group that also holds distributed parameters (per-step stacking)."""
        entries = bucket.entries
        pieces = overlaps([e.count for e in entries], 0, bucket.size)
        G = self.direction(group, entries, pieces)
        values = [e.value for e in entries]
        states = [e.state for e in entries]
        W = stack(values, pieces)
        cstate = gather_cstate(states, pieces, full=True)
        self.update_(group, W, G, hyper, cstate)
        torch._foreach_copy_(values, list(W.split([e.count for e in entries])))
        scatter_cstate(states, pieces, cstate, full=True)
