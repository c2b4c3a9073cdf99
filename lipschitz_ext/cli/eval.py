"""``lipschitz-eval``: analyses of trained run folders.

    lipschitz-eval certify RUN_DIR [--json]               # the certificate of a trained run
    lipschitz-eval accuracy RUN_DIR [--protocol P]        # re-score under each evaluation protocol
    lipschitz-eval sample RUN_DIR [--prompt TEXT] [--chars N] [--temperature T] [--seed S]
    lipschitz-eval robustness | activations | frontier | lr-sensitivity ...   (--help of each)

Bad input ends with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

from ..data import text as data_mod
from ..evaluation.protocols import EVAL_PROTOCOLS, PROTOCOL_HELP
from ..evaluation.tables import print_table
from ..experiments import analyses as ev
from ..experiments.rescore import format_run_accuracy, format_run_certificate, run_accuracy, run_certificate
from ..experiments.sweep import frontier, lr_sensitivity
from ..storage.files import CheckpointError, json_safe
from ..training.config import PRESETS, config_from_preset
from ..training.run import read_checkpoint
from ..training.runtime import resolve_device
from ..training.sampling import sample_run
from .common import DEFAULT_PRESET, float_list, size_list

__all__ = ["eval_main"]

# ---------------------------------------------------------------------------
# lipschitz-eval
# ---------------------------------------------------------------------------
def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipschitz-eval",
                                description="Certificates, samples and analyses of lipschitz-train run folders.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("robustness", help="attacks in embedding space and certified radii")
    r.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR",
                   help="a lipschitz-train run folder (repeat for several on one plot)")
    r.add_argument("--eps", type=float_list, default=[0.01, 0.02, 0.05, 0.1, 0.2],
                   help="attack sizes, comma-separated (default 0.01,0.02,0.05,0.1,0.2)")
    r.add_argument("--pgd-steps", type=int, default=10, help="steps of the PGD attack (default 10)")
    r.add_argument("--absolute", action="store_true", help="eps in absolute RMS units, not relative")
    a = sub.add_parser("activations", help="per-layer activation magnitudes")
    a.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a lipschitz-train run folder")
    a.add_argument("--baseline", metavar="RUN_DIR", help="a BaselineGPT run to compare with")
    f = sub.add_parser("frontier", help="validation accuracy vs certified bound")
    f.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="finished run folders (a name that does not exist is expanded as a glob pattern)")
    s = sub.add_parser("lr-sensitivity", help="final validation loss vs learning rate")
    s.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="the runs' base settings")
    s.add_argument("--lrs", type=float_list, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="learning-rate multipliers (>= 3 orders of magnitude)")
    s.add_argument("--sizes", type=size_list, default=[(32, 2), (64, 2)],
                   help="model sizes d_modelxn_layers, comma-separated (default 32x2,64x2)")
    s.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    s.add_argument("--data", help="training text or shards (default: the built-in corpus)")
    c = sub.add_parser("certify", help="the certificate of a trained run: per-layer table, bound, worst case of "
                                       "its caps")
    c.add_argument("run", metavar="RUN_DIR", help="a lipschitz-train run folder")
    c.add_argument("--json", action="store_true", help="print the certificate as JSON")
    c.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint to certify (default latest: the model summary.json reports)")
    acc = sub.add_parser("accuracy", help="validation accuracy of a trained run under each evaluation protocol")
    acc.add_argument("run", metavar="RUN_DIR", help="a lipschitz-train run folder")
    acc.add_argument("--protocol", action="append", choices=EVAL_PROTOCOLS, default=None,
                     help="spread | paper | full (repeat for several; default all three): "
                          + "; ".join(f"{k}: {v}" for k, v in PROTOCOL_HELP.items()))
    acc.add_argument("--which", choices=("latest", "best"), default="latest",
                     help="checkpoint to score (default latest: the model summary.json reports)")
    acc.add_argument("--json", action="store_true", help="print the scores as JSON")
    g = sub.add_parser("sample", help="generate text from a trained run")
    g.add_argument("run", metavar="RUN_DIR", help="a lipschitz-train run folder")
    g.add_argument("--prompt", default="", help="text to continue (default: start from a newline)")
    g.add_argument("--chars", type=int, default=500, help="tokens (characters) to generate (default 500)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature > 0 (default 0.8)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: the same text every time)")
    g.add_argument("--which", choices=("best", "latest"), default="best",
                   help="checkpoint to sample from (default best)")
    for sp in (c, g, acc):
        sp.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    for sp in (r, a, s):
        sp.add_argument("--batches", type=int, default=4, help="validation batches" if sp is not s else argparse.SUPPRESS)
    for sp in (r, a, f, s):
        sp.add_argument("--out", default=None, help="output folder (default runs/eval-<cmd>-<date>-<time>); its result files must not exist yet")
        sp.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    return p


def _check_eval_args(args: argparse.Namespace) -> None:
    """Clear ``ValueError``s for flag values the analyses cannot use (before any run is loaded)."""
    device = getattr(args, "device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        resolve_device(device)  # says so when no CUDA device is available
    if getattr(args, "batches", 1) < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.cmd == "robustness":
        if args.pgd_steps < 1:
            raise ValueError(f"--pgd-steps must be >= 1 (0 steps would report the clean accuracy as attacked), "
                             f"got {args.pgd_steps}")
        if not args.eps or not all(math.isfinite(e) and e > 0 for e in args.eps):
            raise ValueError(f"--eps must be one or more finite sizes > 0, comma-separated, got {args.eps}")
    if args.cmd == "lr-sensitivity":
        if not args.lrs or not all(math.isfinite(m) and m > 0 for m in args.lrs):
            raise ValueError(f"--lrs must be one or more finite multipliers > 0, comma-separated, got {args.lrs}")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.cmd == "activations" and args.baseline:
        _, cfg, _ = read_checkpoint(args.baseline, ("best", "latest"), arg="--baseline")
        if cfg.model != "baseline":
            raise ValueError(f"--baseline {args.baseline}: is a {cfg.model} run, not a baseline (--model baseline) "
                             "run; pass it as --checkpoint")


def eval_main(argv: list[str] | None = None) -> int:
    """``lipschitz-eval``: the subcommand of ``argv``; returns the exit status."""
    args = _eval_parser().parse_args(argv)
    out = getattr(args, "out", None) or os.path.join("runs", f"eval-{args.cmd}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        _check_eval_args(args)
        if args.cmd == "certify":
            rep = run_certificate(args.run, which=args.which, device=args.device)
            print(json.dumps(json_safe({k: v for k, v in rep.items() if k != "table"}), indent=2, allow_nan=False)
                  if args.json
                  else format_run_certificate(rep))
            return 0
        if args.cmd == "accuracy":
            rep = run_accuracy(args.run, tuple(args.protocol or EVAL_PROTOCOLS), which=args.which, device=args.device)
            print(json.dumps(json_safe(rep), indent=2, allow_nan=False) if args.json else format_run_accuracy(rep))
            return 0
        if args.cmd == "sample":
            print(sample_run(args.run, args.prompt, args.chars, args.temperature, args.seed, which=args.which,
                             device=args.device))
            return 0
        if args.cmd == "robustness":
            rows = ev.robustness(args.checkpoint, args.eps, out, n_batches=args.batches, pgd_steps=args.pgd_steps,
                                 relative=not args.absolute, device=args.device)
            print_table(rows, ["run", "eps", "clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "certified_fraction"])
        elif args.cmd == "activations":
            ev.activations(args.checkpoint, out, args.baseline, n_batches=args.batches, device=args.device)
        elif args.cmd == "frontier":
            # a folder that exists is itself, glob characters and all; otherwise a pattern
            rows = frontier([d for pat in args.runs for d in ([pat] if os.path.exists(pat) else
                                                              sorted(glob.glob(pat)) or [pat])], out)
            print_table(rows, ["constraint", "sigma_max", "certified_bound", "val_accuracy", "run"])
        else:
            sizes = args.sizes
            base = config_from_preset(args.preset, steps=args.steps, eval_every=args.steps, target_bound=0.0,
                                      device=args.device, **({"data": args.data} if args.data else {}))
            rows = lr_sensitivity(base, args.lrs, out, sizes=sizes)
            print_table(rows, ["model", "d_model", "n_layers", "lr_multiplier", "val_loss", "attention_logit_max",
                               "max_abs_logit"])
    except (CheckpointError, data_mod.DataError, ValueError, FileNotFoundError) as exc:
        print(f"lipschitz-eval: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (full disk, read-only folder)
        print(f"lipschitz-eval: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"lipschitz-eval: {exc}" if str(exc) else "lipschitz-eval: interrupted", file=sys.stderr)
        return 130
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
