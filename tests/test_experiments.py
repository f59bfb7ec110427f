"""The experiment scripts (minparcae/experiments): the law fit on synthetic data, the divergence
rule, and a smoke run of each script at a toy size that checks the shape of what it writes."""

import csv
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from minparcae import cli
from minparcae.experiments import common, fixed_depth, isoflop, law, looping, stability

# ----------------------------------------------------------------------------- the law fit


@pytest.mark.parametrize("truth", [(3.2, 1.5, 0.6183), (4.1, 0.8, 0.05), (2.0, 3.0, 2.5),
                                   (5.0, -0.4, 0.9)])
def test_law_fit_recovers_known_parameters(truth):
    T = np.arange(1, 17)
    f = law.fit_law(T, law.law(T, *truth))
    assert np.allclose([f["L_inf"], f["Z"], f["z"]], truth, rtol=1e-8, atol=1e-10)
    assert f["mean_rel_error"] < 1e-12 and not f["at_bound"]


def test_law_fit_with_noise_and_unordered_points():
    rng = np.random.default_rng(0)
    T = rng.permutation(np.arange(1, 33))
    L = law.law(T, 3.5, 1.2, 0.3) + 1e-3 * rng.standard_normal(T.shape)
    f = law.fit_law(T, L)
    assert abs(f["L_inf"] - 3.5) < 5e-3 and abs(f["Z"] - 1.2) < 2e-2 and abs(f["z"] - 0.3) < 1e-2
    assert f["mean_rel_error"] < 1e-3


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


def test_bad_flags_are_rejected(corpus, tmp_path):
    with pytest.raises(SystemExit):
        stability.main(toy_args(corpus, tmp_path, "--lrs", "0.1,abc"))
    with pytest.raises(SystemExit):
        stability.main(toy_args(corpus, tmp_path, "--injections", "diagonal,cubic"))
    with pytest.raises(SystemExit):
        looping.main(toy_args(corpus, tmp_path, "--loops", "0,4"))
    with pytest.raises(SystemExit):
        fixed_depth.main(toy_args(corpus, tmp_path, "--d-model", "15"))


def test_a_missing_corpus_is_one_sentence(tmp_path):
    def main():
        looping.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        cli.run(main)
    assert str(exc.value).startswith("error: data path") and "does not exist" in str(exc.value)
