"""Acceptance measurement of docs/certificate.md: the Shakespeare model with every weight at its cap.

Prints the certificate, the certify() time (wall and CPU), and empirical_lipschitz lower bounds.
Usage: .venv/bin/python scripts/certify_at_cap.py [--T 64] [--restarts 8] [--steps 1000] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import lipschitz_ext
from lipschitz_ext.nn import GPTConfig, LipschitzGPT, LipschitzLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.02, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = LipschitzGPT(GPTConfig(vocab_size=65))
    with torch.no_grad():  # every singular value of every W' at its cap 1
        for mod in model.modules():
            if isinstance(mod, LipschitzLinear):
                torch.nn.init.orthogonal_(mod.weight)
                mod.weight.mul_(mod.rms_scale)
    lipschitz_ext.certify.certify(model)  # warm-up
    wall, cpu = [], []
    for _ in range(10):
        t, p = time.perf_counter(), time.process_time()
        cert = lipschitz_ext.certify.certify(model)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - p)
    print(cert)
    result = {
        "bound": cert.bound,
        "certify_wall_s_median": sorted(wall)[5],
        "certify_cpu_s_median": sorted(cpu)[5],
        "load_average": os.getloadavg()[0],
        "empirical": {},
    }
    x = model.embed.weight.detach()[torch.randint(0, 65, (args.restarts, args.T))]
    for lr in args.lr:
        torch.manual_seed(args.seed + 1)
        t = time.perf_counter()
        emp = lipschitz_ext.certify.empirical_lipschitz(model, x, steps=args.steps, lr=lr)
        result["empirical"][str(lr)] = emp
        print(f"T={args.T} restarts={args.restarts} steps={args.steps} lr={lr}: empirical={emp:.5f} "
              f"certified/empirical={cert.bound / emp:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
