"""lipschitz_ext: train transformers with enforced and certified Lipschitz constants.

Importing the package loads the compiled op library (``torch.ops.lipschitz.*``).
The public API lives in submodules: :mod:`lipschitz_ext.ops` (kernels),
:mod:`lipschitz_ext.nn` (Lipschitz transformer modules) and
:mod:`lipschitz_ext.certify` (a callable module: ``lipschitz_ext.certify(model)``
returns a Certificate; ``lipschitz_ext.certify.empirical_lipschitz`` is a lower bound),
and :func:`load_run` (``lipschitz_ext.load_run("runs/x")``: the model, config and
tokenizer of a ``lipschitz-train`` run folder).
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

from . import fp8_scales, ops  # noqa: E402
from . import constraints  # noqa: E402
from .ops import orthogonalize  # noqa: E402
from . import nn  # noqa: E402
from . import certify  # noqa: E402  (callable module, see lipschitz_ext/certify.py)
from . import optim  # noqa: E402
from .run import LoadedRun, load_run  # noqa: E402  (a trained run folder: model, config, tokenizer)

__version__ = "0.1.0"

__all__ = ["LoadedRun", "certify", "constraints", "fp8_scales", "load_run", "nn", "ops", "optim", "orthogonalize",
           "__version__"]
