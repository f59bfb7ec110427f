"""Stability sweep: the three injections across learning rates.

    python -m minparcae.experiments.stability                 # 3 injections × 4 rates × 2 seeds
    python -m minparcae.experiments.stability --jobs 2 --out docs/results/stability
    python -m minparcae.experiments.stability --lrs 1e-3,1e-2,1e-1 --seeds 0,1,2 --steps 1000

The paper's claim: with the loop's state map constrained to be stable (the diagonal injection,
ρ(Ā) < 1 by construction, lesson 8), training survives learning rates at which the unconstrained
injections (linear: h W_h + e W_e; add: h + e) diverge. Every run here has the same model, data,
batches and initialisation apart from the injection; the learning rate is held constant after a
10% warm-up (no decay that could rescue a run late), with AdamW and the trainer's gradient clip
of 1.0 (`--clip inf` turns it off). For each run the script records the loss, ρ of the state map
(ρ(Ā) for diagonal, the spectral radius of W_h for linear, 1 for add) and ‖h_T‖ (mean norm of the
loop's final state per token) at every step, and counts it as diverged by the rule in common.py (non-finite, or ending
more than 1 nat above its best smoothed loss).

Writes summary.md/.csv (one row per injection and rate), runs.md/.csv (one row per run),
runs.json (every step of every run), README.md and stability.png.
"""

import time
from collections import defaultdict

import numpy as np

from .. import cli
from . import common

INJECTIONS = ("diagonal", "linear", "add")


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "stability", steps=300)
    ap.add_argument("--lrs", default="2e-3,6e-3,2e-2,6e-2", help="comma-separated peak learning rates")
    ap.add_argument("--injections", default=",".join(INJECTIONS))
    ap.add_argument("--mean-recurrence", type=cli.positive_int, default=8, help="μ_rec")
    ap.add_argument("--backprop-depth", type=cli.positive_int, default=4, help="μ_bwd")
    ap.add_argument("--clip", type=float, default=1.0,
                    help="global gradient-norm clip, as in train.py; inf turns clipping off")
    args = common.parse(ap, argv)
    if not args.clip > 0:
        ap.error("--clip must be positive (inf: no clipping)")
    lrs = common.number_list(ap, args.lrs, "--lrs")
    kinds = args.injections.split(",")
    if not kinds or any(k not in INJECTIONS for k in kinds):
        ap.error(f"--injections must be from {', '.join(INJECTIONS)}")

    t0 = time.perf_counter()
    dataset = common.load_dataset(args)
    specs = []
    for kind in kinds:
        cfg = common.base_config(args, dataset.tokenizer.vocab_size, injection=kind, n_prelude=1,
                                 n_recurrent=1, n_coda=1, mean_recurrence=args.mean_recurrence,
                                 backprop_depth=args.backprop_depth)
        for lr in lrs:
            for seed in args.seeds:
                specs.append(common.spec(args, cfg, lr=lr, seed=seed, schedule="constant",
                                         clip=args.clip, name=f"{kind} lr={lr:g} seed={seed}",
                                         keep={"injection": kind}))
    print(f"{len(specs)} runs of {args.steps} steps; model: d {args.d_model}, 1 prelude, 1 "
          f"recurrent, 1 coda block, μ_rec {args.mean_recurrence}, μ_bwd {args.backprop_depth}; "
          f"gradient clip {args.clip:g}")
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None, summary=_summary,
                             out=args.out, resume=args.resume)
    report(records, args, time.perf_counter() - t0, common.unigram(dataset))


def _summary(rec):
    h = rec["history"]
    end = (f"val {rec['val_loss']:.4f}" if rec["val_loss"] is not None else rec["reason"])
    return (f"{end}{', diverged' if rec['diverged'] else ''}; max ρ {np.nanmax(h['rho']):.3f}, "
            f"max ‖h_T‖ {np.nanmax(h['state_norm']):.3g}")


