"""Data parallelism over MPI ranks (minparcae/distributed.py) against one process: the same
per-step losses and final weights at the same global batch and seed, a resume with another number
of ranks, a batch that does not divide, a failing rank taking the others down, and no MPI import
without a launcher. Each run is a real `mpiexec -n 2 python train.py` on this machine's CPU."""

import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runhelp import make_corpus, read_log, train_args

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e \".[test]\" brings it)")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich brings one)")

# float32: the ranks add their halves' gradients in another order than one process's threads do;
# measured 5e-7 on the losses and 2e-6 on the weights after 12 steps
LOSS_TOL_F32, WEIGHT_TOL_F32 = 1e-5, 1e-4
TOL_F64 = 1e-12  # float64: the same sums, reordered


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def env():
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run(argv, ranks=None, timeout=300, script="train.py"):
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks else []) + [sys.executable, str(ROOT / script), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def weights(out):
    with np.load(Path(out) / "ckpt.npz") as f:
        return {k: f[k].astype(np.float64) for k in f.files if f[k].dtype.kind == "f"}


def compare(a, b, loss_tol, weight_tol):
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) <= loss_tol
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(la, lb) if "val_loss" in x) <= loss_tol
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) <= weight_tol


@pytest.mark.parametrize("dtype, loss_tol, weight_tol", [("float32", LOSS_TOL_F32, WEIGHT_TOL_F32),
                                                          ("float64", TOL_F64, TOL_F64)])
def test_two_ranks_train_as_one_process(corpus, tmp_path, dtype, loss_tol, weight_tol):
    flags = ["--steps", "12", "--dtype", dtype]
    one = run(train_args(corpus, tmp_path / "one", *flags))
    two = run(train_args(corpus, tmp_path / "two", *flags), ranks=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "2 ranks, 4 sequences each" in two.stdout
    assert two.stdout.count("val_loss:") == 1  # rank 0 alone reports
    compare(tmp_path / "one", tmp_path / "two", loss_tol, weight_tol)


def test_a_run_resumes_with_another_number_of_ranks(corpus, tmp_path):
    """10 steps on two ranks (a checkpoint at 10), then to 20 in one process, against 20 steps
    in one process."""
    flags = ["--steps", "20", "--dtype", "float64"]
    straight = run(train_args(corpus, tmp_path / "straight", *flags))
    first = run(train_args(corpus, tmp_path / "split", "--steps", "10", "--dtype", "float64"), ranks=2)
    second = run(train_args(corpus, tmp_path / "split", *flags, "--resume"))
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr
    compare(tmp_path / "straight", tmp_path / "split", TOL_F64, TOL_F64)


def test_a_batch_that_does_not_divide_is_refused(corpus, tmp_path):
    r = run(train_args(corpus, tmp_path / "three", "--steps", "2"), ranks=3)
    assert r.returncode != 0
    assert "--batch-size 8 must divide by the 3 ranks" in r.stderr
    assert "Traceback" not in r.stderr  # a user's mistake is one sentence, on every rank


def test_missing_data_under_mpi_is_one_sentence(corpus, tmp_path):
    r = run(train_args(corpus, tmp_path / "run", "--steps", "2", "--data", str(tmp_path / "nothing")),
            ranks=2)
    assert r.returncode != 0
    assert "error: " in r.stderr and "nothing" in r.stderr and "Traceback" not in r.stderr


FAIL_ON_RANK_1 = """
import sys
from mpi4py import MPI
import train
from minparcae import runtime
real, calls = runtime.loss_and_grads, [0]
def failing(*a, **k):
    calls[0] += 1
    if MPI.COMM_WORLD.Get_rank() == 1 and calls[0] == 3:
        raise MemoryError("out of memory on rank 1 (simulated)")
    return real(*a, **k)
runtime.loss_and_grads = failing
train.main(sys.argv[1:])
"""


def test_a_failing_rank_stops_every_rank(corpus, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_1)
    t0 = time.perf_counter()
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script),
                        *train_args(corpus, tmp_path / "run", "--steps", "200")],
                       capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)
    assert r.returncode != 0
    assert "rank 1 of 2" in r.stderr and "out of memory on rank 1 (simulated)" in r.stderr
    assert "MPI_Abort" in r.stderr
    assert time.perf_counter() - t0 < 60  # not a hang: rank 0 waits in the all-reduce no longer


def test_one_process_imports_no_mpi(corpus, tmp_path):
    code = ("import sys, train; train.main(sys.argv[1:]); "
            "print('mpi4py imported' if 'mpi4py' in sys.modules else 'no mpi4py')")
    r = subprocess.run([sys.executable, "-c", code, *train_args(corpus, tmp_path / "run", "--steps", "2")],
                       capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no mpi4py")


def test_ctrl_c_under_mpiexec_stops_every_rank_at_one_step_and_saves_it(corpus, tmp_path):
    """Ctrl-C at the launcher reaches every rank; they agree on the step through the all-reduce,
    rank 0 saves it, and the run resumes from there in one process."""
    out = tmp_path / "run"
    argv = train_args(corpus, out, "--steps", "100000", "--dtype", "float64")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "train.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    saved = [line for line in stderr.splitlines() if "checkpoint saved" in line]
    assert len(saved) == 1 and saved[0].startswith("SIGINT at step "), stderr  # rank 0 alone speaks
    assert "Traceback" not in stderr
    step = int(saved[0].split("SIGINT at step ")[1].split(":")[0])
    assert read_log(out)[-1]["step"] == step  # the log ends at the saved step
    resumed = run(train_args(corpus, out, "--steps", str(step + 3), "--dtype", "float64", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_log(out)][-4:] == [step, step + 1, step + 2, step + 3]
