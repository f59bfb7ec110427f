"""Parcae against fixed-depth transformers, at equal training tokens, at one budget or a sweep.

    python -m minparcae.experiments.fixed_depth
    python -m minparcae.experiments.fixed_depth --tokens 1.5M,3M,4.6M --jobs 2
    python -m minparcae.experiments.fixed_depth --tokens 9M --jobs 2 --out runs/experiments/fixed_depth_9M
    python -m minparcae.experiments.fixed_depth --merge runs/experiments/fixed_depth,runs/experiments/fixed_depth_9M --out runs/experiments/fixed_depth_sweep
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

Token budgets. Without --tokens there is one budget, --steps × --batch-size × --context tokens.
`--tokens 1.5M,3M,4.6M` (plain counts, 1.5e6, or a k, M or G suffix for thousands, millions,
billions) replaces --steps: every model and seed trains once per budget B, for
round(B / (batch size × context)) steps. A token budget is a whole training run: each run gets its
own full trapezoid schedule sized to its budget (warm-up over its first 10%, cooldown to 0 over its
last half), so the 3M point is a fresh run twice as long, not the 1.5M run continued. The largest
budget trains first, so that with --jobs the short runs fill the end.

Merging. `--merge DIR[,DIR...]` trains nothing: it reads the runs.json of earlier outputs of this
script and writes the report of all their runs together to --out (a new folder). That is how a
budget trained on its own (the 9M point above) joins a sweep, and how a report is remade from
runs.json alone. The outputs must have the same model settings, and no run may appear twice.

Reported: per (model, budget), parameters, depth, validation loss (Parcae at T = μ_rec) as the mean
± half range over seeds, tokens, and training FLOPs (matmul FLOPs per token from
model.flops_per_token × tokens). The crossover: at each budget, Parcae − fixed, and the first
budget at which Parcae is lower in every seed. At matched FLOPs: Parcae spends more FLOPs per
token than the fixed model, so each Parcae point is set against the fixed model's loss at the same
training FLOPs, interpolated linearly in log FLOPs between the fixed model's budgets ("outside the
sweep" beyond them: no extrapolation).

Writes summary, crossover, matched_flops and runs (.md and .csv), runs.json, README.md,
fixed_depth.png (training curves) and, with two budgets or more, sweep.png (validation loss against
tokens and against training FLOPs).
"""

import math
import time
from collections import defaultdict

import numpy as np

from .. import cli, model
from . import common

MODELS = ("parcae", "fixed", "fixed-deep")
SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


def configs(args, vocab_size):
    layout = dict(n_prelude=args.n_prelude, n_recurrent=args.n_recurrent, n_coda=args.n_coda)
    parcae = common.base_config(args, vocab_size, injection="diagonal", **layout,
                                mean_recurrence=args.mean_recurrence,
                                backprop_depth=args.backprop_depth)
    fixed = model.fixed_depth_baseline(parcae)
    deep = model.fixed_depth_baseline(common.base_config(
        args, vocab_size, n_prelude=args.n_prelude,
        n_recurrent=args.n_recurrent * args.mean_recurrence, n_coda=args.n_coda))
    return dict(zip(MODELS, (parcae, fixed, deep)))


def main(argv=None):
    ap = common.parser(__doc__.split("\n\n")[0], "fixed_depth", steps=1500)
    common.model_flags(ap, lr=6e-3, layout=(1, 2, 1))
    ap.add_argument("--mean-recurrence", type=cli.positive_int, default=4, help="μ_rec")
    ap.add_argument("--backprop-depth", type=cli.positive_int, default=2, help="μ_bwd")
    ap.add_argument("--models", default="parcae,fixed,fixed-deep")
    ap.add_argument("--tokens", default=None, help="comma-separated training-token budgets, e.g. "
                    "1.5M,3M,4.6M (k, M, G suffixes or plain numbers); replaces --steps")
    ap.add_argument("--merge", default=None, metavar="DIR[,DIR...]", help="train nothing: report "
                    "the runs.json of these earlier outputs together, in --out")
    args = common.parse(ap, argv)
    if args.merge is not None:
        dirs = common.merge_args(ap, args, "--tokens")
        records, counts = load_runs(dirs)
        common.save_records(args.out, records)
        report(records, args, None, merged=counts)
        return
    names = args.models.split(",")
    if not names or any(n not in MODELS for n in names):
        ap.error(f"--models must be from {', '.join(MODELS)}")
    budgets = steps_per_budget(ap, args)
    t0 = time.perf_counter()
    dataset = common.load_dataset(args)
    cfgs = configs(args, dataset.tokenizer.vocab_size)
    specs = []
    for budget, steps in sorted(budgets.items(), reverse=True):  # longest first: --jobs ends on short runs
        for seed in args.seeds:
            for n in names:
                specs.append(common.spec(args, cfgs[n], lr=args.lr, seed=seed, steps=steps,
                                         name=f"{n} {tokens_label(budget)} seed={seed}",
                                         keep={"model": n, "budget": budget,
                                               "params": model.count_params(cfgs[n]),
                                               "command": args.command}))
    for n in names:
        print(f"{n}: {model.count_params(cfgs[n]):,} parameters, "
              f"{model.flops_per_token(cfgs[n]) / 1e6:.2f} MFLOP per training token")
    print("budgets: " + ", ".join(f"{tokens_label(b)} tokens = {s:,} steps" for b, s in budgets.items())
          + f"; {len(specs)} runs")
    records = common.run_all(specs, args.jobs, dataset if args.jobs == 1 else None, out=args.out,
                             resume=args.resume)
    report(records, args, time.perf_counter() - t0, common.unigram(dataset))


