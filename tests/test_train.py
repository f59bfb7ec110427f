"""train.py and sample.py end to end on a tiny corpus: learning, exact resume, Ctrl-C, the
numerical guard, and the one-sentence errors a user can cause."""

import shutil
import signal

import numpy as np
import pytest

import sample
import train
from minparcae import checkpoint, cli, generate, runtime
from runhelp import make_corpus, read_log, signal_during, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


args = train_args


def test_training_lowers_the_loss(corpus, tmp_path):
    val_loss = train.main(args(corpus, tmp_path, "--steps", "30"))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 31))
    first = log[0]["loss"]
    assert abs(first - np.log(300)) < 0.3  # a fresh model predicts nearly uniformly
    assert val_loss < first - 1.0  # stated margin: at least 1 nat lower after 30 steps
    assert all(0 < r["rho"] < 1 for r in log)


def test_a_run_ends_with_samples_at_one_loop_step_and_at_mu_rec_side_by_side(corpus, tmp_path,
                                                                            capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "140")
    train.main(args(corpus, tmp_path, "--steps", "10", "--sample-tokens", "12"))
    out = capsys.readouterr().out
    head, columns = out.split("samples (", 1)[1].split("\n", 1)
    assert "the same random draws" in head
    rows = columns.splitlines()
    titles = [t.strip() for t in rows[0].split("│")]
    assert titles[0].startswith("T = 1 (one pass): val loss ") and titles[1].startswith("T = 4 (μ_rec)")
    losses = [float(t.rsplit(" ", 1)[1]) for t in titles]
    assert losses[0] != losses[1]
    # each column is what generate gives at its depth with the run's seed
    loaded = checkpoint.load_model(tmp_path)
    tok = loaded.tokenizer
    for i, n in enumerate((1, 4)):
        ids = generate.generate(loaded.params, loaded.cfg, [tok.encode(train.SAMPLE_PROMPT)], 12,
                                n_loops=n, temperature=train.SAMPLE_TEMPERATURE,
                                top_k=train.SAMPLE_TOP_K, rng=np.random.default_rng(0),
                                stop_id=tok.eot_id)[0]
        text = cli.side_by_side([tok.decode(tok.encode(train.SAMPLE_PROMPT) + ids)], ["x"], 70)
        body = [r.split("│")[i].rstrip() if "│" in r else "" for r in rows[2:]]
        assert "\n".join(text.splitlines()[2:]).rstrip() == "\n".join(
            b[1:] if i else b for b in body).rstrip()


def test_a_fixed_depth_run_ends_with_one_sample(corpus, tmp_path, capsys):
    train.main(args(corpus, tmp_path, "--steps", "2", "--sample-tokens", "5", "--injection", "none"))
    out = capsys.readouterr().out
    assert "sample:\n" in out and "T = 1" not in out


def test_side_by_side_columns():
    text = cli.side_by_side(["def f(x):\n\treturn x\n" + "a" * 50, "b\x07"], ["left", "right"], 83)
    rows = text.splitlines()
    assert rows[0] == "left".ljust(40) + " │ right"
    assert rows[1] == "─" * 40 + " │ " + "─" * 40
    assert rows[3].startswith("    return x ")  # a tab is four spaces
    assert rows[2].endswith("│ b?")  # unprintable characters are shown as ?
    assert rows[4] == "a" * 40 + " │" and rows[5] == ("↳ " + "a" * 10).ljust(40) + " │"  # continued
    assert all(len(r) <= 83 for r in rows)
    narrow = cli.side_by_side(["x", "y"], ["L", "R"], 60)  # too narrow: one after the other
    assert narrow == "L\nx\n\nR\ny"


