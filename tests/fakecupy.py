"""A CPU stand-in for the `cupy` module that refuses what CuPy refuses, to run device code in CI.

minparcae's model, optimiser, data, generation and checkpoint code must keep host (NumPy) and
device (CuPy) arrays apart, and without a GPU nothing checks that. `install(monkeypatch)` puts this
module in sys.modules as `cupy` (and `cupyx`) for one test. Its arrays hold a NumPy array inside and
behave as CuPy 14.2's do in each of the rules below, read from CuPy's source (cupy/_core/core.pyx,
_routines_indexing.pyx, _kernel.pyx at tag v14.2.0):

  1. No implicit device-to-host copy: `np.asarray(x)`, `np.array(x)`, `np.float32(x)` and anything
     else that calls `x.__array__` raise TypeError ("Implicit conversion to a NumPy array is not
     allowed"). `x.get()`, `cupy.asnumpy(x)`, `x.item()`, `x.tolist()`, `int(x)`, `float(x)`,
     `bool(x)`, `format(x, spec)`, `str(x)` copy explicitly and are allowed.
  2. No mixing in arithmetic: a NumPy ufunc, or an operator, with a CuPy operand runs on the
     device; a NumPy array among its operands raises TypeError ("Unsupported type"), Python and
     NumPy scalars are fine. NumPy functions (`np.sum(x)`, `np.concatenate([x, y])`) dispatch to
     CuPy's, which raise TypeError for a NumPy array argument.
  3. `cupy.asarray` / `cupy.array` copy host data to the device; other cupy functions take device
     arrays only (e.g. `cupy.ascontiguousarray(np_array)` raises TypeError).
  4. Indexing a CuPy array: ints, slices, None, Ellipsis, CuPy arrays, and lists or NumPy arrays of
     ints or bools (copied to the device). Indexing a NumPy array with a CuPy array raises TypeError
     (NumPy asks for `__array__`; CuPy has no `__index__`, so a 0-d array is no index either).
  5. Assigning a NumPy array into a slice of a CuPy array raises ValueError (CuPy's fill refuses a
     non-scalar host array); into an advanced index (an index array) it is copied to the device.
  6. Reductions return 0-d device arrays, not scalars (`x.sum()` is a CuPy array; `float()` of it
     is a host float).

Devices and streams are stand-ins: one device, `synchronize()` does nothing, the memory pool
reports zero bytes. `cupy.random` draws from NumPy's legacy global generator. Only the parts of
CuPy that minparcae uses are here; an unknown name is looked up in NumPy and wrapped by rule 2/3.

minparcae's CUDA kernels can run on the stand-in's arrays too, under Numba's CUDA simulator
(`launch_kernels`): an array offers `__cuda_array_interface__` as CuPy's do, and a kernel reads and
writes it in place, strides included, as on a GPU.
"""

import sys
import types
from contextlib import contextmanager

import numpy as np

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")
_HOST_TO_DEVICE = {"asarray", "array", "asanyarray"}


def _device(value):
    """Wrap NumPy results as device arrays: arrays and NumPy scalars (CuPy returns 0-d arrays)."""
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    if isinstance(value, list):
        return [_device(v) for v in value]
    return value


def _unwrap(value, where):
    """The NumPy array inside a device array; TypeError for a host array (rule 2, 3)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {np.ndarray} in {where}: a host array mixed with device arrays")
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, where) for v in value)
    return value


def _index(key):
    """A CuPy index as NumPy takes it (rule 4)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, np.ndarray) and key.dtype.kind not in "biu":
        raise IndexError("arrays used as indices must be of integer or boolean type")
    return key


def _has_array_index(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (ndarray, np.ndarray, list)) for k in keys)


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: a NumPy array that only leaves through explicit copies."""

    __module__ = "cupy"  # what backend.array_module looks at
    __hash__ = None

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o, ufunc.__name__) for o in out)
        for x in inputs:
            _checked_scalar(x, ufunc)
        result = getattr(ufunc, method)(*(_unwrap(x, ufunc.__name__) for x in inputs), **kwargs)
        return out[0] if out is not None and method == "__call__" else _device(result)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        return _device(func(*_unwrap(args, name), **{k: _unwrap(v, name) for k, v in kwargs.items()}))

    # explicit copies to the host (rule 1)
    def get(self, stream=None, order="C", out=None):
        return self._a.copy()

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __int__(self):
        return int(self._a)

    def __float__(self):
        return float(self._a)

    def __bool__(self):
        return bool(self._a)

    def __complex__(self):
        return complex(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(np.asarray(row)) for row in self._a)

    def __getitem__(self, key):
        return ndarray(np.asarray(self._a[_index(key)]))

    @property
    def __cuda_array_interface__(self):
        """What CuPy offers Numba (version 3 of the interface); strides None when C-contiguous."""
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}

    def __setitem__(self, key, value):
        if isinstance(value, (np.ndarray, list)) and np.ndim(value) and not _has_array_index(key):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, ndarray):
            value = value._a
        self._a[_index(key)] = value

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _device(attr) if isinstance(attr, np.ndarray) else attr
        return lambda *args, **kwargs: _device(attr(*_unwrap(args, name),
                                                    **{k: _unwrap(v, name) for k, v in kwargs.items()}))


class _Ufunc:
    """A CuPy ufunc: cupy.add(...), cupy.add.at(...), on device arrays only."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _device(self._ufunc(*(_checked_scalar(a, self._ufunc) for a in args), **kwargs))

    def at(self, a, indices, values=None):
        if not isinstance(a, ndarray):
            raise TypeError(f"Unsupported type {type(a)} in {self._ufunc.__name__}.at")
        args = (_index(indices),) + (() if values is None else (_unwrap(values, "at"),))
        self._ufunc.at(a._a, *args)

    def __getattr__(self, name):
        return getattr(self._ufunc, name)


