#!/usr/bin/env bash
# Everything UTIO's GPU kernels need checked on a CUDA GPU, in one run (< 9 min):
#   1. the GPU benchmark (benchmarks/gpu_decode_attention.py): correctness of every policy
#      against the torch reference on the device and CUDA-graph replay, then timings vs
#      torch SDPA dense and the HBM byte limit, and the issue's targets (<= 270 s);
#   2. the kernel tests compiled on CUDA (UTIO_KERNEL_DEVICE=cuda): split-KV attention,
#      block lists, summaries, selection, the no-host-sync check, CUDA-graph capture and
#      replay of every policy (<= 240 s).
# Needs python with torch and triton (no vLLM: the GPU-runner tests skip themselves).
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]    # default: $OUT, else results/gpu_check
#   bash scripts/gpu_check.sh --vendor         # on a machine with the project's .venv:
#       copy pytest and its pure-Python dependencies to build/gpu_vendor, for a GPU
#       machine without pytest (carry build/gpu_vendor there; this script finds it)
#
# STEPS="bench" or STEPS="tests" runs one step only (a rerun within the device budget).
# Writes to RESULTS_DIR: env.txt, bench.log, bench/results.{json,md} (rewritten after
# each measured point, so a timeout keeps what was measured), tests.log, tests.xml
# (JUnit), summary.txt. Exit status: 0 only if the steps run passed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENDOR="$ROOT/build/gpu_vendor"

if [ "${1:-}" = "--vendor" ]; then
  SITE="$("${UTIO_VENV:-$ROOT/.venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -rf "$VENDOR" && mkdir -p "$VENDOR"
  for pkg in pytest _pytest pluggy iniconfig packaging py.py; do
    cp -r "$SITE/$pkg" "$VENDOR/"
  done
  find "$VENDOR" -name __pycache__ -prune -exec rm -rf {} +
  echo "vendored pytest into $VENDOR ($(du -sh "$VENDOR" | cut -f1))"
  exit 0
fi

RESULTS="${1:-${OUT:-results/gpu_check}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
if ! "$PY" -c "import pytest" 2>/dev/null && [ -d "$VENDOR" ]; then
  export PYTHONPATH="$VENDOR${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("triton", triton.__version__)' 2>&1
  "$PY" -c 'import pytest; print("pytest", pytest.__version__)' 2>&1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
  git -C "$ROOT" status --short 2>/dev/null | head -50
} > "$RESULTS/env.txt"
cat "$RESULTS/env.txt"

STEPS="${STEPS:-bench tests}"
BENCH=0
TESTS=0
if [[ " $STEPS " == *" bench "* ]]; then
  echo "== 1. benchmark (<= 270 s)"
  timeout 270 "$PY" benchmarks/gpu_decode_attention.py --out "$RESULTS/bench" 2>&1 | tee "$RESULTS/bench.log"
  BENCH=${PIPESTATUS[0]}
fi
if [[ " $STEPS " == *" tests "* ]]; then
  echo "== 2. kernel tests on CUDA (<= 240 s)"
  UTIO_KERNEL_DEVICE=cuda timeout 240 "$PY" -m pytest -p no:cacheprovider -ra -q \
    --junitxml="$RESULTS/tests.xml" --durations=15 \
    tests/test_kernels_split.py tests/test_kernels_select.py tests/test_kernels_hotpath.py \
    tests/test_kernels_gpu_runner.py 2>&1 | tee "$RESULTS/tests.log"
  TESTS=${PIPESTATUS[0]}
fi

{
  echo "steps: $STEPS"
  echo "benchmark exit $BENCH (124: timed out)"
  echo "kernel tests exit $TESTS (124: timed out)"
  [ -f "$RESULTS/bench/results.md" ] && grep -E "^## Targets|MISSED|FAIL" "$RESULTS/bench/results.md"
} | tee "$RESULTS/summary.txt"
[ "$BENCH" -eq 0 ] && [ "$TESTS" -eq 0 ]
