"""The simulator helpers of tests/cudasim.py, and the kernels' warp-shuffle path run through them.

On a CPU the kernel tests (test_kernels_cuda.py) run the shared-memory reductions, at 32-thread
blocks. Here the kernels are built a second time with shuffle reductions, as on a GPU, and run once
at the block sizes the library launches: 256-thread rows and the default flash tiles (16 queries ×
16 threads for head size 128). Tolerance as in test_kernels_cuda.py: 1e-5 of the largest reference
magnitude, float32 against float32 in another summation order.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda, int32

import cudasim
from minparcae.ops import attention, cross_entropy, rmsnorm

pytestmark = [pytest.mark.skipif(not cudasim.simulated(), reason="tests Numba's CUDA simulator"),
              pytest.mark.filterwarnings("ignore:.*(under-utilization|copy overhead)"),
              pytest.mark.usefixtures("fast_barriers")]  # conftest.py
TOL = 1e-5


def close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max(initial=0.0) <= tol * max(np.abs(b).max(initial=0.0), 1e-30)


def test_numba_reads_zero_as_the_gpu():
    """NUMBA_ENABLE_CUDASIM=0 means the GPU, though the string "0" is true in Python."""
    code = "import cudasim; print(cudasim.simulated())"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_simulated_shared_arrays_are_one_per_line_and_block():
    """The serialised shared arrays keep the simulator's meaning: every thread of a block gets the
    same array for one source line, and two lines get two arrays. The kernel writes each thread's
    index into two shared arrays, then reads all of them back after a barrier."""
    @cuda.jit
    def share(out):
        a = cuda.shared.array(32, int32)
        b = cuda.shared.array(32, int32)
        t = cuda.threadIdx.x
        a[t] = t
        b[t] = -t
        cuda.syncthreads()
        total = 0
        for j in range(32):
            total += a[j] - b[j]
        out[cuda.blockIdx.x, t] = total

    out = np.zeros((3, 32), dtype=np.int32)
    share[3, 32](out)
    assert (out == 2 * sum(range(32))).all()


def test_emulated_shuffle_exchanges_lanes(monkeypatch):
    """Each lane gets its xor partner's value, in every warp of a block with a partial last warp."""
    cudasim.emulate_warp_shuffles(monkeypatch)

    @cuda.jit
    def swap(values, out):
        t = cuda.threadIdx.x
        mask = 0xFFFFFFFF if t < 32 else 0xFF  # 40 threads: a full warp, then 8 lanes
        out[t] = cuda.shfl_xor_sync(mask, values[t], 4)

    values = np.arange(40, dtype=np.int32)
    out = np.zeros(40, dtype=np.int32)
    swap[1, 40](values, out)
    assert (out == values ^ 4).all()


@pytest.mark.parametrize("case", ["mask names absent lanes", "partner outside the mask", "lane absent"])
def test_emulated_shuffle_refuses_what_a_gpu_leaves_undefined(monkeypatch, case):
    cudasim.emulate_warp_shuffles(monkeypatch)
    mask, offset, everyone = {"mask names absent lanes": (0xFFFFFFFF, 1, True),
                              "partner outside the mask": (0xFF, 8, True),
                              "lane absent": (0xFF, 1, False)}[case]

    @cuda.jit
    def shuffle(out):
        t = cuda.threadIdx.x
        if everyone or t % 2 == 0:
            out[t] = cuda.shfl_xor_sync(mask, t, offset)

    with pytest.raises(AssertionError):
        shuffle[1, 8](np.zeros(8, dtype=np.int32))


def test_shuffle_reductions_at_the_library_block_sizes(monkeypatch):
    """RMSNorm (forward with the residual add, backward with a weight), cross-entropy and flash
    attention (forward and both backward kernels), built with shuffle reductions and launched with
    256-thread rows and the default tiles, against the reference."""
    K = cudasim.kernels_with_shuffles(monkeypatch)
    assert (K.MAX_THREADS, K._flash_tiles(128)) == (256, (16, 16, 16))
    rng = np.random.default_rng(0)
    x, res, g = (rng.standard_normal((2, 300)).astype(np.float32) for _ in range(3))
    w = (1 + 0.2 * rng.standard_normal(300)).astype(np.float32)
    s, y, xhat, r = K.add_rmsnorm_forward(x, res, w, rmsnorm.EPS)
    y_ref, cache = rmsnorm.forward(x + res, w)
    close(s, x + res)
    close(y, y_ref)
    dx, dw = K.rmsnorm_backward(g, xhat, r, w)
    grads = rmsnorm.backward(g, cache)
    close(dx, grads["x"])
    close(dw, grads["weight"])

    z = (5 * rng.standard_normal((1, 300))).astype(np.float32)
    targets, valid = np.array([299]), np.array([True])
    for got, want in zip(K.softmax_xent(z, targets, valid, 1), cross_entropy.softmax_xent(z, targets, valid, 1)):
        close(got, want)

    q, k, v, dy = (rng.standard_normal((1, 1, 20, 128)).astype(np.float32) for _ in range(4))
    y_ref, cache_ref = attention.forward(q, k, v, 128 ** -0.5)
    y, cache = K.attention_forward(q, k, v, 128 ** -0.5)
    close(y, y_ref)
    want = attention.backward(dy, cache_ref)
    for got, key in zip(K.attention_backward(dy, cache), "qkv"):
        close(got, want[key])
