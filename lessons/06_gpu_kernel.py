# %% [markdown]
# # Lesson 6: GPU kernels, from a row kernel to flash attention
#
#     python lessons/06_gpu_kernel.py                # the lesson, with its worked kernels
#     python lessons/06_gpu_kernel.py --exercise 1   # grade your kernel for exercise 1 (or 2, 3)
#
# minparcae's fast GPU path, `minparcae/kernels/cuda.py`, is Python compiled by Numba's `cuda.jit`.
# This lesson runs kernels on Numba's CUDA simulator, which executes every CUDA thread as a Python
# thread on the CPU: slow, but every thread can be watched. A small helper, `lessons/gpu_counting.py`,
# logs each element that each thread reads or writes, in global memory (the arrays passed in) and
# in shared memory (the scratchpad of a block). On a GPU the kernels in this lesson are
# limited by how much they read from global memory, so those counts are what tells a slow kernel
# from a fast one.
#
# The path: the execution model on a one-line kernel; a row kernel with a block reduction
# (RMSNorm, lesson 4); the online softmax; causal attention (lesson 5) three ways, naive, tiled
# and flash, each checked against the NumPy reference and its memory traffic counted; the flash
# backward. Three exercises ask you to write a kernel from a spec. `--exercise N` runs the lesson
# up to the exercise, then grades the kernel you wrote in its place: its output against the
# reference, and its reads, thread by thread, against a budget. `--exercise N --solution` grades
# the solution in `lessons/solutions/06_gpu_kernel.py` instead. In a notebook, run the exercise's
# check on your kernel in a cell: `check_rms_rows(rms_rows)`.
#
# The lesson always runs on the simulator, on a machine with a GPU too: only there can Python see
# each thread's loads. (The tests run the library's kernels on a GPU when there is one.)

# %%
import math
import os
import sys

# Numba reads this once, when it is first imported: it must be set before anything imports numba.
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from numba import cuda, float32  # noqa: E402

# The lesson's folder, for its helper and the solutions (a notebook has no __file__: it runs there).
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "06_gpu_kernel.py")))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import cudasim  # noqa: E402  (tests/cudasim.py)
import gpu_counting  # noqa: E402  (lessons/gpu_counting.py)
from minparcae.kernels import cuda as K  # noqa: E402
from minparcae.ops import attention, rmsnorm  # noqa: E402

if not cudasim.simulated():
    sys.exit("lesson 6 runs on Numba's CUDA simulator, but numba was imported before the lesson could "
             "ask for it: start a fresh Python with NUMBA_ENABLE_CUDASIM=1 set.")
# The simulator creates a block's shared arrays from several Python threads without a lock, so two
# threads can get two "shared" arrays; tests/cudasim.py adds the lock.
cudasim.serialise_shared_arrays()
# A short switch interval makes the simulator's barriers about three times faster.
sys.setswitchinterval(1e-4)

# `--exercise N [--solution]` on the command line: `run_exercise(N, ...)` below grades and stops.
run_exercise = gpu_counting.exercises((1, 2, 3), os.path.join(HERE, "solutions", "06_gpu_kernel.py"))

NEG_INF, ZERO = np.float32(-np.inf), np.float32(0)
# The kernels compute in float32 (ε ≈ 1.2e-7) and add at most a few dozen terms, in another order
# than NumPy: their rounding stays near 1e-7 of the largest output. A wrong kernel (a key missed, a
# rescale forgotten) is off by 1e-2 or more. Every comparison is to a float64 reference.
RTOL = 1e-5


