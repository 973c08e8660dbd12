#!/usr/bin/env bash
# The one GPU command. Built for scarce GPU time: it always brings something back.
#
#   bash benchmarks/gpu_check.sh [quick]
#
# On the lent GPU machine (device tool), from the repository root, with the wheels carried:
#   mkdir -p .whl && cp ../shared/wheels/*.whl .whl/    # here, once; .whl/ is git-ignored
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Carry the diffusers wheel (and the importlib_metadata wheel beside it); add a setuptools>=77
# wheel to .whl/ only if the preflight says the image's setuptools is too old.
#
# What it does, most informative first, every step cut to one global deadline:
#   0. preflight: versions (python, torch, CUDA, triton, numpy, setuptools, nvcc, GPU) into
#      preflight.txt; installs .whl/*.whl into $SITE; stops at once (exit 2) naming what is
#      missing (no GPU, CPU-only torch, no nvcc, no triton, setuptools < 77, no diffusers,
#      no pytest / pytest-benchmark);
#   1. build diffcr for this GPU's own arch only (DIFFCR_CUDA_ARCHS from nvidia-smi);
#   2. correctness on the GPU: the `gpu`-marked tests (CUDA ops against the reference, fused ==
#      compat, training step, CUDA graphs, inductor), then the compiled-Triton tests apart;
#   3. compute-sanitizer memcheck over every CUDA op with torch's caching allocator off (no
#      racecheck: it only sees shared memory, which these kernels do not use). A refusal of the
#      sanitizer on this machine is recorded, not counted as a failure;
#   4. `diffcr bench` (block: dense vs routed vs naive vs token cache, and mask-aware routing at N = 4096 B = 8; N = 1024 B = 1;
#      Flux.1's training step under bf16 autocast and its regionally compiled forward), then
#      the modern families' blocks (SD3.5-L, Flux.1 double and single, Wan 1.3B and 14B,
#      Qwen-Image, HunyuanVideo; N = 4096, B = 1) and Wan 1.3B at 480p, 81 frames (32,760);
#   5. on a machine with several GPUs: per-rank block time under context parallelism (Ulysses
#      over every GPU), dense vs routed (benchmarks/cp_block_time.py);
#   6. the benchmark suites (pytest-benchmark JSON) and their table.
# Results go under $OUT step by step (the device tool sets OUT; default
# benchmarks/results/<date>-<gpu>/): steps.tsv, one log per step, summary.md. On the deadline
# (GPU_CHECK_DEADLINE, default 540 s), a TERM/INT, or a failed step the summary is still written.
#
# Test hooks (used by tests/test_gpu_check_script.py on CPU):
#   GPU_CHECK_DRY_RUN=1      preflight runs and reports but missing pieces are not fatal; each
#                            step runs `sleep GPU_CHECK_DRY_STEP_S` (default 1) instead
#   NVIDIA_SMI=cmd           the nvidia-smi to ask (default nvidia-smi)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
T0=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-540}
RESERVE=${GPU_CHECK_RESERVE:-10}   # seconds kept for the summary
DRY=${GPU_CHECK_DRY_RUN:-0}
SMI=${NVIDIA_SMI:-nvidia-smi}
MODE=${1:-full}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONDONTWRITEBYTECODE=1

GPU=$($SMI --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_')
OUT=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-${GPU:-gpu}}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tlog\n' > "$STEPS"
FAILED=0
SUMMARY_DONE=0

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "=== [$(elapsed)s] $*" | tee -a "$OUT/log.txt"; }

# run_step NAME BUDGET_S CMD...: runs CMD (through bash -c) with a timeout of
# min(BUDGET_S, time left before the deadline minus the reserve), output to $OUT/NAME.txt.
run_step() {
  local name=$1 budget=$2; shift 2
  local left=$(( DEADLINE - RESERVE - $(elapsed) ))
  local t=$(( budget < left ? budget : left ))
  if (( t < 5 )); then
    printf '%s\tskipped (deadline)\t0\t-\n' "$name" >> "$STEPS"
    FAILED=1
    log "$name: skipped, ${left}s left before the deadline"
    return 124
  fi
  log "$name (timeout ${t}s)"
  local s0 rc status
  s0=$(date +%s)
  # in the background + wait, so that a TERM reaches the trap at once
  if [ "$DRY" = 1 ]; then
    timeout "$t" sleep "${GPU_CHECK_DRY_STEP_S:-1}" > "$OUT/$name.txt" 2>&1 &
  else
    timeout --kill-after=5 "$t" bash -c "$*" > "$OUT/$name.txt" 2>&1 &
  fi
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${t}s"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\t%s.txt\n' "$name" "$status" "$(( $(date +%s) - s0 ))" "$name" >> "$STEPS"
  log "$name: $status"
  tail -n 4 "$OUT/$name.txt" | sed 's/^/    /'
  return $rc
}