def summarise(records):
    """One row per (injection, learning rate): diverged runs out of all, losses of the others,
    extremes of ρ and ‖h_T‖ over every run."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["injection"], r["lr"])].append(r)
    rows = []
    for (kind, lr), runs in groups.items():
        ok = [r for r in runs if not r["diverged"]]
        rho = [x for r in runs for x in r["history"]["rho"] if np.isfinite(x)]
        norm = [x for r in runs for x in r["history"]["state_norm"] if np.isfinite(x)]
        rows.append({
            "injection": kind, "lr": lr, "runs": len(runs),
            "diverged": f"{len(runs) - len(ok)}/{len(runs)}",
            "n_diverged": len(runs) - len(ok),
            "spikes": sum(r["spikes"] or 0 for r in runs),
            "final_loss": float(np.mean([r["final_loss"] for r in ok])) if ok else None,
            "val_loss": float(np.mean([r["val_loss"] for r in ok])) if ok else None,
            "max_rho": max(rho) if rho else None,
            "max_state_norm": max(norm) if norm else None,
            "nonfinite": any(r["final_loss"] is None for r in runs)})
    return rows


SUMMARY_COLUMNS = [("injection", "injection", ""), ("peak lr", "lr", "g"),
                   ("diverged", "diverged", ""), ("loss spikes", "spikes", "d"),
                   ("final train loss", "final_loss", ".3f"), ("val loss", "val_loss", ".3f"),
                   ("max ρ", "max_rho", ".4f"), ("max ‖h_T‖", "max_state_norm", ".3g")]
RUN_COLUMNS = [("injection", "injection", ""), ("peak lr", "lr", "g"), ("seed", "seed", "d"),
               ("steps done", "steps_done", "d"), ("diverged", "diverged_text", ""),
               ("loss spikes", "spikes", "d"), ("final train loss", "final_loss", ".3f"),
               ("val loss", "val_loss", ".3f"), ("final ρ", "final_rho", ".4f"),
               ("max ρ", "max_rho", ".4f"), ("final ‖h_T‖", "final_state_norm", ".3g"),
               ("max ‖h_T‖", "max_state_norm", ".3g")]


def trajectories(records, lr, seed, points=5):
    """ρ and ‖h_T‖ at a few steps of each injection's run at one rate and seed, as table rows."""
    rows = []
    for r in records:
        if r["lr"] != lr or r["seed"] != seed:
            continue
        h, n = r["history"], len(r["history"]["loss"])
        at = sorted({max(1, round(i * r["steps"] / (points - 1))) for i in range(points)})
        for s in at:
            if s <= n:
                rows.append({"injection": r["injection"], "step": s, "loss": h["loss"][s - 1],
                             "rho": h["rho"][s - 1], "state_norm": h["state_norm"][s - 1]})
    return rows


def report(records, args, seconds, baseline=None):
    for r in records:
        h = r["history"]
        r.update(diverged_text="yes" if r["diverged"] else "no", final_rho=h["rho"][-1],
                 max_rho=float(np.nanmax(h["rho"])), final_state_norm=h["state_norm"][-1],
                 max_state_norm=float(np.nanmax(h["state_norm"])))
    summary = common.write_table(args.out, "summary", SUMMARY_COLUMNS, summarise(records))
    runs = common.write_table(args.out, "runs", RUN_COLUMNS, records)
    top = max(r["lr"] for r in records)
    traj = common.write_table(args.out, "trajectory", [
        ("injection", "injection", ""), ("step", "step", "d"), ("train loss", "loss", ".3f"),
        ("ρ", "rho", ".4f"), ("‖h_T‖", "state_norm", ".3g")],
        trajectories(records, top, args.seeds[0]))
    common.write_report(args.out, "Stability sweep", args, [
        ("Per injection and learning rate", summary),
        (f"Trajectories at the highest rate ({top:g}, seed {args.seeds[0]})", traj),
        ("Every run", runs)], seconds, baseline)
    plot(records, args.out, baseline)


def plot(records, out, baseline=None):
    plt = common.pyplot()
    if plt is None:
        return
    colors = {"diagonal": "tab:blue", "linear": "tab:red", "add": "tab:green"}
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    kinds = sorted({r["injection"] for r in records}, key=list(colors).index)
    lrs = sorted({r["lr"] for r in records})
    for kind in kinds:
        xs, ys, bad = [], [], []
        for lr in lrs:
            runs = [r for r in records if r["injection"] == kind and r["lr"] == lr]
            ok = [r["final_loss"] for r in runs if not r["diverged"]]
            if ok:
                xs.append(lr)
                ys.append(np.mean(ok))
            if len(ok) < len(runs):
                bad.append(lr)
        ax[0, 0].plot(xs, ys, "o-", color=colors[kind], label=kind)
        top = max(ys) if ys else 0
        ax[0, 0].plot(bad, [top + 0.3] * len(bad), "x", color=colors[kind], ms=10)
    ax[0, 0].set(xscale="log", xlabel="peak learning rate", ylabel="final train loss",
                 title="final loss (× : at least one seed diverged)")
    ax[0, 0].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax[0, 0].minorticks_off()
    top = max(r["lr"] for r in records)
    for r in records:
        if r["lr"] != top:
            continue
        h, c = r["history"], colors[r["injection"]]
        steps = np.arange(1, len(h["loss"]) + 1)
        label = r["injection"] if r["seed"] == min(q["seed"] for q in records) else None
        ax[0, 1].plot(steps, h["loss"], color=c, lw=0.8, label=label)
        ax[1, 0].plot(steps, h["rho"], color=c, lw=0.8, label=label)
        ax[1, 1].plot(steps, h["state_norm"], color=c, lw=0.8, label=label)
    ax[0, 1].set(xlabel="step", ylabel="train loss", title=f"loss at lr {top:g} (all seeds)")
    ax[1, 0].set(xlabel="step", ylabel="ρ", title=f"ρ of the state map at lr {top:g}")
    ax[1, 1].set(xlabel="step", ylabel="‖h_T‖", yscale="log", title=f"‖h_T‖ at lr {top:g}")
    if baseline:
        for a in (ax[0, 0], ax[0, 1]):
            a.axhline(baseline, color="k", ls="--", lw=0.8, label="unigram (validation)")
    for a in ax.flat:
        a.legend()
    common.save_figure(plt, fig, f"{out}/stability.png")


if __name__ == "__main__":
    cli.run(main)
