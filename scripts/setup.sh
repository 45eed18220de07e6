#!/usr/bin/env bash
# Create ./.venv and install rnf_fast into it with everything the main job and the tests need.
# Safe to rerun: an existing .venv is reused and only what is missing is installed.
#
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter (default: python3.11,
#                                               # else python3)
#   RNF_FAST_NO_EXTENSION=1 bash scripts/setup.sh   # skip the compiled extension
#   RNF_FAST_REQUIRE_EXTENSION=1 bash scripts/setup.sh   # fail if the extension does not build
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
# ninja: the extension's sources compile in parallel.
pip install -q --disable-pip-version-check --upgrade pip "setuptools>=77" wheel ninja

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

# Triton 3.6.0, what the GPU machine runs, in a folder of its own: tests/test_triton_compile.py
# puts it first on PYTHONPATH to check that every kernel also compiles for sm_90 under it.
if [ ! -d .venv/triton-3.6 ]; then
  echo "setup: installing triton==3.6.0 into .venv/triton-3.6 (sm_90 compile check)"
  if ! log=$(pip install -q --no-deps --target .venv/triton-3.6 "triton==3.6.0" 2>&1); then
    rm -rf .venv/triton-3.6
    echo "setup: skipped triton 3.6.0, its compile check will skip: $(tail -n 1 <<<"$log")"
  fi
fi

# --no-build-isolation: rnf_fast._C compiles against the torch installed above. Without it the
# package runs its fallback: say so last, where it is not lost among the build's messages.
echo "setup: installing rnf_fast (editable) with its test, data, MNIST and plot extras"
pip install -q --no-build-isolation -e ".[test,data,mnist,plots]"
if [ "${RNF_FAST_NO_EXTENSION:-0}" != 1 ] \
  && ! .venv/bin/python -c "import rnf_fast._C" >/dev/null 2>&1; then
  echo "setup: WARNING: rnf_fast._C is not built, rnf_fast runs its PyTorch fallback;" \
    "see why with: .venv/bin/python -m pip install -v --no-build-isolation -e ." >&2
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
