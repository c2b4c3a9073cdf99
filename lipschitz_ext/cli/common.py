"""What the commands share: the flags every TrainConfig field gets, list-valued flag
parsers, and the one ``error:`` line bad input ends with."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..training.config import PRESETS, TrainConfig

__all__ = ["DEFAULT_PRESET", "add_config_flags", "config_overrides", "float_list", "format_presets", "int_list",
           "preset_of", "size_list", "str_list"]

DEFAULT_PRESET = "shakespeare-cpu"
_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float}


# ---------------------------------------------------------------------------
# lipschitz-train
# ---------------------------------------------------------------------------
def preset_of(argv: list[str]) -> str:
    """The ``--preset`` among ``argv`` (the default when absent or unknown: argparse reports it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULT_PRESET)
    preset = pre.parse_known_args(argv)[0].preset
    return preset if preset in PRESETS else DEFAULT_PRESET


def _preset_values(preset: str) -> TrainConfig:
    return TrainConfig(preset=preset, **PRESETS[preset])


def add_config_flags(p: argparse.ArgumentParser, preset: str, skip: tuple[str, ...] = ()) -> None:
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


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (flags left unset are not overrides)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def float_list(s: str) -> list[float]:
    """Comma-separated numbers (possibly none: each command checks what it needs and names its flag)."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def int_list(s: str) -> list[int]:
    """Comma-separated integers."""
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def str_list(s: str) -> list[str]:
    """Comma-separated names (blanks dropped)."""
    return [v.strip() for v in s.split(",") if v.strip()]


def size_list(s: str) -> list[tuple[int, int]]:
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


