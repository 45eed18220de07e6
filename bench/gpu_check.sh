#!/usr/bin/env bash
# The GPU check: one short run that builds rnf_fast with its CUDA extension, reports versions and
# backends, runs every CUDA test and the GPU benchmark, on a machine with the packages already
# installed (torch with CUDA, Triton, pytest; optional: cupy, gpytorch) and no network.
#
#   bash bench/gpu_check.sh --out DIR           # the whole check (about 5 minutes on an H200)
#   bash bench/gpu_check.sh --quick --out DIR   # one case per benchmark section (about 3 minutes)
#   bash bench/gpu_check.sh --cpu --build none  # CPU mode: checks this script (the test suite runs it)
#
# Options: --out DIR (default bench/results/gpu), --quick, --cpu (tiny sizes on the CPU),
# --build pip|minimal|none (default pip: `pip install --no-build-isolation --no-deps -e .`, and
# the minimal build below if that fails; minimal: only the minimal build; none: use what is
# installed), --sections a,b,... (default all: versions, build, info, cuda_tests,
# bench_ceilings, bench_kernels, bench_logdet, bench_graph_cg, report). PYTHON picks the interpreter (default
# python3).
#
# Every section has its own timeout, catches its own failure and records itself in
# DIR/check.json as it ends (status ok, failed or timeout, seconds, log file); a failed section
# never stops the next. The benchmark sections write DIR/bench_<section>.json row by row, and
# DIR/summary.md gathers everything at the end. The exit code is 0 only if every section passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=bench/results/gpu
QUICK=0
DEVICE=cuda
BUILD=pip
ALL_SECTIONS=versions,build,info,cuda_tests,bench_ceilings,bench_kernels,bench_logdet,bench_graph_cg,report
SECTIONS=$ALL_SECTIONS
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --cpu) DEVICE=cpu; shift ;;
    --build) BUILD=$2; shift 2 ;;
    --sections) SECTIONS=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUILD" in pip|minimal|none) ;; *) echo "gpu_check: --build must be pip, minimal or none" >&2; exit 2 ;; esac
