"""The commands: ``lipschitz-train`` (:func:`train_main`) and ``lipschitz-eval`` (:func:`eval_main`).

    lipschitz-train [--preset P] [--FIELD VALUE ...]     # one run (--preset P --help: P's values)
    lipschitz-train --resume RUN_DIR                      # continue a run exactly
    lipschitz-train sweep --sigma-max 0.5,1,2 --constraint soft_cap,hard_cap
    lipschitz-train presets                               # the presets and their settings
    lipschitz-eval certify RUN_DIR [--json]               # the certificate of a trained run
    lipschitz-eval sample RUN_DIR [--prompt TEXT] [--chars N] [--temperature T] [--seed S]
    lipschitz-eval robustness | activations | frontier | lr-sensitivity ...   (--help of each)

Every ``lipschitz-train`` flag is a :class:`~lipschitz_ext.config.TrainConfig` field.
Bad input ends with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Any

from . import data as data_mod
from .config import PRESETS, TrainConfig, config_from_preset, preset_override_notes
from .protocols import EVAL_PROTOCOLS, PROTOCOL_HELP
from .run import CheckpointError, json_safe

__all__ = ["train_main", "eval_main", "format_presets"]

DEFAULT_PRESET = "shakespeare-cpu"
_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float}


# ---------------------------------------------------------------------------
# lipschitz-train
# ---------------------------------------------------------------------------
def _preset_of(argv: list[str]) -> str:
    """The ``--preset`` among ``argv`` (the default when absent or unknown: argparse reports it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULT_PRESET)
    preset = pre.parse_known_args(argv)[0].preset
    return preset if preset in PRESETS else DEFAULT_PRESET


def _preset_values(preset: str) -> TrainConfig:
    return TrainConfig(preset=preset, **PRESETS[preset])


