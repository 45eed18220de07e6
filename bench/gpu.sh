#!/usr/bin/env bash
# On a machine with a CUDA GPU and the packages preinstalled (torch with CUDA, Triton, pytest;
# no network): build rnf_fast with its extension, run the CUDA-marked tests, then the GPU
# benchmark (bench/gpu_bench.py -> bench/results/gpu.json). Installs nothing from the network:
# pip runs with --no-deps --no-build-isolation and keeps the machine's torch and Triton.
#
#   bash bench/gpu.sh                 # PYTHON=python3.12 bash bench/gpu.sh to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device available:",
      torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the Triton backend and kernels will be skipped)")
PY

echo "== build"
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .; then
  echo "pip install failed; building the extension in place and running from the source tree"
  "$PY" setup.py build_ext --inplace || echo "extension build failed: PyTorch fallback"
  # rnf_fast.kernels lives in kernels/ (setup.py package_dir); mirror that layout in a tree.
  tree=$(mktemp -d)
  cp -r rnf_fast "$tree/rnf_fast"
  rm -rf "$tree/rnf_fast/kernels"
  cp -r kernels "$tree/rnf_fast/kernels"
  export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import rnf_fast, rnf_fast.kernels; print('backends:', rnf_fast.backend_report())"

echo "== CUDA tests"
# Only the files that hold CUDA-marked tests: the rest of the suite is CPU work.
mapfile -t files < <(grep -rl "mark.cuda" tests --include="test_*.py")
tests_status=0
"$PY" -m pytest -m cuda -q -p no:cacheprovider -rs "${files[@]}" || tests_status=$?

echo "== benchmark"
timeout 600 "$PY" bench/gpu_bench.py --device cuda --out bench/results/gpu.json
exit "$tests_status"
