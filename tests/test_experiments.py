"""The experiment scripts (minparcae/experiments): the law fit on synthetic data, the divergence
rule, and a smoke run of each script at a toy size that checks the shape of what it writes."""

import csv
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from minparcae import cli, model
from minparcae.experiments import common, fixed_depth, isoflop, law, looping, stability

# ----------------------------------------------------------------------------- the law fit


@pytest.mark.parametrize("truth", [(3.2, 1.5, 0.6183), (4.1, 0.8, 0.05), (2.0, 3.0, 2.5),
                                   (5.0, -0.4, 0.9)])
def test_law_fit_recovers_known_parameters(truth):
    T = np.arange(1, 17)
    f = law.fit_law(T, law.law(T, *truth))
    assert np.allclose([f["L_inf"], f["Z"], f["z"]], truth, rtol=1e-8, atol=1e-10)
    assert f["mean_error"] < 1e-12 and f["effect_error"] < 1e-10 and not f["at_bound"]


def test_law_fit_with_noise_and_unordered_points():
    rng = np.random.default_rng(0)
    T = rng.permutation(np.arange(1, 33))
    L = law.law(T, 3.5, 1.2, 0.3) + 1e-3 * rng.standard_normal(T.shape)
    f = law.fit_law(T, L)
    assert abs(f["L_inf"] - 3.5) < 5e-3 and abs(f["Z"] - 1.2) < 2e-2 and abs(f["z"] - 0.3) < 1e-2
    assert f["mean_error"] < 1e-3 and f["effect_error"] < 2e-3


def test_law_fit_error_is_measured_against_the_effect_of_looping():
    """A flat line through a curve that falls 0.04 nats misses by a tiny fraction of L (about
    0.4%) but by a large fraction of the effect; the law's own error stays a small fraction."""
    T = np.arange(1, 17)
    L = law.law(T, 3.8, 0.05, 0.7)
    exact = law.fit_law(T, L)
    assert exact["effect_error"] < 1e-10
    noisy = law.fit_law(T, L + 5e-3 * np.where(T % 2 == 0, 1.0, -1.0))  # ±5e-3: 10-15% of 0.04
    assert 0.05 < noisy["effect_error"] < 0.3
    assert noisy["mean_error"] / L.mean() < 2e-3  # against L, the same fit looks near perfect


def test_law_fit_flags_a_straight_line_and_rejects_bad_input():
    T = np.arange(1, 9)
    assert law.fit_law(T, 4.0 - 0.01 * T)["at_bound"]  # no curvature: z runs to the range's end
    with pytest.raises(ValueError):
        law.fit_law([1, 2], [3.0, 2.0])
    with pytest.raises(ValueError):
        law.fit_law([1, 2, 3], [3.0, np.nan, 2.0])


def test_loops_to_plateau():
    Z, z = 0.8, 0.4
    T = law.loops_to_plateau(Z, z, tol=1e-3)
    assert abs(Z * np.exp(-z * T) - 1e-3) < 1e-15
    assert law.loops_to_plateau(-Z, z) == T  # a rising curve plateaus the same way
    assert law.loops_to_plateau(1e-4, z) == 0.0 and law.loops_to_plateau(0.0, z) == 0.0


# ----------------------------------------------------------------------------- divergence rule


def test_judge_counts_spikes_and_divergence():
    rng = np.random.default_rng(1)
    base = np.linspace(7.0, 4.0, 200) + 0.1 * rng.standard_normal(200)
    assert common.judge(base, warmup=20) == (False, 0, 10)
    recovered = base.copy()
    recovered[100:130] += 3.0  # one spike that comes back down
    diverged, spikes, _ = common.judge(recovered, warmup=20)
    assert not diverged and spikes == 1
    blown = base.copy()
    blown[150:] = 7.5  # up and stays up
    diverged, spikes, _ = common.judge(blown, warmup=20)
    assert diverged and spikes == 1
    # noise of 0.1 nat never counts, however long the run
    assert common.judge(5.0 + 0.1 * rng.standard_normal(2000), warmup=0)[:2] == (False, 0)


