"""Render the lessons as Markdown pages, docs/lessons/NN_name.md, that GitHub shows.

    python lessons/render.py                    # every lesson written as cells
    python lessons/render.py 03 08_stability    # only these

A lesson is a jupytext "percent" script: `# %% [markdown]` cells of Markdown, each line behind
"# ", and `# %%` cells of code. Its page shows each markdown cell as it is and each code cell as a
Python block followed by what the cell printed, so a reader sees every claim with its number. A
script without cell markers is one code cell; it is rendered only when named.

The code runs as `python lessons/NN_name.py` runs it: in a fresh Python process (one lesson's
settings cannot reach another), with the lesson's folder first on sys.path, from an empty temporary
working directory, the cells in order in one namespace; on the CPU, so that a page shows what any
reader's run prints. A lesson that fails stops the render with one line naming it and its cell.

Pictures: the environment variable MINPARCAE_LESSON_PICTURES names a folder for the page's images,
docs/lessons/images/NN_name/, emptied before the lesson runs; a PNG file that a cell writes there
appears on the page after that cell's output.
"""

import builtins
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections import namedtuple
from pathlib import Path

LESSONS_DIR = Path(__file__).resolve().parent
PAGES_DIR = LESSONS_DIR.parent / "docs" / "lessons"
PICTURES_VAR = "MINPARCAE_LESSON_PICTURES"

# kind: "markdown" or "code"; source: the cell's text (Markdown without its "# "); line: the line
# of the file on which that text starts, so that errors and tracebacks point into the lesson
Cell = namedtuple("Cell", "kind source line")
MARKER = re.compile(r"^# %%(.*)$")
MARKDOWN = re.compile(r"\[(markdown|md)\]")


class RenderError(Exception):
    """A lesson that could not be rendered; the message is one line that names it."""


def lesson_paths(folder=LESSONS_DIR):
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def has_cells(text):
    return any(MARKER.match(line) for line in text.splitlines())


def parse_cells(text):
    """The cells of a percent script, in order. Lines before the first marker are a code cell (a
    file without markers is one), as jupytext reads them; a jupytext header is skipped."""
    lines = text.splitlines()
    start = 0
    if lines and lines[0] == "# ---":                 # the YAML header jupytext writes when asked
        start = next((i + 1 for i in range(1, len(lines)) if lines[i] == "# ---"), 0)
    cells, kind, body, first = [], "code", [], start + 1
    for number, line in enumerate(lines[start:], start + 1):
        marker = MARKER.match(line)
        if marker:
            cells.append(_cell(kind, body, first))
            kind = "markdown" if MARKDOWN.search(marker.group(1)) else "code"
            body, first = [], number + 1
        else:
            body.append(line)
    cells.append(_cell(kind, body, first))
    return [cell for cell in cells if cell is not None]


def _cell(kind, lines, first):
    if kind == "markdown":
        lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
    while lines and not lines[0].strip():
        lines, first = lines[1:], first + 1
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return Cell(kind, "\n".join(lines), first) if lines else None