def crash_at(monkeypatch, n_calls, exc):
    """Make the n-th training step's gradient raise `exc` (a crash, or Ctrl-C with
    KeyboardInterrupt)."""
    real, calls = runtime.loss_and_grads, {"n": 0}

    def loss_and_grads(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise exc
        return real(*a, **kw)

    monkeypatch.setattr(train.runtime, "loss_and_grads", loss_and_grads)


def comparable(log):
    return [(r["step"], r["loss"], r["grad_norm"], r["rho"], r.get("val_loss")) for r in log]


def test_resume_after_a_crash_reproduces_the_run(corpus, tmp_path, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    final = train.main(args(corpus, full, "--steps", "20"))
    crash_at(monkeypatch, 15, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(args(corpus, crashed, "--steps", "20"))  # dies after the step-10 checkpoint
    assert checkpoint.load(crashed / "ckpt.npz")[2]["step"] == 10
    monkeypatch.undo()
    resumed = train.main(args(corpus, crashed, "--steps", "20", "--resume"))
    assert resumed == final
    assert comparable(read_log(crashed)) == comparable(read_log(full))  # to the last digit


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_it_and_resume_continues(corpus, tmp_path, monkeypatch,
                                                                   signum):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    # what the process had before (Python's handler, or SIG_IGN in a background job of a shell)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    final = train.main(args(corpus, full, "--steps", "14", "--optimizer", "muon"))
    signal_during(monkeypatch, train.runtime, "loss_and_grads", 7, signum)
    name = signal.Signals(signum).name
    with pytest.raises(SystemExit, match=f"{name} at step 7: checkpoint saved to "
                       f"{stopped / 'ckpt.npz'}; continue with: python train.py --out {stopped} "
                       "--resume"):
        train.main(args(corpus, stopped, "--steps", "14", "--optimizer", "muon"))
    assert checkpoint.load(stopped)[2]["step"] == 7  # the step in progress finished, whole
    assert [r["step"] for r in read_log(stopped)] == list(range(1, 8))
    monkeypatch.undo()
    assert train.main(args(corpus, stopped, "--steps", "14", "--resume")) == final
    assert comparable(read_log(stopped)) == comparable(read_log(full))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    real = runtime.loss_and_grads
    calls = {"n": 0}

    def loss_and_grads(*a, **kw):
        calls["n"] += 1
        loss, grads, diag = real(*a, **kw)
        if calls["n"] == 3 or calls["n"] > 12:  # one bad step, later a run of bad steps
            grads["wte"][0, 0] = np.nan
        return loss, grads, diag

    monkeypatch.setattr(train.runtime, "loss_and_grads", loss_and_grads)
    with pytest.raises(SystemExit) as err:
        train.main(args(corpus, tmp_path, "--steps", "40"))
    msg = str(err.value)
    assert "5 non-finite steps in a row at step 11" in msg
    assert f"the last good checkpoint is {tmp_path / 'ckpt.npz'} (step 10)" in msg
    assert read_log(tmp_path)[-1]["skipped"] == 1  # the isolated bad step was skipped, counted


def test_checkpoint_errors_are_one_sentence(corpus, tmp_path):
    train.main(args(corpus, tmp_path, "--steps", "10"))
    with pytest.raises(SystemExit, match="already holds a run: pass --resume"):
        train.main(args(corpus, tmp_path, "--steps", "10"))
    with pytest.raises(checkpoint.CheckpointError,
                       match="--injection linear differs from this run's diagonal: resume without"):
        train.main(args(corpus, tmp_path, "--steps", "20", "--resume", "--injection", "linear"))
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (tmp_path / "ckpt.npz").read_bytes()
    (broken / "ckpt.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="is damaged or truncated"):
        train.main(args(corpus, broken, "--steps", "20", "--resume"))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        sample.main(["--ckpt", str(tmp_path / "nowhere")])


def test_missing_data_is_a_clear_error(tmp_path):
    from minparcae.data import DataError
    with pytest.raises(DataError, match="does not exist"):
        train.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])


def test_sample_runs_on_a_fresh_checkpoint(corpus, tmp_path, capsys):
    train.main(args(corpus, tmp_path, "--steps", "10"))
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path), "--prompt", "def ", "--loops", "1,2,8", "--tokens", "12",
                 "--eval-batches", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("--- loops")]
    assert [h.split(":")[0] for h in heads] == ["--- loops 1", "--- loops 2", "--- loops 8"]
    assert all("val_loss" in h and "tokens/s" in h for h in heads)


