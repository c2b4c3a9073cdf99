"""``lipschitz-train``: one run, a resumed run, a sweep, or the presets.

    lipschitz-train [--preset P] [--FIELD VALUE ...]     # one run (--preset P --help: P's values)
    lipschitz-train --resume RUN_DIR                      # continue a run exactly
    lipschitz-train sweep --sigma-max 0.5,1,2 --constraint soft_cap,hard_cap
    lipschitz-train presets                               # the presets and their settings
    torchrun --nproc-per-node N -m lipschitz_ext.cli.train [...]   # data-parallel

Every flag is a :class:`~lipschitz_ext.training.config.TrainConfig` field.
Bad input ends with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from ..data import text as data_mod
from ..experiments.sweep import sweep
from ..training import loop as train_mod
from ..training.config import PRESETS, config_from_preset, preset_override_notes
from .common import DEFAULT_PRESET, add_config_flags, float_list, config_overrides, preset_of, format_presets

__all__ = ["train_main"]

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
        p.add_argument("--sigma-max", dest="sweep_sigma", type=float_list, required=True,
                       help="comma-separated caps of the hidden matrices, e.g. 0.5,1,2,4 (each replaces the "
                            "preset's per-group caps)")
        p.add_argument("--constraint", dest="sweep_constraint", default="soft_cap",
                       help="comma-separated constraint methods (default soft_cap)")
    else:
        p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    add_config_flags(p, preset, skip=("sigma_max", "constraint") if sweep else ())
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``lipschitz-train``: one run, ``sweep`` or ``presets``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["presets"]:
        print(format_presets())
        return 0
    is_sweep = argv[:1] == ["sweep"]
    argv = argv[1:] if is_sweep else argv
    args = _train_parser(preset_of(argv), is_sweep).parse_args(argv)
    ov = config_overrides(args)

    try:
        if is_sweep:
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




if __name__ == "__main__":
    sys.exit(train_main())
