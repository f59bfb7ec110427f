"""Train a Parcae model.

    python train.py                                   # the tiny preset on the built-in corpus
    python train.py --preset small-cpu --steps 1000 --out runs/small-cpu   # bigger, ~1 hour
    python train.py --data my_texts/ --out runs/mine  # your own text: a file, folder or .jsonl
    python train.py --out runs/mine --resume          # continue a run exactly where it stopped
    python train.py --init-from parcae-140m --data my_texts/ --out runs/ft --lr 3e-4
                                                      # fine-tune an official Parcae model

Each step: sample a batch of windows and a loop depth per sequence, run the model forward (the
last μ_bwd loop steps keep activations), backward by hand, clip, update. On the CPU the batch is
split over the cores, one group of sequences per thread (runtime.loss_and_grads); the ops are the
device's fast set (kernels.select). Validation loss at
T = μ_rec every --eval-every steps and at the end, each time followed by a checkpoint
(<out>/ckpt.npz). Per-step metrics go to <out>/log.jsonl.

Nothing is lost (minparcae/files.py has the rules): one process at a time trains in an --out
folder; a step's log record is written before its checkpoint; a checkpoint is written only when
the weights are finite and the validation loss evaluated with it is finite. Ctrl-C or SIGTERM
(what a job scheduler sends) lets the step in progress finish, saves it and names the resume
command; a second one before the save begins stops at once, keeping the previous checkpoint, and
signals during the save are ignored. --resume continues with the run's own settings: a flag that
would change what a step computes is refused, --steps may grow (the schedule is recomputed), and
--eval-every, --eval-batches, --sample-tokens, --device and --cache-dir may change.
"""

import argparse
import math
import os
import signal
import sys
import threading
import time
import warnings

from dataclasses import replace

import numpy as np
from tqdm import tqdm

from minparcae import (backend, checkpoint, cli, data, distributed, files, generate, kernels, model,
                       optim, runtime)
from minparcae.tokenizer import Tokenizer

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run is stopped
# what a step computes: fixed for the life of a run, so --resume refuses to change them
RUN_SETTINGS = ("preset", "init_from", "data", "vocab_size", "context", "batch_size", "lr", "optimizer",
                "schedule", "warmup", "weight_decay", "clip", "injection", "mean_recurrence",
                "backprop_depth", "dtype", "seed")
# taken from the run too when --resume is not told otherwise, but free to change
RESUME_DEFAULTS = ("steps", "eval_every", "eval_batches", "sample_tokens", "cache_dir")
_UNSET = object()
# the closing samples (closing_samples); sample.py's flags give any other setting
SAMPLE_PROMPT, SAMPLE_TEMPERATURE, SAMPLE_TOP_K = "def ", 0.8, 50


