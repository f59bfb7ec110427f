"""Lesson 6's exercises, and the counter of memory accesses they are graded with
(lessons/gpu_counting.py).

The exercises run as a learner runs them: each unwritten skeleton fails its check (exit status 1,
"not written yet") and each solution in lessons/solutions/06_gpu_kernel.py passes it. The counter
is checked on small kernels whose accesses are known: exact counts per thread and per element, in
global and shared memory, and a report that fails a kernel for a wrong value or for reads over
its budget, naming the thread that wrote the value.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda, float32

import cudasim

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
sys.path.insert(0, str(LESSONS))
import gpu_counting  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("number", (1, 2, 3))
def test_exercise_fails_unwritten_and_passes_with_the_solution(number, tmp_path):
    env = {**os.environ, "MINPARCAE_DEVICE": "cpu", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*flags):
        return subprocess.run([sys.executable, str(LESSONS / "06_gpu_kernel.py"), "--exercise", str(number),
                               *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    skeleton = run()
    assert skeleton.returncode == 1, skeleton.stdout[-2000:] + skeleton.stderr[-2000:]
    assert "is not written yet" in skeleton.stdout
    solution = run("--solution")
    assert solution.returncode == 0, solution.stdout[-3000:] + solution.stderr[-3000:]
    assert solution.stdout.strip().splitlines()[-1].endswith(": passed")
    assert "lesson 6 passed" not in solution.stdout  # it stopped at the exercise


simulated_only = pytest.mark.skipif(not cudasim.simulated(),
                                    reason="counts accesses on Numba's CUDA simulator")
pytestmark = pytest.mark.usefixtures("fast_barriers")  # conftest.py


@cuda.jit
def gather_and_share(x, idx, y):
    """Thread t reads idx[t], then x[idx[t]] three times; posts it to shared memory and reads its
    neighbour's post once."""
    buf = cuda.shared.array(8, float32)
    t = cuda.threadIdx.x
    j = idx[t]
    acc = float32(0)
    for _ in range(3):
        acc += x[j]
    buf[t] = acc
    cuda.syncthreads()
    y[t] = buf[(t + 1) % 8]


@simulated_only
def test_counts_are_exact_per_thread_and_per_element():
    x = np.arange(5, dtype=np.float32)
    idx = np.array([0, 0, 1, 4, 4, 4, 2, 0])
    y = np.zeros(8, np.float32)
    traffic = gpu_counting.watch(gather_and_share, 1, 8, x, idx, y)
    assert np.array_equal(y, 3 * x[idx[(np.arange(8) + 1) % 8]])
    assert traffic.per_thread("read").tolist() == [4] * 8  # idx[t] once, x[idx[t]] three times
    assert traffic.per_thread("read", "shared").tolist() == [1] * 8
    assert traffic.per_thread("write").tolist() == [1] * 8
    assert traffic.per_element("x").tolist() == [9, 3, 3, 0, 9]
    assert traffic.most_by_one_block(["x", "idx"]) == 9
    assert traffic.shared_floats() == 8
    assert [t[0] for _, t in traffic.writers("y")] == list(range(8))


@cuda.jit
def copy_twice_but_last(x, y):
    """y[j] = x[j] for all but the last element, reading x twice; thread 2's value is off by one."""
    j = cuda.grid(1)
    if j < x.shape[0] - 1:
        y[j] = x[j] + x[j] - x[j] + (1 if j == 2 else 0)


@simulated_only
def test_report_names_wrong_values_and_threads_over_budget(capsys):
    x = np.arange(1, 9, dtype=np.float32)
    y = np.full_like(x, np.nan)
    traffic = gpu_counting.watch(copy_twice_but_last, 2, 4, x, y)
    budget = [("global reads per thread", "read", "global", 1)]
    assert not gpu_counting.report("copy", traffic, [("y", y, x, 1e-6)], budget)
    out = capsys.readouterr().out
    assert "6 of 8 right" in out
    assert "y[2] = 4, want 3: written by block 0 thread 2" in out
    assert "y[7] = nan, want 8: never written" in out
    assert "most 3, budget 1: OVER BUDGET" in out and "block 1: 3 3 3 0" in out
    # The same launch within a budget of 3 reads, against the values it did write, passes.
    assert gpu_counting.report("copy", traffic, [("y", y[:7], y[:7], 1e-6)],
                               [("global reads per thread", "read", "global", 3)])


@cuda.jit
def read_past_the_end(x, y):
    y[0] = x[x.shape[0]]


@cuda.jit
def read_a_slice(x, y):
    y[0] = x[0:2][0]


@simulated_only
def test_reads_outside_the_array_or_of_slices_are_refused():
    x, y = np.zeros(4, np.float32), np.zeros(1, np.float32)
    with pytest.raises(IndexError, match=r"x\[4\] is outside x's shape \(4,\)"):
        gpu_counting.watch(read_past_the_end, 1, 1, x, y)
    with pytest.raises(IndexError, match="index one element at a time"):
        gpu_counting.watch(read_a_slice, 1, 1, x, y)
