"""Try train.py and sample.py as a hostile user would, and count the cases where they keep their
promises (docs/RELIABILITY.md): bad flag values, a second process, signals, SIGKILLs, full disks,
damaged files, resumes with other flags, data that is not text.

    python scripts/reliability_sweep.py            # ~4 minutes on 2 cores; prints a table per theme

Every case runs the programs as separate processes on a ~100 KB corpus with the tiny preset. A case
holds when the program ends with the expected exit status, its output says the expected thing, no
Python traceback is printed, no temporary file is left, and every checkpoint left in the run
folder loads, has finite weights, and agrees with the log (the log's last step is the checkpoint's).
"""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minparcae import checkpoint  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="minparcae-sweep-"))
CORPUS, CACHE = WORK / "code.txt", WORK / "cache"


def run(script, argv, limit=None, wait=True, env=None):
    def child():
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, argv)], cwd=WORK,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=child, env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                                                   "NUMBA_NUM_THREADS": "1", **(env or {})})
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def tiny(out, *extra, cache=CACHE, data=CORPUS):
    return ["--data", data, "--cache-dir", cache, "--out", out, "--vocab-size", 300, "--context",
            32, "--batch-size", 8, "--eval-every", 5, "--eval-batches", 2, "--sample-tokens", 0,
            "--device", "cpu", *extra]


def wait_lines(out, n, proc, timeout=60):
    log, t0 = Path(out) / "log.jsonl", time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= n:
            return
        time.sleep(0.02)


def kill_and_restart(proc, d):
    """SIGKILL `proc`, then train on in its folder as a user would (a SIGKILL leaves what it was
    writing; the next run must clean up and continue). Returns the problem, or ''."""
    proc.kill()
    proc.wait()
    again = ["--resume"] if (d / "ckpt.npz").exists() else []
    code, text = run("train.py", tiny(d, "--steps", 40, *again))
    return "" if code == 0 and "Traceback" not in text else f"restart failed: {text.strip()[-300:]}"


def finish(proc):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def folder_is_whole(out):
    """'' when the run folder that train.py left has no temporary file, and its checkpoint loads,
    is finite and has no step missing from the log."""
    out = Path(out)
    if not (out / "log.jsonl").exists():
        return ""
    temps = [p.name for p in out.glob(".*.tmp")]
    if temps:
        return f"temporary files left: {temps}"
    if (out / "ckpt.npz").exists():
        params, _, meta = checkpoint.load(out)
        steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
                 if line.endswith("}")]
        if meta["step"] > max(steps, default=0):
            return f"the log ends at step {max(steps, default=0)}, before the checkpoint's {meta['step']}"
        if not all(np.isfinite(a).all() for a in params.values()):
            return "the checkpoint holds non-finite weights"
        if meta.get("val_loss") is not None and not np.isfinite(meta["val_loss"]):
            return "the checkpoint's validation loss is not finite"
    return ""


CASES = defaultdict(list)


def case(theme):
    def register(fn):
        CASES[theme].append(fn)
        return fn
    return register


def expect(result, status, *phrases):
    code, text = result
    if "Traceback" in text:
        return "printed a traceback"
    if code != status:
        return f"exit status {code}, not {status}: {text.strip()[-300:]}"
    missing = [p for p in phrases if p not in text]
    return f"missing {missing!r} in: {text.strip()[-300:]}" if missing else ""


# ----------------------------------------------------------------------------- the cases

