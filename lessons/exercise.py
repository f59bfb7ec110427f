"""The lessons' exercises: how an answer is graded, and how a lesson grades one from the command line.

Every lesson but lesson 6 ends with a section `## Exercises`. Each exercise is a function for the
learner to write, whose body is `raise NotImplementedError` under a one-line spec, and a check,
`check_<name>(fn)`, that calls it on small inputs (float64 where it computes) and prints one line
per value it compares (`cmp`, `expect`), then returns whether all were right. The section's last
code cell numbers them:

    EXERCISES = {1: (linear_backward, check_linear_backward), 2: (mlp_backward, check_mlp_backward)}

and the lesson's first code cell calls `grade_if_asked()`, so that

    python lessons/02_linear.py --exercise 1              # grades the linear_backward you wrote
    python lessons/02_linear.py --exercise 1 --solution   # grades lessons/solutions/02_linear.py's

grade exercise 1 and exit with status 0 if it is right and 1 if not. To be quick, the lesson then
runs only its first cell and the code cells of its Exercises section: those import what they need
and use nothing from the cells in between, so a lesson that trains a model does not train it to
grade an exercise. In a notebook, call the check on your function: `check_linear_backward(
linear_backward)`. Lesson 6 grades its kernels as it goes (`gpu_counting.exercises`), with the same
`arguments` and `grade`.
"""

import argparse
import builtins
import importlib.util
import sys
import traceback
from pathlib import Path

import numpy as np

HEADING = "## Exercises"
WIDTH = 20  # of the column of names that a check's lines start with


def cmp(name, mine, ref, rtol=1e-12):
    """Compare `mine` with the reference `ref` (arrays or numbers, on the host) and print one line:
    exact (equal), approximate (max |mine − ref| is at most rtol · max |ref|) or WRONG, with the
    largest difference and where it is. Returns True for exact and approximate. With rtol = 0 (for
    counts and other integers) only exact passes."""
    ref = np.asarray(ref)
    if mine is None:
        return expect(name, False, f"got None, want {_kind(ref)}")
    try:
        got = np.asarray(mine, dtype=np.float64 if ref.dtype.kind in "fc" else None)
    except (TypeError, ValueError) as error:
        return expect(name, False, f"got {type(mine).__name__} ({error}), want {_kind(ref)}")
    if got.dtype == object:
        return expect(name, False, f"got {type(mine).__name__}, want {_kind(ref)}")
    if got.shape != ref.shape:
        return expect(name, False, f"shape {got.shape}, want {ref.shape}")
    if np.array_equal(got, ref):
        return expect(name, True, "", "exact")
    if not np.all(np.isfinite(got)):
        bad = ~np.isfinite(got)
        return expect(name, False, f"{int(bad.sum())} of {got.size} not finite"
                                   + _first(bad, got, ref, ", the first"))
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if rtol == 0 and ref.ndim == 0:
        return expect(name, False, f"{got:.10g}, want {ref:.10g}")
    if rtol == 0:  # only exact passes: say how many differ, and show the first
        return expect(name, False, f"{int((diff > 0).sum())} of {diff.size} differ"
                                   + _first(diff > 0, got, ref, ", the first"))
    rel = float(diff.max()) / (float(np.abs(ref).max()) or 1.0)  # normwise, as lesson 2's rel_error
    if rel <= rtol:
        return expect(name, True, "", f"approximate: max |mine − ref| = {rel:.1e} of max |ref| "
                                      f"(allowed {rtol:g})")
    return expect(name, False, f"max |mine − ref| = {rel:.2g} of max |ref| (allowed {rtol:g})"
                               + _first(diff == diff.max(), got, ref, "; the worst"))


def _kind(ref):
    return "a number" if ref.ndim == 0 else f"an array of shape {ref.shape}"


def _first(mask, got, ref, words):
    """Where the first True entry of mask is, and both values there: ", the first at [1, 2]: 0.5,
    want 0.25". A number is shown without the words: ": 0.5, want 0.25"."""
    i = np.unravel_index(int(np.argmax(mask)), mask.shape)
    at = f"{words} at [{', '.join(str(int(j)) for j in i)}]" if mask.ndim else ""
    return f"{at}: {got[i]:.10g}, want {ref[i]:.10g}"


def expect(name, ok, problem, good="ok"):
    """Print one line: `name` then `good` if ok, else WRONG and the problem. Returns ok."""
    print(f"  {name:<{WIDTH}} {good if ok else 'WRONG: ' + problem}")
    return bool(ok)


