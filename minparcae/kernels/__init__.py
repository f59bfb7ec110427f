"""Fast paths: whole-op replacements, and the one place that chooses them per device (`select`).

The model runs whatever `ops.Ops` set it is given (ops.REFERENCE unless told otherwise). `select`
returns the set for a device, in which some ops are replaced by a faster object with the same
functions, signatures and results (up to rounding); a replacement that has nothing faster for one
of an op's functions keeps the reference's (`replace`). A replacement's cache is its own: only its
own backward reads it. Which are replaced:

    cpu   (kernels/cpu.py, Numba njit)   rmsnorm, qk_norm (rotary and the norm in one pass), mlp
                                         (ReLU²), cross_entropy (softmax and gradient in three
                                         passes), embedding (its backward's scatter-add), attention
                                         (the causal core in row blocks, never computing the
                                         blocks above the diagonal)
    gpu   (kernels/cuda.py, Numba CUDA,  rmsnorm (the residual add fused), qk_norm (rotary and the
           float32 only)                 norm), mlp (ReLU²), attention (flash: never the T × T
                                         matrix), cross_entropy (softmax and gradient in one pass),
                                         injection (the diagonal state map), embedding (its
                                         backward's scatter-add); and the AdamW update
                                         (`adamw_update`)

A CPU replacement stays only while a same-run A/B (`python bench/ab_kernels.py`) shows its gain
outside noise, alone or with the row-wise ones it belongs with (bench/RESULTS.md; a one-pass AdamW
and a product split over threads did not, and went). The GPU ones await that measurement on a GPU.
Matrix products are never replaced: they go to BLAS and cuBLAS.

MINPARCAE_KERNELS=0 makes `select` return the reference for every device.
"""

import os
import types

import numpy as np

from ..backend import array_module
from ..ops import REFERENCE

KERNELS_ENV = "MINPARCAE_KERNELS"


def replace(module, **functions):
    """A whole-op replacement of op `module`: its public names, with `functions` in place of the
    reference's functions of the same names."""
    unknown = [name for name in functions if not callable(getattr(module, name, None))]
    if unknown:
        raise AttributeError(f"{module.__name__} has no function {', '.join(unknown)} to replace")
    names = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    return types.SimpleNamespace(**{**names, **functions, "__name__": module.__name__})


def enabled():
    return os.environ.get(KERNELS_ENV, "1") != "0"


def select(device, dtype=np.float32):
    """The op set for arrays of `dtype` on `device` ("cpu" or "gpu")."""
    if not enabled():
        return REFERENCE
    if device == "cpu":
        from . import cpu
        return REFERENCE._replace(**cpu.REPLACEMENTS)
    if np.dtype(dtype) != np.float32:
        return REFERENCE
    from . import cuda
    return REFERENCE._replace(**cuda.REPLACEMENTS)


def for_array(x):
    """`select` for the device and dtype of array x (e.g. a model's params["wte"])."""
    return select("cpu" if array_module(x) is np else "gpu", x.dtype)


def adamw_update(x):
    """The fast AdamW update (optim.AdamW's `update`) for parameters like x, or None for the
    reference's (on the CPU, NumPy's)."""
    if not enabled() or array_module(x) is np or np.dtype(x.dtype) != np.float32:
        return None
    from . import cuda
    return cuda.adamw_step
