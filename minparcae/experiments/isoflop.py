"""A miniature isoFLOP sweep: at a fixed training compute, which mean loop count is best?

    python -m minparcae.experiments.isoflop                     # budgets 1× and 3×, μ_rec 1, 2, 4, 8
    python -m minparcae.experiments.isoflop --jobs 2 --out docs/results/isoflop
    python -m minparcae.experiments.isoflop --budgets 1,3,9 --seeds 0,1,2 --jobs 2   # ~2 h on 2 cores
    python -m minparcae.experiments.isoflop --budgets 1,4,16 --loops 1,2,4,8,16 --device gpu

Looping more makes each token cost more FLOPs, so at a fixed budget a model that loops more sees
fewer tokens. The paper sweeps μ_rec at several budgets and finds that the loss-minimising μ_rec
grows with the budget (and that looping belongs in the compute-optimal recipe alongside parameters
and data). Here the unit budget is the training FLOPs of the μ_rec = 4 model over `--steps` steps;
each model of a budget trains for budget / (FLOPs per token × tokens per step) steps, with
μ_bwd = ⌈μ_rec / 2⌉, the trapezoid schedule scaled to its own length, and is evaluated at
T = μ_rec. FLOPs are model.flops_per_token (matmuls, the recurrent block at the mean depth).

With several seeds each (budget, μ_rec) reports the mean validation loss ± half its range, and in
how many seeds that μ_rec was the budget's lowest. A budget's best μ_rec is resolved when it is
the lowest in every seed; the best μ_rec's move with the budget counts as measured only when every
budget's best is resolved, and is otherwise reported as not resolved by these seeds.

Merging. `--merge DIR[,DIR...]` trains nothing: it reads the runs.json of earlier outputs of this
script and writes their report together to --out (a new folder): a larger budget trained on its
own joins the smaller ones, and a report is remade from runs.json alone.

Writes isoflop.md/.csv, runs.json, README.md and isoflop.png.
"""

import math
import time
from collections import defaultdict

import numpy as np

from .. import cli, model
from . import common

REFERENCE_MU = 4  # the unit budget: this μ_rec trained for --steps steps


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "isoflop", steps=500, seeds="0")
    ap.add_argument("--budgets", default="1,3", help="comma-separated multiples of the unit budget")
    ap.add_argument("--loops", default="1,2,4,8", help="comma-separated μ_rec to try at each budget")
    ap.add_argument("--merge", default=None, metavar="DIR[,DIR...]", help="train nothing: report "
                    "the runs.json of these earlier outputs together, in --out")
    common.model_flags(ap, lr=6e-3, layout=(1, 2, 1))
    args = common.parse(ap, argv)
    if args.merge is not None:
        records, counts = load_runs(common.merge_args(ap, args, "--budgets", "--loops"))
        common.save_records(args.out, records)
        report(records, args, None, merged=counts)
        return
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
    # largest budget first (--jobs ends on short runs); within a budget seed by seed, so that an
    # interrupted sweep (--resume) has whole seeds to compare
    for b in sorted(budgets, reverse=True):
        for seed in args.seeds:
            for mu in mus:
                cfg = cfg_for(mu)
                steps = max(1, round(b * unit / (model.flops_per_token(cfg) * tokens_per_step)))
                specs.append(common.spec(args, cfg, lr=args.lr, seed=seed, steps=steps,
                                         name=f"budget {b:g}× μ_rec={mu} seed={seed}",
                                         keep={"budget": b, "mu": mu, "unit_flops": unit,
                                               "command": args.command}))
    print(f"unit budget: {unit / 1e12:.3g} TFLOP ({args.steps} steps at μ_rec {REFERENCE_MU}); "
          f"{len(specs)} runs")
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None, out=args.out,
                             resume=args.resume)
    report(records, args, time.perf_counter() - t0, common.unigram(dataset))


def load_runs(dirs):
    """The records of earlier outputs (DIR/runs.json) and {DIR: its number of runs}, as
    common.load_runs checks them."""
    return common.load_runs(
        dirs, "isoflop", lambda r: {"budget", "mu"} <= set(r) and "model" not in r,
        key_of=lambda r: (r["budget"], r["mu"], r["seed"]),
        name_of=lambda k: f"budget {k[0]:g}× μ_rec={k[1]} seed {k[2]}",
        group_of=lambda r: f"μ_rec={r['mu']}")


def best_per_seed(records):
    """{(budget, seed): the μ_rec with the lowest validation loss among that seed's finished runs}."""
    best = {}
    for r in records:
        if r["val_loss"] is None:
            continue
        key = (r["budget"], r["seed"])
        if key not in best or r["val_loss"] < best[key][1]:
            best[key] = (r["mu"], r["val_loss"])
    return {k: mu for k, (mu, _) in best.items()}


