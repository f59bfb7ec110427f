"""Pictures for the lessons: a PNG where matplotlib is installed, a sparkline in the terminal always.

    from pictures import Panel, picture

    picture("state_norm", [Panel("‖h_t‖", {"diagonal": (t, norms), "add": (t, drift)},
                                 x="loop step t", log=True)])

draws one figure of panels side by side and prints each series as a row of ▁▂▃▄▅▆▇█ with its
smallest and largest value, so a reader in a terminal sees the shape of every curve. The PNG goes
into the folder named by the environment variable MINPARCAE_LESSON_PICTURES, which
lessons/render.py sets to the page's images folder (it shows the file after the cell that drew
it). Without the variable it goes into a fresh temporary folder, whose path is printed: a lesson
never writes into the repository or into the folder it runs from. Without matplotlib (the
project's `plot` extra, `pip install -e ".[plot]"`) the sparklines are all there is.
"""

import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PICTURES_VAR = "MINPARCAE_LESSON_PICTURES"
BARS = "▁▂▃▄▅▆▇█"
WIDTH = 64    # characters of a sparkline at most: 64 loop steps fit whole
DPI = 90      # 4.2 × 3.1 inch panels: 380 × 280 pixels each
COLORS = 64   # a plot has few colours: a palette of 64 keeps it sharp at a third of the size


@dataclass
class Panel:
    """One plot: `series` maps a label to (x, y), or to (x, y, style) where style is a dict of
    keyword arguments for matplotlib's Axes.plot (marker, linestyle, color, ...). A label has the
    same colour in every panel of a figure unless its style names one; a label that starts with
    "_" is drawn but neither put in the legend nor printed (matplotlib's own convention). `log`
    puts the y axis on a logarithmic scale, where values ≤ 0 cannot be drawn and are left out."""
    title: str
    series: dict
    x: str = ""
    y: str = ""
    log: bool = False


def sparkline(values, log=False, span=None, width=WIDTH):
    """`values` as one character each on the scale `span` = (lo, hi), ▁ at lo and █ at hi (on a
    log scale if `log`; by default the values' own smallest and largest). A value that cannot be
    placed (not finite, or ≤ 0 on a log scale) is a space, and a constant series on its own scale
    is a row of ▄. A series longer than `width` is shown by `width` evenly spaced values, the first
    and the last among them."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) > width:
        v = v[np.linspace(0, len(v) - 1, width).round().astype(int)]
    ok = drawable(v, log)
    if not ok.any():
        return " " * len(v)
    lo, hi = span or (v[ok].min(), v[ok].max())
    if log:
        v, lo, hi = np.log10(np.where(ok, v, 1.0)), np.log10(lo), np.log10(hi)
    scaled = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.full(len(v), 3 / 7)
    return "".join(BARS[int(s * 7 + 0.5)] if good else " " for s, good in zip(scaled, ok))


def drawable(values, log):
    """Which values a plot can show: the finite ones, and on a log scale only those above 0."""
    values = np.asarray(values, dtype=np.float64)
    return np.isfinite(values) & (values > 0 if log else True)


def describe(panel):
    """The lines printed for one panel: its title, then each series' sparkline, all on the panel's
    one y scale as in the PNG, and the series' own smallest and largest value."""
    shown = {label: (np.asarray(s[0], dtype=np.float64), np.asarray(s[1], dtype=np.float64))
             for label, s in panel.series.items() if not label.startswith("_")}
    head = f"  {panel.title}" + (" (log scale)" if panel.log else "")
    if shown and all(len(x) for x, _ in shown.values()):
        lo, hi = min(x.min() for x, _ in shown.values()), max(x.max() for x, _ in shown.values())
        head += f", {panel.x or 'x'} from {lo:g} to {hi:g}"
    points = [y[drawable(y, panel.log)] for _, y in shown.values()]
    points = np.concatenate(points) if points else np.array([])
    span = (points.min(), points.max()) if len(points) else None
    lines = [head + ":"]
    pad = max((len(label) for label in shown), default=0)
    for label, (_, y) in shown.items():
        ok = drawable(y, panel.log)
        extent = f"{y[ok].min():.4g} … {y[ok].max():.4g}" if ok.any() else "nothing to draw"
        lines.append(f"    {label:<{pad}}  {sparkline(y, panel.log, span)}  {extent}")
    return lines


_temporary = None    # this process's folder for pictures when the variable is not set


def folder():
    """Where a picture is saved: MINPARCAE_LESSON_PICTURES if set, else a temporary folder made
    once per process (and kept, so the pictures can be opened after the lesson ends)."""
    global _temporary
    if os.environ.get(PICTURES_VAR):
        return Path(os.environ[PICTURES_VAR])
    if _temporary is None:
        _temporary = Path(tempfile.mkdtemp(prefix="minparcae-pictures-"))
    return _temporary


def picture(name, panels, title=None):
    """Print the panels as sparklines and, with matplotlib, save them side by side (three to a
    row) as `name`.png (see the module docstring for where). Returns the PNG's path, or None
    without matplotlib."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"a picture's name becomes its file name: use letters, digits, _ and -, "
                         f"not {name!r}")
    print(f"picture {name}" + (f": {title}" if title else ""))
    for panel in panels:
        print("\n".join(describe(panel)))
    try:
        import matplotlib  # noqa: F401  (the `plot` extra)
    except ImportError:
        print("  (no PNG: matplotlib is not installed; pip install -e \".[plot]\" draws one)")
        return None
    from PIL import Image  # matplotlib's own dependency

    path = folder() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    draw(panels, title).savefig(png, format="png", dpi=DPI)
    Image.open(png).convert("RGB").quantize(COLORS).save(path, optimize=True)
    if not os.environ.get(PICTURES_VAR):
        # with the variable set the renderer shows the file; a path here would only be noise
        print(f"  saved {path}")
    return path


def draw(panels, title=None):
    """The matplotlib Figure of the panels. A bare Figure, not pyplot: no window, no backend to
    choose, no state left behind between pictures."""
    from matplotlib.figure import Figure

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.1 * rows + (0.3 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    colors, in_legend = {}, set()
    for ax, panel in zip(axes, panels):
        for label, (x, y, *style) in panel.series.items():
            kwargs = {**(style[0] if style else {})}
            if "color" not in kwargs and not label.startswith("_"):
                kwargs["color"] = colors.setdefault(label, f"C{len(colors) % 10}")
            # a value a log axis cannot show is left out, not clipped to a tiny positive one
            y = np.where(drawable(y, panel.log), y, np.nan)
            ax.plot(x, y, label=label, **kwargs)
        ax.set(title=panel.title, xlabel=panel.x, ylabel=panel.y)
        if panel.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        # each label in the legend of the first panel that draws it, so six panels of the same
        # three curves carry one legend
        handles = [(h, l) for h, l in zip(*ax.get_legend_handles_labels()) if l not in in_legend]
        if handles:
            ax.legend(*zip(*handles), fontsize="small")
            in_legend.update(l for _, l in handles)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
