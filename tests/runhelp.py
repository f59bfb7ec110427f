"""What the tests of train.py and sample.py share: a small corpus, the flags of a tiny run on it,
the run's log, and signals sent from inside a run."""

import json
import os
import signal
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


def signal_during(monkeypatch, target, name, n_call, signum=signal.SIGINT, times=1):
    """Deliver `signum` to this process `times` times inside the n-th call of target.name, as
    Ctrl-C (SIGINT) or a job scheduler (SIGTERM) would."""
    real, calls = getattr(target, name), {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n_call:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(*a, **kw)

    monkeypatch.setattr(target, name, wrapped)
