"""Distributed Muon steps: every rank does Newton-Schulz on its share only.

Two layouts, chosen per parameter (:func:`classify`):

- ``replicated`` (DDP, or a DTensor placed ``Replicate()``): every rank holds the
  whole (identical) weights and gradients. A bucket's ``K`` matrices are split
  into ``world`` contiguous chunks of ``ceil(K / world)``; each rank
  orthogonalizes, updates and constrains its chunk, then one all-gather per
  bucket rebuilds the stack everywhere (plus one small all-gather for the
  constraint state, so every rank can checkpoint all of it). Momentum stays
  replicated: it is elementwise and keeps every rank's state complete.
- ``sharded`` (FSDP2: a DTensor ``Shard(d)`` on a 1-D mesh with ``d`` one of the
  two matrix dims): each rank holds a slice of every matrix. Matrices are
  assigned to owner ranks in contiguous chunks; one ``all_to_all_single`` sends
  each owner the slices (momentum direction and weight) of its matrices, the
  owner rebuilds whole matrices, orthogonalizes, updates and constrains them,
  and a second all-to-all returns the updated slices. Constraint state lives on
  the owner. Public FSDP2 Muons assign each matrix to an owner rank too, but
  move it with one gather and one scatter per matrix; here a whole bucket
  travels in one all-to-all each way, and nothing is all-gathered everywhere.

A DTensor sharded on a batch dim (``Shard(d)``, ``d < ndim - 2``) already holds
whole matrices locally and takes the plain local path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from .bucket import Bucket, gather_cstate, overlaps, scatter_cstate, stack

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


@dataclass(frozen=True)
class Mode:
    """How a parameter's matrices are laid out across ranks (part of the bucket key)."""

    kind: str  # "local" | "replicated" | "sharded"
    group: Any = None  # ProcessGroup for replicated/sharded
    axis: int = -1  # sharded: 0 = rows (fan_out) split, 1 = columns (fan_in) split


LOCAL = Mode("local")


class BucketUpdater(Protocol):
    """What a distributed step needs from its optimizer (:class:`~lipschitz_ext.optim.Muon`
    provides it): the stacked update direction of some of a bucket's matrices, and the
    in-place update of a stack of them."""

    def direction(self, group: dict[str, Any], entries: list, pieces) -> torch.Tensor: ...

    def update_(self, group: dict[str, Any], W: torch.Tensor, G: torch.Tensor, hyper: dict, cstate: dict,
                commit_to: Any = "self") -> None: ...


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a DTensor (a view sharing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def check_placements(p: torch.Tensor) -> None:
    """Reject DTensor layouts the optimizer cannot handle (with a clear message)."""
    if not is_dtensor(p):
        return
    if p.device_mesh.ndim != 1 or len(p.placements) != 1:
        raise ValueError(
            f"Muon: DTensor parameters must live on a 1-D device mesh (FSDP2 or replicated); "
            f"got mesh shape {tuple(p.device_mesh.shape)} with placements {p.placements}"
        )
    pl = p.placements[0]
    if not isinstance(pl, (Shard, Replicate)):
        raise ValueError(f"Muon: DTensor placement {pl} is not supported (Shard or Replicate only)")


def classify(p: torch.Tensor, distributed: str, process_group: Optional[Any]) -> Mode:
    """The :class:`Mode` of parameter ``p`` under the optimizer's ``distributed`` setting."""
    if is_dtensor(p):
        mesh = p.device_mesh
        if mesh.size() == 1:
            return LOCAL
        pl = p.placements[0]
        group = mesh.get_group(0)
        if isinstance(pl, Replicate):
            return Mode("replicated", group)
        d = pl.dim % p.dim()
        if d < p.dim() - 2:
            return LOCAL
        return Mode("sharded", group, axis=d - (p.dim() - 2))
    if distributed == "none":
        return LOCAL
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if distributed == "replicated":
            raise RuntimeError("Muon: distributed='replicated' needs an initialized torch.distributed")
        return LOCAL
    if dist.get_world_size(process_group) == 1:
        return LOCAL
    return Mode("replicated", process_group if process_group is not None else dist.group.WORLD)


def groups_of(modes: list[Mode]) -> list[Any]:
    """Distinct process groups among ``modes`` (for agreeing on a skip decision)."""
    out: list[Any] = []
    for m in modes:
        if m.kind != "local" and all(m.group is not g for g in out):
            out.append(m.group)
    return out


def _all_gather_dim0(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _cstate_layout(layouts: dict, gi: int, bucket: Bucket, cstate: dict, group: Any) -> dict:
    """Keys, trailing shapes and dtypes of the constraint state, agreed from group rank 0.

    Rank 0 always holds a non-empty chunk; ranks with none (K < world) learn the
    layout from it. Cached per (param group, bucket).
    """
    key = (gi, bucket.key)
    if key not in layouts:
        obj = [{k: (tuple(v.shape[1:]), v.dtype) for k, v in cstate.items()}]
        dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0), group=group)
        layouts[key] = obj[0]
    return layouts[key]


