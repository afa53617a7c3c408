#!/usr/bin/env bash
# The Triton tests under another Triton release, on CPU (the interpreter) plus the ahead-of-time
# sm_90 compile of every kernel: the GPU image carries triton 3.6 while CI takes the newest, and
# the kernels must build on both. Needs network access to PyPI (one ~190 MB wheel).
#   make triton-compat                      # triton 3.6.0
#   make triton-compat TRITON_VERSION=3.7.0
#   make triton-compat TORCH=torch==2.11.0   # the GPU image's torch as well (CUDA build, ~3 GB)
# Uses its own venv (.venv-triton<version>), so the main .venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${TRITON_VERSION:-3.6.0}
PY=${PY:-python3}
VENV=.venv-triton$VERSION
TORCH=${TORCH:-torch==2.13.0}
# Triton 3.6 and older interpreters fail on numpy 2.4 (launch.interpreter_problem).
NUMPY="numpy"
if [[ $(printf '%s\n' "$VERSION" 3.7 | sort -V | head -1) != 3.7 ]]; then NUMPY="numpy<2.4"; fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q $TORCH "triton==$VERSION" "$NUMPY" pytest
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
# PYTHONPATH uses this checkout without installing it; pytest reads pyproject.toml as usual.
TRITON_INTERPRET=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/attention/test_mra_triton.py "$@"
