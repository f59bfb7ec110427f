#!/usr/bin/env bash
# The GPU check: everything about minparcae's GPU path that needs a GPU, in one call of at most
# about 8 minutes, on a machine whose python3 already has CuPy, numba-cuda, PyTorch and pytest
# (nothing is installed). Run from anywhere:
#
#     OUT=some/folder bash scripts/gpu_check.sh
#
# Phases, each under its own time limit:
#   preflight   CuPy sees the GPU, Numba finds libNVVM (CUDA_HOME=/usr/local/cuda as a fallback),
#               one kernel launched on a CuPy array is right; any failure stops the check here
#   memcheck, racecheck, synccheck
#               every kernel once at parcae-140m's sizes under compute-sanitizer, results checked
#   tests       every GPU-marked test, failures named, JUnit XML
#   bench       training tokens/s, MFU and peak memory against PyTorch eager and torch.compile:
#               the medium bench size, then parcae-140m at 8 × 512 tokens
#   nccl        the data-parallel all-reduce through NCCL on one GPU, one rank: must be the identity
#   train       the default `python train.py --device gpu`, wall time and val_loss
# Every phase's full output goes to $OUT/<phase>.log (OUT defaults to out/gpu_check); the summary,
# with per-phase times, to stdout and $OUT/summary.txt. The last line is exactly one of
#     GPU CHECK: PASS
#     GPU CHECK: FAIL: <reason>
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
failures=()
start_all=$SECONDS

say() { echo "$*" | tee -a "$summary"; }

finish() {
    say "total: $((SECONDS - start_all)) s"
    if [ ${#failures[@]} -eq 0 ]; then
        say "GPU CHECK: PASS"
        exit 0
    fi
    local joined
    printf -v joined '%s; ' "${failures[@]}"
    say "GPU CHECK: FAIL: ${joined%; }"
    exit 1
}

# phase NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, output to $OUT/NAME.log; returns its status
phase() {
    local name=$1 limit=$2 t0=$SECONDS status
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local took=$((SECONDS - t0))
    if [ $status -eq 0 ]; then
        say "phase $name: ok in $took s"
    elif [ $status -eq 124 ] || [ $status -eq 137 ]; then
        say "phase $name: TIMED OUT after $took s (limit $limit s); last lines:"
        tail -5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$summary"
        failures+=("$name timed out after $limit s")
    else
        say "phase $name: FAILED (status $status) in $took s; last lines:"
        tail -15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$summary"
        failures+=("$name failed")
    fi
    return $status
}

say "# minparcae GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee -a "$summary"

# --- preflight: one clear sentence and stop if the GPU path cannot run at all
if ! phase preflight 45 "$PY" scripts/gpu_preflight.py; then
    if grep -q "libNVVM" "$OUT/preflight.log" && [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
        export CUDA_HOME=/usr/local/cuda
        say "retrying the pre-flight with CUDA_HOME=$CUDA_HOME"
        failures=()
        phase preflight 45 "$PY" scripts/gpu_preflight.py
    fi
fi
if [ ${#failures[@]} -ne 0 ]; then
    reason=$(grep -h "PREFLIGHT FAIL:" "$OUT/preflight.log" | tail -1 | sed 's/^PREFLIGHT FAIL: //')
    failures=("pre-flight: ${reason:-see $OUT/preflight.log}")
    finish
fi
grep -h "PREFLIGHT OK" "$OUT/preflight.log" | tee -a "$summary"

# --- every kernel under compute-sanitizer
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$sanitizer" ]; then
    for tool in memcheck racecheck synccheck; do
        phase "$tool" 40 "$sanitizer" --tool "$tool" --error-exitcode 3 "$PY" scripts/gpu_kernels_once.py --seq 512
    done
else
    say "phase sanitizer: FAILED: compute-sanitizer not found"
    failures+=("compute-sanitizer not found")
    phase kernels 60 "$PY" scripts/gpu_kernels_once.py
fi

# --- the GPU-marked tests
phase tests 70 "$PY" -m pytest -m gpu -rfE -p no:cacheprovider --junitxml="$OUT/junit.xml" tests/
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | tee -a "$summary"

# --- the benchmark against PyTorch (tables go to the summary)
phase bench-medium 45 "$PY" bench/gpu_bench.py --preset medium --compile --no-kernels --steps 5
phase bench-140m 80 "$PY" bench/gpu_bench.py --preset parcae-140m --batch 8 --seq 512 --compile --steps 3 --repeat 5
for b in bench-medium bench-140m; do
    grep -E "^\|" "$OUT/$b.log" | tee -a "$summary"
done

# --- data parallelism: NCCL's all-reduce through minparcae.distributed, one rank (identity)
phase nccl 30 "$PY" scripts/gpu_nccl_smoke.py

# --- the default training run, on the GPU
train_out=$(mktemp -d)
phase train 120 "$PY" train.py --device gpu --out "$train_out/run"
say "train.py --device gpu: $(grep -h '^val_loss' "$OUT/train.log" || echo 'no val_loss'); the CPU run " \
    "(README): val_loss 3.9616 in 2 min 29 s to 3 min 21 s on 2 cores"
rm -rf "$train_out"

finish
