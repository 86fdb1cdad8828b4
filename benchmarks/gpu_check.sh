#!/usr/bin/env bash
# One-command GPU validation of softsae (issue 7):
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. build   the CUDA extension softsae._C_cuda for the present GPU architecture only,
#            MAX_JOBS=$(nproc), no downloads (pip --no-build-isolation --no-deps; falls back
#            to setup.py build_ext --inplace if pip cannot do an editable install offline)
# 2. tests   pytest tests/test_gpu.py tests/test_no_host_sync.py  (junit XML in OUTDIR)
# 3. bench   bench_soft_topk.py (B=4096, n in {4096, 16384, 65536}, float32 and bfloat16) and
#            bench_sparse_decode.py (B=4096, n in {16384, 65536}, d in {512, 2304}, k in
#            {32, 64, 128, 220}) for the reference, triton and cuda backends, --quick --json;
#            bench_train_step.py --device cuda (one training step of softsae's TopK, SoftSAE with
#            the paper's k head and with k_hidden = n/4, hard phase; d 768, n 16384, K 32, B 4096;
#            the other frameworks when installed) -> OUTDIR/train_step.md and its JSON rows
# 4. report  benchmarks/gpu_report.py -> OUTDIR/report.md and OUTDIR/report.json
#
# Prints the seconds each stage took (also in OUTDIR/stages.tsv). Target: < 8 minutes on an
# H100/H200 including the build. Exit codes: 0 all passed, 1 a stage failed (the report is
# still written), 2 usage, 3 no GPU (exits at once).
# Environment: PYTHON (default python3), SKIP_BUILD=1 (use the installed extension),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds per stage, defaults 240 / 120; these are caps, the
# expected times on an H200 are about 1-2 min build, 2-3 min tests, 1 min per benchmark).
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT" || exit 2

# ------------------------------------------------------------------ GPU present?
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds no device); nothing to check." >&2
  exit 3
fi
if ! ARCH=$("$PY" -c "import torch, sys; ok = torch.cuda.is_available(); \
print('{}.{}'.format(*torch.cuda.get_device_capability(0)) if ok else ''); sys.exit(0 if ok else 1)" 2>/dev/null); then
  echo "gpu_check: torch.cuda.is_available() is False (CPU-only torch or driver problem); nothing to check." >&2
  exit 3
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
: > "$OUT/stages.tsv"
STATUS=0
T_ALL=$SECONDS

stage_done() {  # name start status
  local dt=$((SECONDS - $2))
  printf '%s\t%s\t%s\n' "$1" "$dt" "$3" >> "$OUT/stages.tsv"
  echo "== stage $1: ${dt} s ($3)"
  if [ "$3" != ok ] && [ "$3" != skipped ]; then STATUS=1; fi
}

echo "== gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), sm_${ARCH/./}"

# ------------------------------------------------------------------ 1. build
T0=$SECONDS
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  stage_done build "$T0" skipped
else
  NVCC=$(command -v nvcc || true)
  for c in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -z "$NVCC" ] && [ -n "$c" ] && [ -x "$c/bin/nvcc" ]; then NVCC=$c/bin/nvcc; fi
  done
  if [ -z "$NVCC" ]; then
    echo "gpu_check: no nvcc (set CUDA_HOME); the cuda backend cannot be built, triton/reference still run." >&2
    stage_done build "$T0" "no-nvcc"
  else
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
    export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) SOFTSAE_CUDA_EXT=1
    export SOFTSAE_CPU_EXT=${SOFTSAE_CPU_EXT:-auto}
    "$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null 2>&1 ||
      echo "gpu_check: WARNING: ninja not found, torch falls back to a slow serial build" >&2
    echo "   CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
      stage_done build "$T0" ok
    else
      echo "   pip editable install failed (see build.log); trying setup.py build_ext --inplace" >&2
      if "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
        stage_done build "$T0" ok
      else
        tail -30 "$OUT/build.log" >&2
        stage_done build "$T0" failed
      fi
    fi
  fi
fi
"$PY" -c "import softsae; print('   backends on cuda:', softsae.available_backends('cuda'))" ||
  { echo "gpu_check: softsae does not import" >&2; exit 1; }

# ------------------------------------------------------------------ 2. tests
T0=$SECONDS
# SIGINT on timeout: pytest stops and still writes the junit XML of what ran.
if timeout -s INT -k 30 "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_no_host_sync.py --junitxml "$OUT/test_gpu.xml" > "$OUT/tests.log" 2>&1; then
  stage_done tests "$T0" ok
else
  tail -30 "$OUT/tests.log"
  stage_done tests "$T0" failed
fi
tail -1 "$OUT/tests.log"

# ------------------------------------------------------------------ 3. benchmarks
BACKENDS=$("$PY" -c "import softsae; print(' '.join(b for b in ('reference', 'triton', 'cuda') \
if b in softsae.available_backends('cuda')))")
T0=$SECONDS
if timeout "${BENCH_TIMEOUT:-120}" "$PY" benchmarks/bench_soft_topk.py --device cuda --quick --B 4096 \
    --n 4096 16384 65536 --dtypes float32 bfloat16 --backends $BACKENDS --repeat 10 \
    --json "$OUT/soft_topk.json" --markdown "$OUT/soft_topk.md" > "$OUT/bench_soft_topk.log" 2>&1; then
  stage_done bench_soft_topk "$T0" ok
else
  tail -20 "$OUT/bench_soft_topk.log"
  stage_done bench_soft_topk "$T0" failed
fi
T0=$SECONDS
if timeout "${BENCH_TIMEOUT:-120}" "$PY" benchmarks/bench_sparse_decode.py --device cuda --quick --full --B 4096 \
    --backends $BACKENDS --repeat 10 --json "$OUT/sparse_decode.json" --markdown "$OUT/sparse_decode.md" \
    > "$OUT/bench_sparse_decode.log" 2>&1; then
  stage_done bench_sparse_decode "$T0" ok
else
  tail -20 "$OUT/bench_sparse_decode.log"
  stage_done bench_sparse_decode "$T0" failed
fi
T0=$SECONDS
if timeout "${BENCH_TIMEOUT:-120}" "$PY" benchmarks/bench_train_step.py --device cuda --batch-size 4096 \
    --frameworks softsae dictionary_learning sparsify --models topk softsae-soft softsae-soft-kh4 softsae-hard \
    --repeat 10 --markdown "$OUT/train_step.md" --rows "$OUT/train_step.jsonl" \
    > "$OUT/bench_train_step.log" 2>&1; then
  stage_done bench_train_step "$T0" ok
else
  tail -20 "$OUT/bench_train_step.log"
  stage_done bench_train_step "$T0" failed
fi

# ------------------------------------------------------------------ 4. report
T0=$SECONDS
printf '%s\t%s\t%s\n' total $((SECONDS - T_ALL)) "-" >> "$OUT/stages.tsv"
if "$PY" benchmarks/gpu_report.py --out "$OUT" "$OUT/soft_topk.json" "$OUT/sparse_decode.json" \
    --junit "$OUT/test_gpu.xml" --stages "$OUT/stages.tsv"; then
  echo "== stage report: $((SECONDS - T0)) s (ok)"
else
  echo "== stage report: failed" >&2
  STATUS=1
fi
echo "== gpu_check total: $((SECONDS - T_ALL)) s; status $STATUS; see $OUT/report.md"
exit $STATUS
