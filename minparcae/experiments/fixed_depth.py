"""Parcae against fixed-depth transformers, at equal training tokens.

    python -m minparcae.experiments.fixed_depth
    python -m minparcae.experiments.fixed_depth --jobs 2 --out docs/results/fixed_depth
    python -m minparcae.experiments.fixed_depth --d-model 256 --n-head 4 --context 256 --steps 5000 --device gpu

The paper's claim: a looped Parcae model beats the transformer with the same parameters, because
looping buys depth (and compute) without parameters. Three models train on the same batches for
the same number of steps:

    parcae        n_p prelude, n_r recurrent, n_c coda blocks; the recurrent ones loop μ_rec times
                  on average (Poisson depths, μ_bwd steps with gradient)
    fixed         the same n_p + n_r + n_c blocks, each run once: the parameter-matched baseline
                  (Parcae has only its injection's B, C, A_log, dt_bias and one norm more)
    fixed-deep    n_p + n_r·μ_rec + n_c distinct blocks: the depth Parcae reaches at μ_rec, with
                  that many more parameters. Not the paper's comparison; it shows how much of the
                  depth's value the loop recovers with shared weights.

Every model gets the same optimiser, learning rate and schedule (train.py's: AdamW, trapezoid).
Reported: validation loss (Parcae at T = μ_rec), parameters, training FLOPs (matmul FLOPs per
token from model.flops_per_token × tokens).

Writes summary.md/.csv, runs.md/.csv, runs.json, README.md and fixed_depth.png.
"""

import time
from collections import defaultdict

import numpy as np

from .. import cli, model
from . import common


def configs(args, vocab_size):
    layout = dict(n_prelude=args.n_prelude, n_recurrent=args.n_recurrent, n_coda=args.n_coda)
    parcae = common.base_config(args, vocab_size, injection="diagonal", **layout,
                                mean_recurrence=args.mean_recurrence,
                                backprop_depth=args.backprop_depth)
    fixed = model.fixed_depth_baseline(parcae)
    deep = model.fixed_depth_baseline(common.base_config(
        args, vocab_size, n_prelude=args.n_prelude,
        n_recurrent=args.n_recurrent * args.mean_recurrence, n_coda=args.n_coda))
    return {"parcae": parcae, "fixed": fixed, "fixed-deep": deep}


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "fixed_depth", steps=1500)
    common.model_flags(ap, lr=6e-3, layout=(1, 2, 1))
    ap.add_argument("--mean-recurrence", type=int, default=4, help="μ_rec")
    ap.add_argument("--backprop-depth", type=int, default=2, help="μ_bwd")
    ap.add_argument("--models", default="parcae,fixed,fixed-deep")
    args = common.parse(ap, argv)
    t0 = time.perf_counter()
    dataset = common.load_dataset(args)
    cfgs = configs(args, dataset.tokenizer.vocab_size)
    names = args.models.split(",")
    if not names or any(n not in cfgs for n in names):
        ap.error(f"--models must be from {', '.join(cfgs)}")
    specs = [common.spec(args, cfgs[n], lr=args.lr, seed=seed, name=f"{n} seed={seed}")
             for seed in args.seeds for n in names]
    for n in names:
        print(f"{n}: {model.count_params(cfgs[n]):,} parameters, "
              f"{model.flops_per_token(cfgs[n]) / 1e6:.2f} MFLOP per training token")
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None)
    for r, s in zip(records, specs):
        r["model"] = s["name"].split()[0]
        r["params"] = model.count_params(model.Config.from_dict(s["config"]))
    common.save_records(args.out, records)
    report(records, args, time.perf_counter() - t0, common.unigram(dataset))


def summarise(records):
    groups = defaultdict(list)
    for r in records:
        groups[r["model"]].append(r)
    rows = []
    for name, runs in groups.items():
        ok = [r for r in runs if r["val_loss"] is not None]
        vals = [r["val_loss"] for r in ok]
        rows.append({"model": name, "params": runs[0]["params"],
                     "depth": _depth(runs[0]["config"]), "seeds": len(runs),
                     "diverged": sum(r["diverged"] for r in runs),
                     "val_loss": float(np.mean(vals)) if vals else None,
                     "val_spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else None,
                     "tokens": runs[0]["tokens"], "train_tflops": runs[0]["train_flops"] / 1e12,
                     "seconds": float(np.mean([r["seconds"] for r in runs]))})
    return rows


def _depth(cfg):
    """Blocks a token passes through at the training mean depth."""
    loops = cfg["mean_recurrence"] if cfg["injection"] != "none" else 1
    return cfg["n_prelude"] + cfg["n_recurrent"] * loops + cfg["n_coda"]


COLUMNS = [("model", "model", ""), ("parameters", "params", ","), ("depth (blocks)", "depth", "d"),
           ("seeds", "seeds", "d"), ("diverged", "diverged", "d"),
           ("val loss (mean)", "val_loss", ".4f"), ("± half range", "val_spread", ".4f"),
           ("train tokens", "tokens", ","), ("train TFLOP", "train_tflops", ".3g"),
           ("s / run", "seconds", ".0f")]
RUN_COLUMNS = [("model", "model", ""), ("seed", "seed", "d"), ("val loss", "val_loss", ".4f"),
               ("final train loss", "final_loss", ".4f"), ("s", "seconds", ".0f")]


def report(records, args, seconds, baseline=None):
    summary = common.write_table(args.out, "summary", COLUMNS, summarise(records))
    runs = common.write_table(args.out, "runs", RUN_COLUMNS, records)
    common.write_report(args.out, "Parcae against fixed-depth transformers", args,
                        [("Validation loss at equal tokens", summary), ("Every run", runs)],
                        seconds, baseline)
    plot(records, args.out)


def plot(records, out):
    plt = common.pyplot()
    if plt is None:
        return
    colors = {"parcae": "tab:blue", "fixed": "tab:orange", "fixed-deep": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in records:
        s = common.smoothed(np.asarray(r["history"]["loss"]), max(5, len(r["history"]["loss"]) // 50))
        label = None if r["model"] in seen else f"{r['model']} ({r['params'] / 1e3:.0f}k params)"
        seen.add(r["model"])
        ax.plot(np.arange(1, len(s) + 1), s, color=colors.get(r["model"]), lw=1, label=label)
    ax.set(xlabel="step", ylabel="train loss (smoothed)", title="equal tokens: Parcae vs fixed depth")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.legend()
    common.save_figure(plt, fig, f"{out}/fixed_depth.png")


if __name__ == "__main__":
    cli.run(main)
