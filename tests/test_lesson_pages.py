"""The lessons are jupytext percent scripts, and docs/lessons/ holds each one's page.

A lesson is cells: markdown cells of "# "-prefixed Markdown and code cells, starting with a markdown
cell that is its title. lessons/render.py runs a lesson cell by cell and writes its page; the page
must show the lesson as it is now (every cell, in order), and every lesson must have one. The
renderer itself is checked on small lessons written here, which run in well under a second.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
PAGES_DIR = LESSONS_DIR.parent / "docs" / "lessons"
sys.path.insert(0, str(LESSONS_DIR))
import render  # noqa: E402  (lessons/render.py)

LESSONS = render.lesson_paths()


def cells_of(path):
    return render.parse_cells(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_is_cells_under_a_title(path):
    cells = cells_of(path)
    kinds = [cell.kind for cell in cells]
    assert kinds[0] == "markdown" and "code" in kinds, \
        f"{path.name} must start with a markdown cell and have code cells (`# %%` markers)"
    title = cells[0].source.splitlines()[0]
    assert title.startswith(f"# Lesson {int(path.name[:2])}: "), \
        f"{path.name}: the first cell must open with the heading '# Lesson N: ...', not {title!r}"
    assert f"python lessons/{path.name}" in cells[0].source, "the first cell says how to run it"


def test_parser_reads_the_cells_jupytext_reads():
    """Jupyter opens the lessons through jupytext: both must see the same cells."""
    jupytext = pytest.importorskip("jupytext")
    for path in LESSONS:
        ours = [(cell.kind, cell.source) for cell in cells_of(path)]
        theirs = [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]
        assert ours == theirs, f"lessons/render.py and jupytext read {path.name} differently"


def test_every_lesson_has_a_page_and_every_page_a_lesson():
    pages = {p.stem for p in PAGES_DIR.glob("*.md")}
    lessons = {p.stem for p in LESSONS}
    assert pages <= lessons, f"pages without a lesson: {sorted(pages - lessons)}"
    missing = sorted(p.stem for p in LESSONS if p.stem not in pages)
    assert not missing, f"lessons without a page: {missing}; run python lessons/render.py"
    for folder in (PAGES_DIR / "images").glob("*"):
        assert folder.name in pages, f"docs/lessons/images/{folder.name} belongs to no page"


@pytest.mark.parametrize("path", [p for p in LESSONS if (PAGES_DIR / f"{p.stem}.md").exists()],
                         ids=lambda p: p.stem)
def test_page_shows_the_lesson_as_it_is(path):
    """Every cell of the lesson, as the renderer writes it, appears on its page in order (the
    outputs between them are not compared: timings differ from run to run), and every picture
    the page shows is there."""
    page = (PAGES_DIR / f"{path.stem}.md").read_text(encoding="utf-8")
    at = 0
    for number, cell in enumerate(cells_of(path), 1):
        found = page.find(render.cell_block(cell), at)
        assert found >= 0, (f"cell {number} of {path.name} (line {cell.line}) is not on its page "
                            f"as it is now: run python lessons/render.py {path.stem[:2]}")
        at = found + len(render.cell_block(cell))
    for picture in re.findall(r"!\[[^]]*\]\(([^)]+)\)", page):
        assert (PAGES_DIR / picture).is_file(), f"{path.stem}.md shows {picture}, which is missing"


# A 1×1 PNG, what a lesson's picture hook would write (the renderer only looks at the file name).
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")

TINY = '''# %% [markdown]
# # Lesson 1: a tiny lesson
#
# Prose, then a cell that prints.

# %%
import os
import helper  # next to the lesson: its folder is first on sys.path

print("the answer is", helper.VALUE * 6)

# %% [markdown]
# A cell that draws a picture and prints nothing, then one that prints a fence.

# %%
from pathlib import Path

folder = Path(os.environ["MINPARCAE_LESSON_PICTURES"])
(folder / "a_dot.png").write_bytes(PNG)
here = os.getcwd()

# %%
print("```")
print("ran in", "the lesson's folder" if Path(here) == Path(__file__).parent else "elsewhere")
'''


def write_lesson(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / "helper.py").write_text("VALUE = 7\n")
    path = folder / name
    path.write_text(text.replace("(PNG)", f"(bytes.fromhex({PNG.hex()!r}))"), encoding="utf-8")
    return path


def test_parse_cells():
    cells = render.parse_cells(TINY)
    assert [(c.kind, c.line) for c in cells] == [("markdown", 2), ("code", 7), ("markdown", 13),
                                                ("code", 16), ("code", 23)]
    assert cells[0].source == "# Lesson 1: a tiny lesson\n\nProse, then a cell that prints."
    assert cells[1].source.startswith("import os\n") and cells[1].source.endswith("* 6)")
    # a script without markers is one code cell, so a plain lesson renders whole
    assert render.parse_cells("\n'''Doc.'''\nx = 1\n") == [render.Cell("code", "'''Doc.'''\nx = 1", 2)]


def test_render_runs_cells_in_order_and_shows_what_each_printed(tmp_path):
    path = write_lesson(tmp_path / "lessons", "01_tiny.py", TINY)
    pages = tmp_path / "docs" / "lessons"
    page = render.render(path, pages).read_text(encoding="utf-8")
    cells = render.parse_cells(path.read_text(encoding="utf-8"))
    blocks = [render.cell_block(cell) for cell in cells]
    # markdown as it is; code, then its output when it printed something
    assert page.index(blocks[0]) < page.index(blocks[1]) < page.index(blocks[2])
    assert blocks[1] + "\n\n```\nthe answer is 42\n```\n\n" + blocks[2] in page
    # the picture written during cell 4 comes right after that cell, and is copied next to the page
    assert blocks[3] + "\n\n![a dot](images/01_tiny/a_dot.png)\n\n" + blocks[4] in page
    assert (pages / "images" / "01_tiny" / "a_dot.png").read_bytes() == PNG
    # an output holding ``` gets a longer fence; the lesson ran outside its folder
    assert "````\n```\nran in elsewhere\n````" in page
    assert sorted(p.name for p in path.parent.iterdir()) == ["01_tiny.py", "helper.py"]


def test_render_again_drops_pictures_no_longer_drawn(tmp_path):
    path = write_lesson(tmp_path / "lessons", "01_tiny.py", TINY)
    pages = tmp_path / "pages"
    render.render(path, pages)
    path.write_text(TINY.replace('(folder / "a_dot.png").write_bytes(PNG)', "pass"))
    page = render.render(path, pages).read_text(encoding="utf-8")
    assert "![" not in page and not (pages / "images").exists()


def test_a_failing_lesson_stops_the_render_naming_its_cell(tmp_path):
    broken = TINY.replace('print("```")', 'assert helper.VALUE == 8, "seven, not eight"')
    path = write_lesson(tmp_path / "lessons", "02_broken.py", broken)
    with pytest.raises(render.RenderError) as failure:
        render.render(path, tmp_path / "pages")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("02_broken.py failed in cell 5 (the cell at line 23), at line 23: "
                              "AssertionError: seven, not eight")
    assert not (tmp_path / "pages" / "02_broken.md").exists()
    # and on the command line: one line on stderr, status 1
    result = subprocess.run([sys.executable, str(LESSONS_DIR / "render.py"), "13"],
                            capture_output=True, text=True, env={**os.environ}, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no lesson" in result.stderr
