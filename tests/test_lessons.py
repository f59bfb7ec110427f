"""Every lesson runs to the end on the CPU and passes its own checks.

Each lesson is run as a user runs it, `python lessons/NN_name.py`, in a separate process (so one
lesson's settings, such as switching the fast kernels off, cannot leak into another or into the
rest of the suite), from a temporary working directory, with the device forced to the CPU. A
lesson asserts its own numbers; it passes when it exits with status 0 and its last line is
"lesson N passed". README.md must list every lesson with the command that runs it.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 300  # per lesson; all of them together take about 15 s on a 2-core machine


def lesson_number(path):
    return int(path.name[:2])


def test_lessons_are_numbered_and_indexed():
    numbers = [lesson_number(p) for p in LESSONS]
    assert numbers == sorted(set(numbers)) and len(numbers) >= 9
    index = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    for path in LESSONS:
        assert f"({path.name})" in index, f"lessons/README.md does not link {path.name}"
    assert "python lessons/01_backend.py" in index
    listed = set(re.findall(r"\(([0-9]{2}_\w+\.py)\)", index))
    assert listed == {p.name for p in LESSONS}, "README.md lists a lesson that does not exist"


BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def imported_modules(path):
    """The top-level modules a file imports, in the order its import statements come."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
    return names


def test_lessons_that_train_get_one_blas_thread():
    """lessons/common.py sets one BLAS thread (unless the user set a count) before NumPy loads its
    BLAS: it must be imported before NumPy and minparcae, and then NumPy's OpenBLAS runs on one
    thread even where the environment names none."""
    users = [p for p in LESSONS if "common" in imported_modules(p)]
    assert len(users) >= 2
    for path in users:
        names = imported_modules(path)
        assert names.index("common") < min(names.index(m) for m in ("numpy", "minparcae")), \
            f"{path.name} imports NumPy or minparcae before common: the thread count comes too late"
    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
             "from minparcae import runtime; print(runtime.threads())")
    result = subprocess.run([sys.executable, "-c", probe, str(LESSONS_DIR)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"], result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_and_passes_its_checks(path, tmp_path):
    # One BLAS thread: the lessons' matrices are tiny, and on a busy 2-core machine OpenBLAS's
    # waiting threads made lesson 10 five times slower (43 s instead of 8 s) for no gain.
    env = {**os.environ, "MINPARCAE_DEVICE": "cpu", "PYTHONDONTWRITEBYTECODE": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    before = sorted(p.name for p in LESSONS_DIR.iterdir())
    result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, \
        f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == f"lesson {lesson_number(path)} passed", result.stdout[-2000:]
    assert sorted(p.name for p in LESSONS_DIR.iterdir()) == before  # it wrote nothing there
    assert not any(tmp_path.iterdir())  # nor into the working directory