BAD_TRAIN = [("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "abc"),
             ("--weight-decay", "nan"), ("--weight-decay", "-1"), ("--clip", "-1"), ("--clip", "0"),
             ("--clip", "nan"), ("--context", "0"), ("--context", "-4"), ("--seed", "-5"),
             ("--steps", "0"), ("--steps", "-3"), ("--batch-size", "0"), ("--batch-size", "1.5"),
             ("--warmup", "-1"), ("--vocab-size", "10"), ("--vocab-size", "0"),
             ("--mean-recurrence", "0"), ("--backprop-depth", "0"), ("--eval-every", "0"),
             ("--eval-batches", "-2"), ("--sample-tokens", "-1"), ("--preset", "huge"),
             ("--injection", "cubic"), ("--dtype", "float16"), ("--device", "tpu")]
BAD_SAMPLE = [("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "-1"),
              ("--top-p", "nan"), ("--top-p", "2"), ("--top-k", "-3"), ("--epsilon", "nan"),
              ("--epsilon", "-1"), ("--eval-batches", "0"), ("--eval-batches", "-2"),
              ("--tokens", "-5"), ("--seed", "-1"), ("--loops", "0"), ("--loops", "1,,2"),
              ("--adaptive", "maybe")]

for flag, value in BAD_TRAIN:
    case("flags")(lambda d, f=flag, v=value: expect(run("train.py", tiny(d / "r", f, v)), 2,
                                                       f"argument {f}:"))
for flag, value in BAD_SAMPLE:
    case("flags")(lambda d, f=flag, v=value: expect(run("sample.py", ["--ckpt", d, f, v]), 2,
                                                       f"argument {f}:"))


@case("flags")
def long_generation_past_the_context(d):
    run("train.py", tiny(d, "--steps", 2))
    return expect(run("sample.py", ["--ckpt", d, "--tokens", 60, "--device", "cpu"]), 0, "--- loops 4")


@case("one process per folder")
def second_trainer(d):
    first = run("train.py", tiny(d, "--steps", 100000), wait=False)
    wait_lines(d, 1, first)
    result = expect(run("train.py", tiny(d, "--steps", 10)), 1,
                    f"is in use by another process (pid {first.pid})")
    return result or kill_and_restart(first, d)


@case("one process per folder")
def second_trainer_resuming(d):
    run("train.py", tiny(d, "--steps", 5))
    first = run("train.py", tiny(d, "--steps", 100000, "--resume"), wait=False)
    wait_lines(d, 6, first)
    result = expect(run("train.py", tiny(d, "--steps", 100000, "--resume")), 1, "in use by another")
    return result or kill_and_restart(first, d)


@case("one process per folder")
def after_a_kill_the_folder_is_free(d):
    first = run("train.py", tiny(d, "--steps", 100000), wait=False)
    wait_lines(d, 7, first)
    return kill_and_restart(first, d)


for n in (2, 6, 11, 17):  # signals at several points of a run, checkpoints every 5 steps
    for sig in (signal.SIGINT, signal.SIGTERM):
        @case("signals")
        def signal_mid_run(d, n=n, sig=sig):
            proc = run("train.py", tiny(d, "--steps", 100000), wait=False)
            wait_lines(d, n, proc)
            proc.send_signal(sig)
            result = finish(proc)
            step = checkpoint.load(d)[2]["step"]
            return expect(result, 1, f"{sig.name} at step {step}: checkpoint saved",
                          f"python train.py --out {d} --resume")


@case("signals")
def two_quick_ctrl_c(d):
    proc = run("train.py", tiny(d, "--steps", 100000), wait=False)
    wait_lines(d, 8, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    return expect(finish(proc), 1, "step")


@case("signals")
def sigterm_while_tokenising(d):
    d.mkdir()
    cache = d / "cache"
    big = d / "big.txt"
    big.write_text(CORPUS.read_text() * 40)
    proc = run("train.py", tiny(d / "run", cache=cache, data=big), wait=False)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    result = expect(finish(proc), 1, "interrupted")
    leftovers = list(cache.rglob("*.tmp")) if cache.exists() else []
    return result or (f"temporary files left: {leftovers}" if leftovers else "")


@case("signals")
def sigterm_to_sample(d):
    run("train.py", tiny(d, "--steps", 2))
    proc = run("sample.py", ["--ckpt", d, "--tokens", 1000, "--loops", ",".join(["16"] * 50),
                             "--device", "cpu"], wait=False)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    return expect(finish(proc), 1, "interrupted")


for seed in range(6):  # SIGKILLs at random moments, then --resume
    @case("kills and the log")
    def sigkill_then_resume(d, seed=seed):
        proc = run("train.py", tiny(d, "--steps", 30), wait=False)
        wait_lines(d, random.Random(seed).randint(1, 24), proc)
        time.sleep(random.Random(seed).random() * 0.3)
        proc.kill()
        proc.wait()
        again = ["--resume"] if (d / "ckpt.npz").exists() else []  # else a fresh run, same folder
        resumed = run("train.py", tiny(d, "--steps", 30, *again))
        steps = [json.loads(line)["step"] for line in (d / "log.jsonl").read_text().splitlines()]
        return expect(resumed, 0, "val_loss") or ("" if steps == list(range(1, 31)) else
                                                   f"the log's steps are {steps}")


@case("kills and the log")
def fresh_run_after_a_kill_before_the_first_checkpoint(d):
    proc = run("train.py", tiny(d, "--steps", 100000, "--eval-every", 1000), wait=False)
    wait_lines(d, 3, proc)
    proc.kill()
    proc.wait()
    result = expect(run("train.py", tiny(d, "--steps", 4)), 0, "val_loss")
    steps = [json.loads(line)["step"] for line in (d / "log.jsonl").read_text().splitlines()]
    return result or ("" if steps == [1, 2, 3, 4] else f"the log's steps are {steps}")


@case("kills and the log")
def torn_last_line(d):
    run("train.py", tiny(d, "--steps", 5))
    with open(d / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    return expect(run("train.py", tiny(d, "--steps", 7, "--resume")), 0, "val_loss")


@case("kills and the log")
def damaged_log(d):
    run("train.py", tiny(d, "--steps", 5))
    (d / "log.jsonl").write_text("not json\n" + (d / "log.jsonl").read_text())
    return expect(run("train.py", tiny(d, "--steps", 7, "--resume")), 1, f"the log {d}/log.jsonl")


for lr, injection in (("1e6", "diagonal"), ("1e6", "linear"), ("1e4", "add"), ("50", "linear"),
                      ("5", "diagonal")):
    @case("only good checkpoints")
    def huge_learning_rate(d, lr=lr, injection=injection):
        code, text = run("train.py", tiny(d, "--steps", 40, "--lr", lr, "--injection", injection))
        if "Traceback" in text:
            return "printed a traceback"
        if code == 1 and injection == "diagonal" and "use the diagonal injection" in text:
            return "told a diagonal run to use the diagonal injection"
        if code not in (0, 1):
            return f"exit status {code}"
        if (d / "ckpt.npz").exists():  # whatever was kept must sample
            return expect(run("sample.py", ["--ckpt", d, "--tokens", 5, "--device", "cpu"]), 0,
                          "--- loops")
        return ""


def disk_case(name, argv_of, limit, status, *phrases):
    case("operating-system errors")(lambda d: expect(run("train.py", argv_of(d), limit=limit),
                                                      status, *phrases))


disk_case("checkpoint on a full disk", lambda d: tiny(d, "--steps", 8), 1 << 20, 1,
          "cannot write the checkpoint", "File too large")
disk_case("log on a full disk", lambda d: tiny(d, "--steps", 30, "--eval-every", 100), 2000, 1,
          "cannot write the log")
disk_case("token cache on a full disk", lambda d: tiny(d, "--steps", 3, cache=d / "c"), 30_000, 1,
          "cannot write the token cache")


@case("operating-system errors")
def out_is_a_file(d):
    d.mkdir()
    (d / "f").write_text("x")
    return expect(run("train.py", tiny(d / "f")), 1, "is a file, not a folder")


@case("operating-system errors")
def out_under_a_file(d):
    d.mkdir()
    (d / "f").write_text("x")
    return expect(run("train.py", tiny(d / "f" / "run")), 1, "Not a directory")


@case("operating-system errors")
def cache_dir_is_a_file(d):
    d.mkdir()
    (d / "f").write_text("x")
    return expect(run("train.py", tiny(d / "run", cache=d / "f")), 1, "pass another --cache-dir")


@case("operating-system errors")
def dangling_file_in_data(d):
    d.mkdir()
    (d / "data").mkdir()
    (d / "data" / "a.txt").write_text(CORPUS.read_text())
    (d / "data" / "b.txt").symlink_to(d / "nowhere")
    return expect(run("train.py", tiny(d / "run", data=d / "data")), 1, "b.txt", "No such file")


for damage in ("train.bin", "meta.json", "val.bin"):
    @case("operating-system errors")
    def damaged_cache(d, damage=damage):
        cache = d / "cache"
        run("train.py", tiny(d / "a", "--steps", 1, cache=cache))
        target = next(cache.iterdir()) / damage
        if damage == "train.bin":
            target.unlink()
        else:
            with open(target, "r+b") as f:
                f.truncate(7)
        return expect(run("train.py", tiny(d / "b", "--steps", 2, cache=cache)), 0,
                      "token cache", "rebuilding it")


for damage in ("meta.json", "val.bin"):
    @case("operating-system errors")
    def sample_with_damaged_validation_data(d, damage=damage):
        cache = d / "cache"
        run("train.py", tiny(d / "run", "--steps", 2, cache=cache))
        target = next(cache.iterdir()) / damage
        if damage == "meta.json":
            target.unlink()
        else:
            with open(target, "ab") as f:
                f.write(b"\x01")
        return expect(run("sample.py", ["--ckpt", d / "run", "--tokens", 3, "--device", "cpu"]), 0,
                      "samples only")


for what in ("missing", "a text file", "half a checkpoint", "a folder named ckpt.npz"):
    @case("operating-system errors")
    def sample_a_bad_checkpoint(d, what=what):
        d.mkdir()
        target = d / "ckpt.npz"
        if what == "a text file":
            target.write_text("hello")
        elif what == "half a checkpoint":
            run("train.py", tiny(d / "run", "--steps", 5))
            target.write_bytes((d / "run" / "ckpt.npz").read_bytes()[:50_000])
        elif what == "a folder named ckpt.npz":
            target.mkdir()
        return expect(run("sample.py", ["--ckpt", target]), 1, "error:")


for what in ("missing", "empty folder", "empty file", "bad jsonl", "jsonl without text"):
    @case("data that is not text")
    def bad_data_path(d, what=what):
        d.mkdir()
        path = d / ("x.jsonl" if "jsonl" in what else "x")
        if what == "empty folder":
            path.mkdir()
        elif what == "empty file":
            path.write_text("")
        elif what == "bad jsonl":
            path.write_text('{"text": "a"}\n{oops\n')
        elif what == "jsonl without text":
            path.write_text('{"body": "a"}\n')
        return expect(run("train.py", tiny(d / "run", cache=d / "c", data=path)), 1, "error:")


@case("data that is not text")
def an_executable(d):
    return expect(run("train.py", tiny(d / "run", cache=d / "c", data="/bin/ls")), 1, "is not text")


@case("data that is not text")
def random_bytes(d):
    d.mkdir()
    (d / "noise.txt").write_bytes(os.urandom(100_000))
    return expect(run("train.py", tiny(d / "run", cache=d / "c", data=d / "noise.txt")), 1, "is not text")


@case("data that is not text")
def utf16_text(d):
    d.mkdir()
    (d / "u.txt").write_text(CORPUS.read_text()[:20000], encoding="utf-16")
    return expect(run("train.py", tiny(d / "run", cache=d / "c", data=d / "u.txt")), 1, "UTF-16")


@case("data that is not text")
def latin1_text(d):
    d.mkdir()
    (d / "l.txt").write_bytes(("é à ç " + CORPUS.read_text()[:60000]).encode("latin-1", "replace"))
    return expect(run("train.py", tiny(d / "run", "--steps", 2, cache=d / "c", data=d / "l.txt")), 0,
                  "not valid UTF-8", "l.txt")


@case("data that is not text")
def validation_shorter_than_the_context(d):
    d.mkdir()
    (d / "s.txt").write_text("x = 1\n" * 300)
    return expect(run("train.py", tiny(d / "run", "--context", 128, cache=d / "c", data=d / "s.txt")),
                  1, "fewer than one window")


RESUME_CONFLICTS = [("--optimizer", "adamw"), ("--lr", "0.01"), ("--batch-size", "4"),
                    ("--preset", "small-cpu"), ("--injection", "linear"), ("--dtype", "float64"),
                    ("--context", "16"), ("--seed", "3"), ("--steps", "3")]
for flag, value in RESUME_CONFLICTS:
    @case("resume")
    def resume_with_a_conflicting_flag(d, flag=flag, value=value):
        run("train.py", tiny(d, "--steps", 5, "--optimizer", "muon"))
        return expect(run("train.py", ["--out", d, "--resume", flag, value]), 1, flag)


@case("resume")
def resume_with_no_flags_continues_the_run(d):
    run("train.py", tiny(d, "--steps", 5, "--lr", "0.01", "--batch-size", 4, "--optimizer", "muon"))
    return expect(run("train.py", ["--out", d, "--resume", "--steps", 8, "--sample-tokens", 0]), 0,
                  "now ends at step 8", "val_loss")


@case("resume")
def resume_without_a_checkpoint(d):
    return expect(run("train.py", tiny(d, "--resume")), 1, "no checkpoint at")


def main():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    CORPUS.write_text("\n".join((stdlib / name).read_text() for name in
                                ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py",
                                 "fnmatch.py")))
    run("train.py", tiny(WORK / "warm-up", "--steps", 1))  # tokenise the corpus once, for every case
    jobs = [(theme, fn, i) for theme, fns in CASES.items() for i, fn in enumerate(fns)]

    def one(job):
        theme, fn, i = job
        d = WORK / f"{theme.replace(' ', '-')}-{i}"
        try:
            problem = fn(d) or folder_is_whole(d)
        except Exception as err:  # the sweep itself failed: count the case as not holding
            problem = f"{type(err).__name__}: {err}"
        return theme, f"{fn.__name__}[{i}]", problem

    t0 = time.time()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, jobs))
    print("| theme | cases tried | cases holding |\n|---|---|---|")
    for theme in CASES:
        mine = [r for r in results if r[0] == theme]
        print(f"| {theme} | {len(mine)} | {sum(not r[2] for r in mine)} |")
    print(f"| all | {len(results)} | {sum(not r[2] for r in results)} |")
    for theme, name, problem in results:
        if problem:
            print(f"FAILED {theme} / {name}: {problem}")
    print(f"({time.time() - t0:.0f} s, in {WORK})")


if __name__ == "__main__":
    main()
