"""The device check and the GPU benchmark on a machine without a GPU: scripts/gpu_check.sh must stop
in its pre-flight within 60 seconds with one `GPU CHECK: FAIL: pre-flight: ...` line, whether CuPy is
missing or imports but finds no device (as CuPy does without a driver: its first runtime call raises);
bench/gpu_bench.py and scripts/gpu_kernels_once.py must parse their arguments and exit with one
sentence. On a GPU these are the real thing (the check takes minutes), so they are skipped there.
(tests/test_fakecupy.py runs gpu_kernels_once.py's checks on the CuPy stand-in.)
"""

import os
import subprocess
import sys
import time

import pytest

from minparcae.backend import gpu_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(gpu_available(), reason="on a GPU the check runs for real")

CUPY_WITHOUT_DRIVER = '''
class CUDARuntimeError(RuntimeError):
    pass


def _no_driver(*args):
    raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")


class cuda:
    class runtime:
        getDeviceCount = staticmethod(_no_driver)
        getDeviceProperties = staticmethod(_no_driver)
'''


def run_check(tmp_path, extra_path=None):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    start = time.monotonic()
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=90)
    return result, time.monotonic() - start


@pytest.mark.parametrize("cupy", ["missing", "without a driver"])
def test_gpu_check_stops_in_its_preflight(tmp_path, cupy):
    stub = None
    if cupy == "without a driver":
        stub = tmp_path / "stub"
        stub.mkdir()
        (stub / "cupy.py").write_text(CUPY_WITHOUT_DRIVER)
    result, seconds = run_check(tmp_path, stub)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1 and seconds < 60, (seconds, result.stdout, result.stderr)
    assert [line for line in lines if line.startswith("GPU CHECK:")] == lines[-1:], result.stdout
    reason = "CuPy is not importable" if cupy == "missing" else "CuPy sees no GPU"
    assert lines[-1].startswith(f"GPU CHECK: FAIL: pre-flight: {reason}"), lines[-1]
    assert (tmp_path / "out" / "summary.txt").read_text().strip().splitlines()[-1] == lines[-1]


@pytest.mark.parametrize("script, option, args", [
    ("bench/gpu_bench.py", "--peak-tflops", ["--preset", "medium", "--compile"]),
    ("scripts/gpu_kernels_once.py", "--seq", ["--seq", "512"]),
    ("scripts/gpu_nccl_smoke.py", "--elements", ["--elements", "1000"])])
def test_gpu_scripts_parse_their_arguments_and_need_a_gpu(script, option, args):
    path = os.path.join(ROOT, script)
    help_text = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and option in help_text.stdout, help_text.stderr[-2000:]
    result = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    sentence = "needs an NVIDIA GPU with CuPy: install minparcae[gpu] on a machine with one."
    assert result.stderr.strip().splitlines() == [f"{os.path.basename(script)} {sentence}"]
