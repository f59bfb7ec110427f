"""One array API, two devices.

Every op in minparcae is written once against an array module `xp`: NumPy on the CPU, CuPy on an
NVIDIA GPU. Ops never import a device themselves; they ask `array_module(x)` for the module that
owns their input, so the same function runs wherever its arrays live. This file decides where new
arrays (parameters, batches) are created.

Choosing the device, in order of precedence:
  1. `use_device("cpu" | "gpu" | "auto")` (what train.py's `--device` flag calls),
  2. the environment variable MINPARCAE_DEVICE=cpu|gpu|auto,
  3. "auto": CuPy if it imports *and* a CUDA device answers, else NumPy.

`import cupy` succeeds on a machine without a GPU or driver; only the first call into the CUDA
runtime fails (CUDARuntimeError). So "auto" asks the runtime for a device count inside a try and
treats any failure as "no GPU".

The compute dtype is float32 by default; gradient checks use float64 (`use_dtype`).

What runs is decided by three settings a user makes on purpose, and nothing else:
  - the device: `use_device` / --device / MINPARCAE_DEVICE (above);
  - the compute dtype: `use_dtype` / --dtype;
  - whether the fast paths replace ops: MINPARCAE_KERNELS=0 turns them off (minparcae/kernels).
The number of CPU threads is BLAS's (OPENBLAS_NUM_THREADS; minparcae/runtime.py).
"""

import os
import sys

import numpy as np

DEVICE_ENV = "MINPARCAE_DEVICE"
_DEVICES = ("auto", "cpu", "gpu")

_state = {"device": None, "dtype": np.float32}


def gpu_available():
    """True when CuPy imports and the CUDA runtime reports at least one device."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDARuntimeError without a driver, or anything else from a broken install
        return False


def use_device(name=None):
    """Select "cpu", "gpu" or "auto" (None reads MINPARCAE_DEVICE, default "auto"). Returns the
    device actually used, "cpu" or "gpu"."""
    if name is None:
        name = os.environ.get(DEVICE_ENV, "auto") or "auto"
    name = name.strip().lower()
    if name not in _DEVICES:
        raise ValueError(f"unknown device {name!r}: use one of cpu, gpu, auto")
    if name == "gpu" and not gpu_available():
        raise RuntimeError("device 'gpu' was requested but no CUDA GPU is usable through CuPy; "
                           "install minparcae[gpu] on a machine with an NVIDIA GPU, or use --device cpu")
    if name == "auto":
        name = "gpu" if gpu_available() else "cpu"
    _state["device"] = name
    return name


def require_gpu(program):
    """Select the GPU, or end `program` (a script's file name) with one sentence saying it needs one."""
    if use_device("auto") != "gpu":
        sys.exit(f"{program} needs an NVIDIA GPU with CuPy: install minparcae[gpu] on a machine with one.")


def device():
    """The active device, "cpu" or "gpu" (resolved on first use)."""
    if _state["device"] is None:
        use_device()
    return _state["device"]


def get_xp():
    """The array module of the active device: numpy or cupy."""
    if device() == "gpu":
        import cupy
        return cupy
    return np


def array_module(x):
    """The module that owns array `x` (numpy for NumPy arrays and scalars, cupy for CuPy arrays)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def use_dtype(dtype):
    """Set the default floating dtype for new parameters and activations (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"compute dtype must be float32 or float64, not {dtype}")
    _state["dtype"] = dtype.type


def dtype():
    """The default floating dtype (numpy type), float32 unless `use_dtype` changed it."""
    return _state["dtype"]


def to_device(x, dtype=None):
    """Copy a host array (or anything array-like) to the active device."""
    return get_xp().asarray(x, dtype=dtype)


def to_host(x):
    """A NumPy copy (or view) of `x`, wherever it lives."""
    if array_module(x) is np:
        return np.asarray(x)
    return x.get()


def synchronize():
    """Wait for queued GPU work to finish (a no-op on CPU); call before reading a timer."""
    if device() == "gpu":
        import cupy
        cupy.cuda.get_current_stream().synchronize()