def rel_err(got, want):
    """max |got − want| relative to the largest |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# %% [markdown]
# ## 1. Threads, blocks, grids, and watching them
#
# A kernel is a function that many threads run at once, each knowing its own coordinates. Threads
# come in blocks (`cuda.threadIdx`, `cuda.blockDim`, up to 1024 threads), and blocks form a grid
# (`cuda.blockIdx`, `cuda.gridDim`); `kernel[grid, block](args)` launches one. The threads of a
# block share a small on-chip scratchpad, shared memory (`cuda.shared.array`), and can wait for each
# other at a barrier (`cuda.syncthreads()`); threads of different blocks can do neither. Global
# memory, where the arguments live, is large and far away, so a good kernel reads each value from
# it as few times as it can, and keeps what it reuses in shared memory or in the thread's own
# registers (`cuda.local.array`). The GPU runs threads in groups of 32 (warps), and when the
# threads of a warp read neighbouring addresses their 32 loads become one wide transaction.
#
# The first kernel multiplies each row of x by a vector w, the gain of RMSNorm: block i takes row
# i, and its threads take the columns in turn, thread t the columns t, t + nt, t + 2nt, ... (so any
# row length works with any number of threads, and neighbouring threads read neighbouring columns).

# %%
@cuda.jit
def scale_rows(x, w, y):
    """x, y: (N, n); w: (n,).  y[i, j] = x[i, j] · w[j], block i for row i."""
    i, t, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    for j in range(t, x.shape[1], nt):
        y[i, j] = x[i, j] * w[j]


rng = np.random.default_rng(0)
N, n, nt = 3, 10, 4
x = rng.standard_normal((N, n)).astype(np.float32)
w = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
y = np.full_like(x, np.nan)  # NaN until written: an element no thread writes stays visibly wrong
seen = gpu_counting.watch(scale_rows, N, nt, x, w, y)

writer = np.array([[thread[0] for _, thread in row] for row in seen.writers("y")])  # threadIdx.x
print("which thread wrote y[i, j] (block i, row i):")
for i in range(N):
    print(f"  row {i}: " + " ".join(map(str, writer[i])))
print("reads of x[i, j]: each", np.unique(seen.per_element("x")),
      "| reads of w[j]: each", np.unique(seen.per_element("w")), "(once per block)")
assert np.array_equal(y, x * w)  # one float32 product each: the same rounding as NumPy's
assert np.array_equal(writer, np.arange(n)[None, :].repeat(N, 0) % nt)
assert (seen.per_element("x") == 1).all() and (seen.per_element("w") == N).all()

# %% [markdown]
# ## 2. A row kernel with a reduction: RMSNorm
#
# RMSNorm (lesson 4) normalises each row on its own:
#
# $$r = \frac{1}{\sqrt{\tfrac{1}{n}\sum_j x_j^2 + \epsilon}}, \qquad y = x\, r \odot w.$$
#
# The mapping is the one above, a block per row and threads along it, plus one collective step:
# each thread sums the squares of its own columns, and those nt partial sums must become one
# number that every thread of the block knows. Through shared memory that takes log2(nt) steps: each
# thread posts its sum, then at every step the lower half of the active threads adds in the upper
# half's values, with a barrier between steps so that no thread reads a value not yet written.
# For 8 threads:
#
#     buf = [a0 a1 a2 a3 a4 a5 a6 a7]          each thread t posts its sum a_t
#     threads 0-3:  buf[t] += buf[t + 4]        barrier
#     threads 0-1:  buf[t] += buf[t + 2]        barrier
#     thread 0:     buf[0] += buf[1]            barrier; every thread reads the total in buf[0]
#
# Three steps instead of seven additions in one thread. On a GPU, the 32 threads of a warp can also
# swap registers directly (warp shuffles), which the library uses there; the simulator has no
# shuffles, so here it takes the shared-memory path. The library's kernel, with a grid-stride
# loop over rows (block b takes rows b, b + gridDim, ...), in `minparcae/kernels/cuda.py`:
#
#     for i in range(cuda.blockIdx.x, N, cuda.gridDim.x):
#         ss = ZERO
#         for j in range(t, n, nt):
#             v = x[i, j]
#             ss += v * v
#         ri = ONE / math.sqrt(_block_reduce(ss, False, buf) * inv_n + eps)  # all threads get the sum
#
# Three rows of 40 on a grid of 2 blocks of 32 threads: a block takes two rows, a thread one or two
# columns, so both loops go round more than once.

# %%
K.MAX_THREADS, K.ROW_BLOCKS = 32, 2  # small launches: a simulated thread costs a Python thread
x = rng.standard_normal((3, 40)).astype(np.float32)
w = (1 + 0.2 * rng.standard_normal(40)).astype(np.float32)
y_kernel, _, r_kernel = K.rmsnorm_forward(x, w, rmsnorm.EPS)
y_ref, (_, r_ref, _) = rmsnorm.forward(x.astype(np.float64), w.astype(np.float64))  # lesson 4's op
print(f"RMSNorm kernel vs ops.rmsnorm: relative error y {rel_err(y_kernel, y_ref):.1e}, "
      f"r {rel_err(r_kernel, r_ref):.1e}")
assert rel_err(y_kernel, y_ref) < RTOL and rel_err(r_kernel, r_ref) < RTOL

# %% [markdown]
# ### Exercise 1: the reduction, yourself
#
# Write `rms_rows`: block i computes r[i] for row i of x with NT = 16 threads. Budget: each thread
# reads at most ⌈n/NT⌉ elements of x from global memory (every element once, shared out evenly),
# and at most 2·log2(NT) + 1 = 9 elements of shared memory (the tree above: two per step, then the
# total). A thread that adds up all NT partial sums alone reads NT = 16.
#
#     python lessons/06_gpu_kernel.py --exercise 1

# %%
NT = 16  # threads per block in the exercises


@cuda.jit
def rms_rows(x, eps, r):
    """x: (N, n) float32; eps: float32; r: (N,). Launched as rms_rows[N, NT]:
        r[i] = 1 / √(mean_j x[i, j]² + eps)
    Use a shared array of NT floats (cuda.shared.array(NT, float32)) and cuda.syncthreads()."""
    raise NotImplementedError  # exercise 1: your kernel here


def check_rms_rows(kernel):
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    r = np.full(3, np.nan, np.float32)
    traffic = gpu_counting.watch(kernel, 3, NT, x, np.float32(rmsnorm.EPS), r)
    want = rmsnorm.forward(x.astype(np.float64))[1].r.ravel()
    return gpu_counting.report(
        "exercise 1, rms_rows", traffic, [("r", r, want, RTOL)],
        [("global reads per thread", "read", "global", math.ceil(40 / NT)),
         ("shared reads per thread", "read", "shared", 2 * int(math.log2(NT)) + 1)])


run_exercise(1, rms_rows, check_rms_rows)

# %% [markdown]
# ## 3. The online softmax
#
# Attention needs, for each query, the softmax of its scores $s_j$ over all keys. Done directly
# that takes the whole row of scores at once, and the (S, S) matrix for all queries, which does
# not fit in a block's shared memory for long sequences. The online softmax reads the scores a
# tile at a time and keeps two numbers: the running maximum m and the running sum
# $l = \sum_j e^{s_j - m}$. When a score s arrives, the maximum may grow to m', and every term
# already in l must move from $e^{\cdot - m}$ to $e^{\cdot - m'}$:
#
# $$m' = \max(m, s), \qquad l' = l\, e^{m - m'} + e^{s - m'},$$
#
# from m = −∞, l = 0; at the end $\mathrm{softmax}_j = e^{s_j - m}/l$. Subtracting the running
# maximum keeps every exponent ≤ 0, so nothing overflows (lesson 3). A tile of scores at once
# works the same, with the tile's largest score and the sum of its terms. The attention output, a
# weighted sum of value vectors, is rescaled the same way,
#
# $$o' = o\, e^{m - m'} + \sum_{j \in \text{tile}} e^{s_j - m'} v_j, \qquad y = o / l,$$
#
# so no tile's probabilities are needed again once it has been read. One row of 11 scores in
# tiles of 4 (the last one short), in NumPy:

# %%
s = 3 * rng.standard_normal(11)
v_row = rng.standard_normal((11, 3))
tile = 4
m, l, o = -np.inf, 0.0, np.zeros(3)
l_stale = 0.0  # the same sum without the rescaling, to see that it matters
for t0 in range(0, len(s), tile):
    block = s[t0:t0 + tile]
    m_new = max(m, block.max())
    alpha = np.exp(m - m_new)  # 0 for the first tile: m = −∞
    p = np.exp(block - m_new)
    l, o, m = l * alpha + p.sum(), o * alpha + p @ v_row[t0:t0 + tile], m_new
    l_stale += p.sum()
exact = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
print(f"online softmax over {-(-len(s) // tile)} tiles: max |difference| to softmax "
      f"{np.abs(np.exp(s - m) / l - exact).max():.1e}, output {np.abs(o / l - exact @ v_row).max():.1e}; "
      f"without the rescaling the sum is off by {abs(l_stale / l - 1):.0%}")
assert m == s.max() and np.abs(np.exp(s - m) / l - exact).max() < 1e-15
assert np.abs(o / l - exact @ v_row).max() < 1e-14 and abs(l_stale / l - 1) > 0.01

# %% [markdown]
# ### Exercise 2: a softmax kernel in two passes
#
# Write `softmax_rows`: block i computes y[i] = softmax(x[i]) with NT threads. Budget: each thread
# reads at most 2·⌈n/NT⌉ elements of x, i.e. two passes: one in which each thread keeps the
# online (m, l) of its own columns, and one that writes y. In between, the block combines the
# threads' pairs: M = max_t m_t, then the total $\sum_t l_t e^{m_t - M}$. A kernel that first finds the
# maximum, then the sum, then writes y reads x three times and is over budget. The rows hold
# scores of 50 ± 20 (a normal sample), up to about 110, and $e^{89}$ already overflows float32:
# the maximum must come out first.
#
# For the combining you may use the library's reduction, `block_reduce(v, is_max, buf)` (the
# shared-memory one of section 2: the block's sum, or maximum, of v, returned to every thread;
# buf a shared array of NT floats).
#
#     python lessons/06_gpu_kernel.py --exercise 2

# %%
block_reduce = K._block_reduce_shared


@cuda.jit
def softmax_rows(x, y):
    """x, y: (N, n) float32. Launched as softmax_rows[N, NT]:  y[i, j] = e^(x[i, j]) / Σ_k e^(x[i, k])"""
    raise NotImplementedError  # exercise 2: your kernel here


def check_softmax_rows(kernel):
    x = (50 + 20 * np.random.default_rng(2).standard_normal((3, 40))).astype(np.float32)
    y = np.full_like(x, np.nan)
    traffic = gpu_counting.watch(kernel, 3, NT, x, y)
    z = np.exp(x - x.max(axis=1, keepdims=True).astype(np.float64))
    return gpu_counting.report(
        "exercise 2, softmax_rows", traffic, [("y", y, z / z.sum(axis=1, keepdims=True), RTOL)],
        [("global reads per thread", "read", "global", 2 * math.ceil(40 / NT))])


run_exercise(2, softmax_rows, check_softmax_rows)

# %% [markdown]
# ## 4. Attention, three ways
#
# One head, causal, S = 16 positions of head size HS = 4, as in lesson 5:
#
# $$s_{ij} = \text{scale}\; q_i \cdot k_j \;\; (j \le i), \qquad m_i = \max_{j \le i} s_{ij},
# \qquad y_i = \frac{\sum_{j \le i} e^{s_{ij} - m_i} v_j}{\sum_{j \le i} e^{s_{ij} - m_i}}.$$
#
# All three kernels give a thread to each query row i and run blocks of TILE = 4 threads, so block
# b serves queries 4b to 4b + 3. They differ in where they read keys and values from.
#
# **Naive**: each thread reads what it needs from global memory, every time it needs it. Without
# the online softmax it passes over its keys twice: once for the maximum, once for the sum and the
# output.

# %%
S, HS, TILE = 16, 4, 4


@cuda.jit
def attention_naive(q, k, v, scale, y):
    """q, k, v, y: (S, HS); S threads in all. Thread i computes y[i] from global memory, in two
    passes over the keys j ≤ i."""
    i = cuda.grid(1)
    m = NEG_INF
    for j in range(i + 1):  # pass 1: the row's largest score
        s = ZERO
        for d in range(HS):
            s += q[i, d] * k[j, d]
        m = max(m, s * scale)
    o = cuda.local.array(HS, float32)  # registers: the thread's own output row
    for d in range(HS):
        o[d] = ZERO
    l = ZERO
    for j in range(i + 1):  # pass 2: the same scores again, now with the sum and the output
        s = ZERO
        for d in range(HS):
            s += q[i, d] * k[j, d]
        p = math.exp(s * scale - m)
        l += p
        for d in range(HS):
            o[d] += p * v[j, d]
    for d in range(HS):
        y[i, d] = o[d] / l


# %% [markdown]
# The four threads of a block read the same key rows: thread 4b + 3 reads keys 0 to 4b + 3, and
# its three neighbours all but the last few of them. **Tiled**: the block copies a tile of TILE key
# rows into shared memory once, with all its threads (each copies every TILE-th element, so
# neighbours read neighbouring addresses), waits at a barrier, and then every thread reads the
# tile from there. Tiles wholly after the block's last query are never loaded: causality. Without
# the online softmax, a query's scores must all be known before its maximum is, so each thread
# keeps its row of scores, S of them, in shared memory; a second walk over the tiles, of values
# this time, adds up the output.

# %%
@cuda.jit(device=True)
def load_tile(tile, src, row0):
    """tile[rr, d] = src[row0 + rr, d] for the TILE rows, copied by the block's threads together."""
    for e in range(cuda.threadIdx.x, TILE * HS, cuda.blockDim.x):
        tile[e // HS, e % HS] = src[row0 + e // HS, e % HS]


@cuda.jit
def attention_tiled(q, k, v, scale, y):
    """q, k, v, y: (S, HS); blocks of TILE threads, thread r of block b for query i = b·TILE + r."""
    Ks = cuda.shared.array((TILE, HS), float32)
    Vs = cuda.shared.array((TILE, HS), float32)
    scores = cuda.shared.array((TILE, S), float32)  # a row of S scores per query: grows with S
    r, q0 = cuda.threadIdx.x, cuda.blockIdx.x * TILE
    i = q0 + r
    qi = cuda.local.array(HS, float32)
    for d in range(HS):
        qi[d] = q[i, d] * scale  # read once, scaled once
    m = NEG_INF
    for k0 in range(0, q0 + TILE, TILE):  # the key tiles up to the block's last query
        load_tile(Ks, k, k0)
        cuda.syncthreads()  # the tile is complete before anyone reads it
        for jj in range(TILE):
            s = ZERO
            for d in range(HS):
                s += qi[d] * Ks[jj, d]
            s = s if k0 + jj <= i else NEG_INF
            scores[r, k0 + jj] = s
            m = max(m, s)
        cuda.syncthreads()  # nobody reads the tile any more: the next one may overwrite it
    l = ZERO
    for j in range(q0 + TILE):
        p = math.exp(scores[r, j] - m)
        scores[r, j] = p
        l += p
    o = cuda.local.array(HS, float32)
    for d in range(HS):
        o[d] = ZERO
    for k0 in range(0, q0 + TILE, TILE):
        load_tile(Vs, v, k0)
        cuda.syncthreads()
        for jj in range(TILE):
            p = scores[r, k0 + jj]
            for d in range(HS):
                o[d] += p * Vs[jj, d]
        cuda.syncthreads()
    for d in range(HS):
        y[i, d] = o[d] / l


# %% [markdown]
# **Flash**: tiled, with the online softmax of section 3. One walk over the key tiles, loading K
# and V together; each thread keeps only its running m, l and unnormalised output o (in
# registers), and rescales l and o by $\alpha = e^{m - m'}$ when a tile raises its maximum. No row
# of scores is kept: the shared memory a block needs no longer depends on S.

# %%
@cuda.jit
def attention_flash(q, k, v, scale, y):
    """q, k, v, y: (S, HS); blocks of TILE threads, as attention_tiled, in one pass."""
    Ks = cuda.shared.array((TILE, HS), float32)
    Vs = cuda.shared.array((TILE, HS), float32)
    r, q0 = cuda.threadIdx.x, cuda.blockIdx.x * TILE
    i = q0 + r
    qi = cuda.local.array(HS, float32)
    o = cuda.local.array(HS, float32)
    s = cuda.local.array(TILE, float32)  # this tile's scores only
    for d in range(HS):
        qi[d] = q[i, d] * scale
        o[d] = ZERO
    m, l = NEG_INF, ZERO
    for k0 in range(0, q0 + TILE, TILE):
        load_tile(Ks, k, k0)
        load_tile(Vs, v, k0)
        cuda.syncthreads()
        m_new = m
        for jj in range(TILE):
            sc = ZERO
            for d in range(HS):
                sc += qi[d] * Ks[jj, d]
            s[jj] = sc if k0 + jj <= i else NEG_INF
            m_new = max(m_new, s[jj])
        alpha = math.exp(m - m_new)  # 0 on the first tile; m_new is finite: key 0 is in it
        l *= alpha
        for d in range(HS):
            o[d] *= alpha
        for jj in range(TILE):
            p = math.exp(s[jj] - m_new)
            l += p
            for d in range(HS):
                o[d] += p * Vs[jj, d]
        m = m_new
        cuda.syncthreads()
    for d in range(HS):
        y[i, d] = o[d] / l


# %% [markdown]
# Each against `attention.forward` of lesson 5, in float64; and the library's flash kernel
# (`attention_forward` in `minparcae/kernels/cuda.py`, the production version: a block's threads
# split each query's keys too, TPR threads per row, and the tiles are sized for large heads) on
# the same inputs, with tiles (BQ, BK, TPR) = (4, 2, 2): 4 queries, 2 keys, 2 threads per query.

# %%
q, k, v = (rng.standard_normal((S, HS)).astype(np.float32) for _ in range(3))
scale = np.float32(HS ** -0.5)
y_ref, cache_ref = attention.forward(*(a.astype(np.float64)[None, None] for a in (q, k, v)), float(scale))
y_ref = y_ref[0, 0]
LIBRARY_TILES = (4, 2, 2)  # the tiles tests/sm90_compile.py also builds for head size 4
y_lib, cache_lib = K.attention_forward(q[None, None], k[None, None], v[None, None], scale,
                                       tiles=LIBRARY_TILES)
kernels = {"naive": attention_naive, "tiled": attention_tiled, "flash": attention_flash}
traffic = {}
for name, kernel in kernels.items():
    y = np.full_like(q, np.nan)
    traffic[name] = gpu_counting.watch(kernel, S // TILE, TILE, q, k, v, scale, y)
    print(f"{name:>16}: relative error {rel_err(y, y_ref):.1e}")
    assert rel_err(y, y_ref) < RTOL
print(f"{'minparcae flash':>16}: relative error {rel_err(y_lib[0, 0], y_ref):.1e}")
assert rel_err(y_lib[0, 0], y_ref) < RTOL

# %% [markdown]
# ## 5. Counting the traffic
#
# The same launches, counted. Per kernel: the threads launched; global reads per thread (the
# most, by a thread of the last block, which sees every key) and per query (all of them over S);
# the most times one block read one element of q, k or v; shared reads per thread (the most);
# and the floats of shared memory a block declares. The library's kernel is launched directly,
# with the (B·H, S, HS) layout its wrapper passes.

# %%
library_forward = K._flash_kernels(HS, *LIBRARY_TILES)[0]
BQ, _, TPR = LIBRARY_TILES
y_lib3, lse = np.full((1, S, HS), np.nan, np.float32), np.full((1, S), np.nan, np.float32)
traffic["minparcae flash"] = gpu_counting.watch(library_forward, (S // BQ, 1), (TPR, BQ), q[None],
                                                k[None], v[None], scale, y_lib3, lse)
assert rel_err(y_lib3[0], y_ref) < RTOL

columns = ("threads", "global/thread", "global/query", "one element", "shared/thread", "shared floats")
print(f"{'kernel':>16}" + "".join(f"{c:>15}" for c in columns))
for name, t in traffic.items():
    reads = t.per_thread("read")
    row = (len(t.threads), reads.max(), f"{reads.sum() / S:.1f}", t.most_by_one_block(["q", "k", "v"]),
           t.per_thread("read", "shared").max(), t.shared_floats())
    print(f"{name:>16}" + "".join(f"{c:>15}" for c in row))

# %% [markdown]
# The counts follow from the kernels, and are asserted exactly. Naive thread i reads q_i and k_j
# for each j ≤ i in both passes and v_j in the second: 5·HS·(i + 1) elements. In the tiled and the
# flash kernels, thread r of block b reads its q row (HS elements) and a TILE-th of each of the
# b + 1 tiles of K and of V: HS + 2·HS·(b + 1).

# %%
i = np.arange(S)
assert np.array_equal(traffic["naive"].per_thread("read"), 5 * HS * (i + 1))
for name in ("tiled", "flash"):
    assert np.array_equal(traffic[name].per_thread("read"), HS + 2 * HS * (i // TILE + 1))
assert traffic["tiled"].shared_floats() == 2 * TILE * HS + TILE * S  # grows with S
assert traffic["flash"].shared_floats() == 2 * TILE * HS  # does not

# %% [markdown]
# Which key rows each block reads, and how often (a row is HS elements; "." for never): the naive
# blocks read the early keys once per thread and pass, the tiled and flash blocks once.

# %%
for name in ("naive", "flash"):
    print(f"{name}: times block b reads key row j")
    print("  " + " " * 9 + "".join(f"{j:>3}" for j in range(S)))
    for b in range(S // TILE):
        rows = traffic[name].per_element("k", block=(b, 0, 0)).sum(axis=1) // HS
        print(f"  block {b}: " + "".join(f"{c:>3}" if c else "  ." for c in rows))

# %% [markdown]
# The budget of a tiled kernel: every element of q, k and v read from global memory at most once
# per block, shared out evenly among its threads, so at most HS + 2·HS·S/TILE = 36 per thread.
# Graded per thread, as the exercises are, the flash kernel meets it; the naive one, with the
# right output, does not.

# %%
budget = [("global reads per thread", "read", "global", HS + 2 * HS * S // TILE)]
results = {}
for name in ("flash", "naive"):
    y = np.full_like(q, np.nan)
    t = gpu_counting.watch(kernels[name], S // TILE, TILE, q, k, v, scale, y)
    results[name] = gpu_counting.report(f"attention_{name}", t, [("y", y, y_ref, RTOL)], budget)
assert results == {"flash": True, "naive": False}
for name in ("tiled", "flash", "minparcae flash"):
    assert traffic[name].most_by_one_block(["q", "k", "v"]) == 1
# The naive block's worst element is q_i: its own thread reads it for each of its i + 1 keys, twice.
assert traffic["naive"].most_by_one_block(["q", "k", "v"]) == 2 * S

# %% [markdown]
# What the table says at scale. Per query, on average, the naive kernel reads 5·HS·(S + 1)/2
# elements from global memory (170 here), the tiled and flash kernels HS·(S/TILE + 2) (24 here):
# for each key, 5·HS elements against 2·HS shared by a tile of TILE queries, 2.5·TILE times fewer
# as S grows. The tiled kernel pays with a row of scores per query in shared memory, TILE·S floats
# per block: at S = 4096 and 64 queries a block that is 1 MiB, more than four times the 228 KB of
# shared memory of an H100 multiprocessor. The flash kernel needs 2·TILE·HS floats whatever S is,
# which is why it runs at any length, and why the library uses it. (The library's kernel declares
# a little more: the q tile, a tile of probabilities, a buffer for the row reductions of its TPR
# threads per query, and rows padded to HS + 1 floats, so that threads reading down a column of a
# tile hit different memory banks.)
#
# ## 6. The flash backward
#
# The cache keeps, per query, lse_i = m_i + log l_i instead of the probabilities, and the backward
# rebuilds them: $P_{ij} = e^{s_{ij} - \mathrm{lse}_i}$. With $\Delta_i = \sum_d dy_{id}\, y_{id}$,
# lesson 5's softmax backward $ds = P \odot (dP - \mathrm{rowsum}(dP \odot P))$ becomes
# $ds_{ij} = P_{ij}\,(dy_i \cdot v_j - \Delta_i)$, since
# $\mathrm{rowsum}(dP \odot P)_i = \sum_j P_{ij}\, dy_i \cdot v_j = dy_i \cdot y_i$. Then
#
# $$dq_i = \text{scale} \sum_j ds_{ij} k_j, \qquad dv_j = \sum_i P_{ij}\, dy_i,
# \qquad dk_j = \text{scale} \sum_i ds_{ij} q_i,$$
#
# dq by a block per query tile (`backward_dq`), dk and dv by a block per key tile
# (`backward_dkv`): each output row is written by one block, so no atomic adds are needed and the
# result does not depend on the order the blocks run in.

# %%
lse = cache_lib[4].reshape(S, 1)
s_ref = np.where(np.triu(np.ones((S, S), bool), 1), -np.inf, (q.astype(np.float64) @ k.T) * scale)
p_err = np.abs(np.exp(s_ref - lse) - cache_ref.p.reshape(S, S)).max()
print(f"P rebuilt from lse vs the reference's P: max |difference| {p_err:.1e}")
assert p_err < RTOL  # probabilities are at most 1

dy = rng.standard_normal((1, 1, S, HS)).astype(np.float32)
grads_lib = K.attention_backward(dy, cache_lib)
grads_ref = attention.backward(dy.astype(np.float64), cache_ref)
for name, got in zip("qkv", grads_lib):
    print(f"flash backward d{name}: relative error {rel_err(got, grads_ref[name]):.1e}")
    assert rel_err(got, grads_ref[name]) < RTOL

# %% [markdown]
# ### Exercise 3: attention for one new token
#
# When a model generates text (lesson 12), each new token's query attends to all L keys cached so
# far: one row of attention, with nothing to share between queries. Write `attend_one`, which
# runs that row on one block of NT threads by splitting the keys: thread t takes keys t, t + NT,
# t + 2NT, ..., keeps the online (m_t, l_t, o_t) of its keys, and then the block combines them,
# as in exercise 2, with $M = \max_t m_t$ and
#
# $$y = \frac{\sum_t e^{m_t - M} o_t}{\sum_t e^{m_t - M} l_t}.$$
#
# Budget: each thread reads at most HS + 2·HS·⌈L/NT⌉ elements from global memory: q once (keep it
# in registers, `cuda.local.array(HS, float32)`), and each key and value row once in the whole
# block. A thread that reads q again for every key, or that walks all L keys, is over budget.
# `block_reduce` is at hand, as in exercise 2; the reference is one decoding step of the library,
# `attention.forward` with a KV cache.
#
#     python lessons/06_gpu_kernel.py --exercise 3

# %%
@cuda.jit
def attend_one(q, k, v, scale, y):
    """q, y: (HS,); k, v: (L, HS), float32. Launched as attend_one[1, NT]:
        y = Σ_j e^(s_j) v_j / Σ_j e^(s_j),   s_j = scale · q·k_j"""
    raise NotImplementedError  # exercise 3: your kernel here


def check_attend_one(kernel):
    L, g = 40, np.random.default_rng(3)
    q1 = (3 * g.standard_normal(HS)).astype(np.float32)  # the new token's query; 3: sharper weights
    k1, v1 = g.standard_normal((2, L, HS)).astype(np.float32)
    scale = np.float32(HS ** -0.5)
    y = np.full(HS, np.nan, np.float32)
    traffic = gpu_counting.watch(kernel, 1, NT, q1, k1, v1, scale, y)
    # One decoding step: keys 0 .. L − 2 are cached, the new token adds key L − 1 and attends to all.
    keys, values = np.zeros((1, 1, L, HS)), np.zeros((1, 1, L, HS))
    keys[0, 0, :-1], values[0, 0, :-1] = k1[:-1], v1[:-1]
    kv = attention.KVSlot(keys, values, start=L - 1, rows=None)
    want = attention.forward(*(a.astype(np.float64)[None, None, None] for a in (q1, k1[-1], v1[-1])),
                             float(scale), kv)[0].ravel()
    return gpu_counting.report(
        "exercise 3, attend_one", traffic, [("y", y, want, RTOL)],
        [("global reads per thread", "read", "global", HS + 2 * HS * math.ceil(L / NT))])


run_exercise(3, attend_one, check_attend_one)

# %%
print("lesson 6 passed")