def replicated_step(opt: BucketUpdater, gi: int, group: dict, bucket: Bucket, hyper: dict, mode: Mode,
                    layouts: dict) -> None:
    """Each rank updates ``ceil(K / world)`` of the bucket's matrices; all-gather the rest."""
    pg = mode.group
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    entries = bucket.entries
    counts = [e.count for e in entries]
    K = bucket.size
    chunk = math.ceil(K / world)
    lo, hi = min(rank * chunk, K), min((rank + 1) * chunk, K)
    mine = overlaps(counts, lo, hi)
    values = [e.value for e in entries]
    states = [e.state for e in entries]
    a, b = values[0].shape[-2:]
    cstate: dict = {}
    if hi > lo:
        G = opt.direction(group, entries, mine)
        W = stack(values, mine)
        if group["constraint"] is not None:
            cstate = gather_cstate(states, mine, full=True)
        opt.update_(group, W, G, hyper, cstate)
    else:
        W = values[0].new_empty((0, a, b))
    out = W.new_empty((world * chunk, a, b))
    _all_gather_dim0(out, _padded(W, chunk), pg)
    torch._foreach_copy_(values, list(out[:K].split(counts)))
    if group["constraint"] is None:
        return
    layout = _cstate_layout(layouts, gi, bucket, cstate, pg)
    full: dict = {}
    for k, (shape, dtype) in layout.items():
        piece = cstate.get(k)
        if piece is None:
            piece = torch.zeros((0, *shape), dtype=dtype, device=W.device)
        gathered = piece.new_empty((world * chunk, *shape))
        _all_gather_dim0(gathered, _padded(piece.to(dtype), chunk), pg)
        full[k] = gathered[:K]
    scatter_cstate(states, overlaps(counts, 0, K), full, full=True)


def _shard_sizes(length: int, world: int) -> list[int]:
    """Per-rank sizes of ``Shard`` on a dim of ``length`` (torch.chunk semantics)."""
    size = math.ceil(length / world) if length else 0
    return [max(0, min(size, length - r * size)) for r in range(world)]


def sharded_step(opt: BucketUpdater, gi: int, group: dict, bucket: Bucket, hyper: dict, mode: Mode) -> None:
    """FSDP2 path: all-to-all whole matrices to owners, update there, all-to-all back."""
    pg, axis = mode.group, mode.axis
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    m, n = bucket.key[1], bucket.key[2]
    entries = bucket.entries
    counts = [e.count for e in entries]
    values = [e.value for e in entries]
    K = bucket.size
    sizes = _shard_sizes(m if axis == 0 else n, world)
    other = n if axis == 0 else m
    a, b = values[0].shape[-2:]
    if (a, b) != ((sizes[rank], n) if axis == 0 else (m, sizes[rank])):
        raise RuntimeError(
            f"Muon: local shard {(a, b)} of a ({m}, {n}) matrix does not match torch.chunk "
            f"sharding over {world} ranks (expected sizes {sizes}); uneven custom sharding "
            "is not supported"
        )
    chunk = math.ceil(K / world)
    owned = [max(0, min((o + 1) * chunk, K) - min(o * chunk, K)) for o in range(world)]
    lo = min(rank * chunk, K)
    hi = lo + owned[rank]

    everything = overlaps(counts, 0, K)
    W_loc = stack(values, everything)
    G_loc = opt.direction(group, entries, everything).to(W_loc.dtype)
    send = torch.stack([G_loc, W_loc], dim=1).reshape(-1)  # [K, 2, a, b]: owner chunks in order
    in_splits = [c * 2 * a * b for c in owned]
    out_splits = [owned[rank] * 2 * s * other for s in sizes]
    recv = send.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=pg)
    parts = [
        p.view(owned[rank], 2, s, n) if axis == 0 else p.view(owned[rank], 2, m, s)
        for p, s in zip(recv.split(out_splits), sizes)
    ]
    cat_dim = 1 + axis
    G = torch.cat([p[:, 0] for p in parts], dim=cat_dim)
    W = torch.cat([p[:, 1] for p in parts], dim=cat_dim)

    if hi > lo:
        mine = overlaps(counts, lo, hi)
        states = [e.state for e in entries]
        cstate = gather_cstate(states, mine, full=False) if group["constraint"] is not None else {}
        opt.update_(group, W, G, hyper, cstate)
        if group["constraint"] is not None:
            scatter_cstate(states, mine, cstate, full=False)

    offsets = [sum(sizes[:s]) for s in range(world)]
    back_parts = [W.narrow(cat_dim, off, s).reshape(-1) for off, s in zip(offsets, sizes)]
    back = torch.cat(back_parts) if back_parts else W.new_empty(0)
    recv2 = W.new_empty(K * a * b)
    dist.all_to_all_single(
        recv2, back, [c * a * b for c in owned], [owned[rank] * s * other for s in sizes], group=pg
    )
    torch._foreach_copy_(values, list(recv2.view(K, a, b).split(counts)))
