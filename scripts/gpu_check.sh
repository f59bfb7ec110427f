#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU where CuPy, numba-cuda and (for the comparison)
# PyTorch are installed: the GPU tests (kernels at realistic sizes, the model on GPU vs CPU, and the
# simulator's kernel tests on the real device), then bench/gpu_bench.py. About 4 minutes, 8 at most.
# The report goes to $OUT/gpu_check.md when OUT is set, and to stdout in any case.
#
#     bash scripts/gpu_check.sh [arguments for bench/gpu_bench.py, e.g. --preset tiny]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
PY=${PYTHON:-python3}
report=/dev/null
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && report="$OUT/gpu_check.md"

{
    echo "# minparcae GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import cupy, numba, numba.cuda as c; print('CuPy', cupy.__version__, '| Numba', numba.__version__,
'| numba.cuda:', getattr(c, 'implementation', '?'))"
    echo
    echo "## Tests"
    echo '```'
    timeout 270 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_kernels_cuda.py 2>&1 | tail -60
    tests=${PIPESTATUS[0]}
    echo '```'
    echo
    timeout 200 "$PY" bench/gpu_bench.py "$@"
    bench=$?
    echo
    echo "pytest exit status $tests, benchmark exit status $bench"
    [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
} 2>&1 | tee "$report"
exit "${PIPESTATUS[0]}"
