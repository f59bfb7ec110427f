"""A miniature isoFLOP sweep: at a fixed training compute, which mean loop count is best?

    python -m minparcae.experiments.isoflop                     # budgets 1× and 3×, μ_rec 1, 2, 4, 8
    python -m minparcae.experiments.isoflop --jobs 2 --out docs/results/isoflop
    python -m minparcae.experiments.isoflop --budgets 1,4,16 --loops 1,2,4,8,16 --device gpu

Looping more makes each token cost more FLOPs, so at a fixed budget a model that loops more sees
fewer tokens. The paper sweeps μ_rec at several budgets and finds that the loss-minimising μ_rec
grows with the budget (and that looping belongs in the compute-optimal recipe alongside parameters
and data). Here the unit budget is the training FLOPs of the μ_rec = 4 model over `--steps` steps;
each model of a budget trains for budget / (FLOPs per token × tokens per step) steps, with
μ_bwd = ⌈μ_rec / 2⌉, the trapezoid schedule scaled to its own length, and is evaluated at
T = μ_rec. FLOPs are model.flops_per_token (matmuls, the recurrent block at the mean depth).

Writes isoflop.md/.csv, runs.json, README.md and isoflop.png.
"""

import math
import time
from collections import defaultdict

from .. import cli, model
from . import common

REFERENCE_MU = 4  # the unit budget: this μ_rec trained for --steps steps


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "isoflop", steps=500, seeds="0")
    ap.add_argument("--budgets", default="1,3", help="comma-separated multiples of the unit budget")
    ap.add_argument("--loops", default="1,2,4,8", help="comma-separated μ_rec to try at each budget")
    common.model_flags(ap, lr=6e-3, layout=(1, 2, 1))
    args = common.parse(ap, argv)
    budgets = common.number_list(ap, args.budgets, "--budgets")
    mus = common.number_list(ap, args.loops, "--loops", int)
    t0 = time.perf_counter()
    dataset = common.load_dataset(args)

    def cfg_for(mu):
        return common.base_config(args, dataset.tokenizer.vocab_size, n_prelude=args.n_prelude,
                                  n_recurrent=args.n_recurrent, n_coda=args.n_coda,
                                  mean_recurrence=mu, backprop_depth=math.ceil(mu / 2))

    tokens_per_step = args.batch_size * args.context
    unit = model.flops_per_token(cfg_for(REFERENCE_MU)) * tokens_per_step * args.steps
    specs = []
    for b in budgets:
        for mu in mus:
            cfg = cfg_for(mu)
            steps = max(1, round(b * unit / (model.flops_per_token(cfg) * tokens_per_step)))
            for seed in args.seeds:
                s = common.spec(args, cfg, lr=args.lr, seed=seed, steps=steps,
                                name=f"budget {b:g}× μ_rec={mu} seed={seed}")
                s["budget"] = b
                specs.append(s)
    print(f"unit budget: {unit / 1e12:.3g} TFLOP ({args.steps} steps at μ_rec {REFERENCE_MU}); "
          f"{len(specs)} runs")
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None)
    for r, s in zip(records, specs):
        r.update(budget=s["budget"], mu=s["config"]["mean_recurrence"])
    common.save_records(args.out, records)
    report(records, args, unit, time.perf_counter() - t0, common.unigram(dataset))


def rows_of(records):
    """One row per (budget, μ_rec), losses averaged over seeds; `best` marks each budget's
    lowest validation loss."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["budget"], r["mu"])].append(r)
    rows = []
    for (b, mu), runs in sorted(groups.items()):
        vals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
        rows.append({"budget": b, "mu": mu, "steps": runs[0]["steps"], "tokens": runs[0]["tokens"],
                     "tflops": runs[0]["train_flops"] / 1e12,
                     "val_loss": sum(vals) / len(vals) if vals else None,
                     "diverged": sum(r["diverged"] for r in runs), "best": ""})
    for b in {r["budget"] for r in rows}:
        ok = [r for r in rows if r["budget"] == b and r["val_loss"] is not None]
        if ok:
            min(ok, key=lambda r: r["val_loss"])["best"] = "←"
    return rows


COLUMNS = [("budget", "budget", "g"), ("μ_rec", "mu", "d"), ("steps", "steps", ","),
           ("tokens", "tokens", ","), ("train TFLOP", "tflops", ".3g"), ("diverged", "diverged", "d"),
           ("val loss", "val_loss", ".4f"), ("best", "best", "")]


def report(records, args, unit, seconds, baseline=None):
    rows = rows_of(records)
    table = common.write_table(args.out, "isoflop", COLUMNS, rows)
    best = {r["budget"]: r["mu"] for r in rows if r["best"]}
    verdict = (f"Unit budget: {unit / 1e12:.3g} TFLOP. Loss-minimising μ_rec per budget: "
               + ", ".join(f"{b:g}× → {mu}" for b, mu in sorted(best.items())) + ".")
    common.write_report(args.out, "IsoFLOP sweep over μ_rec", args,
                        [("Validation loss at fixed training FLOPs", table + "\n" + verdict)],
                        seconds, baseline)
    plot(rows, args.out)


def plot(rows, out):
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, b in enumerate(sorted({r["budget"] for r in rows})):
        pts = [(r["mu"], r["val_loss"]) for r in rows if r["budget"] == b and r["val_loss"] is not None]
        if pts:
            mus, vals = zip(*pts)
            ax.plot(mus, vals, "o-", color=f"C{i}", label=f"budget {b:g}×")
            j = min(range(len(vals)), key=vals.__getitem__)
            ax.plot([mus[j]], [vals[j]], "*", color=f"C{i}", ms=14)
    ax.set(xscale="log", xlabel="μ_rec", ylabel="validation loss",
           title="isoFLOP: validation loss against μ_rec (★: best per budget)")
    ax.set_xticks(sorted({r["mu"] for r in rows}))
    ax.set_xticklabels([str(m) for m in sorted({r["mu"] for r in rows})])
    ax.minorticks_off()
    ax.legend()
    common.save_figure(plt, fig, f"{out}/isoflop.png")


if __name__ == "__main__":
    cli.run(main)