def test_sample_decoding_options(corpus, tmp_path, capsys):
    """--speculative gives plain greedy decoding's text and says how many drafts it kept; the
    approximate options report their own validation loss; bad combinations are usage errors."""
    train.main(args(corpus, tmp_path, "--steps", "10"))
    base = ["--ckpt", str(tmp_path), "--loops", "4", "--tokens", "40", "--temperature", "0",
            "--eval-batches", "1", "--device", "cpu"]
    texts = {}
    for name, extra in (("plain", []), ("speculative", ["--speculative", "3,1"]),
                        ("recompute", ["--past-context", "recompute"])):
        capsys.readouterr()
        sample.main(base + extra)
        out = capsys.readouterr().out
        texts[name] = out[out.index("--- loops"):].split("\n", 1)[1]
        if name == "speculative":
            assert "drafted tokens kept" in out
    assert texts["speculative"] == texts["plain"]
    capsys.readouterr()
    sample.main(base + ["--kv-slots", "1", "--warm-start", "--adaptive", "kl"])
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--- loops"))
    assert "(kl exit, 1 KV slots, warm start)" in head and "mean loops" in head
    capsys.readouterr()
    sample.main(base + ["--kv-slots", "8"])  # k ≥ the loop count is the exact per-step cache
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--- loops"))
    assert "KV slots" not in head
    for bad in (["--speculative", "3"], ["--speculative", "2,4"], ["--speculative", "2,1", "--kv-slots", "2"],
                ["--no-cache", "--warm-start"], ["--kv-slots", "0"], ["--epsilon", "0.1"],
                ["--speculative", "2,1", "--past-context", "recompute"]):
        with pytest.raises(SystemExit):
            sample.main(base + bad)


def test_sample_drops_loop_options_on_a_fixed_depth_checkpoint(corpus, tmp_path, capsys):
    train.main(args(corpus, tmp_path, "--steps", "2", "--injection", "none"))
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path), "--loops", "2,8", "--adaptive", "kl", "--kv-slots", "1",
                 "--tokens", "5", "--eval-batches", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "(a fixed-depth baseline has no loop: --loops, --adaptive, --kv-slots dropped)" in out
    heads = [line for line in out.splitlines() if line.startswith("--- loops")]
    assert len(heads) == 1 and "mean loops" not in heads[0] and "KV slots" not in heads[0]


def test_sample_without_the_data_still_samples(corpus, tmp_path, capsys):
    train.main(args(corpus, tmp_path / "run", "--steps", "10"))
    moved = tmp_path / "elsewhere.npz"
    shutil.copy(tmp_path / "run" / "ckpt.npz", moved)
    ckpt = checkpoint.load(moved)
    params, opt, meta = ckpt
    meta["data"]["folder"] = str(tmp_path / "gone")
    checkpoint.save(moved, params, opt, {k: v for k, v in meta.items() if k != "format"})
    capsys.readouterr()
    sample.main(["--ckpt", str(moved), "--tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "printing samples only" in out and "--- loops 4" in out


def test_decoding_benchmark_on_a_fresh_checkpoint(corpus, tmp_path, capsys):
    """bench/bench_decoding.py writes one row per decoder; the exact decoders' losses agree, the
    speculative rows show the full-depth loss, and fewer KV slots cost fewer bytes."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_decoding.py"
    spec = importlib.util.spec_from_file_location("bench_decoding", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train.main(args(corpus, tmp_path / "run", "--steps", "10"))
    out = tmp_path / "decoding.md"
    bench.main(["--ckpt", str(tmp_path / "run"), "--tokens", "6", "--repeats", "1",
                "--eval-batches", "1", "--device", "cpu", "--out", str(out)])
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("decoder", "---"):
            rows[cells[0]] = cells
    T = checkpoint.load_model(tmp_path / "run").cfg.mean_recurrence
    assert len(rows) == len(bench.rows_for(T, 1e-2, [0.1, 0.3])) == 16
    loss = {k: float(v[3]) for k, v in rows.items()}
    assert loss[f"no cache, T={T}"] == loss[f"per-step cache, T={T}"]
    speculative = [k for k in rows if k.startswith("speculative")]
    assert speculative and all(loss[k] == loss[f"per-step cache, T={2 * T}"] for k in speculative)
    assert all(rows[k][5].endswith("%") for k in speculative)
    kv = {k: int(v[4].replace(",", "")) for k, v in rows.items() if v[4] != "—"}
    one, two, full = (kv[f"KL exit ε=0.01, ≤{2 * T}, {n}"] for n in ("1 slot", "2 slots", "per-step cache"))
    assert one < two < full == kv[f"per-step cache, T={2 * T}"]
    assert kv[f"state exit ε=0.1, ≤{2 * T}, 1 slot"] == one
    assert "Past the context" in out.read_text()
    bench.main(["--ckpt", str(tmp_path / "run"), "--tokens", "2", "--repeats", "1", "--eval-batches",
                "1", "--device", "cpu", "--long", "0", "--out", str(out)])
    assert "Past the context" not in out.read_text()  # --long 0: no second table
