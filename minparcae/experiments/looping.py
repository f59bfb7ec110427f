"""Test-time looping: validation loss against loop count T, the law L(T) = L∞ + Z·e^(−zT), and
where it plateaus for models trained at different μ_rec.

    python -m minparcae.experiments.looping                    # models at μ_rec 4 and 8
    python -m minparcae.experiments.looping --jobs 2 --out docs/results/looping
    python -m minparcae.experiments.looping --loops 2,4,8,16 --steps 5000 --device gpu

The paper's claims: a trained Parcae model's loss falls with the number of loops it runs at test
time along a saturating exponential, and the curve flattens near the depth it was trained at,
μ_rec; a model trained at a larger μ_rec keeps improving for longer and reaches a lower plateau.
Each model here trains with the same recipe (train.py's AdamW and trapezoid schedule) at its own
μ_rec, with μ_bwd = ⌈μ_rec / 2⌉; then every model is evaluated at T = 1 .. 4·max(μ_rec) on the same
validation batches (from the fixed evaluation state), and the law is fitted by least squares
(law.py) to each model's points T = 1 .. 4·μ_rec. "T to plateau" is the loop count after which the
fitted law stays within 0.001 nats of L∞: ln(|Z|/0.001)/z; "best T" is the measured minimum.

Writes fits.md/.csv (one row per model), curve.md/.csv (loss at every T), runs.json, README.md and
looping.png.
"""

import math
import time

import numpy as np

from .. import cli
from . import common, law


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "looping", steps=2000, seeds="0")
    ap.add_argument("--loops", default="4,8", help="comma-separated training μ_rec, one model each")
    common.model_flags(ap, lr=6e-3, layout=(1, 2, 1))
    args = common.parse(ap, argv)
    mus = common.number_list(ap, args.loops, "--loops", int)
    t0 = time.perf_counter()
    dataset = common.load_dataset(args)
    T_eval = list(range(1, 4 * max(mus) + 1))
    specs = []
    for mu in mus:
        cfg = common.base_config(args, dataset.tokenizer.vocab_size, n_prelude=args.n_prelude,
                                 n_recurrent=args.n_recurrent, n_coda=args.n_coda,
                                 mean_recurrence=mu, backprop_depth=math.ceil(mu / 2))
        for seed in args.seeds:
            specs.append(common.spec(args, cfg, lr=args.lr, seed=seed, eval_loops=T_eval,
                                     name=f"μ_rec={mu} seed={seed}", keep={"mu": mu}))
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None, out=args.out,
                             resume=args.resume)
    report(records, args, T_eval, time.perf_counter() - t0, common.unigram(dataset))


def fit_record(r):
    """Fit the law to the record's curve over T = 1 .. 4·μ_rec and describe the plateau."""
    mu, curve = r["mu"], {int(T): L for T, L in r["curve"].items()}
    T = np.arange(1, 4 * mu + 1)
    L = np.array([curve[t] for t in T])
    f = law.fit_law(T, L)
    best = int(T[np.argmin(L)])
    return {"model": r["name"], "mu": mu, "seed": r["seed"], **f,
            "T_plateau": law.loops_to_plateau(f["Z"], f["z"]),
            "L_1": curve[1], "L_mu": curve[mu], "L_4mu": curve[4 * mu], "best_T": best,
            "L_best": float(L.min()), "gain_to_mu": curve[1] - curve[mu],
            "gain_after_mu": curve[mu] - curve[4 * mu]}


FIT_COLUMNS = [("model", "model", ""), ("μ_rec", "mu", "d"), ("L(1)", "L_1", ".4f"),
               ("L(μ_rec)", "L_mu", ".4f"), ("L(4μ_rec)", "L_4mu", ".4f"), ("best T", "best_T", "d"), ("L∞", "L_inf", ".4f"),
               ("Z", "Z", ".4f"), ("z", "z", ".4f"), ("T to plateau", "T_plateau", ".1f"),
               ("fit error (nats)", "mean_error", ".1e"), ("fit error / (L(1) − L∞)", "effect_error", ".1%"),
               ("gain 1 → μ_rec", "gain_to_mu", ".4f"), ("gain μ_rec → 4μ_rec", "gain_after_mu", ".4f")]


def report(records, args, T_eval, seconds, baseline=None):
    ok = [r for r in records if r["val_loss"] is not None]
    if len(ok) < len(records):
        print(f"{len(records) - len(ok)} run(s) diverged and are left out of the fits.")
    fits = [fit_record(r) for r in ok]
    fit_text = common.write_table(args.out, "fits", FIT_COLUMNS, fits)
    rows = [{"T": T, **{r["name"]: r["curve"][T] for r in ok}} for T in T_eval]
    curve_text = common.write_table(args.out, "curve", [("T", "T", "d")] + [
        (r["name"], r["name"], ".4f") for r in ok], rows)
    bounds = [f["model"] for f in fits if f["at_bound"]]
    note = ("" if not bounds else
            f"\nThe best z for {', '.join(bounds)} is at the end of the search range: the points "
            "do not pin the law down.\n")
    common.write_report(args.out, "Test-time looping", args, [
        ("The law L(T) = L∞ + Z·e^(−zT), fitted per model", fit_text + note),
        ("Validation loss at each loop count T", curve_text)], seconds, baseline)
    plot(ok, fits, args.out)


def plot(records, fits, out):
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (r, f) in enumerate(zip(records, fits)):
        c = f"C{i}"
        T = np.array(sorted(r["curve"]))
        ax.plot(T, [r["curve"][t] for t in T], "o", color=c, ms=4, label=f"{r['name']} measured")
        Tf = np.linspace(1, 4 * r["mu"], 200)
        ax.plot(Tf, law.law(Tf, f["L_inf"], f["Z"], f["z"]), "-", color=c, lw=1,
                label=f"fit: L∞ {f['L_inf']:.3f}, z {f['z']:.2f}")
        ax.axvline(r["mu"], color=c, ls=":", lw=1)
    ax.set(xlabel="loop count T at test time", ylabel="validation loss",
           title="test-time looping (dotted: training μ_rec)")
    ax.legend(fontsize=8)
    common.save_figure(plt, fig, f"{out}/looping.png")


if __name__ == "__main__":
    cli.run(main)
