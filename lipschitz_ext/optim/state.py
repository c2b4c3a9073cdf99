"""State-dict handling shared by the constraint-aware optimizers.

Param groups hold live constraint objects; a state dict must load with
``torch.load(weights_only=True)``, so it stores a constraint by its ``name`` and
``load_state_dict`` keeps this optimizer's own constraint objects. The base
class casts every floating state tensor to its parameter's dtype; constraint
state (``"constraint.*"``) keeps its saved dtype so a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .bucket import CSTATE_PREFIX


def _local_device(p):
    return p.to_local().device if hasattr(p, "to_local") else p.device


def _matrix_count(p) -> int:
    return math.prod(p.shape[:-2]) if p.dim() >= 2 else 1


class ConstraintGroupsMixin:
    """Mixin for a ``torch.optim.Optimizer`` whose groups carry a ``"constraint"``.

    Subclasses name the per-parameter state keys a step needs in ``STATE_KEYS``;
    ``load_state_dict`` refuses (ValueError) a state dict whose groups, keys or
    tensor shapes do not fit this optimizer's parameters -- at load time, not
    with a size mismatch or KeyError on the next step.
    """

    #: State keys every non-empty per-parameter state must hold (beyond ``constraint.*``).
    STATE_KEYS: tuple[str, ...] = ()
    #: Group keys a loadable state dict must hold; other defaults are filled in (older dicts).
    GROUP_KEYS: tuple[str, ...] = ("lr",)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            c = g.get("constraint")
            if c is not None and not isinstance(c, str):
                g["constraint"] = getattr(c, "name", type(c).__name__)
            coeffs = g.get("coefficients")
            if coeffs is not None and not isinstance(coeffs, str):
                g["coefficients"] = [list(t) for t in coeffs]
        return sd

    def check_group_hyper(self, group: dict[str, Any], gi: int) -> None:
        """Refuse bad hyper-parameters of group ``gi`` (subclasses override; default: none)."""

    def _check_loadable(self, state_dict: Any) -> None:
        """Raise ValueError naming the first way ``state_dict`` does not fit this optimizer."""
        who = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{who}.load_state_dict: expected a dict with 'state' and 'param_groups', "
                             f"got {type(state_dict).__name__}"
                             + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""))
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{who}.load_state_dict: the state dict has {len(groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        need = set(self.GROUP_KEYS)
        for gi, (saved, own) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(need - set(saved))
            if missing:
                raise ValueError(f"{who}.load_state_dict: param group {gi} lacks {missing}; "
                                 f"is this a {who} state dict?")
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(f"{who}.load_state_dict: param group {gi} has {len(saved['params'])} "
                                 f"parameters in the state dict, {len(own['params'])} here")
        saved_ids = [pid for g in groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, (pid, p) in enumerate(zip(saved_ids, params)):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            missing = [k for k in self.STATE_KEYS if k not in st]
            foreign = sorted(k for k in st if k not in self.STATE_KEYS and not k.startswith(CSTATE_PREFIX))
            if missing:
                raise ValueError(f"{who}.load_state_dict: state of parameter {i} lacks {missing} "
                                 f"(has {sorted(st)}); is this a {who} state dict?")
            for k, v in st.items():
                if not isinstance(v, torch.Tensor) or v.dim() == 0:
                    continue
                if k.startswith(CSTATE_PREFIX):
                    # leading dim: the parameter's matrices this rank keeps state for
                    count = _matrix_count(p)
                    ok = v.shape[0] <= count if hasattr(p, "to_local") else v.shape[0] == count
                    if not ok:
                        raise ValueError(f"{who}.load_state_dict: state {k!r} of parameter {i} has leading "
                                         f"dim {v.shape[0]}, the parameter {tuple(p.shape)} holds {count} "
                                         "matrices (a state dict of another model?)")
                elif k not in foreign and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{who}.load_state_dict: state {k!r} of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)} (a state dict "
                                     "of another model?)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loadable(state_dict)
        constraints = [g.get("constraint") for g in self.param_groups]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        cstate = {
            pid: {k: v for k, v in st.items() if k.startswith(CSTATE_PREFIX)}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for gi, (g, c) in enumerate(zip(self.param_groups, constraints)):
            g["constraint"] = c
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            self.check_group_hyper(g, gi)
        for pid, p in zip(saved_ids, params):
            for k, v in cstate.get(pid, {}).items():
                self.state[p][k] = v.to(device=_local_device(p), copy=True)
