# Numba reads NUMBA_ENABLE_CUDASIM when it is first imported: without a GPU, the CUDA kernels'
# tests run on its CUDA simulator, on the CPU.
import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    from minparcae.backend import gpu_available

    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if gpu_available() else "1"

import sys

# train.py and sample.py live at the repository root, next to this folder
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cudasim  # noqa: E402  (tests/cudasim.py, once NUMBA_ENABLE_CUDASIM is settled)

if cudasim.simulated():
    cudasim.serialise_shared_arrays()

import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_sm90 = {}


def _start_sm90_compile():
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    process = subprocess.Popen([sys.executable, os.path.join("tests", "sm90_compile.py")], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    _sm90.update(process=process, log=log)


def pytest_collection_finish(session):
    """Compiling every kernel for sm_90 takes about 45 CPU-seconds and no GPU: when its test is
    selected, start it at once, so that it runs beside the tests collected before it."""
    if any(item.name == "test_every_kernel_compiles_for_sm90" for item in session.items):
        _start_sm90_compile()


@pytest.fixture
def fast_barriers():
    """Frequent thread switches make the CUDA simulator's barriers about three times faster."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def sm90_report():
    """What tests/sm90_compile.py printed; the test fails with its output if it failed."""
    if "process" not in _sm90:
        _start_sm90_compile()
    returncode = _sm90["process"].wait(timeout=900)
    _sm90["log"].seek(0)
    report = _sm90["log"].read()
    assert returncode == 0, report[-3000:]
    return report


def pytest_sessionfinish(session):
    """A session that stopped before the sm_90 test (-x, a deselection) does not leave it running."""
    if "process" in _sm90 and _sm90["process"].poll() is None:
        _sm90["process"].kill()
        _sm90["process"].wait()
