"""State-dict handling shared by the constraint-aware optimizers.

Param groups hold live constraint objects; a state dict must load with
``torch.load(weights_only=True)``, so it stores a constraint by its ``name`` and
``load_state_dict`` keeps this optimizer's own constraint objects. The base
class casts every floating state tensor to its parameter's dtype; constraint
state (``"constraint.*"``) keeps its saved dtype so a resumed run is bit-identical.
"""

from __future__ import annotations

from typing import Any

from .bucket import CSTATE_PREFIX


def _local_device(p):
    return p.to_local().device if hasattr(p, "to_local") else p.device


class ConstraintGroupsMixin:
    """Mixin for a ``torch.optim.Optimizer`` whose groups carry a ``"constraint"``."""

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        constraints = [g.get("constraint") for g in self.param_groups]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        cstate = {
            pid: {k: v for k, v in st.items() if k.startswith(CSTATE_PREFIX)}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for g, c in zip(self.param_groups, constraints):
            g["constraint"] = c
        for pid, p in zip(saved_ids, params):
            for k, v in cstate.get(pid, {}).items():
                self.state[p][k] = v.to(device=_local_device(p), copy=True)
