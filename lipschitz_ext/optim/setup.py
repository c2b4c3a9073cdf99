"""The paper's optimizer setup for any ``nn.Module`` (docs/theory.md, section 4).

- hidden matrices: :class:`Muon` + a spectral constraint (cap ``hidden_sigma_max``);
- the head (output) matrix: Muon with its own lr (paper: 10x smaller) and cap;
- embedding tables: Adam (betas 0.8 / 0.95) + a per-token RMS cap;
- vectors and scalars (gains, biases) and convolution kernels: Adam, unconstrained.

Parameter roles come from ``model.param_groups_spec()`` when the model has it
(a list of dicts ``{name, params, kind, sigma_max}`` with kind one of
``"embedding" | "hidden" | "head" | "vector"``), else from heuristics:
``nn.Embedding`` weights are embeddings; a 2-D weight is the head when its name
is in ``head_names``, or (if ``head_names`` is None) when its module is a Linear
whose out_features equals the vocabulary size (``vocab_size``, or the largest
nn.Embedding's num_embeddings) or whose attribute name is ``lm_head``, ``head``
or ``output``; other ``ndim >= 2`` weights are hidden (convolution kernels go to
Adam: Muon would treat their spatial dims as a batch of matrices); the rest are
vectors. A parameter shared by two modules (tied embedding / head) counts once,
as an embedding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import constraints
from .adam import ConstrainedAdam, describe_nonfinite, nonfinite_grads
from .muon import (DISTRIBUTED_MODES, NS_DTYPES, UPDATE_SCALES, DistributedMode, Muon, NonFiniteGradient, NsDtype,
                   UpdateScale)

__all__ = ["OptimizerConfig", "OptimizerSet", "ParamRole", "build_optimizers", "classify_parameters"]

KINDS = ("embedding", "hidden", "head", "vector")
_HEAD_NAME = re.compile(r"(^|\.)(lm_head|head|output)$")

#: A role's constraint: a name for :func:`lipschitz_ext.constraints.make_constraint` (caps get
#: ``sigma_max=``, ``"embedding_rms"`` gets ``max_rms=``), a constraint object, a callable
#: ``cap -> constraint``, or None.
ConstraintSpec = Union[str, constraints.Constraint, None, Callable[[float], Any]]


@dataclass(frozen=True)
class OptimizerConfig:
    """Everything :func:`build_optimizers` sets, in four groups. Defaults follow the paper's
    NanoGPT run: Muon lr 0.05 (head 10x smaller), momentum 0.95 Nesterov, embedding Adam lr
    0.1 with betas (0.8, 0.95), every cap 1."""

    # Muon: hidden and head matrices
    lr: float = 0.05
    head_lr: Optional[float] = None  # None: lr / 10
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    coefficients: Union[str, tuple[tuple[float, float, float], ...]] = "polar_express"
    weight_decay: float = 0.0
    update_scale: UpdateScale = "fan_ratio"
    ns_dtype: NsDtype = "auto"
    distributed: DistributedMode = "auto"
    # Adam: embeddings and vectors
    embed_lr: float = 0.1
    vector_lr: float = 0.01
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    # constraints and their caps (a role's own sigma_max from param_groups_spec() wins)
    hidden_constraint: ConstraintSpec = "soft_cap"
    head_constraint: ConstraintSpec = "soft_cap"
    embedding_constraint: ConstraintSpec = "embedding_rms"
    hidden_sigma_max: float = 1.0
    head_sigma_max: float = 1.0
    embed_max_rms: float = 1.0
    # which parameter is which (see the module docstring)
    vocab_size: Optional[int] = None
    head_names: Optional[tuple[str, ...]] = None
    embedding_names: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        for name, allowed in (("update_scale", UPDATE_SCALES), ("ns_dtype", NS_DTYPES),
                              ("distributed", DISTRIBUTED_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"OptimizerConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lr", "embed_lr", "vector_lr", "weight_decay", "hidden_sigma_max", "head_sigma_max",
                     "embed_max_rms") + (("head_lr",) if self.head_lr is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"OptimizerConfig: {name} must be a finite number >= 0, got {v!r}")
        for name in ("head_names", "embedding_names"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))  # any iterable of names; stored hashable


@dataclass
class ParamRole:
    """One role group: a name, its parameters, kind and cap (None: the builder's default)."""

    name: str
    kind: str
    params: list[nn.Parameter] = field(default_factory=list)
    sigma_max: Optional[float] = None


def classify_parameters(
    model: nn.Module,
    *,
    vocab_size: Optional[int] = None,
    head_names: Optional[Iterable[str]] = None,
    embedding_names: Optional[Iterable[str]] = None,
) -> list[ParamRole]:
    """Sort ``model``'s trainable parameters into roles (see the module docstring)."""
    spec_fn = getattr(model, "param_groups_spec", None)
    if callable(spec_fn):
        roles = []
        for d in spec_fn():
            kind = d["kind"]
            if kind not in KINDS:
                raise ValueError(f"build_optimizers: param_groups_spec kind must be one of {KINDS}, got {kind!r}")
            params = [p for p in d["params"] if p.requires_grad]
            if params:
                roles.append(ParamRole(d.get("name", kind), kind, params, d.get("sigma_max")))
        return roles

    modules = dict(model.named_modules())
    owner: dict[str, nn.Module] = {}
    for mname, mod in modules.items():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    embeddings = [m for m in modules.values() if isinstance(m, nn.Embedding)]
    if vocab_size is None and embeddings:
        vocab_size = max(m.num_embeddings for m in embeddings)
    head_set = set(head_names) if head_names is not None else None
    embed_set = set(embedding_names or ())

    roles = {k: ParamRole(k, k) for k in KINDS}
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False))
    # Embeddings first so a tied head/embedding weight counts as an embedding.
    named.sort(key=lambda kv: not (isinstance(owner.get(kv[0]), nn.Embedding) or kv[0] in embed_set))
    for name, p in named:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        mod = owner.get(name)
        mod_name = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(mod, nn.Embedding) or name in embed_set:
            kind = "embedding"
        elif p.dim() < 2 or isinstance(mod, nn.modules.conv._ConvNd):
            kind = "vector"
        elif head_set is not None:
            kind = "head" if name in head_set or mod_name in head_set else "hidden"
        elif isinstance(mod, nn.Linear) and (
            (vocab_size is not None and mod.out_features == vocab_size) or _HEAD_NAME.search(mod_name)
        ):
            kind = "head"
        else:
            kind = "hidden"
        roles[kind].params.append(p)
    return [r for r in roles.values() if r.params]


