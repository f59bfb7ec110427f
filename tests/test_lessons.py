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
TIMEOUT_S = 300  # per lesson; all of them together take about a minute on a 2-core machine


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


REPO = LESSONS_DIR.parent
QUOTE_PREFIX = "#     "  # a comment's "# " and four spaces of indentation
PATH_IN_BACKTICKS = re.compile(r"`([\w./-]+\.py)`")


def code_part(line):
    """A line without its indentation and its trailing comment (two spaces or more, then #)."""
    return re.split(r"\s{2,}#", line.strip())[0].rstrip()


def quotes(path):
    """(line number, quoted file, quoted code) for every line a lesson quotes from a file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i in range(1, len(lines) - 1):
        intro = lines[i - 1].rstrip()
        named = PATH_IN_BACKTICKS.findall(intro)
        if lines[i].rstrip() != "#" or not intro.endswith(":") or not named:
            continue
        j = i + 1
        while j < len(lines) and lines[j].startswith(QUOTE_PREFIX):
            found.append((j + 1, named[-1], code_part(lines[j][len(QUOTE_PREFIX):])))
            j += 1
    return found


def test_quoted_code_is_still_in_the_file_it_names():
    """Code that a lesson quotes must still be there, so a lesson never shows lines the library no
    longer runs. The convention for a quote, in every lesson:

        # ... a sentence that ends with the quoted file, backticked, as a path from the repository
        # root, and a colon: `minparcae/ops/linear.py`:
        #
        #     return {"x": rows_matmul(dout, w.T), "w": rows_t_matmul(x, dout)}
        #     grads["x"] = r * (dout - xhat)         # a trailing comment: the lesson's own note

    that is: a comment line that ends with ":" and names a backticked `.py` path (the last one on
    the line is the file), a bare "#" line, then the quoted lines, each "#" followed by five spaces
    and the code with its own indentation (in a markdown cell, whose lines are Markdown behind "# ",
    that makes them a code block, indented four spaces). Every quoted line, without its indentation
    and without a trailing comment (two or more spaces, then "#"), must equal a line of that file,
    compared the same way. Lines indented the same way but introduced without a backticked path
    (outlines, diagrams) are not quotes."""
    checked = 0
    for lesson in sorted(LESSONS_DIR.glob("*.py")):
        sources = {}
        for line_no, name, code in quotes(lesson):
            source = REPO / name
            assert source.is_file(), f"{lesson.name}:{line_no} quotes {name}, which does not exist"
            if name not in sources:
                sources[name] = {code_part(line) for line in source.read_text("utf-8").splitlines()}
            assert code and code in sources[name], \
                f"{lesson.name}:{line_no} quotes a line that {name} no longer has: {code}"
            checked += 1
    assert checked >= 25  # the lessons quote about thirty lines: a parse that finds none is wrong


@pytest.mark.slow
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_and_passes_its_checks(path, tmp_path, tmp_path_factory):
    # One BLAS thread for every lesson, as common.py gives those that train: the lessons' matrices
    # are tiny, and on a busy 2-core machine OpenBLAS's waiting threads only slow them down.
    # Without the renderer's MINPARCAE_LESSON_PICTURES a lesson saves its pictures in a new
    # temporary folder and keeps it for the reader; TMPDIR puts it where pytest cleans up.
    env = {**os.environ, "MINPARCAE_DEVICE": "cpu", "PYTHONDONTWRITEBYTECODE": "1",
           "OPENBLAS_NUM_THREADS": "1", "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    env.pop("MINPARCAE_LESSON_PICTURES", None)
    before = sorted(p.name for p in LESSONS_DIR.iterdir())
    result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, \
        f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == f"lesson {lesson_number(path)} passed", result.stdout[-2000:]
    assert sorted(p.name for p in LESSONS_DIR.iterdir()) == before  # it wrote nothing there
    assert not any(tmp_path.iterdir())  # nor into the working directory
