#!/usr/bin/env bash
# One-call check of the CUDA kernels on a GPU machine that already has torch (no network needed):
#   1. builds demem_ext._C with its CUDA kernels (pip install --no-build-isolation --no-deps -e .),
#   2. runs tests/test_cuda.py, then tests/test_ops.py tests/test_philox.py tests/test_build.py,
#   3. runs benchmarks/bench_fused.py --device cuda (table + JSON).
# Every log, the JSON and summary.txt (one line per step with its exit code and duration) go under
# $OUT (default ./gpu_out). A failing step is recorded and the script goes on; it exits non-zero if
# any step failed. Budget: well under 8 minutes on one H100/H200 with 16 cores.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=python3 OUT=./gpu_out by default
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}"
export DEMEM_BUILD_CUDA=1
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}"
# torch.utils.cpp_extension derives CUDA_HOME from the nvcc on PATH; a wrapper script there (e.g.
# /usr/local/bin/nvcc) would point it at the wrong prefix. Ask nvcc where it really lives.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  top="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)"
  if [[ -n "$top" && -d "$top/include" ]]; then
    CUDA_HOME="$(cd "$top" && pwd)"
    export CUDA_HOME
  fi
fi

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME TIMEOUT_SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc=0
  echo "== $name: $*" | tee -a "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start))
  printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" "$took" "$*" | tee -a "$SUMMARY"
  if [[ $rc -ne 0 ]]; then FAILED=1; fi
  return 0
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 || true
} >"$OUT/env.log" 2>&1

step build 330 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
step check_ext 60 "$PYTHON" -c "import torch; from demem_ext import ops, _C; print('backend', ops.backend(), 'cuda kernels', ops.extension_has_cuda(), 'cpu', _C.cpu_capability()); assert ops.extension_has_cuda() and torch.cuda.is_available()"
step test_cuda 200 "$PYTHON" -m pytest tests/test_cuda.py -q -p no:cacheprovider -x --durations=10
step test_cpu 150 "$PYTHON" -m pytest tests/test_ops.py tests/test_philox.py tests/test_build.py -q -p no:cacheprovider --durations=5
step bench_cuda 150 "$PYTHON" benchmarks/bench_fused.py --device cuda --dtype fp32 bf16 --json "$OUT/bench_cuda.json"

echo "summary ($SUMMARY):"
cat "$SUMMARY"
exit "$FAILED"
