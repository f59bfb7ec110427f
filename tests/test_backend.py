"""Device selection: NumPy unless CuPy imports *and* a GPU answers; overrides; helpers."""

import sys
import types

import numpy as np
import pytest

from minparcae import backend


@pytest.fixture(autouse=True)
def restore_backend():
    saved = dict(backend._state)
    yield
    backend._state.update(saved)


def fake_cupy_without_gpu():
    """A stand-in for CuPy on a machine with no driver: the import works, the first runtime
    call raises, as real CuPy's CUDARuntimeError does."""
    cupy = types.ModuleType("cupy")

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return cupy


def test_falls_back_to_numpy_when_cupy_has_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy_without_gpu())
    monkeypatch.delenv(backend.DEVICE_ENV, raising=False)
    assert backend.gpu_available() is False
    assert backend.use_device() == "cpu"
    assert backend.get_xp() is np
    with pytest.raises(RuntimeError, match="use --device cpu"):
        backend.use_device("gpu")


def test_real_cupy_without_gpu_falls_back():
    """Same check against the real CuPy package, where it is installed on a GPU-less machine."""
    cupy = pytest.importorskip("cupy")
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        pytest.skip("this machine has a GPU")
    assert backend.use_device("auto") == "cpu"


def test_environment_variable_and_explicit_choice(monkeypatch):
    monkeypatch.setenv(backend.DEVICE_ENV, "cpu")
    assert backend.use_device() == "cpu"
    monkeypatch.setenv(backend.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.use_device()
    assert backend.use_device("CPU") == "cpu"  # an explicit choice wins over the variable


def test_dtype_and_helpers():
    backend.use_device("cpu")
    assert backend.dtype() is np.float32
    backend.use_dtype(np.float64)
    assert backend.dtype() is np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.use_dtype(np.int32)
    x = backend.to_device([1.0, 2.0])
    assert backend.array_module(x) is np and backend.to_host(x).tolist() == [1.0, 2.0]
    backend.synchronize()
