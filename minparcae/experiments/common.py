"""What the experiment scripts share: flags, one training run, the divergence rule, running many
runs (in parallel processes if asked), and writing tables and plots.

A run is described by a plain dict (a "spec": config, learning rate, seed, steps, ...) so that it
can be sent to a worker process, and it returns a plain dict (a "record": per-step history, final
and validation losses, whether it diverged) that goes straight into runs.json.

The divergence rule. A run diverges if its loss or gradient norm becomes non-finite (the run
stops there), or if at the end of training its smoothed loss sits more than `spike` nats (default
1.0) above the lowest smoothed loss it had reached: it blew up and did not come back. The smoothed
loss is the mean over the last `window` steps (5% of the run, at least 5), which keeps the
batch-to-batch noise (about ±0.1 nat at the default sizes) far below the threshold. A loss spike is
an episode during which the smoothed loss stands more than `spike` above that lowest value; the
records count them whether or not the run recovered.
"""

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import backend, cli, data, files, kernels, model, optim

SPIKE = 1.0  # nats above the best smoothed loss: a spike, and at the end of a run, a divergence


def parser(description, name, steps, seeds="0,1"):
    """An argument parser with the flags every experiment has."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"runs/experiments/{name}",
                    help="folder for the table (.md, .csv), runs.json and the plot")
    ap.add_argument("--data", default=None, help="text file, folder or .jsonl (default: the Python "
                    "standard library's source, as in train.py)")
    ap.add_argument("--vocab-size", type=cli.positive_int, default=2048)
    ap.add_argument("--cache-dir", default=None, help="where tokenised corpora are kept")
    ap.add_argument("--steps", type=cli.positive_int, default=steps, help="optimiser steps per run")
    ap.add_argument("--batch-size", type=cli.positive_int, default=16)
    ap.add_argument("--context", type=cli.positive_int, default=64)
    ap.add_argument("--d-model", type=cli.positive_int, default=64)
    ap.add_argument("--n-head", type=cli.positive_int, default=2)
    ap.add_argument("--seeds", default=seeds, help="comma-separated seeds; each setting runs once per seed")
    ap.add_argument("--eval-batches", type=cli.positive_int, default=16, help="validation batches per evaluation")
    ap.add_argument("--jobs", type=cli.positive_int, default=1, help="runs trained at once, each in its own "
                    "process with one thread; on CPU set it to the number of cores")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    ap.add_argument("--resume", action="store_true", help="keep the runs already finished in "
                    "--out/runs.json and train only the rest (an interrupted sweep goes on where it "
                    "stopped; runs.json is rewritten as each run finishes)")
    ap.set_defaults(experiment=name)
    return ap


def parse(ap, argv=None):
    args = ap.parse_args(argv)  # every number was checked as it was parsed (cli's types)
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        ap.error("--d-model must be a multiple of --n-head with an even head size (rotary).")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, not {args.seeds!r}")
    # the command that makes these runs: --resume only says which of them to train now
    args.command = " ".join([f"python -m minparcae.experiments.{args.experiment}"]
                            + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
                               if a != "--resume"])
    return args


def number_list(ap, text, flag, cast=float):
    """Comma-separated numbers from a flag: positive floats, or integers of at least 1."""
    try:
        values = [cast(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"{flag} must be comma-separated {'integers' if cast is int else 'numbers'}, "
                 f"not {text!r}")
    if not values or not (min(values) >= 1 if cast is int else min(values) > 0):
        ap.error(f"{flag} must be {'at least 1' if cast is int else 'positive'}")
    return values


def model_flags(ap, lr, layout=(1, 2, 1)):
    """--lr and the block layout (--n-prelude, --n-recurrent, --n-coda) with these defaults."""
    ap.add_argument("--lr", type=cli.positive_float, default=lr, help="peak learning rate (every model)")
    for flag, n, kind in zip(("--n-prelude", "--n-recurrent", "--n-coda"), layout,
                             (cli.nonneg_int, cli.positive_int, cli.nonneg_int)):
        ap.add_argument(flag, type=kind, default=n)


def load_dataset(args):
    """The tokenised corpus (trained and cached on first use, like train.py's)."""
    return data.prepare_data(args.data, vocab_size=args.vocab_size, cache_dir=args.cache_dir)


def data_spec(args):
    return {"source": args.data, "vocab_size": args.vocab_size, "cache_dir": args.cache_dir}


def base_config(args, vocab_size, **overrides):
    """The experiments' small model: width, heads and context from the flags, the rest from
    `overrides` (layout, μ_rec, injection) or model.Config's defaults."""
    return model.Config(**{"vocab_size": vocab_size, "context": args.context,
                           "d_model": args.d_model, "n_head": args.n_head, **overrides})


def spec(args, cfg, *, lr, seed, name, steps=None, warmup=None, schedule="trapezoid",
         weight_decay=0.1, clip=1.0, eval_loops=None, spike=SPIKE, keep=None):
    """A run's description: everything `train_run` needs, as plain values. `keep`: fields copied
    into the run's record as they are (what the report groups by: budget, μ_rec, the command)."""
    steps = steps or args.steps
    return {"name": name, "config": cfg.to_dict(), "lr": lr, "seed": seed, "steps": steps,
            "batch_size": args.batch_size, "warmup": steps // 10 if warmup is None else warmup,
            "schedule": schedule, "weight_decay": weight_decay, "clip": clip, "spike": spike,
            "eval_batches": args.eval_batches, "eval_loops": list(eval_loops or []),
            "data": data_spec(args), "device": args.device, "keep": dict(keep or {})}


# ----------------------------------------------------------------------------- one run

_DATASETS = {}


def _dataset(d):
    key = json.dumps(d, sort_keys=True)
    if key not in _DATASETS:
        _DATASETS[key] = data.prepare_data(d["source"], vocab_size=d["vocab_size"],
                                           cache_dir=d["cache_dir"])
    return _DATASETS[key]


def smoothed(losses, window):
    """Trailing mean over `window` steps (shorter at the start)."""
    c = np.cumsum(np.concatenate([[0.0], losses]))
    n = np.arange(1, len(losses) + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def judge(losses, warmup, spike=SPIKE):
    """(diverged, spikes, window) for a finite loss history, by the rule in the module docstring."""
    losses = np.asarray(losses, dtype=np.float64)
    window = max(5, len(losses) // 20)
    s = smoothed(losses, window)
    best = np.minimum.accumulate(s)
    above = s > best + spike
    above[: min(len(above), warmup + window)] = False  # no verdict until a full window after warm-up
    spikes = int(np.sum(above[1:] & ~above[:-1]) + (above[0] if len(above) else 0))
    return bool(above[-1]) if len(above) else False, spikes, window


def train_run(spec, dataset=None):
    """Train one model as `spec` says and return its record."""
    backend.use_device(spec["device"])
    ds = dataset if dataset is not None else _dataset(spec["data"])
    cfg = model.Config.from_dict(spec["config"])
    params = model.init_params(cfg, seed=spec["seed"], dtype=np.float32)
    ops = kernels.for_array(params["wte"])
    opt = optim.AdamW(weight_decay=spec["weight_decay"], update=kernels.adamw_update(params["wte"]))
    rng = np.random.default_rng(spec["seed"])
    steps, B = spec["steps"], spec["batch_size"]
    hist = {k: [] for k in ("loss", "grad_norm", "rho", "state_norm", "loop_steps")}
    reason, t0 = None, time.perf_counter()
    # An unstable loop is expected to overflow float32 on its way to diverging; the record shows it
    # (an infinite state norm, a non-finite loss), so NumPy's warnings would only repeat it.
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps):
            lr = optim.lr_at(step, steps, spec["lr"], spec["warmup"], spec["schedule"])
            x, y = data.get_batch(ds.train, B, cfg.context, rng)
            depths = model.sample_depths(rng, B, cfg)
            # the whole batch at once, not runtime.loss_and_grads: its split of the batch over the
            # cores changes how the gradient's sums are rounded with the number of cores, and
            # a run's numbers should not depend on the machine or on --jobs
            loss, cache, diag = model.forward(params, cfg, x, y, depths=depths, rng=rng, train=True,
                                              ops=ops)
            grads = model.backward(params, cfg, cache)
            del cache
            grad_norm = optim.clip_grad_norm(grads, spec["clip"])
            for k, v in (("loss", loss), ("grad_norm", grad_norm), ("rho", diag["rho"]),
                         ("state_norm", diag["state_norm"]), ("loop_steps", diag["steps"])):
                hist[k].append(float(v))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                reason = f"non-finite loss or gradient at step {step + 1}"
                break
            opt.step(params, grads, lr)
    seconds = time.perf_counter() - t0
    done = len(hist["loss"])
    rec = {**spec["keep"], "name": spec["name"], "config": spec["config"], "lr": spec["lr"],
           "seed": spec["seed"], "identity": identity(spec),
           "steps": steps, "steps_done": done, "seconds": seconds, "history": hist,
           "tokens": done * B * cfg.context,
           "train_flops": model.flops_per_token(cfg, train=True) * done * B * cfg.context}
    if reason is not None:
        rec.update(diverged=True, reason=reason, spikes=None, final_loss=None, val_loss=None,
                   curve={})
        return rec
    diverged, spikes, window = judge(hist["loss"], spec["warmup"], spec["spike"])
    rec.update(diverged=diverged, spikes=spikes,
               reason=f"smoothed loss ended > {spec['spike']} above its best" if diverged else None,
               final_loss=float(np.mean(hist["loss"][-window:])))

    def val(n_loops=None):
        batches = data.iter_eval_batches(ds.val, B, cfg.context, spec["eval_batches"])
        return float(model.evaluate(params, cfg, batches, n_loops=n_loops, ops=ops))

    with np.errstate(over="ignore", invalid="ignore"):
        rec["val_loss"] = val()
        rec["curve"] = {int(T): val(T) for T in spec["eval_loops"]}
    return rec


# ----------------------------------------------------------------------------- many runs

def _one_thread_env():
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"


def identity(spec):
    """What makes two specs the same run, wherever and however they are trained: the spec without
    the device, the tokenised corpus's cache folder and the fields only copied into the record."""
    ident = {k: v for k, v in spec.items() if k not in ("device", "keep")}
    ident["data"] = {k: v for k, v in spec["data"].items() if k != "cache_dir"}
    return ident


def finished_runs(out, specs):
    """For --resume: the records in out/runs.json, as {spec index: record} for the specs they
    match. A ValueError if runs.json holds a run that is none of `specs` (it would be lost when
    runs.json is rewritten)."""
    path = Path(out, "runs.json")
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON: --resume needs the runs.json this script "
                         "wrote (move it away to start again)") from None
    index = {json.dumps(identity(s), sort_keys=True): i for i, s in enumerate(specs)}
    found = {}
    for r in runs if isinstance(runs, list) else [None]:
        i = index.get(json.dumps(r.get("identity"), sort_keys=True)) if isinstance(r, dict) else None
        if i is None:
            name = r.get("name", "?") if isinstance(r, dict) else "?"
            raise ValueError(f"{path} holds the run {name!r}, which these flags do not make: "
                             "--resume must repeat the flags that started the sweep (or use a new --out)")
        found[i] = r
    return found


def run_all(specs, jobs=1, dataset=None, summary=None, out=None, resume=False):
    """Train every spec; return the records in the specs' order. jobs > 1 trains that many at once,
    each in a fresh process limited to one thread (set before NumPy loads its BLAS there).
    `summary(record)` gives the one line printed as each run finishes. With `out`, out/runs.json
    holds the records finished so far (in the specs' order), rewritten as each run finishes, so
    an interrupted sweep loses only the runs in progress; with `resume`, the runs already there
    are kept and not trained again."""
    records = [None] * len(specs)
    kept = finished_runs(out, specs) if resume and out is not None else {}
    if resume:
        print(f"--resume: {len(kept)} of {len(specs)} runs already finished in {out}/runs.json; "
              f"training the other {len(specs) - len(kept)}")
    elif out is not None and Path(out, "runs.json").exists():
        print(f"{out}/runs.json is replaced as runs finish (--resume would keep its finished runs)")
    for i, r in kept.items():
        records[i] = r
    todo = [i for i in range(len(specs)) if i not in kept]
    bar = tqdm(total=len(todo), desc="runs", unit="run", dynamic_ncols=True, disable=None)

    done = []

    def finished(i, rec):
        records[i] = rec
        done.append(i)
        if out is not None:
            save_records(out, [r for r in records if r is not None])
        bar.update(1)
        bar.write(f"[{len(done)}/{len(todo)}] {rec['name']}: "
                  + (summary(rec) if summary else _default_summary(rec)) + f" ({rec['seconds']:.0f} s)")

    if jobs == 1:
        for i in todo:
            finished(i, train_run(specs[i], dataset))
    else:
        saved = dict(os.environ)
        _one_thread_env()  # inherited by the spawned workers
        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(train_run, specs[i]): i for i in todo}
                for f in as_completed(futures):
                    finished(futures[f], f.result())
        finally:
            os.environ.clear()
            os.environ.update(saved)
    bar.close()
    return records


