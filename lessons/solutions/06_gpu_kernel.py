"""Solutions to the exercises of lesson 6. Write yours first: `python lessons/06_gpu_kernel.py
--exercise N` grades the kernel in the lesson, `--exercise N --solution` grades the one here."""

import math

import numpy as np
from numba import cuda, float32

from minparcae.kernels.cuda import _block_reduce_shared as block_reduce

NT, HS = 16, 4  # threads per block and head size, as in the lesson
NEG_INF, ZERO, ONE = np.float32(-np.inf), np.float32(0), np.float32(1)


@cuda.jit
def rms_rows(x, eps, r):
    """Exercise 1: r[i] = 1/√(mean_j x[i, j]² + eps), block i, NT threads."""
    buf = cuda.shared.array(NT, float32)
    i, t, n = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    ss = ZERO
    for j in range(t, n, NT):  # each element once: columns t, t + NT, ...
        v = x[i, j]
        ss += v * v
    buf[t] = ss
    cuda.syncthreads()
    step = NT // 2
    while step > 0:  # the tree: half the threads add the other half's sums in, each step
        if t < step:
            buf[t] += buf[t + step]
        cuda.syncthreads()  # this step's sums are written before the next step reads them
        step //= 2
    if t == 0:
        # float32 throughout (ONE, float32(n)): float64 arithmetic is far slower on most GPUs
        r[i] = ONE / math.sqrt(buf[0] / float32(n) + eps)


@cuda.jit
def softmax_rows(x, y):
    """Exercise 2: y[i] = softmax(x[i]), block i, NT threads, two passes over the row."""
    buf = cuda.shared.array(NT, float32)
    i, t, n = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    m, l = NEG_INF, ZERO  # this thread's running max and Σ e^(x − m) over its columns
    for j in range(t, n, NT):
        s = x[i, j]
        m_new = max(m, s)
        l = l * math.exp(m - m_new) + math.exp(s - m_new)
        m = m_new
    top = block_reduce(m, True, buf)
    total = block_reduce(l * math.exp(m - top), False, buf)  # each l moved to the row's max
    for j in range(t, n, NT):
        y[i, j] = math.exp(x[i, j] - top) / total


@cuda.jit
def attend_one(q, k, v, scale, y):
    """Exercise 3: y = softmax(scale · k q) v for one query, one block of NT threads splitting the
    keys: j = t, t + NT, ... with an online softmax each, then the NT partial results combined."""
    buf = cuda.shared.array(NT, float32)
    t = cuda.threadIdx.x
    qs = cuda.local.array(HS, float32)
    o = cuda.local.array(HS, float32)
    for d in range(HS):
        qs[d] = q[d] * scale  # read once, kept in registers for every key
        o[d] = ZERO
    m, l = NEG_INF, ZERO
    for j in range(t, k.shape[0], NT):
        s = ZERO
        for d in range(HS):
            s += qs[d] * k[j, d]
        m_new = max(m, s)
        alpha, p = math.exp(m - m_new), math.exp(s - m_new)
        l = l * alpha + p
        for d in range(HS):
            o[d] = o[d] * alpha + p * v[j, d]
        m = m_new
    top = block_reduce(m, True, buf)
    c = math.exp(m - top)  # this thread's l and o, moved to the block's max
    total = block_reduce(l * c, False, buf)
    for d in range(HS):
        od = block_reduce(o[d] * c, False, buf)  # every thread takes part: the reduction has barriers
        if t == 0:
            y[d] = od / total
