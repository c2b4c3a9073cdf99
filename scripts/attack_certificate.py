"""Certified / attacked ratio of the earlier and the refined certificate on tiny models.

For each model of issue 20's table (orthogonal weights at their cap and at 2.5x the cap) this
prints the certificate before (``refined=False``: Theorems 1-3) and after (Theorems 5 and 6),
the best ratio ``||f(x) - f(y)|| / ||x - y||`` a float64 Adam ascent finds on the certificate's
domain (pairs far apart and close, every point projected to per-token RMS <= radius), and
the geometric-mean drop of certified / attacked over the content-attention models.

    .venv/bin/python scripts/attack_certificate.py [--steps 300] [--restarts 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import torch

from lipschitz_ext import nn as lnn
from lipschitz_ext.certify import attack_lipschitz, certify

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--restarts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | weights | earlier bound | refined bound | attacked | earlier / attacked | refined / attacked | drop |")
    print("|---|---|---|---|---|---|---|---|")
    drops = []
    for label, s, bias, layers, radius in MODELS:
        for scale in (1.0, 2.5):
            model = build(s, bias, layers, scale, args.seed)
            old = certify(model, input_rms=radius, refined=False).bound
            new = certify(model, input_rms=radius).bound
            att = attack_lipschitz(model, radius, args.steps, args.restarts,
                                   torch.Generator().manual_seed(args.seed))
            if new > old * (1 + 1e-12) or att > new * (1 + 1e-9):
                raise SystemExit(f"VIOLATION: {label} x{scale}: old {old} new {new} attacked {att}")
            if s > 0:
                drops.append(old / new)
            print(f"| {label} | {'at cap' if scale == 1 else '2.5x cap'} | {old:.4g} | {new:.4g} | {att:.4g} | "
                  f"{old / att:.3g} | {new / att:.3g} | {old / new:.3g}x |")
    gm = math.exp(sum(map(math.log, drops)) / len(drops))
    print(f"\ngeometric-mean drop of certified / attacked over the {len(drops)} content-attention rows: {gm:.3g}x")


if __name__ == "__main__":
    main()