def parse_args(argv=None):
    """The parsed flags, and the names of those given on the command line (which --resume must
    weigh against the run's own settings)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    ap.add_argument("--data", default=None, help="text file, folder of .txt/.md/.py, or .jsonl "
                    "with a 'text' field (default: the Python standard library's source)")
    ap.add_argument("--out", default="runs/default", help="run folder: checkpoint and log")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.npz")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune a trained model: an official Parcae folder (config.json, weights, "
                         "tokenizer.json) or a minparcae run folder; its architecture and tokenizer "
                         "are kept, so --preset, --vocab-size and --injection do not apply")
    ap.add_argument("--steps", type=cli.positive_int, default=1000)
    ap.add_argument("--batch-size", type=cli.positive_int, default=16)
    ap.add_argument("--context", type=cli.positive_int, default=None,
                    help="sequence length (default: the preset's)")
    ap.add_argument("--vocab-size", type=cli.positive_int, default=None,
                    help="BPE vocabulary, at least 257 (default: the preset's)")
    ap.add_argument("--lr", type=cli.positive_float, default=3e-3)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                    help="muon: Muon for block matrices, AdamW for the rest")
    ap.add_argument("--schedule", default="trapezoid", choices=["trapezoid", "cosine", "constant"])
    ap.add_argument("--warmup", type=cli.nonneg_int, default=20)
    ap.add_argument("--weight-decay", type=cli.nonneg_float, default=0.1)
    ap.add_argument("--clip", type=cli.positive_float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--injection", default=None, choices=list(model.INJECTIONS),
                    help="diagonal (Parcae), linear, add, or none (fixed-depth transformer)")
    ap.add_argument("--mean-recurrence", type=cli.positive_int, default=None,
                    help="μ_rec (default: the preset's)")
    ap.add_argument("--backprop-depth", type=cli.positive_int, default=None,
                    help="μ_bwd (default: the preset's)")
    ap.add_argument("--eval-every", type=cli.positive_int, default=100)
    ap.add_argument("--eval-batches", type=cli.positive_int, default=8)
    ap.add_argument("--sample-tokens", type=cli.nonneg_int, default=120,
                    help="tokens sampled at the end (0: none)")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--cache-dir", default=None, help="where tokenised corpora are kept")
    args = ap.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 257:
        ap.error("argument --vocab-size: must hold the 256 byte tokens and the end-of-text token, "
                 "so at least 257")
    unset = argparse.Namespace(**dict.fromkeys(vars(args), _UNSET))
    given = {k for k, v in vars(ap.parse_args(argv, unset)).items() if v is not _UNSET}
    if args.data is not None:
        args.data = os.path.abspath(args.data)  # the run is tied to the corpus, not to the cwd
    if args.init_from is not None:
        args.init_from = os.path.abspath(args.init_from)
        fixed = [f"--{n.replace('_', '-')}" for n in ("preset", "vocab_size", "injection") if n in given]
        if fixed:
            ap.error(f"{fixed[0]} cannot change a model given by --init-from: its architecture and "
                     "tokenizer are the model's own")
    return args, given


def build_config(args, vocab_size):
    overrides = {"vocab_size": vocab_size}
    for flag, field in (("context", "context"), ("injection", "injection"),
                        ("mean_recurrence", "mean_recurrence"), ("backprop_depth", "backprop_depth")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if overrides.get("injection") == "none":
        overrides.update(mean_recurrence=1, backprop_depth=1)
    return model.preset(args.preset, **overrides)


def fine_tune_config(args, cfg):
    """The config of a model to fine-tune: its own architecture, with the training flags that may
    change (a shorter --context, --mean-recurrence, --backprop-depth) applied."""
    overrides = {}
    if args.context is not None:
        if args.context > cfg.context:
            raise checkpoint.CheckpointError(f"--context {args.context} is longer than the model's "
                                             f"{cfg.context} positions.")
        overrides["context"] = args.context
    for flag in ("mean_recurrence", "backprop_depth"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    return replace(cfg, **overrides)


def make_optimizer(args, params):
    adamw = optim.AdamW(weight_decay=args.weight_decay, update=kernels.adamw_update(params["wte"]))
    return optim.Combined(adamw=adamw) if args.optimizer == "muon" else adamw


def take_run_settings(args, given, meta, path):
    """Continue the run as it was: every setting not given on the command line comes from the
    checkpoint; a given one that changes what a step computes is refused; a new --steps is
    accepted when it is not behind the run, with a note on how the schedule changes."""
    stored, step = meta.get("args", {}), meta["step"]
    base = model.PRESETS.get(stored.get("preset"), model.PRESETS[args.preset])

    def effective(name, value):  # None means "the preset's", for the flags that default to it
        return getattr(base, name) if value is None and hasattr(base, name) else value

    for name in RUN_SETTINGS + RESUME_DEFAULTS:
        if name not in stored:
            continue
        flag = "--" + name.replace("_", "-")
        mine, theirs = effective(name, getattr(args, name)), effective(name, stored[name])
        if name in given and name in RUN_SETTINGS and mine != theirs:
            raise checkpoint.CheckpointError(
                f"{flag} {mine} differs from this run's {theirs}: resume without {flag} (the run "
                "keeps its own settings), or start a new run with another --out.")
        if name not in given:
            setattr(args, name, stored[name])
    if args.steps < step:
        raise checkpoint.CheckpointError(f"--steps {args.steps} is behind this run, which is at "
                                         f"step {step} of {path}: ask for at least {step}.")
    if "steps" in given and args.steps != stored.get("steps", args.steps):
        before = optim.lr_at(step, stored["steps"], args.lr, args.warmup, args.schedule)
        after = optim.lr_at(step, args.steps, args.lr, args.warmup, args.schedule)
        print(f"note: the run now ends at step {args.steps}, not {stored['steps']}; the "
              f"{args.schedule} schedule is recomputed for it, so the learning rate at step {step} "
              f"is {after:.3g} (it would have been {before:.3g}).")


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM during training, turned into a flag the loop reads between
    steps, so a checkpoint never holds a half-done update. The first signal asks the loop to stop
    after the step in progress and save it; a second one, before the save begins, stops at once
    (KeyboardInterrupt) and keeps the previous checkpoint; while `saving` is set, no signal
    interrupts, so a save cannot be cut (a first one still asks to stop after the save). Signal handlers exist in the main thread only; elsewhere
    this does nothing and Ctrl-C keeps Python's meaning."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet=False):
        self.requested, self.saving, self._previous, self.quiet = None, False, {}, quiet

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.saving:  # never cut a save; a first signal still asks to stop after it
            self.requested = self.requested or signal.Signals(signum).name
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if not self.quiet:  # the ranks of a data-parallel run but rank 0 keep quiet
                tqdm.write(f"{self.requested}: stopping after this step to save it (send it again to "
                       "stop at once without saving).")


def data_parallel_step(params, cfg, dataset, args, rng, ops, world, shard, stop_requested):
    """One rank's step of a data-parallel run (minparcae/distributed.py): the whole batch drawn
    from rng as one process draws it, this rank's rows run, and the loss, gradients and
    diagnostics summed over the ranks in one all-reduce, together with whether any rank was asked
    to stop. Returns (loss, grads, diag, stop asked on some rank)."""
    B = args.batch_size
    x, y = data.get_batch(dataset.train, B, cfg.context, rng, rows=shard)
    depths = model.sample_depths(rng, B, cfg)
    xp = backend.array_module(params["wte"])
    h0 = (model.initial_state(cfg, (B, cfg.context, cfg.d_h), cfg.state_init, rng,
                              params["wte"].dtype, xp) if cfg.looped else None)
    loss, grads, diag = runtime.loss_and_grads(params, cfg, x, y, depths=depths[shard],
                                               h0=None if h0 is None else h0[shard], rng=rng, ops=ops)
    names = sorted(grads)
    w = 1.0 / world.size  # equal shares: every window of a training batch is whole
    scalars = xp.asarray([loss * w, diag["state_norm"] * w, diag["residual"] * w,
                          float(stop_requested is not None)], dtype=params["wte"].dtype)
    summed = world.sum([grads[k] * w for k in names] + [scalars])
    loss, state_norm, residual, asked = (float(v) for v in backend.to_host(summed[-1]))
    diag = dict(diag, state_norm=state_norm, residual=residual, steps=int(depths.max()))
    return loss, dict(zip(names, summed[:-1])), diag, asked > 0


def all_finite(arrays):
    return all(bool(backend.array_module(a).isfinite(a).all()) for a in arrays)


class _NoLog:
    """The run log of a rank other than 0: it writes nothing."""

    def write(self, rec):
        pass

    sync = close = lambda self: None


def main(argv=None):
    args, given = parse_args(argv)
    world = distributed.init()  # one process, or a rank of an MPI launch (minparcae/distributed.py)
    # a diverging run overflows, in this thread and in the batch's worker threads; the non-finite
    # guard of the training loop reports that in one sentence, so NumPy's warnings would only repeat it
    with world.guard(), warnings.catch_warnings(), \
            (files.RunFolder if world.main else files.RunPaths)(args.out) as run:
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                RuntimeWarning)
        return train(args, given, run, world)


def train(args, given, run, world=None):
    world = world or distributed.Single()
    say = print if world.main else (lambda *a, **k: None)
    ckpt_path = run.checkpoint
    if args.resume:
        saved, opt_state, meta = checkpoint.load(ckpt_path)
        take_run_settings(args, given, meta, ckpt_path)
    elif ckpt_path.exists():
        world.agreed = True
        sys.exit(f"{args.out} already holds a run: pass --resume to continue it, or choose a new --out.")
    if args.batch_size % world.size:
        world.agreed = True
        sys.exit(f"--batch-size {args.batch_size} must divide by the {world.size} ranks: each rank "
                 "takes an equal share of the global batch.")
    shard = world.shard(args.batch_size)
    device = backend.use_device(args.device)
    if device == "gpu":
        distributed.use_gpu_of_local_rank(world)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    base = model.PRESETS[args.preset]
    start = None
    if args.init_from and not args.resume:
        start = checkpoint.load_model(args.init_from, dtype)
        say(f"--init-from {args.init_from}: {start.description}")
    if args.init_from:  # the model's own tokenizer (on resume, as the checkpoint keeps it)
        given_tok = start.tokenizer if start else Tokenizer.from_dict(meta["tokenizer"])
    else:
        given_tok = None
    if not world.main:
        world.barrier()  # rank 0 prepares the token cache; the others then find it ready
    dataset = data.prepare_data(args.data, tokenizer=given_tok,
                                vocab_size=args.vocab_size or base.vocab_size, cache_dir=args.cache_dir)
    if world.main:
        world.barrier()
    tok = dataset.tokenizer
    if start is not None:
        cfg = fine_tune_config(args, start.cfg)
    elif args.init_from:
        cfg = model.Config.from_dict(meta["config"])
    else:
        cfg = build_config(args, tok.vocab_size)
    data.check_context(dataset, cfg.context)
    unigram = data.unigram_entropy(dataset.train, tok.vocab_size, dataset.val) if world.main else None

    if start is not None:
        params = {k: backend.to_device(v, dtype=dtype) for k, v in start.params.items()}
    else:
        params = model.init_params(cfg, seed=args.seed, dtype=dtype)
    ops = kernels.for_array(params["wte"])
    opt = make_optimizer(args, params)
    rng = np.random.default_rng(args.seed)
    step, skipped = 0, 0
    if args.resume:
        checkpoint.check_config(meta, cfg.to_dict(), ckpt_path)
        checkpoint.check_params(saved, model.param_shapes(cfg), ckpt_path)
        if meta["tokenizer_fingerprint"] != tok.fingerprint:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt_path} was trained with another "
                                             "tokenizer: resume with the same --data and --vocab-size.")
        params = {k: backend.to_device(saved[k], dtype=dtype) for k in params}
        try:
            opt.load_state_dict(opt_state)
        except KeyError as err:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt_path} holds no {args.optimizer} "
                                             f"optimiser state ({err} is missing).") from None
        rng.bit_generator.state = meta["rng"]
        step, skipped = meta["step"], meta["skipped"]

    n_params = model.count_params(cfg)
    tokens_per_step = args.batch_size * cfg.context
    if world.main:
        print(f"device {device} | {'fine-tuned model' if args.init_from else args.preset}: {n_params:,} parameters, injection {cfg.injection}, "
              f"μ_rec {cfg.mean_recurrence}, μ_bwd {cfg.backprop_depth} | {dataset.meta['source']}: "
              f"{len(dataset.train):,} train / {len(dataset.val):,} val tokens, vocab {tok.vocab_size} | "
              f"unigram baseline {unigram:.3f}" + (f" | {world.size} ranks, {args.batch_size // world.size} "
                                                   "sequences each" if world.size > 1 else ""))

    def evaluate():
        batches = data.iter_eval_batches(dataset.val, args.batch_size, cfg.context, args.eval_batches)
        return model.evaluate(params, cfg, batches, ops=ops)

    saved_step = step if args.resume else None

    def last_good():
        if saved_step is None:
            return "none (no checkpoint was written)"
        return f"{ckpt_path} (step {saved_step})"

    def save(val_loss):
        """Write the checkpoint of this step, signals held off; returns whether it did: not when
        the weights or the optimiser state are non-finite, so the last checkpoint stays a good one."""
        nonlocal saved_step
        if not all_finite(list(params.values()) + [a for a in opt.state_dict().values()
                                                    if hasattr(a, "shape")]):
            return False
        meta = {"config": cfg.to_dict(), "step": step, "rng": rng_state,
                "tokenizer": tok.to_dict(), "tokenizer_fingerprint": tok.fingerprint,
                "args": vars(args), "val_loss": val_loss,
                "data": {"source": dataset.meta["source"], "folder": str(dataset.folder)},
                "unigram": unigram, "skipped": skipped}
        stop.saving = True
        try:
            log.sync()
            checkpoint.save(ckpt_path, params, opt.state_dict(), meta)
        finally:
            stop.saving = False
        saved_step = step
        return True

    def advice():
        unstable = cfg.injection in ("linear", "add")
        return f"lower --lr (it is {args.lr:g})" + (", or use the diagonal injection" if unstable else "")

    val_loss, bad_in_a_row = None, 0
    rng_state = rng.bit_generator.state  # as of the last completed step: what a checkpoint resumes
    log = files.RunLog(run.log, resume_step=step if args.resume else None) if world.main else _NoLog()
    stop = StopRequests(quiet=not world.main)
    stopping = None  # a stop request every rank has agreed on (one process: its own)
    bar = tqdm(total=args.steps, initial=step, desc="training", dynamic_ncols=True,
               disable=None if world.main else True)
    try:
        with stop:
            while step < args.steps and not (stop.requested if world.size == 1 else stopping):
                t0 = time.perf_counter()
                lr = optim.lr_at(step, args.steps, args.lr, args.warmup, args.schedule)
                if world.size == 1:
                    x, y = data.get_batch(dataset.train, args.batch_size, cfg.context, rng)
                    depths = model.sample_depths(rng, args.batch_size, cfg)
                    loss, grads, diag = runtime.loss_and_grads(params, cfg, x, y, depths=depths,
                                                               rng=rng, ops=ops)
                else:
                    loss, grads, diag, asked = data_parallel_step(params, cfg, dataset, args, rng,
                                                                  ops, world, shard, stop.requested)
                    if asked and not stopping:
                        stopping = stop.requested or "a stop request on another rank"
                        if not stop.requested:
                            say(f"{stopping}: stopping after this step to save it.")
                grad_norm = optim.clip_grad_norm(grads, args.clip)
                rng_state = rng.bit_generator.state
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    skipped += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        world.agreed = True  # every rank sees the same reduced gradients
                        sys.exit(f"training stopped: {bad_in_a_row} non-finite steps in a row at "
                                 f"step {step}; the last good checkpoint is {last_good()}. "
                                 f"To go on, {advice()}.")
                    continue
                bad_in_a_row = 0
                opt.step(params, grads, lr)
                backend.synchronize()
                step += 1
                dt = time.perf_counter() - t0
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "rho": diag["rho"], "state_norm": diag["state_norm"],
                       "residual": diag["residual"], "loop_steps": diag["steps"],
                       "tokens_per_s": tokens_per_step / dt, "skipped": skipped}
                evaluated = (step % args.eval_every == 0 or step == args.steps) and world.main
                if evaluated:
                    val_loss = evaluate()
                    rec["val_loss"] = val_loss
                log.write(rec)
                if evaluated:
                    if not (math.isfinite(val_loss) and save(val_loss)):
                        what = (f"the validation loss is {val_loss}" if not math.isfinite(val_loss)
                                else "the weights are not finite")
                        sys.exit(f"training stopped at step {step}: {what}, so no checkpoint was "
                                 f"written; the last good checkpoint is {last_good()}. "
                                 f"To go on, {advice()}.")
                    bar.write(f"step {step}: val_loss {val_loss:.4f}")
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                                rho=f"{diag['rho']:.3f}")
                bar.update(1)
            stopping = stop.requested if world.size == 1 else stopping
            if stopping:
                world.agreed = True  # every rank leaves the loop at this step
                if not world.main:
                    sys.exit(0)
                if saved_step != step and not save(val_loss):
                    sys.exit(f"{stopping} at step {step}: the weights are not finite, so no "
                             f"checkpoint was written; the last good checkpoint is {last_good()}.")
                sys.exit(f"{stopping} at step {step}: checkpoint saved to {ckpt_path}; "
                         f"continue with: python train.py --out {args.out} --resume")
    except KeyboardInterrupt:
        sys.exit(f"stopped at step {step} without saving it; the last good checkpoint is "
                 f"{last_good()}.")
    except (checkpoint.CheckpointError, files.RunFolderError) as err:
        sys.exit(f"training stopped at step {step}: {err} The last good checkpoint is "
                 f"{last_good()}; continue it with --resume once the problem is fixed.")
    finally:
        bar.close()
        log.close()
    if not world.main:
        return None
    if val_loss is None:  # resumed a run that had already finished
        val_loss = evaluate()
    if args.sample_tokens:
        print(closing_samples(params, cfg, tok, dataset, args, ops))
    print(f"unigram baseline: {unigram:.4f}, skipped steps: {skipped}")
    print(f"val_loss: {val_loss:.4f}")
    return val_loss


def closing_samples(params, cfg, tok, dataset, args, ops):
    """What a run ends with: one prompt continued with the same random draws at T = 1 (one pass
    through the loop) and at T = μ_rec, side by side, each under its validation loss, so that the
    first thing a run shows is what the loop adds. A fixed-depth model has one sample."""
    prompt = tok.encode(SAMPLE_PROMPT)
    depths = [1, cfg.mean_recurrence] if cfg.looped and cfg.mean_recurrence > 1 else [None]
    texts, titles = [], []
    for n in depths:
        out = generate.generate(params, cfg, [prompt], args.sample_tokens, n_loops=n,
                                temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K,
                                rng=np.random.default_rng(args.seed), stop_id=tok.eot_id, ops=ops)
        texts.append(tok.decode(prompt + out[0]))
        batches = data.iter_eval_batches(dataset.val, args.batch_size, cfg.context, args.eval_batches)
        loss = model.evaluate(params, cfg, batches, n_loops=n, ops=ops)
        titles.append(f"T = {n or 1}" + (" (one pass)" if n == 1 else " (μ_rec)" if n else "")
                      + f": val loss {loss:.4f}")
    if len(texts) == 1:
        return "sample:\n" + texts[0]
    return (f"samples (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K}, the same random draws "
            "at each loop count):\n" + cli.side_by_side(texts, titles))


if __name__ == "__main__":
    cli.run(main)
