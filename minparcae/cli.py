"""What the command-line programs share: flag types that refuse bad numbers at parse time, and the
top-level guard that turns every error a user can cause into one sentence.

A flag's type is checked by argparse before anything runs, so `--lr -1` or `--top-p nan` ends at
once with "argument --lr: must be a positive number, not -1" instead of training by gradient ascent
or failing minutes later inside NumPy. Python's float() accepts "nan" and "inf"; every number type
here refuses both, since no setting of minparcae means anything at either.
"""

import argparse
import math
import shutil
import signal
import sys
import threading
import traceback

from .checkpoint import CheckpointError
from .data import DataError
from .files import RunFolderError, describe_os_error
from .official import OfficialError
from .torchfile import WeightsError

USER_ERRORS = (CheckpointError, DataError, RunFolderError, OfficialError, WeightsError, ValueError)


def _number(cast, test, wanted):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value
    parse.__name__ = wanted  # what argparse names in its own messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer of at least 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer of at least 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
nonneg_float = _number(float, lambda v: v >= 0, "a number of at least 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def run(main, *args):
    """Call main(*args) as a program's entry point. An error a user can cause (a bad flag value, a
    missing or damaged file, a full disk, Ctrl-C outside the training loop) ends in one line; any
    other exception is a bug in minparcae, shown with its traceback and a line saying so. SIGTERM
    (what a job scheduler sends) acts as Ctrl-C does, so it too removes temporary files on its
    way out."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(*args)
    except KeyboardInterrupt:
        sys.exit("interrupted.")
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        sys.exit(f"error: {describe_os_error(err)}")
    except Exception:
        traceback.print_exc()
        sys.exit("this is a bug in minparcae, not something you did: please report it with the "
                 "traceback above.")



def _terminate(signum, frame):
    raise KeyboardInterrupt


def side_by_side(texts, titles, width=None):
    """`texts` as columns under their `titles`, for a terminal `width` columns wide (default: this
    terminal's, 120 when there is none). Tabs become four spaces, unprintable characters "?", and a
    line longer than its column continues on the next row after "↳ ". Too narrow for columns (under
    36 characters each), the texts come one after another."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    gap = " │ "
    col = (width - len(gap) * (len(texts) - 1)) // len(texts)
    if col < 36:
        return "\n\n".join(f"{title}\n{text}" for title, text in zip(titles, texts))
    columns = []
    for text, title in zip(texts, titles):
        rows = [title[:col], "─" * col]
        for line in text.expandtabs(4).split("\n"):
            line = "".join(c if c.isprintable() else "?" for c in line)
            rows.append(line[:col])
            for i in range(col, len(line), col - 2):
                rows.append("↳ " + line[i:i + col - 2])
        columns.append(rows)
    depth = max(len(c) for c in columns)
    return "\n".join(gap.join((c[i] if i < len(c) else "").ljust(col) for c in columns).rstrip()
                     for i in range(depth))
