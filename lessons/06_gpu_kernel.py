"""Lesson 6: a GPU kernel. A row-wise kernel, then flash attention's tiling and online softmax.

    python lessons/06_gpu_kernel.py

minparcae's fast GPU path (kernels/cuda.py) is written in Python with Numba's `cuda.jit`. Without a
GPU, Numba's CUDA simulator runs the very same kernels on the CPU, one Python thread per CUDA
thread: slow, but exact enough to check them on any laptop. This lesson runs the RMSNorm kernel and
the two attention kernels on tiny arrays and compares each with the NumPy reference of lessons 4
and 5, and explains the one idea that makes flash attention possible: the online softmax.
"""

import os
import sys

from minparcae.backend import gpu_available

# Numba reads this variable once, when it is first imported, so it must be set before anything
# imports numba (minparcae.kernels.cuda does). With a usable GPU the kernels run on it instead.
if not gpu_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402

from minparcae.kernels import cuda as K  # noqa: E402  (imports numba)
from minparcae.ops import attention, rmsnorm  # noqa: E402

simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
print(f"running the kernels {'under the CUDA simulator' if simulated else 'on the GPU'}")
if simulated:
    # The simulator creates a block's shared arrays from many Python threads without a lock, so two
    # threads can end up with two "shared" arrays; the tests' simulator helper adds the lock.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import cudasim  # noqa: E402

    cudasim.serialise_shared_arrays()

# Small launches: the simulator starts one Python thread per CUDA thread, so 32 threads per block
# instead of 256 keep this lesson fast; a shorter switch interval makes its barriers faster too.
K.MAX_THREADS, K.THREADS, K.ROW_BLOCKS = 32, 32, 2
sys.setswitchinterval(1e-4)
rng = np.random.default_rng(0)