def fenced(text, info=""):
    """`text` as a fenced block, the fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def cell_block(cell):
    """A cell as the page shows it, before its output."""
    return cell.source if cell.kind == "markdown" else fenced(cell.source, "python")


def page(path, cells, results, pages_dir):
    """The Markdown page of the lesson at `path`: results[i] is {"output", "pictures"} for code
    cell i (None for a markdown cell)."""
    source = Path(os.path.relpath(path, pages_dir)).as_posix()
    index = Path(os.path.relpath(path.parent / "README.md", pages_dir)).as_posix()
    parts = [f"<!-- Rendered from {path.name} by lessons/render.py: edit the lesson, then run "
             f"`python lessons/render.py {path.stem[:2]}`. -->"]
    for cell, result in zip(cells, results):
        parts.append(cell_block(cell))
        if result is None:
            continue
        output = "\n".join(line.rstrip() for line in result["output"].splitlines()).strip("\n")
        if output:
            parts.append(fenced(output))
        for name in result["pictures"]:
            parts.append(f"![{Path(name).stem.replace('_', ' ')}](images/{path.stem}/{name})")
    parts.append(f"---\n\n*This page is [`{path.name}`]({source}) run by `lessons/render.py`, "
                 f"outputs included. All lessons: [the index]({index}).*")
    return "\n\n".join(parts) + "\n"


def render(path, pages_dir=PAGES_DIR):
    """Run the lesson at `path` cell by cell in a worker process and write its page into
    `pages_dir` (pictures under pages_dir/images/NN_name/). Returns the page's path; raises
    RenderError if the lesson fails."""
    path, pages_dir = Path(path).resolve(), Path(pages_dir).resolve()
    pictures = pages_dir / "images" / path.stem
    shutil.rmtree(pictures, ignore_errors=True)       # a picture the lesson no longer draws goes
    pictures.mkdir(parents=True)
    env = {**os.environ, PICTURES_VAR: str(pictures), "MINPARCAE_DEVICE": "cpu",
           "PYTHONDONTWRITEBYTECODE": "1"}
    # the lessons' matrices are tiny: extra BLAS threads only wait (see lessons/common.py)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work, report = Path(tmp) / "work", Path(tmp) / "report.json"
            work.mkdir()
            finished = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                       str(path), str(report)], cwd=work, env=env)
            if not report.is_file():
                raise RenderError(f"{path.name}: the process running it ended with status "
                                  f"{finished.returncode} before reporting")
            outcome = json.loads(report.read_text(encoding="utf-8"))
        if outcome["error"]:
            raise RenderError(outcome["error"])
        cells = parse_cells(path.read_text(encoding="utf-8"))
        pages_dir.mkdir(parents=True, exist_ok=True)
        target = pages_dir / f"{path.stem}.md"
        target.write_text(page(path, cells, outcome["results"], pages_dir), encoding="utf-8")
        return target
    finally:
        if not any(pictures.iterdir()):
            pictures.rmdir()
            with contextlib.suppress(OSError):
                pictures.parent.rmdir()               # images/ itself, once no lesson has any


def run_cells(path, report):
    """The worker: run the lesson's cells in one namespace, as `python path` would, and write
    {"results": [...], "error": None or a one-line message} to `report` as JSON."""
    path = Path(path)
    cells = parse_cells(path.read_text(encoding="utf-8"))
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = str(path), builtins
    sys.modules["__main__"], sys.argv[:] = main, [str(path)]
    sys.path[0] = str(path.parent)                    # as for `python path`: its folder first
    pictures = Path(os.environ[PICTURES_VAR])
    results, error = [], None
    for number, cell in enumerate(cells, 1):
        if cell.kind == "markdown":
            results.append(None)
            continue
        before = _png_times(pictures)
        captured = io.StringIO()
        # padding with blank lines keeps the file's line numbers in tracebacks and warnings
        code = compile("\n" * (cell.line - 1) + cell.source, str(path), "exec")
        try:
            with contextlib.redirect_stdout(captured):
                exec(code, main.__dict__)
        except Exception as exc:
            lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
                     if frame.filename == str(path)]
            message = str(exc).strip().splitlines()
            error = (f"{path.name} failed in cell {number} (the cell at line {cell.line}), at "
                     f"line {lines[-1] if lines else cell.line}: {type(exc).__name__}"
                     + (f": {message[0]}" if message else "")
                     + f"; run python lessons/{path.name} to see the whole traceback")
            break
        after = _png_times(pictures)
        results.append({"output": captured.getvalue(),
                        "pictures": sorted(name for name, t in after.items() if before.get(name) != t)})
    Path(report).write_text(json.dumps({"results": results, "error": error}), encoding="utf-8")
    return 1 if error else 0


def _png_times(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def select(names, paths):
    """The lessons named on the command line (by number, stem or file name); none: every lesson
    written as cells."""
    if not names:
        return [p for p in paths if has_cells(p.read_text(encoding="utf-8"))]
    chosen = []
    for name in names:
        stem = Path(name).stem
        found = [p for p in paths if stem in (p.stem, p.stem[:2])]
        if not found:
            raise RenderError(f"no lesson in {LESSONS_DIR} is called {name!r}; give a number such "
                              f"as 03, or a name such as {paths[0].stem}")
        chosen += found
    return chosen


def main(argv):
    if argv[:1] == ["--worker"]:
        return run_cells(*argv[1:])
    started = time.perf_counter()
    try:
        chosen = select(argv, lesson_paths())
        shown = os.path.relpath(PAGES_DIR)
        print(f"rendering {len(chosen)} lesson{'s' * (len(chosen) != 1)} into {shown}", flush=True)
        for i, path in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {path.name}", flush=True)
            t0 = time.perf_counter()
            target = render(path)
            print(f"      wrote {os.path.relpath(target)} in {time.perf_counter() - t0:.1f} s",
                  flush=True)
    except RenderError as error:
        sys.exit(f"render.py: {error}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
