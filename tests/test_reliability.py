"""Nothing is lost: train.py and sample.py against a second process, signals, kills, full disks,
read-only folders, damaged files, resumes with other flags, bad flag values and data that is not
text. Each test is one promise of docs/RELIABILITY.md; each fails on the code before that promise
was kept.

Faults are real where a test can make them without privileges: a second process, SIGTERM, SIGKILL,
and a full disk as the kernel reports it when a process passes its file-size limit
(RLIMIT_FSIZE: writes fail with EFBIG, "File too large", as they fail with ENOSPC on a full disk).
Where a fault needs privileges the tests do not have (a read-only mount; permissions, which root
ignores), a fake raises the error the operating system would."""

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sample
import train
from minparcae import checkpoint, cli, data, files, model, runtime
from runhelp import make_corpus, read_log, signal_during, train_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = make_corpus(tmp_path_factory.mktemp("corpus"))
    data.prepare_data(c["data"], vocab_size=300, cache_dir=c["cache"])  # subprocesses reuse it
    return c


def program(script, argv, file_limit=None, wait=True):
    """Run train.py or sample.py as a user would, in a process of its own; `file_limit` caps the
    size of any file it writes (bytes), so a write past it fails as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limit if file_limit else None)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def wait_for_log(out, n_lines, proc):
    log = Path(out) / "log.jsonl"
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().count("\n") >= n_lines):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def temp_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


# ----------------------------------------------------------------------------- 1. one process per folder

def test_a_second_process_exits_at_once_naming_the_holder(corpus, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minparcae import files; "
                               f"f = files.RunFolder({str(tmp_path)!r}).__enter__(); print('locked', "
                               "flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        code, _, err = program("train.py", train_args(corpus, tmp_path, "--steps", "10"))
        assert code == 1 and time.monotonic() - t0 < 10
        assert err.strip() == (f"error: run folder {tmp_path} is in use by another process (pid "
                               f"{holder.pid}): wait for it to finish, or choose another --out.")
        assert not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    with files.RunFolder(tmp_path):
        pass


def test_a_killed_run_leaves_no_temporary_file_and_its_lock_is_released(corpus, tmp_path):
    proc = program("train.py", train_args(corpus, tmp_path, "--steps", "1000", "--eval-every", "2"),
                   wait=False)
    wait_for_log(tmp_path, 5, proc)
    proc.kill()
    proc.wait()
    (tmp_path / ".ckpt.npz.999999.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    code, out, err = program("train.py", train_args(corpus, tmp_path, "--steps", "12", "--resume"))
    assert code == 0 and "Traceback" not in err, err
    assert temp_files(tmp_path) == []
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 13))


def test_atomic_write_keeps_the_old_file_and_removes_its_temporary_one(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    assert str(os.getpid()) in files.temp_path(path).name

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- 2. signals

def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    signal_during(monkeypatch, train.runtime, "loss_and_grads", 13, times=2)
    with pytest.raises(SystemExit, match=rf"stopped at step 12 without saving it; the last good "
                       rf"checkpoint is {tmp_path / 'ckpt.npz'} \(step 10\)"):
        train.main(train_args(corpus, tmp_path, "--steps", "20"))
    assert checkpoint.load(tmp_path)[2]["step"] == 10


def test_signals_during_a_save_do_not_cut_it(corpus, tmp_path, monkeypatch):
    signal_during(monkeypatch, train.checkpoint, "save", 1, signal.SIGTERM, times=3)
    with pytest.raises(SystemExit, match="SIGTERM at step 10: checkpoint saved"):
        train.main(train_args(corpus, tmp_path, "--steps", "20"))
    assert checkpoint.load(tmp_path)[2]["step"] == 10 and temp_files(tmp_path) == []


def test_sigterm_from_outside_saves_and_names_the_resume_command(corpus, tmp_path):
    proc = program("train.py", train_args(corpus, tmp_path, "--steps", "1000"), wait=False)
    wait_for_log(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    step = read_log(tmp_path)[-1]["step"]
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().endswith(f"SIGTERM at step {step}: checkpoint saved to {tmp_path / 'ckpt.npz'}"
                                f"; continue with: python train.py --out {tmp_path} --resume")
    assert checkpoint.load(tmp_path)[2]["step"] == step


# ----------------------------------------------------------------------------- 3. the log

class Killed(BaseException):
    """A kill: nothing in train.py catches it."""


def kill_in_save(monkeypatch, n_call, after_writing):
    real, calls = checkpoint.save, {"n": 0}

    def save(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n_call and not after_writing:
            raise Killed
        real(*a, **kw)
        if calls["n"] == n_call:
            raise Killed

    monkeypatch.setattr(train.checkpoint, "save", save)


def comparable(log):
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in log]


@pytest.mark.parametrize("after_writing", [False, True])
def test_a_kill_around_a_checkpoint_loses_no_log_record(corpus, tmp_path, monkeypatch, after_writing):
    full = tmp_path / "full"
    train.main(train_args(corpus, full, "--steps", "10", "--eval-every", "5"))
    kill_in_save(monkeypatch, 2, after_writing)
    with pytest.raises(Killed):
        train.main(train_args(corpus, tmp_path, "--steps", "10", "--eval-every", "5"))
    assert read_log(tmp_path)[-1]["step"] == 10  # the record was written before the checkpoint
    monkeypatch.undo()
    train.main(train_args(corpus, tmp_path, "--steps", "10", "--eval-every", "5", "--resume"))
    assert comparable(read_log(tmp_path)) == comparable(read_log(full))


def test_a_fresh_run_starts_a_fresh_log(corpus, tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(1, 32)))
    train.main(train_args(corpus, tmp_path, "--steps", "5"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_torn_last_line_is_dropped_on_resume(corpus, tmp_path):
    train.main(train_args(corpus, tmp_path, "--steps", "10"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 4.')  # a write cut short by a full disk
    train.main(train_args(corpus, tmp_path, "--steps", "12", "--resume"))
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 13))


@pytest.mark.parametrize("damage", ["middle", "folder"])
def test_an_unreadable_log_is_named(corpus, tmp_path, damage):
    train.main(train_args(corpus, tmp_path, "--steps", "10"))
    log = tmp_path / "log.jsonl"
    if damage == "middle":
        lines = log.read_text().splitlines()
        log.write_text("\n".join(lines[:3] + ["\x00garbage"] + lines[3:]) + "\n")
        expected = f"line 4 of the log {log} is not a step record"
    else:
        log.unlink()
        log.mkdir()
        expected = f"the log {log} is unreadable"
    with pytest.raises(files.RunFolderError, match=expected):
        train.main(train_args(corpus, tmp_path, "--steps", "12", "--resume"))


# ----------------------------------------------------------------------------- 4. last good checkpoint

def test_a_huge_learning_rate_never_writes_a_bad_checkpoint(corpus, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path, "--steps", "30", "--lr", "1e6", "--eval-every", "5"))
    assert "the last good checkpoint is none (no checkpoint was written)" in str(stop.value)
    assert "lower --lr (it is 1e+06)." in str(stop.value)
    assert "diagonal injection" not in str(stop.value)  # the run already uses it
    assert not (tmp_path / "ckpt.npz").exists()


def test_the_linear_injection_is_told_about_the_diagonal_one(corpus, tmp_path):
    with pytest.raises(SystemExit, match=r"lower --lr \(it is 1e\+06\), or use the diagonal injection"):
        train.main(train_args(corpus, tmp_path, "--steps", "30", "--lr", "1e6", "--injection", "linear"))


@pytest.mark.parametrize("fault", ["nan validation loss", "infinite weight"])
def test_a_checkpoint_is_written_only_when_finite(corpus, tmp_path, monkeypatch, fault):
    real, calls = model.evaluate, {"n": 0}

    def evaluate(params, cfg, batches, n_loops=None, ops=None):
        calls["n"] += 1
        loss = real(params, cfg, batches, n_loops, ops)
        if calls["n"] == 2 and fault == "nan validation loss":
            return float("nan")
        if calls["n"] == 2:
            params["wte"][0, 0] = np.inf
        return loss

    monkeypatch.setattr(train.model, "evaluate", evaluate)
    what = "the validation loss is nan" if fault.startswith("nan") else "the weights are not finite"
    with pytest.raises(SystemExit, match=rf"training stopped at step 20: {what}, so no checkpoint was "
                       rf"written; the last good checkpoint is {tmp_path / 'ckpt.npz'} \(step 10\)"):
        train.main(train_args(corpus, tmp_path, "--steps", "30"))
    saved, _, meta = checkpoint.load(tmp_path)
    assert meta["step"] == 10 and np.isfinite(meta["val_loss"])
    assert all(np.isfinite(a).all() for a in saved.values())


# ----------------------------------------------------------------------------- 5. operating-system errors

def test_a_full_disk_at_the_checkpoint_stops_cleanly(corpus, tmp_path):
    code, _, err = program("train.py", train_args(corpus, tmp_path, "--steps", "20"),
                           file_limit=1 << 20)  # the log fits, the 10 MB checkpoint does not
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"training stopped at step 10: cannot write the checkpoint "
                           f"{tmp_path / 'ckpt.npz'}: File too large; the previous checkpoint, if "
                           "any, is untouched. The last good checkpoint is none (no checkpoint was "
                           "written); continue it with --resume once the problem is fixed.")
    assert temp_files(tmp_path) == [] and not (tmp_path / "ckpt.npz").exists()
    assert read_log(tmp_path)[-1]["step"] == 10


def test_a_full_disk_in_the_log_stops_cleanly(corpus, tmp_path):
    code, _, err = program("train.py", train_args(corpus, tmp_path, "--steps", "20"), file_limit=1500)
    assert code == 1 and "Traceback" not in err
    assert f"cannot write the log {tmp_path / 'log.jsonl'}: File too large." in err


def test_a_full_disk_while_tokenising_leaves_no_temporary_file(corpus, tmp_path):
    cache = tmp_path / "cache"
    argv = train_args(corpus, tmp_path / "run", "--steps", "5")
    argv[argv.index("--cache-dir") + 1] = str(cache)
    code, _, err = program("train.py", argv, file_limit=20_000)
    assert code == 1 and "Traceback" not in err
    assert "cannot write the token cache" in err and "File too large: pass another --cache-dir." in err
    assert temp_files(cache) == []


def test_no_space_left_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params = {"w": np.ones(3)}
    checkpoint.save(tmp_path / "ckpt.npz", params, {}, {"step": 1})

    def savez(f, **arrays):
        f.write(b"PK\x03\x04 some bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.np, "savez", savez)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device; the previous"):
        checkpoint.save(tmp_path / "ckpt.npz", {"w": np.zeros(3)}, {}, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)[2]["step"] == 1 and temp_files(tmp_path) == []


def test_a_read_only_run_folder_fails_before_any_data_is_prepared(corpus, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    real_open = os.open

    def read_only(path, *a, **kw):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(files.os, "open", read_only)
    argv = train_args(corpus, out)
    argv[argv.index("--cache-dir") + 1] = str(cache)
    with pytest.raises(files.RunFolderError, match=f"cannot write in the run folder {out}/.lock: "
                       "Read-only file system: choose another --out."):
        train.main(argv)
    assert not cache.exists()


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_an_out_that_is_a_file_is_refused(corpus, tmp_path, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "is a file" else tmp_path / "f" / "run"
    expected = ("is a file, not a folder" if where == "is a file"
                else "cannot create the run folder .*: Not a directory")
    with pytest.raises(files.RunFolderError, match=expected):
        train.main(train_args(corpus, out))


def test_a_cache_dir_that_is_a_file_is_refused(corpus, tmp_path):
    argv = train_args(corpus, tmp_path / "run")
    (tmp_path / "cachefile").write_text("x")
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cachefile")
    with pytest.raises(data.DataError, match="cannot write the token cache .*: pass another --cache-dir"):
        train.main(argv)


def test_unreadable_and_dangling_files_in_a_data_folder_are_named(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n" * 50)
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(data.DataError, match=f"cannot read {folder / 'gone.txt'}: No such file"):
        data.prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")
    (folder / "gone.txt").unlink()
    real = Path.read_bytes

    def denied(self):
        if self.name == "a.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    def denied_open(path, *args, **kwargs):  # a lone file is streamed through open()
        if Path(path).name == "a.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", denied)
    monkeypatch.setattr(data, "open", denied_open, raising=False)
    with pytest.raises(data.DataError, match=f"cannot read {folder / 'a.txt'}: Permission denied"):
        data.prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")
    (folder / "b.txt").write_text("more text\n" * 50)  # two documents: each file read whole
    with pytest.raises(data.DataError, match=f"cannot read {folder / 'a.txt'}: Permission denied"):
        data.prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["train.bin missing", "meta.json truncated", "val.bin short"])
def test_a_damaged_token_cache_is_rebuilt(corpus, tmp_path, capsys, damage):
    first = data.prepare_data(corpus["data"], vocab_size=300, cache_dir=tmp_path)
    folder, train_tokens = first.folder, np.array(first.train)
    if damage == "train.bin missing":
        (folder / "train.bin").unlink()
    elif damage == "meta.json truncated":
        (folder / "meta.json").write_text((folder / "meta.json").read_text()[:40])
    else:
        with open(folder / "val.bin", "r+b") as f:
            f.truncate(3)
    capsys.readouterr()
    again = data.prepare_data(corpus["data"], vocab_size=300, cache_dir=tmp_path)
    assert f"the token cache {folder} is damaged" in capsys.readouterr().err
    assert not again.cached and np.array_equal(np.array(again.train), train_tokens)


@pytest.mark.parametrize("damage", ["meta.json lost", "val.bin odd size"])
def test_sample_prints_samples_when_the_validation_data_is_damaged(corpus, tmp_path, damage):
    cache = tmp_path / "cache"
    argv = train_args(corpus, tmp_path / "run", "--steps", "2")
    argv[argv.index("--cache-dir") + 1] = str(cache)
    train.main(argv)
    folder = next(cache.iterdir())
    if damage == "meta.json lost":
        (folder / "meta.json").unlink()
    else:
        with open(folder / "val.bin", "ab") as f:
            f.write(b"\x01")
    code, out, err = program("sample.py", ["--ckpt", str(tmp_path / "run"), "--tokens", "3",
                                           "--device", "cpu"])
    assert code == 0 and "Traceback" not in err, err
    assert "validation data of this run is unusable" in out and "--- loops 4" in out


# ----------------------------------------------------------------------------- 6. resume

def test_resume_takes_the_runs_own_settings(corpus, tmp_path, monkeypatch):
    own = ("--lr", "0.01", "--batch-size", "4", "--optimizer", "muon", "--steps", "12")
    full = train.main(train_args(corpus, tmp_path / "full", *own))
    real, calls = runtime.loss_and_grads, {"n": 0}

    def crash(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 12:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(train.runtime, "loss_and_grads", crash)
    with pytest.raises(Killed):
        train.main(train_args(corpus, tmp_path / "run", *own))
    monkeypatch.undo()
    assert train.main(["--out", str(tmp_path / "run"), "--resume", "--sample-tokens", "0"]) == full
    assert comparable(read_log(tmp_path / "run")) == comparable(read_log(tmp_path / "full"))


@pytest.mark.parametrize("flag, value, expected", [
    ("--optimizer", "adamw", "--optimizer adamw differs from this run's muon"),
    ("--lr", "0.02", "--lr 0.02 differs from this run's 0.003"),
    ("--batch-size", "16", "--batch-size 16 differs from this run's 8"),
    ("--steps", "5", "--steps 5 is behind this run, which is at step 10"),
])
def test_resume_refuses_a_flag_that_changes_the_run(corpus, tmp_path, flag, value, expected):
    train.main(train_args(corpus, tmp_path, "--steps", "10", "--optimizer", "muon"))
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        train.main(["--out", str(tmp_path), "--resume", flag, value])


def test_resume_with_more_steps_says_how_the_schedule_changes(corpus, tmp_path, capsys):
    train.main(train_args(corpus, tmp_path, "--steps", "10", "--warmup", "0"))
    capsys.readouterr()
    train.main(train_args(corpus, tmp_path, "--steps", "20", "--warmup", "0", "--resume"))
    out = capsys.readouterr().out
    assert ("the run now ends at step 20, not 10; the trapezoid schedule is recomputed for it, so "
            "the learning rate at step 10 is 0.003 (it would have been 0)") in out
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 21))


# ----------------------------------------------------------------------------- 7. flags

BAD_TRAIN_FLAGS = [("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--weight-decay", "nan"),
                   ("--weight-decay", "-0.1"), ("--clip", "-1"), ("--clip", "inf"),
                   ("--context", "0"), ("--context", "-4"), ("--seed", "-5"), ("--steps", "0"),
                   ("--batch-size", "2.5"), ("--warmup", "-1"), ("--vocab-size", "100"),
                   ("--mean-recurrence", "0"), ("--backprop-depth", "-2"), ("--eval-every", "0"),
                   ("--eval-batches", "x"), ("--sample-tokens", "-1")]
BAD_SAMPLE_FLAGS = [("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0"),
                    ("--top-p", "-1"), ("--top-p", "nan"), ("--top-p", "1.5"), ("--top-k", "-3"),
                    ("--epsilon", "nan"), ("--eval-batches", "0"), ("--eval-batches", "-2"),
                    ("--tokens", "-5"), ("--seed", "-1"), ("--loops", "0"), ("--loops", "2,x")]


@pytest.mark.parametrize("script, flag, value", [("train", *f) for f in BAD_TRAIN_FLAGS]
                         + [("sample", *f) for f in BAD_SAMPLE_FLAGS])
def test_every_numeric_flag_is_checked_when_parsed(script, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        {"train": train, "sample": sample}[script].parse_args([flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err.splitlines()[-1]


def test_long_generation_shows_progress(corpus, tmp_path, monkeypatch):
    train.main(train_args(corpus, tmp_path, "--steps", "2"))

    class Terminal:
        text = ""

        def write(self, s):
            Terminal.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    sample.main(["--ckpt", str(tmp_path), "--tokens", "40", "--device", "cpu", "--eval-batches", "1"])
    assert "generating" in Terminal.text and "tok" in Terminal.text


# ----------------------------------------------------------------------------- 8. data that is not text

@pytest.mark.parametrize("kind", ["executable", "random bytes"])
def test_binary_data_is_refused(tmp_path, kind):
    if kind == "executable":
        path = Path(sys.executable).resolve()
    else:
        path = tmp_path / "noise.txt"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(data.DataError, match=rf"{path} is not text \(a NUL byte at offset \d+\)"):
        train.main(["--data", str(path), "--out", str(tmp_path / "run"), "--cache-dir",
                    str(tmp_path / "cache")])


def test_text_that_is_not_utf8_is_reported(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain ascii\n" * 100)
    (folder / "b.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 100)
    ds = data.prepare_data(folder, vocab_size=300, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert (f"note: 1 file(s) are not valid UTF-8 (400 undecodable byte sequences read as U+FFFD), "
            f"the first being {folder / 'b.txt'}") in err
    assert ds.meta["train_tokens"] > 0


def test_a_validation_split_shorter_than_the_context_is_refused_before_training(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x = 1\n" * 400)
    with pytest.raises(data.DataError, match=r"the validation split of file .* holds \d+ tokens, "
                       r"fewer than one window of context \+ 1 = 129"):
        train.main(["--data", str(path), "--out", str(tmp_path / "run"), "--vocab-size", "300",
                    "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ----------------------------------------------------------------------------- the top-level guard

@pytest.mark.parametrize("error, expected", [
    (data.DataError("bad data."), "error: bad data."),
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), "error: cannot use /x/y: No space left on device"),
    (KeyboardInterrupt(), "interrupted."),
])
def test_a_user_error_is_one_line(error, expected, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit, match=expected):
        cli.run(main)
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(capsys):
    def main():
        return {}["missing"]

    with pytest.raises(SystemExit, match="this is a bug in minparcae"):
        cli.run(main)
    assert "Traceback" in capsys.readouterr().err