def rows_of(records):
    """One row per (budget, μ_rec): the mean validation loss over seeds ± half its range, and in
    how many of the budget's seeds this μ_rec was the lowest; `best` marks each budget's lowest
    mean."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["budget"], r["mu"])].append(r)
    per_seed = best_per_seed(records)
    rows = []
    for (b, mu), runs in sorted(groups.items()):
        mean, half = common.spread(r["val_loss"] for r in runs)
        seeds = {s for bb, s in per_seed if bb == b}
        rows.append({"budget": b, "mu": mu, "steps": runs[0]["steps"], "tokens": runs[0]["tokens"],
                     "tflops": runs[0]["train_flops"] / 1e12, "seeds": len(runs),
                     "val_loss": mean, "val_spread": half,
                     "lowest_in": f"{sum(per_seed[(b, s)] == mu for s in seeds)}/{len(seeds)}",
                     "diverged": sum(r["diverged"] for r in runs), "best": ""})
    for b in {r["budget"] for r in rows}:
        ok = [r for r in rows if r["budget"] == b and r["val_loss"] is not None]
        if ok:
            min(ok, key=lambda r: r["val_loss"])["best"] = "←"
    return rows


def verdict(rows):
    """What the sweep says about the best μ_rec and its move with the budget, and whether the seeds
    resolve it."""
    best = sorted((r["budget"], r["mu"], r["lowest_in"]) for r in rows if r["best"])
    if not best:
        return "No run finished: no best μ_rec."
    text = ("Loss-minimising μ_rec per budget (lowest mean; seeds in which it is the lowest): "
            + ", ".join(f"{b:g}× → {mu} ({k})" for b, mu, k in best) + ".")
    counts = [tuple(int(x) for x in k.split("/")) for _, _, k in best]
    mus = [mu for _, mu, _ in best]
    if max(n for _, n in counts) < 2:
        return text + " One seed: the seed noise is not measured, so nothing is resolved."
    moves = " → ".join(str(m) for m in dict.fromkeys(mus))
    unresolved = [f"{b:g}×" for (b, _, _), (k, n) in zip(best, counts) if k < n]
    if unresolved:
        return text + (f" At {', '.join(unresolved)} the best μ_rec is not the lowest in every seed: "
                       f"its move ({moves}) is not resolved by these seeds.")
    if len(best) == 1:
        return text + (" The best μ_rec is the lowest in every seed; with one budget there is no "
                       "move to measure (merge other budgets with --merge).")
    if len(set(mus)) == 1:
        return text + f" The best μ_rec is {mus[0]} at every budget, in every seed: it does not move."
    return text + (f" Every budget's best μ_rec is the lowest in every seed, so its move ({moves}) "
                   "is outside the seed noise.")


COLUMNS = [("budget", "budget", "g"), ("μ_rec", "mu", "d"), ("steps", "steps", ","),
           ("tokens", "tokens", ","), ("train TFLOP", "tflops", ".3g"), ("seeds", "seeds", "d"),
           ("diverged", "diverged", "d"), ("val loss (mean)", "val_loss", ".4f"),
           ("± half range", "val_spread", ".4f"), ("lowest in seeds", "lowest_in", ""),
           ("best", "best", "")]


def report(records, args, seconds, baseline=None, merged=None):
    """Write the table, README.md and plot of `records`; `merged`: {folder: runs} they came from."""
    rows = rows_of(records)
    table = common.write_table(args.out, "isoflop", COLUMNS, rows)
    # records from before unit_flops was kept: every run's FLOPs are its budget × the unit, to
    # within one step
    unit = float(np.median([r.get("unit_flops") or r["train_flops"] / r["budget"] for r in records]))
    sections = [("Validation loss at fixed training FLOPs",
                 table + "\n" + f"Unit budget: {unit / 1e12:.3g} TFLOP. " + verdict(rows))]
    if merged:
        sections.append(common.merged_section(records, merged))
    common.write_report(args.out, "IsoFLOP sweep over μ_rec", args, sections, seconds, baseline)
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
            err = [r["val_spread"] or 0.0 for r in rows if r["budget"] == b and r["val_loss"] is not None]
            ax.errorbar(mus, vals, yerr=err, fmt="o-", capsize=3, color=f"C{i}", label=f"budget {b:g}×")
            j = min(range(len(vals)), key=vals.__getitem__)
            ax.plot([mus[j]], [vals[j]], "*", color=f"C{i}", ms=14)
    ax.set(xscale="log", xlabel="μ_rec", ylabel="validation loss",
           title="isoFLOP: validation loss against μ_rec\n(★: best per budget, bars: seed range)")
    ax.set_xticks(sorted({r["mu"] for r in rows}))
    ax.set_xticklabels([str(m) for m in sorted({r["mu"] for r in rows})])
    ax.minorticks_off()
    ax.legend()
    common.save_figure(plt, fig, f"{out}/isoflop.png")


if __name__ == "__main__":
    cli.run(main)
