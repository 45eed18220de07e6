#!/usr/bin/env bash
# Create ./.venv and install rnf_fast into it with everything the main job and the tests need.
# Safe to rerun: an existing .venv is reused and only what is missing is installed.
#
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter (default: python3.11,
#                                               # else python3)
#   RNF_FAST_NO_EXTENSION=1 bash scripts/setup.sh   # skip the compiled extension
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip "setuptools>=77" wheel

# torch first, pinned: an open range would pull a multi-GB CUDA build on machines without a GPU.
# Without an NVIDIA driver, prefer PyTorch's CPU wheel index when it is reachable.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  extra=()
  if ! command -v nvidia-smi >/dev/null 2>&1 && .venv/bin/python - <<'PY' >/dev/null 2>&1
import urllib.request
urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=3)
PY
  then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "setup: installing torch==2.13.0"
  pip install -q "torch==2.13.0" "${extra[@]}"
fi

# Triton: CUDA builds of torch bring the Triton they were built with (keep it); the CPU build
# brings none, and the kernels' CPU tests (TRITON_INTERPRET=1) need 3.7.1: 3.6's interpreter
# breaks with numpy >= 2.4.
if ! .venv/bin/python -c "import triton" >/dev/null 2>&1; then
  echo "setup: installing triton==3.7.1 (kernel tests in interpreter mode)"
  pip install -q "triton==3.7.1"
fi

echo "setup: installing rnf_fast (editable) with its test, data, MNIST and plot extras"
pip install -q --no-build-isolation -e ".[test,data,mnist,plots]"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