# ----------------------------------------------------------------------------- smoke runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    folder = root / "corpus"
    folder.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "heapq.py", "queue.py"):
        shutil.copy(stdlib / name, folder / name)
    return root


def toy_args(corpus, out, *extra):
    return ["--data", str(corpus / "corpus"), "--cache-dir", str(corpus / "cache"),
            "--vocab-size", "300", "--context", "16", "--d-model", "16", "--batch-size", "4",
            "--eval-batches", "1", "--out", str(out), *extra]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stability_smoke(corpus, tmp_path):
    out = tmp_path / "stability"
    stability.main(toy_args(corpus, out, "--steps", "6", "--lrs", "1e-3,1e-1", "--seeds", "0",
                            "--mean-recurrence", "3", "--backprop-depth", "2"))
    summary = read_csv(out / "summary.csv")
    assert [(r["injection"], float(r["lr"])) for r in summary] == [
        (k, lr) for k in ("diagonal", "linear", "add") for lr in (1e-3, 1e-1)]
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 6 and all(len(r["history"]["loss"]) == r["steps_done"] for r in runs)
    by_kind = {r["injection"]: r for r in runs if r["lr"] == 1e-3}
    assert max(by_kind["diagonal"]["history"]["rho"]) < 1
    assert set(by_kind["add"]["history"]["rho"]) == {1.0}
    assert len(read_csv(out / "runs.csv")) == 6
    assert "python -m minparcae.experiments.stability" in (out / "README.md").read_text()


def test_fixed_depth_smoke_in_two_processes(corpus, tmp_path):
    out = tmp_path / "fixed"
    fixed_depth.main(toy_args(corpus, out, "--steps", "4", "--seeds", "0", "--jobs", "2"))
    rows = read_csv(out / "summary.csv")
    assert [r["model"] for r in rows] == ["parcae", "fixed", "fixed-deep"]
    params = {r["model"]: int(r["params"]) for r in rows}
    assert params["fixed"] < params["parcae"] < 1.1 * params["fixed"] < params["fixed-deep"]
    assert [int(r["depth"]) for r in rows] == [1 + 2 * 4 + 1, 4, 10]
    flops = {r["model"]: float(r["train_tflops"]) for r in rows}
    assert flops["fixed"] < flops["parcae"]
    assert all(np.isfinite(float(r["val_loss"])) for r in rows)


def without_keys(src, dest, *keys):
    """An output folder `dest` whose runs.json is src's without `keys`, as an older version of
    the script wrote it; returns (dest, its records)."""
    dest.mkdir()
    records = json.loads((src / "runs.json").read_text())
    for r in records:
        for k in keys:
            del r[k]
    (dest / "runs.json").write_text(json.dumps(records))
    return dest, records


