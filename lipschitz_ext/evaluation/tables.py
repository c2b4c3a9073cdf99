"""Result tables of the experiment commands: CSV + JSON files and the console."""

from __future__ import annotations

import csv
import json
import os

from ..storage.files import json_safe


__all__ = ["write_table", "print_table"]


def write_table(rows: list[dict], path: str) -> None:
    """``rows`` as CSV at ``path`` and as strict JSON (a list of objects, ``None`` and
    non-finite numbers as null)
    beside it with the extension ``.json``."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump(json_safe(rows), fh, indent=1, allow_nan=False)  # strict JSON: inf / NaN as null


def print_table(rows: list[dict], cols: list[str]) -> None:
    """``cols`` of ``rows`` as aligned text columns (floats to 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max([len(c), *(len(fmt(r.get(c, ""))) for r in rows)]) for c in cols]  # rows may be []
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
