#!/usr/bin/env bash
# One-call check of the CUDA kernels on a GPU machine that already has torch (no network needed):
#   1. builds demem_ext._C with its CUDA kernels (pip install --no-build-isolation --no-deps -e .),
#   2. runs tests/ops/test_cuda.py, then tests/ops/test_ops.py tests/ops/test_philox.py tests/ops/test_build.py,
#   3. runs the fused-op benchmark on the GPU (benchmarks/bench_fused.py --device cuda): B x P up to
#      4 GB of fp32 per-sample gradients (64/256 x 1e5/1e6/4e6, 1024 x 1e6, 64 x 16e6; bf16 at the
#      largest P), the extension vs the plain PyTorch composition vs the exact reference (small shapes)
#      vs Opacus's DPOptimizer.pre_step(), with the device copy bandwidth measured in the same run,
#   4. profiles each kernel of the fused op against a device copy (python -m demem_ext.bench.cuda_passes:
#      which pass, if any, falls short of the bandwidth target),
#   5. if time is left, the training-step benchmark on the GPU (CNN and GroupNorm ResNet-18, PGD-10),
#   6. merges the benchmarks and the step summary into $OUT/gpu_bench.json.
# $OUT (default ./gpu_out) ends with four files: gpu_bench.json, summary.txt (one line per step with
# its exit code and duration), env.log and logs.tar.gz (every step's log and JSON, written to
# $OUT/logs/ while the script runs; the device tool brings back at most 8 files). A failing step is
# recorded and the script goes on; it exits non-zero if any step failed or was skipped. Budget:
# GPU_CHECK_SECONDS (default 480) in all: each step's timeout is cut to what is left, the training
# benchmark is skipped when less than 45 s are left, the merge and the bundle always run.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=python3 OUT=./gpu_out by default
#
# Wheels in .whl/ (benchmarks/gpu_wheels.sh fetches Opacus there) are installed first, into a
# temporary folder on PYTHONPATH: carry .whl when the machine cannot reach a package index.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-python3}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
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

# wheels carried from the build machine (benchmarks/gpu_wheels.sh: Opacus), installed without network
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/demem-wheels \
    .whl/*.whl >"$LOGS/wheels.log" 2>&1 || echo "installing .whl/*.whl failed" >>"$LOGS/wheels.log"
  export PYTHONPATH="/tmp/demem-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# Every step ends by DEADLINE seconds after the start (its timeout is cut to what is left, less
# RESERVE for the merge and the bundle), so the script finishes inside the device call's own timeout
# (give that call DEADLINE + about 60 s) and $OUT holds its four files even when steps ran long.
DEADLINE="${GPU_CHECK_SECONDS:-480}"
RESERVE=30

# step NAME TIMEOUT_SECONDS COMMAND...: runs COMMAND with its output in $LOGS/NAME.log
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - RESERVE - SECONDS))
  if [[ $name == merge ]]; then left=$((DEADLINE - SECONDS)); fi
  if ((left < 10)); then
    printf '%-12s skipped: %ss used of %ss\n' "$name" "$SECONDS" "$DEADLINE" | tee -a "$SUMMARY"
    FAILED=1
    return 0
  fi
  if ((limit > left)); then limit=$left; fi
  local start=$SECONDS rc=0
  echo "== $name: $*" | tee -a "$LOGS/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1 || rc=$?
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
  "$PYTHON" -c "import opacus; print('opacus', opacus.__version__)" 2>&1 || true
} >"$OUT/env.log" 2>&1

step build 330 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
step check_ext 60 "$PYTHON" -c "import torch; from demem_ext import ops, _C; print('backend', ops.backend(), 'cuda kernels', ops.extension_has_cuda(), 'cpu', _C.cpu_capability()); assert ops.extension_has_cuda() and torch.cuda.is_available()"
step test_cuda 200 "$PYTHON" -m pytest tests/ops/test_cuda.py -q -p no:cacheprovider -x --durations=10
step test_cpu 150 "$PYTHON" -m pytest tests/ops/test_ops.py tests/ops/test_philox.py tests/ops/test_build.py -q -p no:cacheprovider --durations=5
step bench_fused 150 "$PYTHON" benchmarks/bench_fused.py --device cuda --json "$LOGS/bench_fused_cuda.json"
step passes 90 "$PYTHON" -m demem_ext.bench.cuda_passes --json "$LOGS/cuda_passes.json"
# the training benchmark only gets what is left (at most 150 s), and only if that is 45 s or more
if ((DEADLINE - RESERVE - SECONDS >= 45)); then
  step bench_train 150 "$PYTHON" benchmarks/bench_training.py --device cuda --model all \
    --json "$LOGS/bench_training_cuda.json"
else
  printf '%-12s skipped: %ss used, too little time left\n' bench_train "$SECONDS" | tee -a "$SUMMARY"
fi
step merge 30 "$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
merged = {"summary": open(os.path.join(out, "summary.txt")).read().splitlines()}
for key, name in (("fused", "bench_fused_cuda.json"), ("passes", "cuda_passes.json"),
                  ("training", "bench_training_cuda.json")):
    path = os.path.join(out, "logs", name)
    merged[key] = json.load(open(path)) if os.path.exists(path) else None
json.dump(merged, open(os.path.join(out, "gpu_bench.json"), "w"), indent=2)
print("wrote", os.path.join(out, "gpu_bench.json"), "fused rows:", len((merged["fused"] or {}).get("rows", [])))
PY

for name in bench_fused passes bench_train; do
  if [[ -f "$LOGS/$name.log" ]]; then
    echo "---- $name"
    grep -v '^  B=' "$LOGS/$name.log" | sed -n '/^\(fused step\|CUDA fused step\|training step\)/,$p'
  fi
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"

echo "summary ($SUMMARY):"
cat "$SUMMARY"
exit "$FAILED"