def test_fixed_depth_token_sweep_and_merge(corpus, tmp_path):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    pair = ("--models", "parcae,fixed", "--seeds", "0,1")
    # 4 × 16 = 64 tokens a step: budgets of 3 and 6 steps, one written with a suffix
    fixed_depth.main(toy_args(corpus, a, "--tokens", "192,0.384k", *pair))
    rows = read_csv(a / "summary.csv")
    assert [(int(r["budget"]), r["model"]) for r in rows] == [
        (192, "parcae"), (192, "fixed"), (384, "parcae"), (384, "fixed")]
    assert [int(r["tokens"]) for r in rows] == [192, 192, 384, 384]
    runs = json.loads((a / "runs.json").read_text())
    assert sorted((r["budget"], r["steps"], r["steps_done"]) for r in runs) == [(192, 3, 3)] * 4 + [(384, 6, 6)] * 4
    for r in runs:
        cfg = model.Config.from_dict(r["config"])
        assert r["train_flops"] == model.flops_per_token(cfg, train=True) * r["tokens"]
    cross = read_csv(a / "crossover.csv")
    assert [int(r["budget"]) for r in cross] == [192, 384] and all(r["lower"][-2:] == "/2" for r in cross)
    assert "rossover" in (a / "README.md").read_text()
    assert (a / "sweep.png").exists() == (common.pyplot() is not None)

    # a budget trained on its own joins the sweep; the report is remade from runs.json alone
    fixed_depth.main(toy_args(corpus, b, "--tokens", "768", *pair))
    fixed_depth.main(["--merge", f"{a},{b}", "--out", str(merged)])
    rows = read_csv(merged / "summary.csv")
    assert [int(r["budget"]) for r in rows] == [192, 192, 384, 384, 768, 768]
    assert rows[:4] == read_csv(a / "summary.csv")
    assert len(json.loads((merged / "runs.json").read_text())) == 12
    readme = (merged / "README.md").read_text()
    assert f"- {a}: 8 runs" in readme and f"- {b}: 4 runs" in readme and "--tokens 768" in readme
    # Parcae costs ~1.6× the fixed model's FLOPs a token: only its largest budget has no fixed
    # budget at or above its FLOPs
    assert [r["note"] for r in read_csv(merged / "matched_flops.csv")] == ["", "", "outside the sweep"]

    # an output written before budgets were recorded: its budget is the tokens it planned
    old, legacy = without_keys(b, tmp_path / "old", "budget", "command")
    fixed_depth.main(["--merge", f"{a},{old}", "--out", str(tmp_path / "with_old")])
    assert read_csv(tmp_path / "with_old" / "summary.csv") == rows

    with pytest.raises(ValueError, match="is in both"):
        fixed_depth.main(["--merge", f"{a},{a}", "--out", str(tmp_path / "twice")])
    with pytest.raises(ValueError, match="does not exist"):
        fixed_depth.main(["--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    for r in legacy:
        r["lr"] *= 2
    (old / "runs.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="different model settings"):
        fixed_depth.main(["--merge", f"{a},{old}", "--out", str(tmp_path / "other")])
    for argv in (["--merge", f"{a},{b}", "--out", str(a)], ["--merge", str(a), "--tokens", "1M"]):
        with pytest.raises(SystemExit):
            fixed_depth.main(argv)


def sweep_record(name, budget, seed, val, flops_per_token):
    return {"model": name, "budget": budget, "seed": seed, "val_loss": val, "diverged": val is None,
            "params": 1000, "tokens": budget, "train_flops": flops_per_token * budget, "seconds": 1.0,
            "config": {"n_prelude": 1, "n_recurrent": 2, "n_coda": 1, "mean_recurrence": 4,
                       "injection": "diagonal" if name == "parcae" else "none"}}


def test_fixed_depth_crossover_and_matched_flops():
    # (parcae seed 0, seed 1, fixed seed 0, seed 1) per budget; Parcae costs 1.5× the FLOPs a token
    losses = {1_000_000: (4.0, 4.1, 3.9, 4.0),    # Parcae higher in both seeds
              2_000_000: (3.7, 3.9, 3.8, 3.8),    # lower in one
              4_000_000: (3.5, 3.56, 3.6, 3.6)}   # lower in both: the crossover
    records = [sweep_record(name, b, seed, v[2 * i + seed], cost)
               for b, v in losses.items() for i, (name, cost) in enumerate((("parcae", 1.5), ("fixed", 1.0)))
               for seed in (0, 1)]
    rows, first = fixed_depth.crossover(records)
    assert first == 4_000_000 and [r["lower"] for r in rows] == ["0/2", "1/2", "2/2"]
    assert [r["difference"] for r in rows] == pytest.approx([0.1, 0.0, -0.07])
    assert [r["parcae_spread"] for r in rows] == pytest.approx([0.05, 0.1, 0.03])
    assert [r["fixed_spread"] for r in rows] == pytest.approx([0.05, 0.0, 0.0])
    assert fixed_depth.crossover_verdict(rows, first).startswith("Crossover at 4M tokens")

    matched = fixed_depth.matched_flops(records)
    # Parcae at 1M tokens spent the fixed model's FLOPs of 1.5M tokens: between its 1M and 2M points
    at_1M = 3.95 + (3.8 - 3.95) * np.log(1.5) / np.log(2)
    at_2M = 3.8 + (3.6 - 3.8) * np.log(1.5) / np.log(2)
    assert [m["fixed_tokens"] for m in matched] == [1_500_000, 3_000_000, 6_000_000]
    assert [m["fixed"] for m in matched[:2]] == pytest.approx([at_1M, at_2M], abs=1e-12)
    assert [m["difference"] for m in matched[:2]] == pytest.approx([4.05 - at_1M, 3.8 - at_2M], abs=1e-12)
    assert (matched[2]["fixed"], matched[2]["difference"], matched[2]["note"]) == (None, None, "outside the sweep")
    assert [m["note"] for m in matched[:2]] == ["", ""]

    # no crossover: a diverged Parcae seed never counts as lower, even beside a loss it beats
    records[-3].update(val_loss=None, diverged=True)  # Parcae, 4M, seed 1
    rows, first = fixed_depth.crossover(records)
    assert first is None and rows[-1]["lower"] == "1/2"
    assert fixed_depth.crossover_verdict(rows, first).startswith("No crossover within the sweep (1M to 4M tokens)")
    # one budget: nothing to interpolate between
    only = [r for r in records if r["budget"] == 1_000_000]
    assert fixed_depth.matched_flops(only)[0]["note"] == "outside the sweep"


@pytest.mark.parametrize("tokens, message", [
    ("1.5X", "comma-separated token counts"), ("3M,", "comma-separated token counts"),
    ("0", "at least 1 token"), ("-3M", "at least 1 token"), ("nan", "at least 1 token"),
    ("10", "less than one step"), ("128,150", "list each budget once")])
def test_bad_token_budgets_are_refused(corpus, tmp_path, capsys, tokens, message):
    with pytest.raises(SystemExit):
        fixed_depth.main(toy_args(corpus, tmp_path, f"--tokens={tokens}"))
    assert message in capsys.readouterr().err


def test_token_budgets_parse():
    assert fixed_depth.parse_tokens("1.5M,3e6,4.6M,200k,9m,1G,1000") == [
        1_500_000, 3_000_000, 4_600_000, 200_000, 9_000_000, 10**9, 1000]
    assert [fixed_depth.tokens_label(n) for n in (1_500_000, 4_600_000, 9_000_000, 1_536_000, 384)] == [
        "1.5M", "4.6M", "9M", "1.54M", "384"]


def test_looping_smoke(corpus, tmp_path):
    out = tmp_path / "looping"
    looping.main(toy_args(corpus, out, "--steps", "4", "--loops", "1,2"))
    fits = read_csv(out / "fits.csv")
    assert [int(r["mu"]) for r in fits] == [1, 2]
    curve = read_csv(out / "curve.csv")
    assert [int(r["T"]) for r in curve] == list(range(1, 9))
    assert len(curve[0]) == 3  # T and one column per model


def test_isoflop_smoke(corpus, tmp_path):
    out = tmp_path / "isoflop"
    isoflop.main(toy_args(corpus, out, "--steps", "3", "--loops", "1,4", "--budgets", "1,2"))
    rows = read_csv(out / "isoflop.csv")
    assert [(float(r["budget"]), int(r["mu"])) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for b in (1.0, 2.0):
        same = [r for r in rows if float(r["budget"]) == b]
        assert sum(r["best"] == "←" for r in same) == 1
        # equal budgets: the training FLOPs agree to within one step's worth
        f = [float(r["tflops"]) for r in same]
        assert abs(f[0] - f[1]) / max(f) < 0.2
        assert int(same[0]["steps"]) > int(same[1]["steps"])  # fewer loops, more tokens
    assert "One seed: the seed noise is not measured" in (out / "README.md").read_text()


def test_isoflop_seeds_and_merge(corpus, tmp_path):
    small, large, merged = tmp_path / "small", tmp_path / "large", tmp_path / "merged"
    base = ("--steps", "3", "--loops", "1,2", "--seeds", "0,1")
    isoflop.main(toy_args(corpus, small, *base, "--budgets", "1"))
    isoflop.main(toy_args(corpus, large, *base, "--budgets", "2"))
    isoflop.main(["--merge", f"{small},{large}", "--out", str(merged)])
    rows = read_csv(merged / "isoflop.csv")
    assert [(float(r["budget"]), int(r["mu"]), int(r["seeds"])) for r in rows] == [
        (1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    runs = json.loads((merged / "runs.json").read_text())
    for r in rows:
        vals = [x["val_loss"] for x in runs if (x["budget"], x["mu"]) == (float(r["budget"]), int(r["mu"]))]
        assert float(r["val_loss"]) == pytest.approx(np.mean(vals), abs=1e-12)
        assert float(r["val_spread"]) == pytest.approx((max(vals) - min(vals)) / 2, abs=1e-12)
    for b in ("1.0", "2.0"):  # each seed's lowest μ_rec is counted once per budget
        assert sum(int(r["lowest_in"].split("/")[0]) for r in rows if r["budget"] == b) == 2
    readme = (merged / "README.md").read_text()
    assert "Merged outputs" in readme and "--budgets 2" in readme and "Unit budget" in readme
    # the unit of records written before unit_flops was kept comes from their FLOPs
    old, _ = without_keys(small, tmp_path / "old", "unit_flops", "command")
    isoflop.main(["--merge", f"{old},{large}", "--out", str(tmp_path / "with_old")])
    assert read_csv(tmp_path / "with_old" / "isoflop.csv") == rows
    with pytest.raises(ValueError, match="is in both"):
        isoflop.main(["--merge", f"{small},{small}", "--out", str(tmp_path / "twice")])
    with pytest.raises(ValueError, match="not an output of isoflop"):
        isoflop.main(["--merge", str(_fixed_depth_output(corpus, tmp_path)), "--out", str(tmp_path / "x")])
    for argv in (["--merge", str(small), "--out", str(small)],
                 ["--merge", str(small), "--budgets", "4", "--out", str(tmp_path / "y")]):
        with pytest.raises(SystemExit):
            isoflop.main(argv)


def test_runs_are_saved_as_they_finish_and_resume_trains_only_the_rest(corpus, tmp_path, monkeypatch):
    out = tmp_path / "iso"
    argv = toy_args(corpus, out, "--steps", "3", "--loops", "1,2", "--seeds", "0,1", "--budgets", "1")
    isoflop.main(argv)
    whole = json.loads((out / "runs.json").read_text())
    assert [(r["seed"], r["mu"]) for r in whole] == [(0, 1), (0, 2), (1, 1), (1, 2)]  # seed by seed
    report = (out / "isoflop.csv").read_text()

    # a sweep that dies in its third run keeps the two that finished
    real, calls = common.train_run, []

    def dies_in_the_third(spec, dataset=None):
        calls.append(spec["name"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(spec, dataset)

    monkeypatch.setattr(common, "train_run", dies_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        isoflop.main(argv)
    part = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in part] == calls[:2] and not (out / "runs.json.tmp").exists()

    # --resume trains the other two only, and the report is that of the uninterrupted sweep
    calls.clear()
    monkeypatch.setattr(common, "train_run", lambda spec, dataset=None: calls.append(spec["name"])
                        or real(spec, dataset))
    isoflop.main(argv + ["--resume"])
    assert calls == [r["name"] for r in whole[2:]]
    again = json.loads((out / "runs.json").read_text())
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in whole]  # same seeds, same numbers
    assert (out / "isoflop.csv").read_text() == report
    assert "--resume" not in again[-1]["command"]
    calls.clear()
    isoflop.main(argv + ["--resume"])  # nothing left to train
    assert calls == []
    # runs made with other flags are not thrown away
    with pytest.raises(ValueError, match="which these flags do not make"):
        isoflop.main(toy_args(corpus, out, "--steps", "4", "--loops", "1,2", "--seeds", "0,1",
                              "--budgets", "1", "--resume"))
    with pytest.raises(SystemExit):
        isoflop.main(["--merge", str(out), "--out", str(tmp_path / "m"), "--resume"])


def _fixed_depth_output(corpus, tmp_path):
    out = tmp_path / "fd"
    fixed_depth.main(toy_args(corpus, out, "--steps", "2", "--seeds", "0", "--models", "fixed"))
    return out


def iso_rows(losses):
    """isoflop rows from {(budget, μ_rec, seed): val loss}."""
    return isoflop.rows_of([{"budget": b, "mu": mu, "seed": s, "val_loss": v, "diverged": v is None,
                             "steps": 10, "tokens": 100, "train_flops": 1e12}
                            for (b, mu, s), v in losses.items()])


def test_isoflop_verdict_says_whether_the_seeds_resolve_the_move():
    resolved = {(1, 1, 0): 3.0, (1, 2, 0): 3.1, (1, 1, 1): 3.02, (1, 2, 1): 3.15,
                (3, 1, 0): 2.9, (3, 2, 0): 2.8, (3, 1, 1): 2.95, (3, 2, 1): 2.85}
    text = isoflop.verdict(iso_rows(resolved))
    assert "1× → 1 (2/2), 3× → 2 (2/2)" in text and "move (1 → 2) is outside the seed noise" in text
    noisy = dict(resolved)
    noisy[(3, 2, 1)] = 2.99  # seed 1 prefers μ_rec 1 at 3×; the mean still prefers 2
    rows = iso_rows(noisy)
    assert [(r["mu"], r["lowest_in"], r["best"]) for r in rows if r["budget"] == 3] == [
        (1, "1/2", ""), (2, "1/2", "←")]
    assert "At 3× the best μ_rec is not the lowest in every seed" in isoflop.verdict(rows)
    still = {k: v for k, v in resolved.items() if k[0] == 1}
    still.update({(3, 1, 0): 2.7, (3, 2, 0): 2.8, (3, 1, 1): 2.75, (3, 2, 1): 2.85})
    assert "it does not move" in isoflop.verdict(iso_rows(still))
    one = {k: v for k, v in resolved.items() if k[0] == 3}  # one budget: nothing to move between
    text = isoflop.verdict(iso_rows(one))
    assert "3× → 2 (2/2)" in text and "no move to measure" in text and "does not move" not in text
    diverged = dict(resolved)
    diverged[(3, 2, 1)] = None  # a diverged run never counts as the lowest
    rows = iso_rows(diverged)
    assert [r["lowest_in"] for r in rows if r["budget"] == 3] == ["1/2", "1/2"]


def test_bad_flags_are_rejected(corpus, tmp_path):
    with pytest.raises(SystemExit):
        stability.main(toy_args(corpus, tmp_path, "--lrs", "0.1,abc"))
    with pytest.raises(SystemExit):
        stability.main(toy_args(corpus, tmp_path, "--injections", "diagonal,cubic"))
    with pytest.raises(SystemExit):
        looping.main(toy_args(corpus, tmp_path, "--loops", "0,4"))
    with pytest.raises(SystemExit):
        fixed_depth.main(toy_args(corpus, tmp_path, "--d-model", "15"))
    for flag, value in (("--lr", "nan"), ("--lr", "0"), ("--steps", "0"), ("--n-recurrent", "0"),
                        ("--n-coda", "-1"), ("--jobs", "1.5"), ("--mean-recurrence", "0")):
        with pytest.raises(SystemExit):
            fixed_depth.main(toy_args(corpus, tmp_path, flag, value))


def test_a_missing_corpus_is_one_sentence(tmp_path):
    def main():
        looping.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        cli.run(main)
    assert str(exc.value).startswith("error: data path") and "does not exist" in str(exc.value)
