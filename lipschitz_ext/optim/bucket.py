"""Shape buckets: stacking same-shape matrices of many parameters into one ``[K, m, n]``.

A bucket holds every parameter of one param group whose matrices share a shape
(and dtype, device and distribution mode). Each parameter ``p`` of shape
``[..., m, n]`` contributes ``count = p.numel() // (m * n)`` consecutive matrices
to the stack. Ranges ``[lo, hi)`` of the stack (a rank's share, an owner's share)
are described by :class:`Overlap` pieces so that slicing never loops over kernels:
the pieces are views and one ``torch.cat`` builds the stack.

Constraint state (``lipschitz_ext.constraints``) is a ``dict[str, Tensor]`` whose
tensors have the stacked-matrix count as leading dim; it is stored per parameter
in the optimizer state under ``"constraint." + key`` (that parameter's slice) and
stacked back on the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CSTATE_PREFIX = "constraint."


@dataclass
class Entry:
    """One parameter in a bucket: its local tensors viewed as ``[count, a, b]``."""

    param: torch.Tensor  # the nn.Parameter (maybe a DTensor): the key of optimizer state
    value: torch.Tensor  # local data, [count, a, b] view (a, b: local matrix dims)
    grad: torch.Tensor  # local gradient, same view
    buf: torch.Tensor  # local momentum buffer, same view
    count: int
    state: dict


@dataclass
class Bucket:
    key: tuple
    entries: list[Entry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(e.count for e in self.entries)


@dataclass(frozen=True)
class Overlap:
    """Matrices ``[start, stop)`` of entry ``index`` fall inside a stack range."""

    index: int
    start: int
    stop: int


def overlaps(counts: list[int], lo: int, hi: int) -> list[Overlap]:
    """Pieces of the entries covering stacked matrices ``[lo, hi)``."""
    out = []
    offset = 0
    for i, c in enumerate(counts):
        a, b = max(lo, offset), min(hi, offset + c)
        if a < b:
            out.append(Overlap(i, a - offset, b - offset))
        offset += c
    return out


def stack(tensors: list[torch.Tensor], pieces: list[Overlap]) -> torch.Tensor:
    """``torch.cat`` of ``tensors[i][start:stop]`` over the pieces (a new tensor)."""
    parts = [tensors[o.index][o.start : o.stop] for o in pieces]
    if len(parts) == 1:
        return parts[0].clone(memory_format=torch.contiguous_format)
    return torch.cat(parts)


def unstack_(tensors: list[torch.Tensor], pieces: list[Overlap], stacked: torch.Tensor) -> None:
    """Inverse of :func:`stack`: copy ``stacked`` back into the pieces (one foreach copy)."""
    dst = [tensors[o.index][o.start : o.stop] for o in pieces]
    src = list(stacked.split([o.stop - o.start for o in pieces]))
    torch._foreach_copy_(dst, src)


def gather_cstate(states: list[dict], pieces: list[Overlap], full: bool) -> dict[str, torch.Tensor]:
    """Stack the constraint state of the pieces, or ``{}`` if any piece lacks it.

    ``full=True``: each parameter's state covers all its matrices (slice it);
    ``full=False``: it covers exactly this piece (a rank's owned matrices).
    A piece without state (new parameter, changed ownership) drops the whole
    stack: the constraint then re-creates it (e.g. a fresh power-iteration start).
    """
    if not pieces:
        return {}
    first = states[pieces[0].index]
    keys = [k for k in first if k.startswith(CSTATE_PREFIX)]
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        parts = []
        for o in pieces:
            v = states[o.index].get(k)
            n = o.stop - o.start
            if v is None:
                return {}
            if full:
                v = v[o.start : o.stop]
            if v.shape[0] != n:
                return {}
            parts.append(v)
        out[k[len(CSTATE_PREFIX) :]] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return out


def scatter_cstate(states: list[dict], pieces: list[Overlap], cstate: dict, full: bool) -> None:
    """Store ``cstate`` (leading dim = stacked count) back per parameter.

    ``full=True`` expects ``pieces`` to cover every matrix of each parameter.
    """
    counts = [o.stop - o.start for o in pieces]
    for k, v in cstate.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != sum(counts):
            raise ValueError(
                f"Muon: constraint state entry {k!r} must be a tensor with leading dim "
                f"{sum(counts)} (one slice per stacked matrix), got "
                f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            )
        for o, part in zip(pieces, v.split(counts)):
            states[o.index][CSTATE_PREFIX + k] = part
