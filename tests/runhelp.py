"""What the tests of train.py and sample.py share: a small corpus, the flags of a tiny run on it,
and the run's log."""

import json
import sysconfig
from pathlib import Path


def make_corpus(root):
    """~100 KB of real Python source in `root`/code.txt, tokenised into `root`/cache by the first
    run that uses it. Returns {"data": path, "cache": folder}."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text() for name in ("json/decoder.py", "json/encoder.py",
                                                              "textwrap.py", "shlex.py", "fnmatch.py"))
    (Path(root) / "code.txt").write_text(text)
    return {"data": str(Path(root) / "code.txt"), "cache": str(Path(root) / "cache")}


def train_args(corpus, out, *extra):
    """train.py's flags for a tiny run (vocabulary 300, context 32, batch 8, evaluation and
    checkpoint every 10 steps) on `corpus`, writing to `out`."""
    return ["--data", corpus["data"], "--cache-dir", corpus["cache"], "--out", str(out),
            "--vocab-size", "300", "--context", "32", "--batch-size", "8", "--eval-every", "10",
            "--eval-batches", "2", "--sample-tokens", "0", "--device", "cpu", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
