"""Pre-flight of scripts/gpu_check.sh: can this machine run minparcae's GPU path at all?

    python3 scripts/gpu_preflight.py

Checks, in order, and stops at the first that fails with one line `PREFLIGHT FAIL: <sentence>`
(exit status 1): CuPy imports and sees a GPU; Numba's CUDA target is numba-cuda and finds libNVVM
(gpu_check.sh retries with CUDA_HOME=/usr/local/cuda when it does not); one kernel of
minparcae/kernels/cuda.py, launched on a CuPy array on CuPy's stream, gives the reference's result;
kernels.select gives the CUDA replacements for float32 CuPy arrays. Success prints
`PREFLIGHT OK: <GPU name>, ...`.
"""

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")


def fail(sentence):
    print(f"PREFLIGHT FAIL: {sentence}", flush=True)
    sys.exit(1)


def main():
    try:
        import cupy
    except Exception as e:
        fail(f"CuPy is not importable ({type(e).__name__}: {str(e)[:120]}); install cupy-cuda13x.")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as e:
        fail(f"CuPy sees no GPU ({type(e).__name__}: {str(e)[:120]}).")
    if count < 1:
        fail("CuPy sees no GPU.")
    try:
        from numba import cuda
        from numba.cuda.cudadrv import nvvm
    except Exception as e:
        fail(f"numba-cuda is not importable ({type(e).__name__}: {str(e)[:120]}).")
    if getattr(cuda, "implementation", "") != "NVIDIA":
        fail("Numba's CUDA target is not numba-cuda: install numba-cuda.")
    try:
        nvvm.NVVM()
    except Exception as e:
        fail(f"Numba cannot load libNVVM ({type(e).__name__}: {str(e)[:120]}); set CUDA_HOME.")
    if not cuda.is_available():
        fail("Numba sees no CUDA GPU.")

    import numpy as np

    from minparcae import kernels
    from minparcae.kernels import cuda as K
    from minparcae.ops import REFERENCE

    u = cupy.asarray(np.linspace(-2, 2, 1000, dtype=np.float32).reshape(10, 100))
    a, g = K.relu2_forward(u)
    cupy.cuda.get_current_stream().synchronize()
    want = np.maximum(np.linspace(-2, 2, 1000, dtype=np.float32), 0).reshape(10, 100)
    if not (np.array_equal(a.get(), want) and np.allclose(g.get(), 0.5 * want * want)):
        fail("a kernel launched on a CuPy array gave a wrong result.")
    if kernels.for_array(u) != REFERENCE._replace(**K.REPLACEMENTS):
        fail(f"kernels.select does not give the CUDA replacements for float32 CuPy arrays "
             f"({kernels.KERNELS_ENV}={os.environ.get(kernels.KERNELS_ENV, 'unset')}).")
    print(f"PREFLIGHT OK: {name}, {count} GPU(s), CuPy {cupy.__version__}, CUDA runtime "
          f"{cupy.cuda.runtime.runtimeGetVersion()}, libNVVM {'.'.join(map(str, nvvm.NVVM().get_version()))}",
          flush=True)


if __name__ == "__main__":
    main()