def arguments(numbers=None, argv=None):
    """(N, solution) from `--exercise N [--solution]` on the command line, (None, False) without;
    N must be one of `numbers` when they are given."""
    parser = argparse.ArgumentParser(description="Run the lesson, or grade one of its exercises.")
    parser.add_argument("--exercise", type=int, choices=None if numbers is None else sorted(numbers),
                        help="grade your answer to this exercise, and stop")
    parser.add_argument("--solution", action="store_true",
                        help="with --exercise: grade the solution instead of your answer")
    args, _ = parser.parse_known_args(argv)  # a notebook's kernel passes arguments of its own
    if args.solution and args.exercise is None:
        parser.error("--solution goes with --exercise N: it grades the solution of exercise N")
    return args.exercise, args.solution


def solutions_path(lesson):
    """lessons/solutions/NN_name.py for the lesson lessons/NN_name.py."""
    lesson = Path(lesson)
    return lesson.parent / "solutions" / lesson.name


def solution(solutions_file, name):
    """The function (or kernel) called `name` in the solutions file."""
    spec = importlib.util.spec_from_file_location(f"solutions_{Path(solutions_file).stem}",
                                                  solutions_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def name_of(fn):
    return getattr(fn, "py_func", fn).__name__  # a Numba kernel keeps its Python function


def grade(number, fn, check, solutions_file=None, noun="code"):
    """Run check(fn), or check(the solution of the same name) when solutions_file is given, and
    return whether it passed. An answer not yet written, or one that raises, fails with one line
    that says so (and where, for an error)."""
    name = name_of(fn)
    if solutions_file is not None:
        fn = solution(solutions_file, name)
    try:
        return bool(check(fn))
    except NotImplementedError as error:
        frames = traceback.extract_tb(error.__traceback__)
        skeleton = frames[-1].name if frames else name  # the one that raised: fn or a helper it calls
        calls = f" ({name} calls it)" if skeleton != name else ""
        print(f"exercise {number}: `{skeleton}` is not written yet{calls}: replace its "
              f"`raise NotImplementedError` with your {noun}.")
    except Exception as error:  # the learner's bug: one line, pointing at the answer's line
        code = getattr(getattr(fn, "py_func", fn), "__code__", None)
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if code is not None and f.filename == code.co_filename]
        where = f" (line {frames[-1].lineno} of {Path(frames[-1].filename).name})" if frames else ""
        message = str(error).strip().splitlines()
        print(f"exercise {number}: `{name}` failed{where}: {type(error).__name__}"
              + (f": {message[0]}" if message else ""))
    return False


def exercise_cells(lesson):
    """The code cells of the lesson's Exercises section, without the last cell, which prints that
    the lesson passed."""
    import render  # lessons/render.py, beside this file: the cells as Jupyter reads them
    lesson = Path(lesson)
    cells = render.parse_cells(lesson.read_text(encoding="utf-8"))
    starts = [i for i, c in enumerate(cells) if c.kind == "markdown" and c.source.startswith(HEADING)]
    if not starts:
        raise ValueError(f"{lesson.name} has no '{HEADING}' section")
    last = f'print("lesson {int(lesson.name[:2])} passed")'
    if cells[-1].source != last:
        raise ValueError(f"{lesson.name} must end with a cell of its own: {last}")
    return [c for c in cells[starts[-1]:-1] if c.kind == "code"]


def load(lesson):
    """Run the code cells of the lesson's Exercises section in a fresh namespace and return it
    (a dict: the skeletons, their checks, EXERCISES). Line numbers stay the lesson's own."""
    lesson = Path(lesson).resolve()
    namespace = {"__name__": f"exercises_{lesson.stem}", "__file__": str(lesson),
                 "__builtins__": builtins}
    for cell in exercise_cells(lesson):
        exec(compile("\n" * (cell.line - 1) + cell.source, str(lesson), "exec"), namespace)
    return namespace


def grade_if_asked():
    """With `--exercise N [--solution]` on the command line: grade exercise N of the lesson being
    run (its Exercises section only, see the module docstring) and exit, 0 if right, 1 if not.
    Without: do nothing, and the lesson runs on."""
    number, use_solution = arguments()
    if number is None:
        return
    lesson = Path(sys.modules["__main__"].__file__).resolve()
    exercises = load(lesson)["EXERCISES"]
    if number not in exercises:
        print(f"{lesson.name} has exercises {', '.join(map(str, sorted(exercises)))}: there is no "
              f"exercise {number}", file=sys.stderr)
        sys.exit(2)  # a usage error, as argparse's
    fn, check = exercises[number]
    where = solutions_path(lesson)
    print(f"exercise {number}: {name_of(fn)}"
          + (f", from lessons/solutions/{where.name}" if use_solution else ""))
    passed = grade(number, fn, check, where if use_solution else None)
    print(f"exercise {number}: {'passed' if passed else 'FAILED'}")
    sys.exit(0 if passed else 1)
