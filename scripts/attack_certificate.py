"""Certified / attacked ratio of the earlier and the refined certificate on tiny models.

For each model of the content-attention table of docs/certificate.md (orthogonal weights at their cap and at 2.5x the cap) this
prints the certificate before (``refined=False``: Theorems 1-3), with Theorems 5 and 6
(``domain=False``) and with Theorem 7 too (the default), the best ratio ``||f(x) - f(y)|| / ||x - y||``
a float64 Adam ascent finds on the certificate's domain (pairs far apart and close, every point
projected to per-token RMS <= radius), and the geometric-mean drop of certified / attacked over the
content-attention models. The drop uses the plain attack (fixed, so it measures the certificate);
the structured attack (``attack_lipschitz(structured=True)``) is a stronger lower bound, reported
apart: refined / structured is the room left to any sound bound.

    nice -n 5 .venv/bin/python scripts/attack_certificate.py [--steps 300] [--restarts 16] [--seed 0] [--plain-only]

``--run RUN_DIR`` instead certifies a trained ``lipschitz-train`` run (loaded with ``load_run``) and
attacks it with the head folded into a ``d x d`` map of the same output norm
(``S = sqrt(d/V) (W_head^T W_head)^(1/2)``: ``||S z|| / sqrt(d) = ||W_head z|| / sqrt(V)``), so the
attack does not pay for a 50k-word vocabulary; it prints the bounds with and without the head.
"""


from __future__ import annotations

import argparse
import math

import torch

from lipschitz_ext import nn as lnn
from lipschitz_ext.certify.attacks import _project, attack_lipschitz
from lipschitz_ext.certify import certify

#: (label, softmax_scale, pos_bias, n_layers, input radius)
MODELS = [
    ("positional (s = 0), learned bias, 2 layers", 0.0, "learned", 2, 1.0),
    ("content, s = 2, learned bias, 2 layers", 2.0, "learned", 2, 1.0),
    ("content, s = 4, alibi, 3 layers, radius 1.7", 4.0, "alibi", 3, 1.7),
    ("content, s = 1, 1 layer, no bias, radius 0.6", 1.0, "none", 1, 0.6),
]


def build(s: float, pos_bias: str, layers: int, scale: float, seed: int) -> lnn.LipschitzGPT:
    """d = 8, 2 heads, vocab 7, seq 6; every matrix (semi-)orthogonal at RMS->RMS norm ``scale``."""
    torch.manual_seed(seed)
    cfg = lnn.GPTConfig(vocab_size=7, d_model=8, n_layers=layers, n_heads=2, seq_len=6, softmax_scale=s,
                        mlp_ratio=2, attention="reference", zero_init_out=False, pos_bias=pos_bias)
    model = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        for lin in model.modules():
            if isinstance(lin, lnn.LipschitzLinear):
                torch.nn.init.orthogonal_(lin.weight)
                lin.weight.mul_(scale * lin.rms_scale)
    return model


def fold_head(model: lnn.LipschitzGPT) -> lnn.LipschitzGPT:
    """A float64 copy of ``model`` whose head is ``S = sqrt(d/V) (W^T W)^(1/2)`` (vocab = d): the same
    ``forward_embeddings`` up to an isometry of the output norm, so the same Lipschitz constant."""
    cfg = model.config
    d, V = cfg.d_model, cfg.vocab_size
    folded = lnn.LipschitzGPT(lnn.GPTConfig(**{**cfg.to_dict(), "vocab_size": d})).double()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "embed."))}
    folded.load_state_dict(state, strict=False)
    W = model.head.weight.detach().double()
    lam, U = torch.linalg.eigh(W.mT @ W)
    with torch.no_grad():
        folded.head.weight.copy_(math.sqrt(d / V) * (U * lam.clamp_min(0).sqrt()) @ U.mT)
    return folded


