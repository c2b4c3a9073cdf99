"""``lipschitz-classify``: certified MLP image classifiers.

    lipschitz-classify train --dataset fashion-mnist --data DIR --time-budget 600 --out RUN
    lipschitz-classify train --resume RUN
    lipschitz-classify certify RUN [--data DIR]       # certified accuracy by radius, bound
    lipschitz-classify attack RUN [--examples N]      # PGD-l2 accuracy and the soundness check
    lipschitz-classify sweep --data DIR --out DIR     # optimizer x constraint x lr, frontier plot
    lipschitz-classify presets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..certify.classifier import DEFAULT_RADII, certified_accuracy, certified_radii, pgd_l2, soundness_check
from ..data.images import ImageDataError, load_image_data
from ..storage.files import CheckpointError
from ..storage.folder import RunFolderError
from ..experiments.classifier_sweep import sweep_classifiers
from ..training.classifier import train_classifier
from ..training.classifier_config import ClassifyConfig, classify_config
from ..training.classifier import is_classifier_run, load_classifier_run
from ..training.classifier_config import CLASSIFY_PRESETS
from ..training.run import resolve_data_path
from .common import float_list, int_list, str_list

__all__ = ["main"]


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


#: (flag, type, help) of every ClassifyConfig field a command line may set
_FIELDS = [
    ("dataset", str, "fashion-mnist, mnist or cifar10"),
    ("data", str, "folder of the data set's files (default: the distribution's folder when installed)"),
    ("out", str, "run folder to create (absent or empty)"),
    ("widths", int_list, "hidden widths, e.g. 256,256"),
    ("bias", _bool, "linear biases (true/false)"),
    ("activation", str, "relu or maxmin"),
    ("init", str, "orthogonal or paper"),
    ("center", _bool, "subtract the training set's mean image inside the model (true/false)"),
    ("optimizer", str, "muon or adamw"),
    ("constraint", str, "a lipschitz_ext.constraints name (hard_cap, soft_cap, normalize, ...) or none"),
    ("cap", float, "each layer's spectral-norm cap"),
    ("cap_frame", str, "l2 (network bound cap ** depth) or rms (the paper's RMS->RMS frame)"),
    ("lr", float, "peak learning rate (decays linearly to zero)"),
    ("weight_decay", float, "decoupled weight decay (for spectral_weight_decay: its strength)"),
    ("batch_size", int, "examples per step"),
    ("loss", str, "ce or margin_ce"),
    ("margin_eps", float, "margin_ce's radius"),
    ("logit_scale", float, "logits are multiplied by this inside the cross-entropy"),
    ("time_budget", float, "seconds of training; the lr reaches zero there"),
    ("steps", int, "step limit (the lr reaches zero there when no time budget is set)"),
    ("eval_every", float, "seconds of training between test evaluations"),
    ("checkpoint_every", float, "seconds of training between checkpoints"),
    ("seed", int, "seed of the initialisation and the batch order"),
    ("threads", int, "torch CPU threads (0: torch's default)"),
    ("radii", float_list, "l2 radii reported (pixels in [0, 1])"),
    ("attack_examples", int, "test examples attacked with PGD-l2 after training (0: none)"),
    ("attack_steps", int, "PGD steps per start"),
    ("attack_restarts", int, "PGD starts per example"),
]


def _add_fields(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for name, typ, help_ in _FIELDS:
        if name not in skip:
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lipschitz-classify", description="certified Lipschitz MLP classifiers")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one classifier (default: the certified recipe)")
    t.add_argument("--preset", default="certified", choices=sorted(CLASSIFY_PRESETS))
    t.add_argument("--resume", default=None, help="continue the run in this folder")
    t.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true")
    _add_fields(t)
    for cmd, help_ in (("certify", "certified accuracy by radius and the certified bound of a run"),
                       ("attack", "PGD-l2 accuracy by radius and the soundness check of a run")):
        c = sub.add_parser(cmd, help=help_)
        c.add_argument("run_dir")
        c.add_argument("--data", default=None, help="data folder (default: the run's)")
        c.add_argument("--radii", type=float_list, default=None)
        if cmd == "attack":
            c.add_argument("--examples", type=int, default=1000, help="first test examples attacked")
            c.add_argument("--steps", type=int, default=50)
            c.add_argument("--restarts", type=int, default=3)
    s = sub.add_parser("sweep", help="optimizer x constraint x lr grid, frontier plot and table")
    s.add_argument("--optimizers", type=str_list, default=["adamw", "muon"])
    s.add_argument("--constraints", type=str_list, default=["weight_decay", "normalize", "soft_cap", "hard_cap"])
    s.add_argument("--caps", type=float_list, default=[1.0, 2.0])
    s.add_argument("--muon-lrs", type=float_list, default=[0.05, 0.1, 0.2])
    s.add_argument("--adamw-lrs", type=float_list, default=[3e-4, 1e-3, 3e-3])
    s.add_argument("--weight-decays", type=float_list, default=[0.1, 1.0],
                   help="weight decays of the weight_decay method (it takes no cap)")
    s.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    s.add_argument("--quiet", action="store_true")
    _add_fields(s, skip=("optimizer", "constraint", "cap", "lr", "weight_decay"))
    sub.add_parser("presets", help="list the presets")
    return ap


def _overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name, _, _ in _FIELDS if getattr(args, name, None) is not None}


def _print_eval(run_dir: str, res: dict) -> None:
    print(json.dumps(res, indent=2))


def _load(run_dir: str, data_dir: str | None):
    if not is_classifier_run(run_dir):
        raise CheckpointError(f"{run_dir}: not a lipschitz-classify run folder (no config.json with task classify)")
    run = load_classifier_run(run_dir)
    data = load_image_data(run.config.dataset, data_dir or resolve_data_path(run.config.data, run_dir))
    return run, data


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lipschitz-classify``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)

    try:
        if args.command == "presets":
            for name, (desc, fields) in CLASSIFY_PRESETS.items():
                print(f"{name}: {desc}\n    {fields or '(the defaults)'}")
            return 0
        if args.command == "train":
            if args.resume:
                summary = train_classifier(resume=args.resume, quiet=args.quiet, overrides=_overrides(args))
            else:
                if args.config_json:
                    cfg = ClassifyConfig(**json.loads(args.config_json))
                else:
                    cfg = classify_config(args.preset, **_overrides(args))
                summary = train_classifier(cfg, quiet=args.quiet)
            if summary.get("status") == "interrupted":
                return 130
            acc = summary["clean_accuracy"]
            cert = ", ".join(f"{r}: {100 * a:.1f}%" for r, a in summary["certified_accuracy"].items())
            print(f"{summary['status']} after {summary['steps']} steps in {summary['wall_seconds']:.0f} s | "
                  f"test accuracy {100 * acc:.2f}% | certified bound {summary['certified_bound']:.4g}\n"
                  f"  certified accuracy by l2 radius: {cert}")
            if "pgd_accuracy" in summary:
                pgd = ", ".join(f"{r}: {100 * a:.1f}%" for r, a in summary["pgd_accuracy"].items())
                print(f"  PGD-l2 accuracy ({summary['pgd']['examples']} examples): {pgd}\n"
                      f"  soundness: {summary['soundness']['flipped']} of {summary['soundness']['certified']} "
                      "certified predictions flipped by the attack")
            return 0 if summary["status"] in ("completed", "time_budget") else 1
        if args.command in ("certify", "attack"):
            run, data = _load(args.run_dir, args.data)
            radii = args.radii or run.config.radii or list(DEFAULT_RADII)
            if args.command == "certify":
                radius, correct, L = certified_radii(run.model, data.test_x, data.test_y)
                _print_eval(args.run_dir, {"clean_accuracy": float(correct.double().mean()), "certified_bound": L,
                                           "certified_accuracy": certified_accuracy(radius, correct, radii)})
                return 0
            if args.examples < 1 or args.steps < 1 or args.restarts < 1:
                raise ValueError("--examples, --steps and --restarts must be >= 1")
            k = min(args.examples, data.test_y.shape[0])
            x, y = data.test_x[:k], data.test_y[:k]
            _, correct, _ = certified_radii(run.model, x, y)
            res = {"examples": k, "pgd_accuracy": {
                f"{e:g}": float((correct & ~pgd_l2(run.model, x, y, e, steps=args.steps,
                                                   restarts=args.restarts)).double().mean()) for e in radii},
                "soundness": soundness_check(run.model, x, y, steps=args.steps, restarts=args.restarts)}
            _print_eval(args.run_dir, res)
            return 0 if res["soundness"]["flipped"] == 0 else 1
        if args.command == "sweep":
            base = {**dataclasses.asdict(ClassifyConfig()), "preset": "lipschitz", "loss": "ce",
                    "attack_examples": 0, "threads": 1, **_overrides(args)}
            base.pop("out", None)
            out = args.out or "runs/classify-sweep"
            if not base.get("time_budget") and not base.get("steps"):
                raise ValueError("--time-budget: give each sweep run a time budget (seconds) or --steps")
            ClassifyConfig(**{**base, "out": out}).validate()
            grid = []
            for o in args.optimizers:
                lrs = args.muon_lrs if o == "muon" else args.adamw_lrs
                for c in args.constraints:
                    for lr in lrs:
                        if c in ("weight_decay", "spectral_weight_decay"):
                            grid += [{"optimizer": o, "constraint": c, "lr": lr, "weight_decay": wd}
                                     for wd in args.weight_decays]
                        elif c == "none":
                            grid.append({"optimizer": o, "constraint": c, "lr": lr})
                        else:
                            grid += [{"optimizer": o, "constraint": c, "lr": lr, "cap": cap} for cap in args.caps]
            for point in grid:
                ClassifyConfig(**{**base, **point, "out": out}).validate()
            rows = sweep_classifiers(base, grid, out, jobs=args.jobs, quiet=args.quiet)
            print(f"{out}/frontier.md, frontier.png: {len(rows)} runs")
            return 0
    except (ValueError, TypeError, ImageDataError, CheckpointError, RunFolderError, OSError) as exc:
        print(f"lipschitz-classify: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