# ----------------------------------------------------------------------------- token budgets

def parse_tokens(text):
    """Token counts from --tokens ("1.5M,3M", "1500000,3e6", "200k"), as integers. A ValueError
    says what is wrong."""
    budgets = []
    for item in text.split(","):
        item = item.strip()
        scale = SUFFIXES.get(item[-1:].lower(), 1)
        try:
            n = float(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ValueError(f"--tokens must be comma-separated token counts such as 1.5M,3M or "
                             f"1.5e6, not {text!r}") from None
        if not (math.isfinite(n) and n >= 1):
            raise ValueError(f"--tokens must be at least 1 token each, not {item}")
        budgets.append(round(n))
    return budgets


def steps_per_budget(ap, args):
    """{token budget: optimiser steps}: one budget from --steps, or one per --tokens entry."""
    tokens_per_step = args.batch_size * args.context
    if args.tokens is None:
        return {args.steps * tokens_per_step: args.steps}
    try:
        budgets = parse_tokens(args.tokens)
    except ValueError as err:
        ap.error(str(err))
    steps = {}
    for b in budgets:
        n = round(b / tokens_per_step)
        if n < 1:
            ap.error(f"--tokens {b} is less than one step (--batch-size × --context = "
                     f"{tokens_per_step} tokens)")
        if n in steps.values():
            ap.error(f"--tokens lists {tokens_label(b)} and another budget of the same {n} steps "
                     f"({tokens_per_step} tokens a step): list each budget once")
        steps[b] = n
    return steps


def tokens_label(n):
    """1500000 → "1.5M"."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def load_runs(dirs):
    """The records of earlier outputs (DIR/runs.json) and {DIR: its number of runs}, as
    common.load_runs checks them. Records written before --tokens existed have no budget: theirs
    is the tokens their steps were planned for."""
    def ours(r):
        if r.get("model") not in MODELS:
            return False
        if "budget" not in r:
            r["budget"] = r["tokens"] // r["steps_done"] * r["steps"]
        return True

    return common.load_runs(
        dirs, "fixed_depth", ours, key_of=lambda r: (r["model"], r["budget"], r["seed"]),
        name_of=lambda k: f"{k[0]} at {tokens_label(k[1])} tokens, seed {k[2]},",
        group_of=lambda r: r["model"])


# ----------------------------------------------------------------------------- tables

def summarise(records):
    """One row per (budget, model), in budget order then MODELS order; the loss is the mean over
    the seeds that finished, with half their range."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["budget"], r["model"])].append(r)
    rows = []
    for (budget, name), runs in sorted(groups.items(), key=lambda g: (g[0][0], MODELS.index(g[0][1]))):
        mean, half = common.spread(r["val_loss"] for r in runs)
        rows.append({"budget": budget, "model": name, "params": runs[0]["params"],
                     "depth": _depth(runs[0]["config"]), "seeds": len(runs),
                     "diverged": sum(r["diverged"] for r in runs),
                     "val_loss": mean, "val_spread": half,
                     "tokens": max(r["tokens"] for r in runs),
                     "train_tflops": max(r["train_flops"] for r in runs) / 1e12,
                     "seconds": float(np.mean([r["seconds"] for r in runs]))})
    return rows


def _depth(cfg):
    """Blocks a token passes through at the training mean depth."""
    loops = cfg["mean_recurrence"] if cfg["injection"] != "none" else 1
    return cfg["n_prelude"] + cfg["n_recurrent"] * loops + cfg["n_coda"]


def _lower(a, b):
    """Is validation loss a below b? A run that diverged (None) is never below a finished one."""
    return a is not None and (b is None or a < b)


def crossover(records):
    """Parcae against the parameter-matched fixed model at each budget both trained at: their
    mean losses and half ranges, Parcae − fixed, and in how many of their common seeds Parcae is
    lower. Returns (rows, the first budget at which Parcae is lower in every seed, or None)."""
    rows = {(r["budget"], r["model"]): r for r in summarise(records)}
    val = defaultdict(dict)  # (budget, model) → {seed: val_loss}
    for r in records:
        val[(r["budget"], r["model"])][r["seed"]] = r["val_loss"]
    out = []
    for budget in sorted({b for b, _ in rows}):
        p, f = rows.get((budget, "parcae")), rows.get((budget, "fixed"))
        if p is None or f is None:
            continue
        vp, vf = val[(budget, "parcae")], val[(budget, "fixed")]
        seeds = sorted(set(vp) & set(vf))
        lower = sum(_lower(vp[s], vf[s]) for s in seeds)
        out.append({"budget": budget, "tokens": p["tokens"],
                    "parcae": p["val_loss"], "parcae_spread": p["val_spread"],
                    "fixed": f["val_loss"], "fixed_spread": f["val_spread"],
                    "difference": (p["val_loss"] - f["val_loss"]
                                   if p["val_loss"] is not None and f["val_loss"] is not None else None),
                    "lower": f"{lower}/{len(seeds)}", "every_seed": bool(seeds) and lower == len(seeds)})
    first = next((r["budget"] for r in out if r["every_seed"]), None)
    return out, first


def crossover_verdict(rows, first):
    if not rows:
        return "No budget has both parcae and fixed runs: no crossover to look for."
    span = " to ".join(dict.fromkeys(tokens_label(r["budget"]) for r in (rows[0], rows[-1]))) + " tokens"
    if first is None:
        return (f"No crossover within the sweep ({span}): at no budget is Parcae's validation loss "
                "below the parameter-matched fixed model's in every seed.")
    after = [r for r in rows if r["budget"] >= first]
    return (f"Crossover at {tokens_label(first)} tokens: the first budget of the sweep ({span}) at "
            "which Parcae's validation loss is below the parameter-matched fixed model's in every "
            "seed" + ("; it stays below at every larger budget." if all(r["every_seed"] for r in after)
                      else ", though not at every larger budget."))


def matched_flops(records):
    """Each Parcae point against the fixed model at the same training FLOPs: the fixed model's
    loss interpolated linearly in log FLOPs between its measured budgets (None, noted "outside
    the sweep", beyond them), and the tokens the fixed model would train on for those FLOPs."""
    rows = summarise(records)
    fixed = [r for r in rows if r["model"] == "fixed"]
    if not fixed:
        return []
    per_token = fixed[0]["train_tflops"] / fixed[0]["tokens"]
    measured = sorted((r["train_tflops"], r["val_loss"]) for r in fixed if r["val_loss"] is not None)
    out = []
    for p in (r for r in rows if r["model"] == "parcae"):
        F = p["train_tflops"]
        inside = bool(measured) and measured[0][0] <= F <= measured[-1][0]
        at = (float(np.interp(np.log(F), [np.log(x) for x, _ in measured], [y for _, y in measured]))
              if inside else None)
        out.append({"budget": p["budget"], "tokens": p["tokens"], "train_tflops": F,
                    "parcae": p["val_loss"], "parcae_spread": p["val_spread"],
                    "fixed_tokens": round(F / per_token), "fixed": at,
                    "difference": p["val_loss"] - at if at is not None and p["val_loss"] is not None
                    else None,
                    "note": "" if inside else "outside the sweep"})
    return out


COLUMNS = [("token budget", "budget", ","), ("model", "model", ""), ("parameters", "params", ","),
           ("depth (blocks)", "depth", "d"), ("seeds", "seeds", "d"), ("diverged", "diverged", "d"),
           ("val loss (mean)", "val_loss", ".4f"), ("± half range", "val_spread", ".4f"),
           ("train tokens", "tokens", ","), ("train TFLOP", "train_tflops", ".3g"),
           ("s / run", "seconds", ".0f")]
CROSSOVER_COLUMNS = [("token budget", "budget", ","), ("parcae val loss", "parcae", ".4f"),
                     ("±", "parcae_spread", ".4f"), ("fixed val loss", "fixed", ".4f"),
                     ("±", "fixed_spread", ".4f"), ("parcae − fixed", "difference", "+.4f"),
                     ("seeds parcae lower", "lower", "")]
MATCHED_COLUMNS = [("parcae token budget", "budget", ","), ("train TFLOP", "train_tflops", ".3g"),
                   ("parcae val loss", "parcae", ".4f"), ("±", "parcae_spread", ".4f"),
                   ("fixed tokens at these FLOPs", "fixed_tokens", ","),
                   ("fixed val loss (interpolated)", "fixed", ".4f"),
                   ("parcae − fixed", "difference", "+.4f"), ("note", "note", "")]
RUN_COLUMNS = [("token budget", "budget", ","), ("model", "model", ""), ("seed", "seed", "d"),
               ("steps", "steps", ","), ("val loss", "val_loss", ".4f"),
               ("final train loss", "final_loss", ".4f"), ("s", "seconds", ".0f")]


def report(records, args, seconds, baseline=None, merged=None):
    """Write the tables, README.md and plots of `records`; `merged`: {folder: runs} they came from."""
    out = args.out
    summary = common.write_table(out, "summary", COLUMNS, summarise(records))
    cross, first = crossover(records)
    cross_text = common.write_table(out, "crossover", CROSSOVER_COLUMNS, cross)
    matched = matched_flops(records)
    matched_text = common.write_table(out, "matched_flops", MATCHED_COLUMNS, matched)
    ratio = _flops_ratio(summarise(records))
    matched_note = ((f"Parcae spends {ratio:.2f}× the fixed model's training FLOPs per token. " if ratio
                     else "") + "The fixed model's loss at each Parcae point's FLOPs is interpolated "
                    "linearly in log FLOPs between its own budgets; beyond them it is outside the sweep.")
    runs = common.write_table(out, "runs", RUN_COLUMNS, sorted(
        records, key=lambda r: (r["budget"], MODELS.index(r["model"]), r["seed"])))
    sections = [("Validation loss at equal tokens", summary),
                ("Crossover: Parcae − fixed at equal tokens", cross_text + "\n" + crossover_verdict(cross, first)),
                ("Parcae − fixed at matched training FLOPs", matched_text + "\n" + matched_note)]
    if merged:
        sections.append(common.merged_section(records, merged))
    sections.append(("Every run", runs))
    common.write_report(out, "Parcae against fixed-depth transformers", args, sections, seconds, baseline)
    plot_curves(records, out)
    if len({r["budget"] for r in records}) > 1:
        plot_sweep(summarise(records), first, out)


def _flops_ratio(rows):
    """Parcae's training FLOPs per token over the fixed model's (None without both)."""
    per_token = {r["model"]: r["train_tflops"] / r["tokens"] for r in rows}
    return per_token["parcae"] / per_token["fixed"] if {"parcae", "fixed"} <= set(per_token) else None


# ----------------------------------------------------------------------------- plots

COLORS = {"parcae": "tab:blue", "fixed": "tab:orange", "fixed-deep": "tab:gray"}


def plot_curves(records, out):
    """Every run's smoothed training loss against the tokens it has seen."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in sorted(records, key=lambda r: MODELS.index(r["model"])):
        loss = np.asarray(r["history"]["loss"])
        s = common.smoothed(loss, max(5, len(loss) // 50))
        label = None if r["model"] in seen else f"{r['model']} ({r['params'] / 1e3:.0f}k params)"
        seen.add(r["model"])
        tokens_per_step = r["tokens"] / r["steps_done"]
        ax.plot(tokens_per_step * np.arange(1, len(s) + 1), s, color=COLORS[r["model"]], lw=1,
                alpha=0.8, label=label)
    ax.set(xlabel="training tokens", ylabel="train loss (smoothed)",
           title="equal tokens: Parcae vs fixed depth")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.legend()
    common.save_figure(plt, fig, f"{out}/fixed_depth.png")


def plot_sweep(rows, first, out):
    """Validation loss (mean, seed half range as error bars) against training tokens and against
    training FLOPs, one line per model; the crossover budget marked on the first."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for name in MODELS:
        pts = [r for r in rows if r["model"] == name and r["val_loss"] is not None]
        if not pts:
            continue
        y = [r["val_loss"] for r in pts]
        err = [r["val_spread"] or 0.0 for r in pts]
        for ax, key, scale in ((by_tokens, "tokens", 1), (by_flops, "train_tflops", 1e12)):
            ax.errorbar([r[key] * scale for r in pts], y, yerr=err, marker="o", capsize=3,
                        color=COLORS[name], label=f"{name} ({pts[0]['params'] / 1e3:.0f}k params)")
    if first is not None:
        tokens = next(r["tokens"] for r in rows if r["budget"] == first)
        by_tokens.axvline(tokens, color="k", ls=":", lw=1,
                          label=f"crossover: Parcae lower in every seed from {tokens_label(first)}")
    by_tokens.set(xscale="log", xlabel="training tokens", ylabel="validation loss",
                  title="against training tokens"
                  + ("" if first is not None else " (no crossover within the sweep)"))
    by_flops.set(xscale="log", xlabel="training FLOPs", title="against training FLOPs")
    by_tokens.legend(fontsize=8)
    common.save_figure(plt, fig, f"{out}/sweep.png")


if __name__ == "__main__":
    cli.run(main)
