"""Numba's CUDA simulator, made fit to check minparcae's kernels on a CPU.

The simulator runs each block of a launch as one Python thread per CUDA thread. Two things it lacks
are added here, for the tests and lesson 6 only (the library never touches the simulator):

  - `serialise_shared_arrays`: its `cuda.shared.array` is not safe when called by several threads
    at once (below);
  - `emulate_warp_shuffles`: it has no `cuda.shfl_xor_sync`, so the kernels' shuffle reductions
    cannot run. The emulation exchanges values through a per-block buffer between two barriers,
    and checks what the hardware requires and cannot check itself: every lane of the mask takes
    part, the partner lane is in the mask, and the mask names exactly the lanes of the warp that
    exist. `kernels_with_shuffles()` then compiles a second copy of minparcae/kernels/cuda.py
    that takes the shuffle path, as it is built on a GPU.

Barriers are block-wide, so the emulation needs every thread of a block to reach the shuffle
together, as all of minparcae's reductions do (they sit in loops whose trip count is the same for
the whole block); a lane that does not arrive is reported, not waited for.
"""

import importlib.util
import sys
import threading

import numpy as np
from numba import config

WARP = 32


def simulated():
    """True when Numba runs `cuda.jit` kernels on its simulator (NUMBA_ENABLE_CUDASIM=1, as Numba
    itself parses it: "0" means the GPU)."""
    return bool(config.ENABLE_CUDASIM)


def serialise_shared_arrays():
    """Make the simulator's shared arrays safe to create from several threads at once.

    `cuda.shared.array(...)` looks the array up by the calling source line and creates it when it
    is absent. Look-up and creation are not atomic: in the first block of a launch two threads can
    each create their own "shared" array and never see each other's writes. On a busy CPU that
    gave wrong rows in the first block of the flash-attention forward in about one launch in a
    hundred. This is the simulator's own function with look-up and creation under one lock."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "serialised", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or unsupported: as before
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)  # the kernel line that asks: one array per line and block
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array.serialised = True
    kernelapi.FakeCUDAShared.array = array


class _Exchange:
    """One block's shuffle buffer: each thread posts (round, value) under its linear index."""

    def __init__(self):
        self.posted = {}


_exchanges = threading.Lock(), {}


def _block_exchange(manager):
    lock, table = _exchanges
    with lock:
        if manager not in table:
            table.clear()  # blocks run one after another: only the current one is needed
            table[manager] = _Exchange()
        return table[manager]


def shfl_xor_sync(mask, value, lane_mask):
    """`cuda.shfl_xor_sync` on the simulator: the value that lane (lane ^ lane_mask) of the calling
    warp passed in the same call. Raises AssertionError where a GPU would be undefined."""
    thread = threading.current_thread()
    manager = thread._manager
    n = int(np.prod(manager._block_dim))
    t = thread.thread_id
    lane, first = t % WARP, t - t % WARP
    present = min(WARP, n - first)
    partner = lane ^ lane_mask
    assert mask == (1 << present) - 1, \
        f"shuffle mask {mask:#x} for a warp of {present} lanes: it must name exactly the lanes present"
    assert partner < present and mask >> lane & 1 and mask >> partner & 1, \
        f"lane {lane} shuffles with lane {partner}, outside mask {mask:#x}"
    exchange = _block_exchange(manager)
    rounds = exchange.posted.get(t, (0, None))[0] + 1
    exchange.posted[t] = (rounds, value)
    thread.syncthreads()
    partner_round, got = exchange.posted.get(first + partner, (0, None))
    assert partner_round == rounds, f"lane {partner} of warp {t // WARP} did not take part in a shuffle"
    thread.syncthreads()  # every read is done before anyone posts again
    return got


def emulate_warp_shuffles(monkeypatch):
    """Give the simulator `cuda.shfl_xor_sync` (undone by `monkeypatch` at the end of the test)."""
    import numba.cuda
    from numba.cuda.simulator import kernelapi

    monkeypatch.setattr(numba.cuda, "shfl_xor_sync", shfl_xor_sync, raising=False)
    monkeypatch.setattr(kernelapi.FakeCUDAModule, "shfl_xor_sync", staticmethod(shfl_xor_sync),
                        raising=False)


def kernels_with_shuffles(monkeypatch):
    """A fresh copy of minparcae.kernels.cuda built while the simulator has shuffles, so its
    reductions take the GPU's shuffle path (WARP_SHUFFLES is decided at import). The library's own
    module, and the kernels the rest of the suite uses, are left as they are."""
    emulate_warp_shuffles(monkeypatch)
    from minparcae.kernels import cuda as library_module

    name = "minparcae.kernels._cuda_with_shuffles"
    spec = importlib.util.spec_from_file_location(name, library_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WARP_SHUFFLES
    return module