def _default_summary(rec):
    if rec["val_loss"] is None:
        return f"diverged ({rec['reason']})"
    return (f"val {rec['val_loss']:.4f}, final train {rec['final_loss']:.4f}"
            + (", DIVERGED" if rec["diverged"] else ""))


# ----------------------------------------------------------------------------- output

def fmt(value, spec=".4f"):
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) if spec else str(value)


def write_table(out, stem, columns, rows):
    """Write rows (dicts) as out/stem.md and out/stem.csv. `columns`: (header, key, format spec);
    the CSV keeps raw values. Returns the Markdown text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k), f) for _, k, f in columns) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for _, k, _ in columns])
        w.writerows([[r.get(k) for _, k, _ in columns] for r in rows])
    return text


def unigram(dataset):
    """The validation loss of the context-free unigram predictor: a model at this loss has
    learned token frequencies and nothing else."""
    return data.unigram_entropy(dataset.train, dataset.tokenizer.vocab_size, dataset.val)


def write_report(out, title, args, sections, seconds, baseline=None):
    """Write (and print) out/README.md: the title, the command, the wall time (None: a report of
    earlier runs, which has none) and the unigram baseline, then each (heading, text) section."""
    facts = ([f"Wall time: {seconds / 60:.1f} min, {args.jobs} job(s) at once."] if seconds is not None
             else []) + ([f"Unigram baseline (validation): {baseline:.3f} nats."] if baseline else [])
    parts = [f"# {title}", "", f"    {args.command}", ""] + ([" ".join(facts), ""] if facts else [])
    for heading, text in sections:
        parts += [f"## {heading}", "", text.rstrip(), ""]
    text = "\n".join(parts)
    Path(out, "README.md").write_text(text)
    print("\n" + text)


def save_records(out, records):
    """Write out/runs.json whole or not at all (files.durable_write)."""
    text = json.dumps(records).encode()
    files.durable_write(str(Path(out, "runs.json")), lambda f: f.write(text))


def load_runs(dirs, script, ours, key_of, name_of, group_of):
    """The records of earlier outputs of `script` (DIR/runs.json), checked to belong in one report,
    and {DIR: its number of runs}. `ours(r)`: is r a record of this script (and fills in what older
    records lack); `key_of(r)`: what identifies a run, none may appear twice (`name_of(key)` names
    it); `group_of(r)`: the runs of one group must share their model settings and learning rate.
    A ValueError says what is wrong."""
    records, counts, seen, settings = [], {}, {}, {}
    for d in dirs:
        path = Path(d, "runs.json")
        if not path.is_file():
            raise ValueError(f"{path} does not exist: --merge takes folders written by this script")
        try:
            runs = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON: write it again with this script") from None
        if not isinstance(runs, list) or not all(isinstance(r, dict) and ours(r) for r in runs):
            raise ValueError(f"{path} is not an output of {script}: merge only this script's runs")
        counts[d] = len(runs)
        for r in runs:
            key = key_of(r)
            if key in seen:
                raise ValueError(f"{name_of(key)} is in both {seen[key]} and {d}: merge only one of them")
            seen[key] = d
            first, where = settings.setdefault(group_of(r), ((r["config"], r["lr"]), d))
            if first != (r["config"], r["lr"]):
                raise ValueError(f"the {group_of(r)} runs of {where} and {d} have different model "
                                 "settings or learning rates: merge only outputs of the same flags")
            records.append(r)
    return records, counts


def merge_args(ap, args, *training_flags):
    """The folders of --merge, after refusing flags that only training uses and an --out that is
    one of them (it would overwrite its runs.json)."""
    dirs = args.merge.split(",")
    for flag in (*training_flags, "--resume"):
        dest = flag.lstrip("-").replace("-", "_")
        if getattr(args, dest) != ap.get_default(dest):
            ap.error(f"--merge reports earlier runs and trains nothing: train with {flag} on its own "
                     "(without --merge), then merge its folder")
    if any(Path(d).resolve() == Path(args.out).resolve() for d in dirs):
        ap.error("--out must be a new folder, not one of --merge's (it would overwrite its runs.json)")
    return dirs


def merged_section(records, merged):
    """The report section naming the merged folders and the commands that made their runs."""
    commands = dict.fromkeys(r.get("command", "(command not recorded)") for r in records)
    return ("Merged outputs", "\n".join(f"- {d}: {n} runs" for d, n in merged.items())
            + "\n\nmade by\n\n" + "\n".join(f"    {c}" for c in commands))


def spread(values):
    """Mean and half range of the values that are not None: (None, None) without any, half range
    None with one."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else None


def pyplot():
    """matplotlib's pyplot (non-interactive), or None with a note when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: tables only (pip install -e \".[plot]\" for plots).")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