def _add_config_flags(p: argparse.ArgumentParser, preset: str, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per TrainConfig field, its help from the field's metadata and, as
    the default shown, the value ``preset`` gives it. Defaults stay None so that the
    flags given explicitly are known (they override the preset)."""
    shown = _preset_values(preset)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset" or f.name in skip:
            continue
        value = getattr(shown, f.name)
        default = "unset" if value is None else repr(value) if isinstance(value, str) else f"{value:g}" \
            if isinstance(value, float) else str(value)
        p.add_argument("--" + f.name.replace("_", "-"), type=_TYPES.get(str(f.type), str), default=None,
                       metavar=f.name.upper(), help=f"{f.metadata['help']} (default: {default})")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _floats(s: str) -> list[float]:
    """Comma-separated numbers (possibly none: each command checks what it needs and names its flag)."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _sizes(s: str) -> list[tuple[int, int]]:
    """``d_modelxn_layers`` pairs, comma-separated, e.g. ``32x2,64x2``."""
    try:
        sizes = [tuple(int(v) for v in sz.strip().split("x")) for sz in s.split(",") if sz.strip()]
    except ValueError:
        sizes = []
    if not sizes or not all(len(sz) == 2 and min(sz) > 0 for sz in sizes):
        raise argparse.ArgumentTypeError(f"expected d_modelxn_layers pairs of positive integers, comma-separated "
                                         f"(e.g. 32x2,64x2), got {s!r}")
    return sizes


def format_presets() -> str:
    """Every preset with the settings it changes from TrainConfig's defaults."""
    lines = []
    for name, settings in PRESETS.items():
        lines.append(f"{name}{' (default)' if name == DEFAULT_PRESET else ''}:")
        lines += [f"    {k:<16} {v}" for k, v in settings.items()]
    lines.append("every other setting is TrainConfig's default (lipschitz-train --preset P --help shows them all)")
    return "\n".join(lines)


def _train_parser(preset: str, sweep: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lipschitz-train" + (" sweep" if sweep else ""),
        description=("One run per (constraint, sigma_max); writes frontier.csv and frontier.png." if sweep else
                     "Train a Lipschitz transformer (or the unconstrained baseline) and certify its bound. "
                     "Subcommands: 'lipschitz-train sweep ...' (one run per constraint and cap), "
                     "'lipschitz-train presets' (the presets and their settings).")
        + f" Defaults shown are preset {preset}'s.")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"the settings every flag starts from (default: {DEFAULT_PRESET}; "
                        "'lipschitz-train presets' lists them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or final line")
    if sweep:
        p.add_argument("--sigma-max", dest="sweep_sigma", type=_floats, required=True,
                       help="comma-separated caps of the hidden matrices, e.g. 0.5,1,2,4 (each replaces the "
                            "preset's per-group caps)")
        p.add_argument("--constraint", dest="sweep_constraint", default="soft_cap",
                       help="comma-separated constraint methods (default soft_cap)")
    else:
        p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    _add_config_flags(p, preset, skip=("sigma_max", "constraint") if sweep else ())
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``lipschitz-train``: one run, ``sweep`` or ``presets``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["presets"]:
        print(format_presets())
        return 0
    is_sweep = argv[:1] == ["sweep"]
    argv = argv[1:] if is_sweep else argv
    args = _train_parser(_preset_of(argv), is_sweep).parse_args(argv)
    ov = _overrides(args)
    from . import train as train_mod  # the loop (and torch's heavier imports) only for a run

    try:
        if is_sweep:
            from .sweep import sweep

            if not args.sweep_sigma or not all(math.isfinite(v) and v > 0 for v in args.sweep_sigma):
                raise ValueError(f"--sigma-max must be one or more finite caps > 0, comma-separated, "
                                 f"got {args.sweep_sigma}")

            for note in preset_override_notes(args.preset, {**ov, "sigma_max": args.sweep_sigma[0]}):
                print(note, file=sys.stderr)
            # the sweep's --sigma-max is the hidden cap, like an explicit --sigma-max
            # a frontier spans bounds: no target bound unless asked for
            cfg = config_from_preset(args.preset, **{"target_bound": 0.0, **ov}, sigma_max=1.0)
            out = cfg.out or os.path.join("runs", f"sweep-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
            rows = sweep(cfg, args.sweep_sigma, [c.strip() for c in args.sweep_constraint.split(",")], out,
                         quiet=args.quiet)
            print(f"{out}/frontier.csv: {len(rows)} runs")
            return 0
        if args.resume:
            summary = train_mod.train(resume=args.resume, quiet=args.quiet, overrides=ov)
        else:
            cfg = config_from_preset(args.preset, **ov)
            for note in preset_override_notes(args.preset, ov):
                print(note, file=sys.stderr)
            summary = train_mod.train(cfg, quiet=args.quiet)
    except train_mod.RunInterrupted as exc:
        print(f"lipschitz-train: {exc}", file=sys.stderr)
        return train_mod.EXIT_CODES["interrupted"]
    except KeyboardInterrupt:
        print("lipschitz-train: interrupted before training started; run the command again", file=sys.stderr)
        return train_mod.EXIT_CODES["interrupted"]
    except train_mod.RunWriteError as exc:
        print(f"lipschitz-train: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, data_mod.DataError) as exc:
        print(f"lipschitz-train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a folder that turned read-only between the checks and the write
        print(f"lipschitz-train: error: {exc.filename or ''}{': ' if exc.filename else ''}"
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return train_mod.EXIT_CODES[summary["status"]]


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
    r.add_argument("--eps", type=_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2],
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
    s.add_argument("--lrs", type=_floats, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="learning-rate multipliers (>= 3 orders of magnitude)")
    s.add_argument("--sizes", type=_sizes, default=[(32, 2), (64, 2)],
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
        from .runtime import resolve_device

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
        from .run import read_checkpoint

        _, cfg, _ = read_checkpoint(args.baseline, ("best", "latest"), arg="--baseline")
        if cfg.model != "baseline":
            raise ValueError(f"--baseline {args.baseline}: is a {cfg.model} run, not a baseline (--model baseline) "
                             "run; pass it as --checkpoint")


def eval_main(argv: list[str] | None = None) -> int:
    """``lipschitz-eval``: the subcommand of ``argv``; returns the exit status."""
    from . import eval as ev
    from .tables import print_table

    args = _eval_parser().parse_args(argv)
    out = getattr(args, "out", None) or os.path.join("runs", f"eval-{args.cmd}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        _check_eval_args(args)
        if args.cmd == "certify":
            from .run_certificate import format_run_certificate, run_certificate

            rep = run_certificate(args.run, which=args.which, device=args.device)
            print(json.dumps(json_safe({k: v for k, v in rep.items() if k != "table"}), indent=2, allow_nan=False)
                  if args.json
                  else format_run_certificate(rep))
            return 0
        if args.cmd == "accuracy":
            from .run_accuracy import format_run_accuracy, run_accuracy

            rep = run_accuracy(args.run, tuple(args.protocol or EVAL_PROTOCOLS), which=args.which, device=args.device)
            print(json.dumps(json_safe(rep), indent=2, allow_nan=False) if args.json else format_run_accuracy(rep))
            return 0
        if args.cmd == "sample":
            from .sampling import sample_run

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
            from .sweep import frontier

            # a folder that exists is itself, glob characters and all; otherwise a pattern
            rows = frontier([d for pat in args.runs for d in ([pat] if os.path.exists(pat) else
                                                              sorted(glob.glob(pat)) or [pat])], out)
            print_table(rows, ["constraint", "sigma_max", "certified_bound", "val_accuracy", "run"])
        else:
            from .sweep import lr_sensitivity

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
