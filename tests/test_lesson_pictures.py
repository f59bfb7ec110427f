"""lessons/pictures.py: the sparklines every reader sees, and the PNG that matplotlib adds.

A picture goes where MINPARCAE_LESSON_PICTURES says (the renderer's images folder), else into a
temporary folder whose path is printed; never into the working directory. Without matplotlib only
the sparklines are printed.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lessons"))
import pictures  # noqa: E402  (lessons/pictures.py)
from pictures import Panel, describe, picture, sparkline  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PANELS = [Panel("‖h_t‖", {"diagonal": ([1, 2, 3, 4], [5, 5, 5, 5]),
                          "linear": ([1, 2, 3, 4], [1, 10, 100, 1000])}, x="loop step t", log=True),
          Panel("loss", {"diagonal": ([1, 2, 3], [3.0, 2.0, 1.0]),
                         "_best": ([3], [1.0], {"marker": "*"})}, x="step")]


def test_sparkline_places_each_value_between_the_smallest_and_the_largest():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([7, 0, 3.4, 3.6]) == "█▁▄▅"                   # to the nearest of 8 levels
    assert sparkline([1, 10, 100, 1000], log=True) == "▁▃▆█"       # even steps in log10
    assert sparkline([2, 3], span=(0, 7)) == "▃▄"                  # on a scale given from outside
    assert sparkline([2, 2, 2]) == "▄▄▄"                           # constant: level, mid-height
    # what a plot cannot place is a gap: NaN, inf, and on a log scale 0 and below
    assert sparkline([1, np.nan, np.inf, 3]) == "▁  █"
    assert sparkline([1, 0, -1, 1000], log=True) == "▁  █"
    assert sparkline([np.nan, np.nan]) == "  "
    # a long series: `width` evenly spaced values, the first and the last among them
    assert sparkline(np.arange(200), width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline(np.r_[np.zeros(99), 1.0], width=10) == "▁▁▁▁▁▁▁▁▁█"


def test_describe_puts_a_panel_on_one_scale_and_prints_each_range():
    lines = describe(PANELS[0])
    assert lines == ["  ‖h_t‖ (log scale), loop step t from 1 to 4:",
                     "    diagonal  ▃▃▃▃  5 … 5",      # log10 5 ≈ 0.70 of 3: level 1.6 → ▃
                     "    linear    ▁▃▆█  1 … 1000"]
    # a label starting with "_" is drawn, not printed
    assert describe(PANELS[1]) == ["  loss, step from 1 to 3:", "    diagonal  █▅▁  1 … 3"]


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty working directory and an empty temporary folder, to see what a picture writes."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(pictures, "_temporary", None)
    monkeypatch.delenv(pictures.PICTURES_VAR, raising=False)
    return cwd, tmp


def test_png_goes_into_the_folder_the_variable_names(places, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    cwd, tmp = places
    target = tmp_path / "images" / "08_stability"     # made if missing
    monkeypatch.setenv(pictures.PICTURES_VAR, str(target))
    path = picture("state_norm", PANELS, title="two panels")
    out = capsys.readouterr().out
    assert path == target / "state_norm.png"
    assert sorted(p.name for p in target.iterdir()) == ["state_norm.png"]
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.size[0] == round(2 * 4.2 * pictures.DPI)   # the two panels side by side
        assert image.mode == "P"                                 # saved with a small palette
    assert not any(cwd.iterdir()) and not any(tmp.iterdir())
    # the terminal still gets every series; the renderer shows the file, so no path is printed
    assert out.splitlines()[0] == "picture state_norm: two panels"
    assert "    linear    ▁▃▆█  1 … 1000" in out.splitlines()
    assert "saved" not in out and str(target) not in out


def test_without_the_variable_pngs_go_to_one_temporary_folder(places, capsys):
    pytest.importorskip("matplotlib")
    cwd, tmp = places
    first = picture("one", PANELS[:1])
    second = picture("two", PANELS[1:])
    out = capsys.readouterr().out
    assert first.parent == second.parent and first.parent.parent == tmp
    assert first.is_file() and second.is_file()
    assert f"  saved {first}" in out.splitlines() and f"  saved {second}" in out.splitlines()
    assert not any(cwd.iterdir())


def test_without_matplotlib_the_sparklines_are_all(places, tmp_path, monkeypatch, capsys):
    cwd, tmp = places
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now fails
    monkeypatch.setenv(pictures.PICTURES_VAR, str(tmp_path / "images"))
    assert picture("state_norm", PANELS) is None
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["picture state_norm"] + describe(PANELS[0])
    assert "matplotlib is not installed" in out[-1]
    assert not (tmp_path / "images").exists()
    assert not any(cwd.iterdir()) and not any(tmp.iterdir())


def test_a_name_must_make_a_plain_file_name():
    for name in ("../up", "a/b", "with space", ""):
        with pytest.raises(ValueError, match="file name"):
            picture(name, PANELS)
