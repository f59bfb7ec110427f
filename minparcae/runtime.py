"""Where CPU work runs: minparcae's threads, BLAS's thread count, and a training batch split over
the cores. The model and the ops know nothing of this; it is the training step's business.

On the CPU a step is many small pieces: matrix products of a few MFLOP, row-wise ops, the
attention core per head. Split each piece over the cores (what BLAS does with a product, and what
PyTorch does with every op) and the cores are handed back and forth a few hundred times per step,
each hand-off a wait; on a machine whose other core is busy, a wait can last a scheduler time
slice. So `loss_and_grads` splits the batch instead: one group of sequences per thread, each
running forward and backward with single-threaded BLAS, no thread waiting for another until its
part is done. It measured 1.18-1.55× faster than splitting every op (bench/RESULTS.md).

The parts' gradients add up to the whole batch's: the mean loss over all targets is Σ_i (n_i/n) L_i
for parts with n_i of the n targets, so part i backpropagates dloss = n_i/n. The initial state is
drawn for the whole batch first, so the result is the unsplit forward and backward's up to the
order of float additions.

Threads: as many as NumPy's OpenBLAS is set to use (OPENBLAS_NUM_THREADS, by default the cores).
BLAS's thread count is process-wide, so it is set to 1 while the parts run and restored after;
where it cannot be controlled (another BLAS, no /proc), the batch is not split.
"""

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import model
from .backend import array_module, to_host
from .ops import REFERENCE
from .ops.cross_entropy import IGNORE_INDEX


@functools.cache
def _blas_thread_control():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None


def threads():
    """How many threads minparcae's CPU work may use: OpenBLAS's thread count, or 1 when that BLAS
    cannot be controlled."""
    control = _blas_thread_control()
    return control[0]() if control else 1


@functools.cache
def _pool():
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="minparcae")


def split(n, parts):
    """`parts` slices [lo, hi) of range(n), as even as can be (fewer if n < parts)."""
    parts = max(1, min(n, parts))
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def map_parts(job, n):
    """[job(lo, hi) for the slices of range(n), one per thread], run at once with BLAS
    single-threaded meanwhile (the first slice on the calling thread). One slice, or a call from a
    thread other than the main one, runs the jobs in order on the calling thread."""
    control = _blas_thread_control()
    slices = split(n, threads())
    if len(slices) == 1 or control is None or threading.current_thread() is not threading.main_thread():
        return [job(*s) for s in slices]
    get, put = control
    saved = get()
    put(1)
    rest = []
    try:
        rest = [_pool().submit(job, *s) for s in slices[1:]]
        first = job(*slices[0])
        return [first] + [f.result() for f in rest]
    finally:
        for f in rest:
            f.exception()  # wait for every part before BLAS gets its threads back
        put(saved)


def loss_and_grads(p, cfg, ids, targets, depths=None, h0=None, rng=None, ops=REFERENCE):
    """One training batch: model.forward(train=True), then model.backward. Returns (loss, grads,
    diagnostics). On the CPU the batch is split over the threads (see the module docstring)."""
    B, T = ids.shape
    if array_module(p["wte"]) is not np or B < 2 or threads() < 2:
        loss, cache, diag = model.forward(p, cfg, ids, targets, depths=depths, h0=h0, rng=rng,
                                          train=True, ops=ops)
        return loss, model.backward(p, cfg, cache), diag
    if depths is None:
        depths = np.full(B, cfg.mean_recurrence)
    depths = np.asarray(to_host(depths))
    if h0 is None and cfg.looped:  # as forward would draw it for the whole batch
        h0 = model.initial_state(cfg, (B, T, cfg.d_h), cfg.state_init, rng, p["wte"].dtype)
    counts = (targets != IGNORE_INDEX).reshape(B, -1).sum(axis=1)
    n = max(int(counts.sum()), 1)

    def part(lo, hi):
        share = int(counts[lo:hi].sum()) / n
        loss, cache, diag = model.forward(p, cfg, ids[lo:hi], targets[lo:hi], depths=depths[lo:hi],
                                          h0=None if h0 is None else h0[lo:hi], train=True, ops=ops)
        return share * loss, model.backward(p, cfg, cache, dloss=share), diag, hi - lo

    parts = map_parts(part, B)
    loss, grads = parts[0][0], parts[0][1]
    for part_loss, part_grads, _, _ in parts[1:]:
        loss += part_loss
        for k, g in part_grads.items():
            grads[k] += g
    diag = dict(parts[0][2])  # steps and ρ as the first part's; the means weighted by sequences
    diag["steps"] = max(d["steps"] for _, _, d, _ in parts)
    for key in ("state_norm", "residual"):
        diag[key] = sum(d[key] * rows for _, _, d, rows in parts) / B
    diag["loops"] = np.concatenate([d["loops"] for _, _, d, _ in parts])
    return loss, grads, diag