def _make(spec: ConstraintSpec, sigma: float, kwarg: str = "sigma_max"):
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "none":
            return None
        # which names take a cap: the registry in constraints.py (one home for constraint facts)
        spec_of = constraints.CONSTRAINT_SPECS.get(spec)
        if (spec_of is not None and spec_of.takes_cap) or spec == "embedding_rms":
            return constraints.make_constraint(spec, **{kwarg: sigma})
        return constraints.make_constraint(spec)
    if hasattr(spec, "apply_") and not isinstance(spec, type):
        return spec
    if callable(spec):
        return spec(sigma)
    raise TypeError(f"build_optimizers: cannot make a constraint from {spec!r}")


def _policy(opt: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    """The ``nonfinite`` policy of ``group`` (Muon keeps it per group, ConstrainedAdam per
    optimizer; an optimizer without one: ``"raise"``)."""
    return group.get("nonfinite", getattr(opt, "nonfinite", "raise"))


class OptimizerSet:
    """Several optimizers stepped together (Muon for matrices, Adam for the rest).

    ``optimizers`` is a list of ``torch.optim.Optimizer`` (use it to attach LR
    schedulers, e.g. ``[LambdaLR(o, f) for o in opt_set.optimizers]`` or
    :meth:`schedulers`). Every param group carries ``"kind"`` and ``"role"`` keys.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.by_name = dict(optimizers)
        self.optimizers = list(self.by_name.values())
        self.skipped_steps = 0  # steps skipped as a whole for a non-finite gradient (policy "skip")

    def __getitem__(self, name: str) -> torch.optim.Optimizer:
        return self.by_name[name]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """All groups of all optimizers (the same dicts: editing ``lr`` takes effect)."""
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        """Step every optimizer, or none: a non-finite gradient anywhere (in a group whose
        ``nonfinite`` policy is not ``"ignore"``) skips the step of all of them, so the
        model is never left half-updated; ``"raise"`` (the default) then raises NonFiniteGradient (a RuntimeError)
        saying so, ``"skip"`` counts it in :attr:`skipped_steps`. One host sync for all the
        optimizers, whose own checks are then not repeated (none while a CUDA graph is
        captured: each optimizer's own check applies there)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing:
            # every checked group of every optimizer, in one list: one host sync in all
            owners = [(name, gi, _policy(o, g)) for name, o in self.by_name.items()
                      for gi, g in enumerate(o.param_groups) if _policy(o, g) != "ignore"]
            found = nonfinite_grads([self.by_name[name].param_groups[gi] for name, gi, _ in owners])
            if found:
                self.skipped_steps += 1
                if any(owners[k][2] == "raise" for k, _ in found):
                    where = "; ".join(f"{owners[k][0]}: {describe_nonfinite([(owners[k][1], shapes)])}"
                                      for k, shapes in found)
                    raise NonFiniteGradient(f"OptimizerSet: {where}; the step of every optimizer was skipped, nothing "
                                            "was changed")
                return loss
        for o in self.optimizers:
            if isinstance(o, ConstrainedAdam) and not capturing:
                o.step(checked=True)
            else:
                o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @property
    def ns_dtype_resolved(self) -> Optional[str]:
        """The Muon optimizer's resolved Newton-Schulz dtype (:attr:`Muon.ns_dtype_resolved`), None without one."""
        muon = self.by_name.get("muon")
        return None if muon is None else muon.ns_dtype_resolved

    def check_nonfinite(self) -> None:
        """Raise now for a skipped non-finite Muon step not yet reported (:meth:`Muon.check_nonfinite`)."""
        for o in self.optimizers:
            check = getattr(o, "check_nonfinite", None)
            if check is not None:
                check()

    def state_dict(self) -> dict[str, Any]:
        return {name: o.state_dict() for name, o in self.by_name.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.by_name):
            raise ValueError(f"OptimizerSet: state dict has {sorted(state_dict)}, expected {sorted(self.by_name)}")
        for name, o in self.by_name.items():
            o.load_state_dict(state_dict[name])

    def schedulers(self, factory: Callable[[torch.optim.Optimizer], Any]) -> list[Any]:
        """``[factory(o) for o in self.optimizers]``, e.g. ``lambda o: LambdaLR(o, f)``."""
        return [factory(o) for o in self.optimizers]


def build_optimizers(model: nn.Module, config: Optional[OptimizerConfig] = None, **overrides: Any) -> OptimizerSet:
    """Build Muon (hidden + head matrices) and Adam (embeddings + vectors) for ``model``.

    ``config`` (default :class:`OptimizerConfig()`) says everything; keyword ``overrides`` are
    :class:`OptimizerConfig` fields replacing its values (``build_optimizers(model, lr=0.02)``).
    Constraint specs: see :data:`ConstraintSpec`.

    Returns:
        :class:`OptimizerSet` with ``"muon"`` and/or ``"adam"`` (only those with
        parameters). Each group has keys ``"kind"`` and ``"role"``.
    """
    cfg = config if config is not None else OptimizerConfig()
    if not isinstance(cfg, OptimizerConfig):
        raise TypeError(f"build_optimizers: config must be an OptimizerConfig, got {type(cfg).__name__}")
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"build_optimizers: unknown setting(s) {unknown}; OptimizerConfig has {sorted(fields)}")
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    head_lr = cfg.lr * 0.1 if cfg.head_lr is None else cfg.head_lr
    roles = classify_parameters(model, vocab_size=cfg.vocab_size, head_names=cfg.head_names,
                                embedding_names=cfg.embedding_names)
    muon_groups, adam_groups = [], []
    for r in roles:
        tag = {"kind": r.kind, "role": r.name}
        if r.kind == "hidden":
            s = cfg.hidden_sigma_max if r.sigma_max is None else r.sigma_max
            muon_groups.append({"params": r.params, "lr": cfg.lr, "constraint": _make(cfg.hidden_constraint, s), **tag})
        elif r.kind == "head":
            s = cfg.head_sigma_max if r.sigma_max is None else r.sigma_max
            muon_groups.append({"params": r.params, "lr": head_lr, "constraint": _make(cfg.head_constraint, s), **tag})
        elif r.kind == "embedding":
            s = cfg.embed_max_rms if r.sigma_max is None else r.sigma_max
            adam_groups.append({"params": r.params, "lr": cfg.embed_lr,
                                "constraint": _make(cfg.embedding_constraint, s, "max_rms"), **tag})
        else:
            adam_groups.append({"params": r.params, "lr": cfg.vector_lr, "constraint": None, **tag})
    opts: dict[str, torch.optim.Optimizer] = {}
    if muon_groups:
        opts["muon"] = Muon(muon_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                            ns_steps=cfg.ns_steps, coefficients=cfg.coefficients, weight_decay=cfg.weight_decay,
                            update_scale=cfg.update_scale, distributed=cfg.distributed, ns_dtype=cfg.ns_dtype)
    if adam_groups:
        opts["adam"] = ConstrainedAdam(adam_groups, lr=cfg.embed_lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if not opts:
        raise ValueError("build_optimizers: the model has no trainable parameters")
    return OptimizerSet(opts)