def rel_err(got, want):
    """max |got − want| relative to the largest |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# 1. The CUDA execution model, in five sentences.
#
# A kernel is a function that many threads run at once, each knowing its own coordinates.
# Threads come in blocks (up to 1024 threads, `cuda.threadIdx`, `cuda.blockDim`), and blocks form
# a grid (`cuda.blockIdx`, `cuda.gridDim`); a launch is written kernel[grid, block](args).
# Threads of one block can share a small fast scratchpad, shared memory (`cuda.shared.array`), and
# wait for each other at a barrier (`cuda.syncthreads()`); threads of different blocks cannot.
# Global memory (the arrays passed in) is large but slow, so a kernel reads each value once if it
# can and keeps what it reuses in shared memory or in registers (`cuda.local.array`).
# A GPU runs threads in groups of 32 (a warp), so block sizes are multiples of 32.

# ---------------------------------------------------------------------------------------------
# 2. A row kernel: RMSNorm, a block per row.
#
# RMSNorm (lesson 4) normalises each row on its own:  r = 1/√(mean_j x_j² + eps),  y = x r ⊙ w.
# The natural mapping is a block per row and threads along the row. `_rmsnorm_forward` does, in
# outline (the kernel also adds a residual first, when it is given one):
#
#     for i in range(cuda.blockIdx.x, N, cuda.gridDim.x):   # this block's rows (grid-stride)
#         ss = sum of x[i, j]² over j = t, t + nt, t + 2nt, ...   # each thread, a strided slice
#         ri = 1 / sqrt(_block_reduce(ss, False, buf) / n + eps) # all threads get the row's sum
#         y[i, j] = x[i, j] * ri * w[j]  for the thread's same slice of j
#
# The one collective step is the reduction: n partial sums, one per thread, must become one number
# that every thread knows. `_block_reduce_shared` writes them to shared memory and halves the
# number of active threads each step (thread t adds in the value of thread t + step), with a
# barrier between steps: log2(32) = 5 steps for 32 threads. On a real GPU the threads of a warp
# exchange registers directly instead (warp shuffles, `_block_reduce_shuffle`); the simulator has
# no shuffles, so here the shared-memory path runs.
#
# Three rows of width 40 over a grid of 2 blocks of 32 threads: each thread handles one or two
# columns and one block handles two rows, so both loops go round more than once.

x = rng.standard_normal((3, 40)).astype(np.float32)
w = (1 + 0.2 * rng.standard_normal(40)).astype(np.float32)
y_kernel, xhat_kernel, r_kernel = K.rmsnorm_forward(x, w, rmsnorm.EPS)
y_ref, (xhat_ref, r_ref, _) = rmsnorm.forward(x, w)  # the reference op of lesson 4
print(f"RMSNorm kernel vs ops.rmsnorm: relative error y {rel_err(y_kernel, y_ref):.1e}, "
      f"r {rel_err(r_kernel, r_ref):.1e}")
# float32 on both sides; only the order of the sum of squares differs, so the tolerance is a few
# float32 roundings (eps32 ≈ 1.2e-7) of the largest output.
assert rel_err(y_kernel, y_ref) < 1e-5 and rel_err(r_kernel, r_ref) < 1e-5

# ---------------------------------------------------------------------------------------------
# 3. The online softmax.
#
# Attention needs, for each query row, softmax over the scores s_j of all keys. Done naively, that
# takes the whole row of S scores at once (and the (S, S) matrix for all rows), which does not fit
# in shared memory for long sequences. The online softmax reads the scores one tile at a time and
# keeps only two numbers per row: the running maximum m and the running sum l = Σ_j e^(s_j − m).
# When a new score s arrives (or a tile's largest score), the maximum may grow to m' = max(m, s),
# and every term already in l must be rescaled from e^(· − m) to e^(· − m'):
#
#     m' = max(m, s),    l' = l · e^(m − m') + e^(s − m'),
#
# starting from m = −∞, l = 0. At the end softmax_j = e^(s_j − m)/l. Subtracting the running
# maximum keeps every exponent ≤ 0, so nothing overflows (lesson 3). The attention output is a
# weighted sum of values, and it is rescaled the same way: o' = o · e^(m − m') + Σ_j e^(s_j − m') v_j,
# so y = o/l never needs the probabilities of earlier tiles again.
#
# One row of 11 scores, read in tiles of 4 (the last one short), in plain NumPy:

s = 3 * rng.standard_normal(11)
tile = 4
m, l = -np.inf, 0.0
for t0 in range(0, len(s), tile):
    block = s[t0:t0 + tile]
    m_new = max(m, block.max())
    l = l * np.exp(m - m_new) + np.exp(block - m_new).sum()
    m = m_new
online = np.exp(s - m) / l
exact = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
print(f"online softmax over {-(-len(s) // tile)} tiles vs softmax: "
      f"max |difference| {np.abs(online - exact).max():.1e}")
assert m == s.max() and np.abs(online - exact).max() < 1e-15

# The same update with a value vector per key gives the attention output tile by tile:
v_row = rng.standard_normal((11, 3))
m, l, o = -np.inf, 0.0, np.zeros(3)
for t0 in range(0, len(s), tile):
    block = s[t0:t0 + tile]
    m_new = max(m, block.max())
    alpha = np.exp(m - m_new)
    p = np.exp(block - m_new)
    l, o, m = l * alpha + p.sum(), o * alpha + p @ v_row[t0:t0 + tile], m_new
assert np.abs(o / l - exact @ v_row).max() < 1e-14

# ---------------------------------------------------------------------------------------------
# 4. Attention on the GPU: the definition, then flash attention.
#
# `_attention_simple` is the definition as a kernel: one thread per query row i, no shared memory.
# It passes over keys j ≤ i twice, once for the maximum m and once for y_i = Σ e^(s_ij − m) v_j / l,
# reading q, k, v from global memory every time. Each row also stores lse_i = m + log l, the log of
# the softmax denominator, which is all the backward needs to rebuild P.
#
# The flash kernel (`_flash_kernels(...)[0]`, "forward") gives a tile of BQ queries to a block and
# walks the key tiles of BK keys: load the K and V tile into shared memory, compute the BQ × BK
# scores, update each row's m, l and output with the online softmax above, move on. The (S, S)
# matrix never exists; each thread (c, r) serves query row r with TPR − 1 mates that split the
# keys and the output columns. Key tiles wholly in a query tile's future are skipped (causality).
# Tiles are (BQ, BK, TPR); with (4, 2, 2) and S = 7 there are 2 query tiles and up to 4 key tiles.

B, H, S, hs = 1, 2, 7, 4
q, k, v, dy = (rng.standard_normal((B, H, S, hs)).astype(np.float32) for _ in range(4))
scale = hs ** -0.5
y_ref, cache_ref = attention.forward(q, k, v, scale)

y_simple, _ = K.attention_forward_simple(q, k, v, scale)
tiles = (4, 2, 2)
y_flash, cache_flash = K.attention_forward(q, k, v, scale, tiles=tiles)
print(f"attention, S = {S}, tiles (BQ, BK, TPR) = {tiles}: relative error "
      f"simple {rel_err(y_simple, y_ref):.1e}, flash {rel_err(y_flash, y_ref):.1e}")
assert rel_err(y_simple, y_ref) < 1e-5 and rel_err(y_flash, y_ref) < 1e-5

# The cache holds lse (B·H, S) instead of P (B, H, S, S); it rebuilds P exactly:
lse = cache_flash[4].reshape(B, H, S, 1)
s_ref = np.where(np.triu(np.ones((S, S), bool), 1), -np.inf, (q @ k.transpose(0, 1, 3, 2)) * scale)
assert np.abs(np.exp(s_ref - lse) - cache_ref.p.reshape(B, H, S, S)).max() < 1e-5

# ---------------------------------------------------------------------------------------------
# 5. The flash backward.
#
# With P_ij = e^(s_ij − lse_i) recomputed from the cache and Δ_i = Σ_d dy_id y_id, the softmax
# backward of lesson 5, ds = P ⊙ (dP − rowsum(dP ⊙ P)), becomes ds_ij = P_ij (dy_i·v_j − Δ_i),
# since rowsum(dP ⊙ P)_i = Σ_j P_ij dy_i·v_j = dy_i·y_i = Δ_i. Then
#     dq_i = scale Σ_j ds_ij k_j          (`backward_dq`, a block per query tile)
#     dv_j = Σ_i P_ij dy_i,  dk_j = scale Σ_i ds_ij q_i     (`backward_dkv`, a block per key tile)
# Two kernels instead of one: each output row is written by a single block, so no atomic adds
# are needed and the result does not depend on the order blocks run in.

grads_flash = K.attention_backward(dy, cache_flash)
grads_ref = attention.backward(dy, cache_ref)
for name, got, want in zip(("dq", "dk", "dv"), grads_flash, (grads_ref[k] for k in "qkv")):
    print(f"flash backward {name}: relative error {rel_err(got, want):.1e}")
    assert rel_err(got, want) < 1e-5
print("lesson 6 passed")