def _checked_scalar(x, ufunc):
    """x if CuPy's ufuncs take it: a device array or a scalar (rule 2)."""
    if isinstance(x, (ndarray, np.generic, int, float, bool, complex)):
        return x
    raise TypeError(f"Unsupported type {type(x)} in {ufunc.__name__}")


def _function(name, func):
    """A cupy function: host arrays become device arrays in `asarray` and friends (rule 3)."""
    if name in _HOST_TO_DEVICE:
        def host_to_device(a, dtype=None, **kwargs):
            if isinstance(a, ndarray):  # already on the device: a copy only when asked or converted
                return ndarray(np.array(a._a, dtype=dtype, copy=None if name == "asarray" else True))
            return ndarray(np.array(a, dtype=dtype, **kwargs))  # host data: always a copy
        return host_to_device
    return lambda *args, **kwargs: _device(func(*_unwrap(args, name), **{k: _unwrap(v, name)
                                                                          for k, v in kwargs.items()}))


def asnumpy(a, stream=None, order="C", out=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def get_array_module(*args):
    return sys.modules["cupy"] if any(isinstance(a, ndarray) for a in args) else np


class _Stream:
    ptr = 0

    def synchronize(self):
        pass


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


class _Namespace(types.ModuleType):
    """A module whose unknown names come from a NumPy namespace, wrapped as device functions."""

    def __init__(self, name, numpy_namespace, **attrs):
        super().__init__(name)
        self._numpy = numpy_namespace
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._numpy, name)
        if isinstance(value, np.ufunc):
            value = _Ufunc(value)
        elif callable(value) and not isinstance(value, type):
            value = _function(name, value)
        setattr(self, name, value)
        return value


def _make_modules():
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1,
                                    getDeviceProperties=lambda i: {"name": b"CPU stand-in for CuPy",
                                                                   "totalGlobalMem": 0})
    stream = _Stream()
    cuda = types.SimpleNamespace(runtime=runtime, get_current_stream=lambda: stream,
                                 Device=lambda i=0: types.SimpleNamespace(id=i, synchronize=lambda: None))
    pool = _MemoryPool()
    cupy = _Namespace("cupy", np, ndarray=ndarray, asnumpy=asnumpy, get_array_module=get_array_module,
                      cuda=cuda, get_default_memory_pool=lambda: pool, __version__="14.2.0 (CPU stand-in)")
    cupy.random = _Namespace("cupy.random", np.random)
    cupy.linalg = _Namespace("cupy.linalg", np.linalg)

    def scatter_add(a, slices, value):
        cupy.add.at(a, slices, value)

    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = scatter_add
    return cupy, cupyx


def install(monkeypatch):
    """Make `import cupy` (and `cupyx`) give the stand-in until the end of the test; returns it."""
    cupy, cupyx = _make_modules()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    return cupy


@contextmanager
def installed():
    """`install` for code outside pytest (lesson 1's exercise): the stand-in is `cupy` inside the
    with block, and whatever was there before (CuPy itself, or nothing) comes back after it."""
    before = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    cupy, cupyx = _make_modules()
    sys.modules.update(cupy=cupy, cupyx=cupyx)
    try:
        yield cupy
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def launch_kernels(monkeypatch):
    """Let Numba's CUDA simulator launch kernels on the stand-in's arrays, as a GPU launches them on
    CuPy's (until the end of the test). minparcae/kernels/cuda.py passes an array that has a
    `__cuda_array_interface__` through `numba.cuda.as_cuda_array`, which the simulator lacks; here
    it gives the simulator's device array over the stand-in array's own memory, so a kernel reads it
    with its strides and writes it in place.

    A NumPy array among a launch's device arrays raises TypeError: on a GPU Numba would copy it to
    the device and back at every launch, a host/device mix-up that costs time instead of failing."""
    from numba import cuda
    from numba.cuda.simulator import kernel
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def as_cuda_array(obj, sync=True):
        if not isinstance(obj, ndarray):
            raise TypeError(f"{type(obj).__name__} does not export __cuda_array_interface__")
        return FakeCUDAArray(obj._a)

    launch = kernel.FakeCUDAKernel.__call__

    def checked_launch(self, *args):
        on_device = any(isinstance(a, FakeCUDAArray) for a in args)
        if on_device and any(isinstance(a, np.ndarray) and a.ndim for a in args):
            raise TypeError(f"kernel {self.__name__} launched on device arrays with a host array among them")
        return launch(self, *args)

    monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array, raising=False)
    monkeypatch.setattr(kernel.FakeCUDAKernel, "__call__", checked_launch)
