"""Compile every CUDA kernel of minparcae/kernels/cuda.py for sm_90 (Hopper) without a GPU, and
report what the assembler makes of it. Run by tests/test_kernels_cuda.py in its own process, since
Numba must not be in simulator mode:

    NUMBA_ENABLE_CUDASIM=0 python tests/sm90_compile.py

Each kernel is compiled with the argument types its launch wrapper passes: the wrappers are called on
NumPy arrays of the dtypes, ranks and layouts the model uses (float32; int64 ids and targets; bool
masks; Python bools; a strided head view for rotary), and so are the op replacements of
cuda.REPLACEMENTS (through tests/replacements.py), with `_launch` replaced by a recorder, and
Numba types each recorded argument as it would a CuPy array of the same layout. The flash kernels
are built for every head size the presets, lessons and tests use. Numba's NVVM gives the PTX; the
PTX goes through nvJitLink (the assembler that ships in the nvidia-nvjitlink wheel) to sm_90 code,
whose log gives registers, spills, local memory and static shared memory. One line per kernel:

    KERNEL <name> regs=<n> spill_stores=<bytes> spill_loads=<bytes> lmem=<bytes> smem=<bytes>
           f64=<0|1> shfl=<0|1>

`smem` excludes the 1 KB per block that sm_80 and later reserve for the system. Exits non-zero,
with one sentence, when NVVM or nvJitLink cannot be found.
"""

import multiprocessing
import os
import re
import sys
import types

import numpy as np

from replacements import exercise  # tests/replacements.py, next to this file

HEAD_SIZES = (8, 16, 32, 64, 128)  # lessons 7-10 (8, 16), tiny (32), small-cpu and medium (64), parcae-* (128)
EXTRA_TILES = ((4, (4, 2, 2)),)  # lesson 6 launches its own tiles
SYSTEM_SMEM = 1024  # shared memory per block reserved by the driver on sm_80 and later


def record_launches(K):
    """[(kernel, args)] of every launch the wrappers make, the kernels not run."""
    launched = []
    K._launch = lambda kernel, grid, block, *args: launched.append((kernel, args))
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    np.seterr(all="ignore")  # the outputs are never written: sums over them see garbage
    x, w, r = f(6, 768), f(768), f(6, 1)
    K.rmsnorm_forward(x, w, 1e-5)
    K.add_rmsnorm_forward(x, x, None, 1e-5)
    K.add_rmsnorm_forward(x, x, w, 1e-5)
    K.rmsnorm_backward(x, x, r, w)
    K.rmsnorm_backward(x, x, r, None, dres=x)
    cos, sin = f(16, 64), f(16, 64)
    K.rotary(f(2, 16, 6, 128).transpose(0, 2, 1, 3), cos, sin)  # attention's head view of x W_q
    K.rotary(f(2, 6, 16, 128), cos, sin)
    K.relu2_forward(x)
    K.relu2_backward(x, x)
    K.softmax_xent(f(4, 100), np.zeros(4, np.int64), np.ones(4, bool), 4)
    K.scatter_add(f(10, 768), np.zeros(6, np.int64), x)
    K.injection_forward(x, x, w)
    K.injection_backward(x, x, w)
    K.adamw_step(x, x, x.copy(), x.copy(), 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05)
    for hs, tiles in [(hs, None) for hs in HEAD_SIZES] + list(EXTRA_TILES):
        q = f(1, 2, 16, hs)
        K.attention_backward(q, K.attention_forward(q, q, q, 0.1, tiles=tiles)[1])
    K.attention_forward_simple(q, q, q, 0.1)
    # the op replacements that kernels.select gives a GPU, with the arguments they pass (head size 8:
    # no flash build beyond the ones above)
    for name, op in K.REPLACEMENTS.items():
        exercise(name, op, np.float32, T=9, hs=8, width=40)
    return launched


def link_info(ptx):
    """nvJitLink's log for the PTX assembled for sm_90."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, ["-arch=sm_90", "-verbose"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, ptx.encode(), len(ptx), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        return bytes(log).decode()
    finally:
        nvjitlink.destroy(handle)


def number(pattern, text):
    found = re.search(pattern, text)
    if found is None:
        raise SystemExit(f"nvJitLink's log has no match for {pattern!r}:\n{text}")
    return int(found.group(1))


def main():
    import numba.cuda.dispatcher
    from numba import cuda, typeof
    from numba.cuda.dispatcher import CUDADispatcher

    if getattr(cuda, "implementation", "") != "NVIDIA":
        raise SystemExit("numba-cuda is not installed: pip install -e '.[test]' brings it.")
    # device functions ask the current device for its compute capability: answer for the target
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    try:
        cuda.compile_ptx(lambda a: None, (typeof(np.zeros(1, np.float32)),), cc=(9, 0))
        link_info(cuda.compile_ptx(lambda a: None, (typeof(np.zeros(1, np.float32)),), cc=(9, 0))[0])
    except Exception as e:
        raise SystemExit(f"cannot compile for sm_90 here ({type(e).__name__}: {str(e)[:200]}): the test extra's "
                         "numba-cuda[cu13] brings NVVM and nvJitLink.")

    from minparcae.kernels import cuda as K

    assert K.WARP_SHUFFLES, "numba-cuda without shfl_xor_sync"
    jobs, seen = [], set()
    for kernel, args in record_launches(K):
        signature = tuple(typeof(a) for a in args)
        if (kernel, signature) not in seen:
            seen.add((kernel, signature))
            jobs.append((kernel, signature))
    kernels = {v for v in vars(K).values() if isinstance(v, CUDADispatcher) and not v.targetoptions.get("device")}
    for kernel in kernels - {kernel for kernel, _ in jobs}:
        print("NOT LAUNCHED", kernel.py_func.__name__)
    # The compilations are independent and take about a second each: a process per core but one,
    # which is left to the tests that run meanwhile (tests/conftest.py starts this early)
    with multiprocessing.get_context("fork").Pool(max(1, (os.cpu_count() or 1) - 1)) as pool:
        for line in pool.imap(compile_and_assemble, jobs):
            print(line, flush=True)


def compile_and_assemble(job):
    from numba import cuda

    kernel, signature = job
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    assert ".target sm_90" in ptx
    log = link_info(ptx)
    name = kernel.py_func.__qualname__.replace("_flash_kernels.<locals>.", "flash.")
    if name.startswith("flash."):
        name += "[D={},BQ={},BK={},TPR={}]".format(*_flash_constants(kernel))
    smem = number(r"(\d+) bytes smem", log)
    fields = {"regs": number(r"used (\d+) registers", log),
              "spill_stores": number(r"(\d+) bytes spill stores", log),
              "spill_loads": number(r"(\d+) bytes spill loads", log),
              "lmem": number(r"(\d+) bytes lmem", log),
              "smem": smem - SYSTEM_SMEM if smem else 0,  # the reservation appears with shared memory
              "f64": int(".f64" in ptx), "shfl": int("shfl.sync" in ptx)}
    return "KERNEL " + name + " " + " ".join(f"{k}={v}" for k, v in fields.items())


def _flash_constants(kernel):
    """(D, BQ, BK, TPR) of a kernel built by `_flash_kernels`, read from its closure."""
    cells = dict(zip(kernel.py_func.__code__.co_freevars, kernel.py_func.__closure__))
    return tuple(cells[c].cell_contents for c in ("D", "BQ", "BK", "TPR"))


if __name__ == "__main__":
    sys.exit(main())