def attack_radii(model: lnn.LipschitzGPT, radius: float, steps: int, restarts: int, seed: int) -> list[float]:
    """Largest per-token RMS an Adam ascent (smooth max over tokens) reaches at each sub-layer's output
    from inputs with per-token RMS <= radius: lower bounds for the certificate's activation radii."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for j in range(2 * cfg.n_layers):
        x = (radius * torch.randn(restarts, cfg.seq_len, cfg.d_model, dtype=torch.float64, generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.03 * radius)
        best = 0.0
        for _ in range(steps):
            z = _project(x, radius)
            for i in range(j + 1):
                blk = model.blocks[i // 2]
                z = torch.lerp(z, (blk.attn if i % 2 == 0 else blk.mlp)(z), blk.alpha)
            rms = z.pow(2).mean(-1).sqrt()
            best = max(best, rms.max().item())
            opt.zero_grad()
            (-torch.logsumexp(10 * rms, dim=-1).sum()).backward()
            opt.step()
        out.append(best)
    return out


def radii(steps: int, restarts: int, seed: int) -> None:
    label, s, bias, layers, radius = MODELS[2]
    model = build(s, bias, layers, 2.5, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    ball = certify(model, input_rms=radius, domain=False).rows[:-1]
    dom = certify(model, input_rms=radius).rows[:-1]
    att = attack_radii(model, radius, steps, 2 * restarts, seed)
    print(f"{label}, 2.5x cap: per-token RMS radius of each sub-layer's output")
    print("| sub-layer | Theorems 3, 6 (ball) | Theorem 7 (token domain) | attacked |")
    print("|---|---|---|---|")
    for b, t, a in zip(ball, dom, att):
        if a > t.activation_bound * (1 + 1e-9):
            raise SystemExit(f"VIOLATION: {b.name}: attacked radius {a} above {t.activation_bound}")
        print(f"| {b.name} | {b.activation_bound:.4g} | {t.activation_bound:.4g} | {a:.4g} |")


def trained(run_dir: str, steps: int, restarts: int, seed: int, structured: bool) -> None:
    from lipschitz_ext.training.run import load_run

    model = load_run(run_dir, "latest").model.double()
    radius = model.input_rms()
    head = certify(model, input_rms=radius).rows[-1].block_bound
    for name, kw in (("earlier (refined=False)", {"refined": False}), ("Theorems 5-6 (domain=False)", {"domain": False}),
                     ("refined (Theorems 5-7)", {})):
        cert = certify(model, input_rms=radius, **kw)
        print(f"{name}: bound {cert.bound:.5g}, without the head {cert.bound / head:.5g}, "
              f"activation bound {cert.activation_bound:.4g}, {cert.seconds:.2f} s")
    folded = fold_head(model)
    assert math.isclose(certify(folded, input_rms=radius).bound, certify(model, input_rms=radius).bound, rel_tol=1e-6)
    att = attack_lipschitz(folded, radius, steps, restarts, torch.Generator().manual_seed(seed), structured=structured)
    print(f"attacked ({'structured' if structured else 'plain'}, {restarts} restarts x {steps} steps): {att:.5g}, "
          f"without the head {att / head:.5g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--restarts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain-only", action="store_true", help="skip the structured attack (about 13x slower)")
    ap.add_argument("--run", help="a trained run folder: certify and attack it instead of the tiny models")
    ap.add_argument("--radii", action="store_true", help="certified vs attacked activation radii of the 3-layer, 2.5x cap model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run:
        trained(args.run, args.steps, args.restarts, args.seed, not args.plain_only)
        return
    if args.radii:
        radii(args.steps, args.restarts, args.seed)
        return
    print("| model | weights | earlier bound | Thm 5-6 bound | refined bound | attacked | earlier / attacked | "
          "refined / attacked | drop | structured attack | refined / structured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    drops = []
    for label, s, bias, layers, radius in MODELS:
        for scale in (1.0, 2.5):
            model = build(s, bias, layers, scale, args.seed)
            old = certify(model, input_rms=radius, refined=False).bound
            mid = certify(model, input_rms=radius, domain=False).bound
            new = certify(model, input_rms=radius).bound
            att = attack_lipschitz(model, radius, args.steps, args.restarts,
                                   torch.Generator().manual_seed(args.seed))
            strong = att if args.plain_only else attack_lipschitz(
                model, radius, args.steps, args.restarts, torch.Generator().manual_seed(args.seed), structured=True)
            if new > mid * (1 + 1e-12) or mid > old * (1 + 1e-12) or max(att, strong) > new * (1 + 1e-9):
                raise SystemExit(f"VIOLATION: {label} x{scale}: old {old} Thm 5-6 {mid} new {new} attacked {att} "
                                 f"structured {strong}")
            if s > 0:
                drops.append(old / new)
            print(f"| {label} | {'at cap' if scale == 1 else '2.5x cap'} | {old:.4g} | {mid:.4g} | {new:.4g} | "
                  f"{att:.4g} | {old / att:.3g} | {new / att:.3g} | {old / new:.3g}x | {strong:.4g} | "
                  f"{new / strong:.3g} |", flush=True)
    gm = math.exp(sum(map(math.log, drops)) / len(drops))
    print(f"\ngeometric-mean drop of certified / attacked over the {len(drops)} content-attention rows: {gm:.3g}x")


if __name__ == "__main__":
    main()