summary() {
  [ "$SUMMARY_DONE" = 1 ] && return
  SUMMARY_DONE=1
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- command: \`bash benchmarks/gpu_check.sh ${MODE}\` (deadline ${DEADLINE}s, ran $(elapsed)s)"
    echo "- git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    [ -f "$OUT/preflight.txt" ] && sed 's/^/- /' "$OUT/preflight.txt"
    echo
    echo "| step | status | s | log |"
    echo "|---|---|---|---|"
    tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
    for f in gpu_tests.txt triton_tests.txt memcheck.txt; do
      [ -s "$OUT/$f" ] && { echo; echo "## $f (last lines)"; echo '```'; tail -n 15 "$OUT/$f"; echo '```'; }
    done
    if [ -s "$OUT/bench.json" ] && [ "$DRY" != 1 ]; then
      echo
      "$PY" "$ROOT/benchmarks/summarize.py" "$OUT/bench.json" \
        --command "bash benchmarks/gpu_check.sh $MODE" 2>&1
    fi
  } > "$OUT/summary.md"
  echo "summary: $OUT/summary.md"
}
CHILD=
on_signal() {
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2> /dev/null
  printf 'interrupted\tsignal at %ss\t-\t-\n' "$(elapsed)" >> "$STEPS"
  log "interrupted"
  summary
  exit 3
}
trap on_signal TERM INT
trap summary EXIT

# ---------------------------------------------------------------------------------------------
# 0. preflight
# ---------------------------------------------------------------------------------------------
log "preflight"
if ls .whl/*.whl > /dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    echo "would install: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')" >> "$OUT/log.txt"
  else
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl \
      > "$OUT/wheels.txt" 2>&1 || { echo "installing .whl/*.whl failed:"; tail -5 "$OUT/wheels.txt"; }
  fi
fi
"$SMI" > "$OUT/nvidia-smi.txt" 2>&1
CAP=$($SMI --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
"$PY" - "$CAP" > "$OUT/preflight.txt" 2> "$OUT/preflight_err.txt" <<'PY'
import importlib, importlib.metadata as md, shutil, subprocess, sys

missing = []
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

print(f"python {sys.version.split()[0]}")
gpu = sys.argv[1]
print(f"gpu compute capability: {gpu or 'none (nvidia-smi gave nothing)'}")
if not gpu:
    missing.append("a GPU: nvidia-smi reports none")
try:
    import torch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"cuda available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    if torch.version.cuda is None:
        missing.append("a CUDA build of torch (this one is CPU-only)")
    elif not torch.cuda.is_available():
        missing.append("torch.cuda.is_available() is False")
except ImportError as e:
    missing.append(f"torch ({e})")
for name, need in (("triton", "triton"), ("numpy", "numpy"), ("setuptools", "setuptools"),
                   ("diffusers", "diffusers (carry ../shared/wheels/diffusers-*.whl in .whl/)"),
                   ("pytest", "pytest"), ("pytest-benchmark", "pytest-benchmark"),
                   ("safetensors", "safetensors")):
    v = ver(name)
    print(f"{name} {v or 'MISSING'}")
    if v is None:
        missing.append(need)
st = ver("setuptools")
if st and int(st.split(".")[0]) < 77:
    missing.append(f"setuptools >= 77 (pyproject's license field), found {st}: carry a "
                   "setuptools wheel in .whl/")
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if shutil.os.path.exists("/usr/local/cuda/bin/nvcc") else None)
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print("nvcc " + (out.strip().splitlines()[-1] if out.strip() else "?"))
else:
    print("nvcc MISSING")
    missing.append("nvcc (the CUDA kernels are built on the machine)")
print("compute-sanitizer " + ("found" if shutil.which("compute-sanitizer") else "not found"))
for m in missing:
    print(f"MISSING: {m}")
sys.exit(1 if missing else 0)
PY
PRE=$?
cat "$OUT/preflight.txt"
[ -s "$OUT/preflight_err.txt" ] && tail -3 "$OUT/preflight_err.txt"
if [ "$PRE" != 0 ]; then
  if [ "$DRY" = 1 ]; then
    printf 'preflight\tmissing (dry run, going on): %s\t%s\tpreflight.txt\n' \
      "$(grep '^MISSING' "$OUT/preflight.txt" | sed 's/^MISSING: //' | paste -sd';' -)" \
      "$(elapsed)" >> "$STEPS"
    log "preflight: something is missing (dry run: going on)"
  else
    printf 'preflight\tfailed: %s\t%s\tpreflight.txt\n' \
      "$(grep '^MISSING' "$OUT/preflight.txt" | sed 's/^MISSING: //' | paste -sd';' -)" \
      "$(elapsed)" >> "$STEPS"
    log "preflight failed: nothing else is run"
    exit 2
  fi
fi
[ "$PRE" = 0 ] && printf 'preflight\tok\t%s\tpreflight.txt\n' "$(elapsed)" >> "$STEPS"
export DIFFCR_CUDA_ARCHS=${DIFFCR_CUDA_ARCHS:-${CAP:-90}}

# ---------------------------------------------------------------------------------------------
# 1-5. steps, most informative first; each is cut to the deadline
# ---------------------------------------------------------------------------------------------
run_step build 180 "$PY -m pip install --no-build-isolation --no-deps --upgrade --target '$SITE' . \
  && cd /tmp && $PY -m diffcr info && $PY -c 'import diffcr_kernels as dk, sys; r = dk.available_backends(); print(r); sys.exit(0 if r[\"cuda\"][\"status\"] == \"available\" else 1)'"
BUILD=$?
if [ "$BUILD" != 0 ] && [ "$DRY" != 1 ]; then
  log "build failed: the GPU steps are skipped"
  exit 1
fi
# -P: the source tree must not shadow the installed package (which holds the built extension)
run_step gpu_tests 150 "DIFFCR_REQUIRE_EXT=1 $PY -P -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=20 --ignore=tests/kernels/test_triton.py"
# compiled Triton apart: its JIT compiles must not starve the CUDA-op and model tests above
run_step triton_tests 120 "DIFFCR_REQUIRE_EXT=1 $PY -P -m pytest tests/kernels/test_triton.py -m gpu -q -p no:cacheprovider --maxfail=20"
if command -v compute-sanitizer > /dev/null 2>&1 || [ "$DRY" = 1 ]; then
  run_step memcheck 90 "cd /tmp && PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 3 $PY '$ROOT/benchmarks/sanitize_ops.py' --device cuda; rc=\$?; \
    if [ \$rc != 0 ] && grep -qiE 'not supported|unable to|insufficient|permission' '$OUT/memcheck.txt'; then \
      echo 'compute-sanitizer refused to run on this machine (not a finding)'; exit 0; fi; exit \$rc"
fi
run_step bench_b8 120 "cd /tmp && $PY -m diffcr bench --rounds 10 --token-cache --masked --json > '$OUT/diffcr_bench_b8.json'"
run_step bench_b1 60 "cd /tmp && $PY -m diffcr bench --tokens 1024 --batch 1 --rounds 20 --json > '$OUT/diffcr_bench_b1.json'"
# what users switch on (#26): the two-bin training step under bf16 autocast over fp32 weights
# (diffcr train --mixed-precision bf16), and the inference rows with both blocks compiled
# regionally (torch.compile fullgraph per block, as compile_repeated_blocks), Flux.1 at N = 4096
run_step bench_autocast 90 "cd /tmp && $PY -m diffcr bench --model flux --tokens 4096 --batch 1 --rounds 5 --kappas 1.0,0.5 --autocast bf16 --no-naive --json > '$OUT/diffcr_bench_flux_autocast.json'"
run_step bench_compile 120 "cd /tmp && $PY -m diffcr bench --model flux --tokens 4096 --batch 1 --rounds 5 --kappas 1.0,0.8,0.5,0.3 --compile --no-training --no-overhead --json > '$OUT/diffcr_bench_flux_compile.json'"
# the modern families (SD3.5-L joint, Flux.1 double and single, Wan 1.3B and 14B, Qwen-Image and
# HunyuanVideo blocks), N = 4096, B = 1; then Wan at 480p, 81 frames (32,760 tokens)
run_step bench_families 200 "cd /tmp && for m in sd3 flux flux-single wan wan-14b qwenimage hunyuanvideo; do $PY -m diffcr bench --model \$m --tokens 4096 --batch 1 --rounds 5 --no-training --no-naive --token-cache --json > '$OUT'/diffcr_bench_\$m.json || exit 1; done; $PY -m diffcr bench --model wan --tokens 32760 --batch 1 --rounds 3 --no-training --no-naive --json > '$OUT'/diffcr_bench_wan_480p_81f.json"
# several GPUs (a machine with more than one): routing under context parallelism, per-rank
# block time dense vs routed (Ulysses over every GPU, nccl; benchmarks/cp_block_time.py)
NGPU=$($SMI --query-gpu=name --format=csv,noheader 2>/dev/null | grep -c .)
if [ "${NGPU:-0}" -ge 2 ]; then
  run_step cp_multi_gpu 120 "cd /tmp && $PY -m torch.distributed.run --nproc_per_node $NGPU \
    '$ROOT/benchmarks/cp_block_time.py' --device cuda --tokens 16384 --rounds 10"
fi
SEL=""
[ "$MODE" = quick ] && SEL="-k kernels"
run_step suites 300 "$PY -P -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider $SEL --benchmark-json '$OUT/bench.json'"
log "done ($( [ "$FAILED" = 0 ] && echo 'every step ok' || echo 'some step failed, timed out or was skipped'))"
exit $FAILED
