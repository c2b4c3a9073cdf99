"""lipschitz_ext: train neural networks with enforced and certified Lipschitz constants.

Importing the package loads the compiled op library (``torch.ops.lipschitz.*``).
Subpackages, imports going one way (``docs/layout.md``): :mod:`~lipschitz_ext.ops`
(kernels) -> :mod:`~lipschitz_ext.constraints` -> :mod:`~lipschitz_ext.nn` ->
:mod:`~lipschitz_ext.optim` -> :mod:`~lipschitz_ext.certify` -> :mod:`~lipschitz_ext.evaluation`
-> :mod:`~lipschitz_ext.training` -> :mod:`~lipschitz_ext.experiments` -> :mod:`~lipschitz_ext.cli`,
with :mod:`~lipschitz_ext.data` and :mod:`~lipschitz_ext.storage` below them all.
:func:`load_run` (``lipschitz_ext.load_run("runs/x")``) returns the model, config and
tokenizer of a ``lipschitz-train`` run folder.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before our extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.lipschitz.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "lipschitz_ext._C is not built. Build it against the installed torch with\n"
        "    pip install --no-build-isolation -e .\n"
        "(or run scripts/setup.sh). If you ran from the source tree after a non-editable "
        f"install, run from another directory. Original error: {exc}"
    ) from exc

from . import certify, constraints, nn, ops, optim  # noqa: E402
from .training.run import LoadedRun, load_run  # noqa: E402

__version__ = "0.1.0"

__all__ = ["LoadedRun", "certify", "constraints", "load_run", "nn", "ops", "optim", "__version__"]