for s in ${SECTIONS//,/ }; do
  [[ ",$ALL_SECTIONS," == *",$s,"* ]] || { echo "gpu_check: --sections: unknown section $s (sections: $ALL_SECTIONS)" >&2; exit 2; }
done
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # absolute
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/check.jsonl"
STAGE=$(mktemp -d)/rnf_fast_stage
export ROOT PY OUT STAGE QUICK DEVICE BUILD PYTHONUNBUFFERED=1
FAILED=0

record() {  # record SECTION STATUS MILLISECONDS
  "$PY" - "$OUT" "$1" "$2" "$3" <<'PY'
import json, os, sys
out, section, status, ms = sys.argv[1:]
row = {"section": section, "status": status, "seconds": int(ms) / 1e3, "log": f"{section}.log"}
with open(f"{out}/check.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
rows = [json.loads(line) for line in open(f"{out}/check.jsonl") if line.strip()]
with open(f"{out}/check.json.tmp", "w") as f:
    f.write(json.dumps(rows, indent=1) + "\n")
os.replace(f"{out}/check.json.tmp", f"{out}/check.json")
PY
}

section() {  # section NAME TIMEOUT_S COMMAND...: run, log, time out, record; never exits
  local name=$1 limit=$2 start status rc
  shift 2
  [[ ",$SECTIONS," == *",$name,"* ]] || return 0
  echo "== $name (timeout ${limit}s)"
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$status" = ok ] || FAILED=1
  record "$name" "$status" $((($(date +%s%N) - start) / 1000000))
  echo "== $name: $status"
}

versions() {
  "$PY" -P - <<'PY'
import importlib, json, platform, shutil, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("triton", "setuptools", "pytest", "pytest_benchmark", "cupy", "gpytorch", "numpy"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as exc:  # absent or broken: say which
        info[name] = f"unavailable ({type(exc).__name__}: {exc})"[:200]
nvcc = shutil.which("nvcc")
info["nvcc"] = (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
                .strip().splitlines()[-1] if nvcc else None)
for key, value in info.items():
    print(f"{key}: {value}")
PY
}

build_pip() {
  RNF_FAST_REQUIRE_EXTENSION=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
}

# The minimal build: the package tree as installed (rnf_fast with kernels/ as rnf_fast.kernels)
# in a staging folder without pyproject.toml, the extension built in place from setup.py's own
# extension list; nothing depends on the machine's setuptools reading pyproject.toml. The
# sections after it import rnf_fast from there (PYTHONPATH), never from the source tree.
build_minimal() {
  rm -rf "$STAGE" && mkdir -p "$STAGE" || return 1
  cp -r rnf_fast csrc setup.py "$STAGE/" && rm -rf "$STAGE/rnf_fast/kernels" \
    && cp -r kernels "$STAGE/rnf_fast/kernels" || return 1
  (cd "$STAGE" && RNF_FAST_REQUIRE_EXTENSION=1 "$PY" -P "$ROOT/bench/gpu_build.py") || return 1
  touch "$STAGE/.built"
  export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
}

built_and_current() {  # an importable _C (with CUDA where torch has it), newer than csrc/
  "$PY" -P - <<'PY'
import pathlib, sys
import torch
try:
    from rnf_fast import _C
except ImportError:
    sys.exit(1)
newest = max(p.stat().st_mtime for p in pathlib.Path("csrc").rglob("*") if p.is_file())
current = pathlib.Path(_C.__file__).stat().st_mtime > newest
sys.exit(0 if current and (_C.WITH_CUDA or torch.version.cuda is None) else 1)
PY
}

build() {
  case "$BUILD" in
    none) ;;
    minimal) build_minimal || return 1 ;;
    pip)
      if built_and_current; then
        echo "rnf_fast._C is installed and newer than csrc/: not rebuilt"
      elif ! build_pip; then
        echo "pip install failed: the minimal build in $STAGE"
        build_minimal || return 1
      fi ;;
  esac
  # Loud: a CUDA torch with nvcc must give an extension with CUDA kernels.
  "$PY" -P - <<'PY'
import shutil, sys
import torch
import rnf_fast, rnf_fast.kernels
from rnf_fast.ops import cpp as cpp_backend
print("rnf_fast from", rnf_fast.__file__)
C = cpp_backend._C
print("rnf_fast._C:", "missing: " + str(cpp_backend.unavailable_reason()) if C is None
      else f"built, WITH_CUDA={C.WITH_CUDA}")
if torch.version.cuda is not None and shutil.which("nvcc") and (C is None or not C.WITH_CUDA):
    sys.exit("FAILED: torch has CUDA and nvcc is here, but rnf_fast._C has no CUDA kernels")
PY
}

info() {
  "$PY" -P -m rnf_fast.cli info
}

cuda_tests() {
  # -o addopts=: the project's addopts name a pytest-benchmark option; run without that plugin.
  "$PY" -P -m pytest tests -m cuda -o addopts= -q -rs -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"
}

bench() {
  local args=(--section "$1" --device "$DEVICE" --out "$OUT")
  [ "$QUICK" = 1 ] && args+=(--quick)
  "$PY" -P bench/gpu_bench.py "${args[@]}"
}

# Section timeouts (seconds): the whole check stays within 5 minutes on an H200 when nothing
# hangs; a hang costs at most its own section's limit.
if [ "$QUICK" = 1 ]; then T_TESTS=120 T_BENCH=90; else T_TESTS=150 T_BENCH=150; fi
export -f versions built_and_current build_pip build_minimal build info cuda_tests bench
section versions 60 versions
section build 240 build
# The build ran in a child shell: later sections import from the staging tree if it built one.
[ -f "$STAGE/.built" ] && export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
section info 60 info
section cuda_tests "$T_TESTS" cuda_tests
section bench_ceilings 60 bench ceilings
section bench_kernels "$T_BENCH" bench kernels
section bench_logdet "$T_BENCH" bench logdet
section bench_graph_cg 90 bench graph_cg
section report 60 "$PY" -P bench/gpu_bench.py --report "$OUT"
rm -f "$OUT/check.jsonl"
echo "results in $OUT (check.json, bench_*.json, summary.md, *.log)"
exit "$FAILED"
