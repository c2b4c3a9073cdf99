"""2-process CPU (gloo) runs of Muon's distributed paths vs a 1-process run.

Each test spawns two ranks with torch.multiprocessing; the workers compare
against a local (``distributed="none"``) optimizer on identical copies and raise
on mismatch, which fails the test through ``mp.spawn``.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_helpers import PowerNormalize, clone_params

import lipschitz_ext.optim.muon as muon_mod
from lipschitz_ext.optim import Muon

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo unavailable"
)

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _finish() -> None:
    # Both ranks leave together: a rank tearing down gloo while its peer still talks to
    # it can abort the process at exit ("terminate called without an active exception").
    # The barrier is bounded so that a rank whose peer already failed still exits.
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    except RuntimeError:
        pass
    dist.destroy_process_group()


def _spawn(fn) -> None:
    mp.spawn(fn, args=(_free_port(),), nprocs=WORLD, join=True)


def _groups(params, constraint):
    from lipschitz_ext.constraints import SpectralNormalize

    return [
        {"params": params[:5], "constraint": constraint},
        {"params": params[5:], "lr": 0.03, "weight_decay": 0.0, "constraint": SpectralNormalize(1.0)},
    ]


def _replicated_worker(rank: int, port: int) -> None:
    import lipschitz_ext  # noqa: F401  (loads the ops in the child)

    _init(rank, port)
    try:
        torch.manual_seed(0)  # identical weights and gradients on every rank (as after DDP's all-reduce)
        shapes = [(6, 10), (6, 10), (10, 6), (2, 6, 10), (6, 10), (5, 5), (5, 5)]
        params = [torch.nn.Parameter(torch.randn(*s) * 0.3) for s in shapes]
        grads = [[torch.randn(*s) for s in shapes] for _ in range(STEPS)]
        ref = clone_params(params)
        opt = Muon(_groups(params, PowerNormalize(0.7)), lr=0.05, weight_decay=0.1)
        opt_ref = Muon(_groups(ref, PowerNormalize(0.7)), lr=0.05, weight_decay=0.1, distributed="none")

        seen = []
        real = muon_mod.orthogonalize

        def counting(G, *a, **k):
            seen.append(G.shape[0])
            return real(G, *a, **k)

        for gs in grads:
            for p, q, g in zip(params, ref, gs):
                p.grad, q.grad = g.clone(), g.clone()
            muon_mod.orthogonalize = counting
            opt.step()
            muon_mod.orthogonalize = real
            opt_ref.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
        for p, q in zip(params[:5], ref[:5]):
            for key in ("constraint.u", "constraint.calls"):
                torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], rtol=1e-6, atol=1e-6)
        for p, q in zip(params[5:], ref[5:]):  # the real SpectralNormalize's warm-start vectors
            torch.testing.assert_close(opt.state[p]["constraint.u"], opt_ref.state[q]["constraint.u"])
        # Buckets: (6,10) x5 matrices -> 3 + 2; (10,6) x1 -> 1 + 0; (5,5) x2 -> 1 + 1.
        expected = {0: 5, 1: 3}[rank]
        assert sum(seen) == expected * STEPS, (rank, seen)
    finally:
        _finish()


@pytest.mark.slow
def test_replicated_matches_single_process():
    _spawn(_replicated_worker)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 7, bias=False)  # [7, 10]: rows 4 + 3
        self.b = torch.nn.Linear(10, 7, bias=False)  # same bucket as a
        self.c = torch.nn.Linear(7, 8, bias=False)
        self.d = torch.nn.Linear(7, 10, bias=False)  # [10, 7]
        self.experts = torch.nn.Parameter(torch.randn(4, 7, 7) / 3)  # Shard(0) on the batch dim
        self.head = torch.nn.Linear(8, 3, bias=False)  # Shard(1): columns 4 + 4 (FSDP2 needs even)

    def forward(self, x):
        h = torch.tanh(self.a(x) + self.b(x))
        h = h + torch.einsum("bi,eoi->bo", h, self.experts) / 4
        g = torch.tanh(self.d(h)).sum(-1, keepdim=True)
        return self.head(torch.tanh(self.c(h)) * g)


def _fsdp_worker(rank: int, port: int) -> None:
    import lipschitz_ext  # noqa: F401

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    _init(rank, port)
    try:
        torch.manual_seed(0)
        net = _Net()
        ref = copy.deepcopy(net)
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(net, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is net.head.weight else None)
        assert all(isinstance(p, DTensor) for p in net.parameters())

        def groups(m):
            mats = [m.a.weight, m.b.weight, m.c.weight, m.d.weight, m.head.weight]
            return [{"params": mats, "constraint": PowerNormalize(0.8)}, {"params": [m.experts], "constraint": PowerNormalize(0.5), "weight_decay": 0.0}]

        opt = Muon(groups(net), lr=0.05, weight_decay=0.1)
        opt_ref = Muon(groups(ref), lr=0.05, weight_decay=0.1, distributed="none")
        for _ in range(STEPS):
            x = torch.randn(8, 10)  # same batch on every rank: FSDP's mean gradient = the local one
            for model, o in ((net, opt), (ref, opt_ref)):
                o.zero_grad()
                model(x).pow(2).mean().backward()
                o.step()
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
        # Constraint state of each sharded 2-D matrix lives on exactly one rank (its owner).
        owned = torch.tensor([float("constraint.u" in opt.state[p]) for p in (net.a.weight, net.b.weight,
                                                                           net.c.weight, net.d.weight,
                                                                           net.head.weight)])
        dist.all_reduce(owned)
        assert torch.equal(owned, torch.ones(5)), owned
        assert opt.state[net.experts]["momentum_buffer"].placements == net.experts.placements

        # DTensors placed Replicate() take the replicated path (split the work, all-gather).
        from torch.distributed.tensor import Replicate, distribute_tensor

        full = [torch.randn(6, 10), torch.randn(6, 10), torch.randn(10, 6)]
        rep = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Replicate()])) for t in full]
        loc = clone_params(full)
        o_rep = Muon(rep, lr=0.1, constraint=PowerNormalize(0.8))
        o_loc = Muon(loc, lr=0.1, constraint=PowerNormalize(0.8), distributed="none")
        for _ in range(2):
            for p, q in zip(rep, loc):
                g = torch.randn(q.shape)
                p.grad, q.grad = distribute_tensor(g, mesh, [Replicate()]), g.clone()
            o_rep.step()
            o_loc.step()
        for p, q in zip(rep, loc):
            torch.testing.assert_close(p.to_local(), q.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o_rep.state[p]["constraint.u"], o_loc.state[q]["constraint.u"])
    finally:
        _finish()


@pytest.mark.slow
def test_fsdp2_matches_single_process():
    _spawn(_fsdp_worker)


def _nonfinite_worker(rank: int, port: int) -> None:
    import lipschitz_ext  # noqa: F401

    _init(rank, port)
    try:
        torch.manual_seed(0)
        shapes = [(6, 10), (10, 6), (5, 5)]
        params = [torch.nn.Parameter(torch.randn(*s) * 0.3) for s in shapes]
        opt = Muon(params, lr=0.05, constraint=PowerNormalize(0.7))
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        snap = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        for p in params:
            p.grad = torch.randn(p.shape)
        if rank == 1:
            params[1].grad[0, 0] = float("nan")  # one rank's gradient: both ranks skip (flag all-reduced)
        opt.step()
        assert all(torch.equal(p, s) for p, s in zip(params, snap)), rank
        assert all(torch.equal(opt.state[p][k], v) for p, st in zip(params, state) for k, v in st.items())
        try:
            opt.step()
            message = None
        except RuntimeError as exc:
            message = str(exc)
        assert message is not None and "non-finite gradient in param group 0" in message, (rank, message)
        assert ("(10, 6)" in message) == (rank == 1) and ("on another rank" in message) == (rank == 0), message
    finally:
        _finish()


@pytest.mark.slow
def test_replicated_nonfinite_gradient_skips_on_every_rank():
    _spawn(_nonfinite_worker)
