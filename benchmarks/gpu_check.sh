#!/usr/bin/env bash
# One command for a GPU machine that has torch, triton, nvcc and pytest-benchmark but not
# diffusers (its wheel, and the others in shared/wheels, are copied into .whl/ and carried):
#   1. install the wheels and build diffcr with the CUDA kernels (MAX_JOBS=16);
#   2. GPU tests (bf16 and fp32): op tests against the reference, fused == compat, training
#      step, CUDA-graph capture, inductor compile;
#   3. compute-sanitizer memcheck and racecheck over every CUDA op (fwd + bwd, all dtypes);
#   4. `diffcr bench` (block: dense vs routed vs naive, overhead, two-bin step) and the kernel /
#      block / model benchmark suites, and a results table.
# Writes everything under $OUT (default benchmarks/results/<date>-<gpu>/). Target: < 8 min on
# an H100. Usage: bash benchmarks/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
OUT=${OUT:-benchmarks/results/$(date +%Y%m%d)-${GPU:-gpu}}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
export DIFFCR_CUDA_ARCHS=${DIFFCR_CUDA_ARCHS:-"80;90"}
status=0

step "install wheels + build (archs $DIFFCR_CUDA_ARCHS)" | tee "$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl 2>&1 | tail -3
fi
pip install -q --no-build-isolation --no-deps --target "$SITE" . > "$OUT/build.txt" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.txt"; exit 1; }
(cd /tmp && python -m diffcr info) | tee "$OUT/info.txt"
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/device.txt" 2>&1

step "GPU tests" | tee -a "$OUT/log.txt"
DIFFCR_REQUIRE_EXT=1 timeout 240 pytest tests -m gpu -q -p no:cacheprovider -p no:logging \
  > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.txt"

if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" | tee -a "$OUT/log.txt"
    (cd /tmp && timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python "$OLDPWD/benchmarks/sanitize_ops.py" --device cuda) > "$OUT/sanitizer_$tool.txt" 2>&1 \
      || status=1
    tail -3 "$OUT/sanitizer_$tool.txt"
  done
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer_missing.txt"
fi

step "diffcr bench (N = 4096, B = 8 and N = 1024, B = 1, bf16)" | tee -a "$OUT/log.txt"
(cd /tmp && timeout 150 python -m diffcr bench --rounds 10 --json) > "$OUT/diffcr_bench_b8.json" \
  2>&1 || status=1
(cd /tmp && timeout 90 python -m diffcr bench --tokens 1024 --batch 1 --rounds 20 --json) \
  > "$OUT/diffcr_bench_b1.json" 2>&1 || status=1

step "benchmarks" | tee -a "$OUT/log.txt"
SEL=""
[ "${1:-}" = "quick" ] && SEL="-k kernels"
timeout 300 pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -p no:logging $SEL \
  --benchmark-json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1 || status=1
tail -3 "$OUT/bench.txt"
python benchmarks/summarize.py "$OUT/bench.json" --command "bash benchmarks/gpu_check.sh $*" \
  > "$OUT/summary.md" 2>&1 || status=1
cat "$OUT/summary.md"
step "done (status $status)" | tee -a "$OUT/log.txt"
exit $status
