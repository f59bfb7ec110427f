"""Train a Parcae model.

    python train.py                                   # the tiny preset on the built-in corpus
    python train.py --preset small-cpu --steps 3000   # bigger
    python train.py --data my_texts/ --out runs/mine  # your own text: a file, folder or .jsonl
    python train.py --out runs/mine --resume          # continue a run exactly where it stopped

Each step: sample a batch of windows and a loop depth per sequence, run the model forward (the
last μ_bwd loop steps keep activations), backward by hand, clip, update. On the CPU the batch is
split over the cores, one group of sequences per thread (model.loss_and_grads). Validation loss at
T = μ_rec every --eval-every steps and at the end, each time followed by a checkpoint
(<out>/ckpt.npz). Per-step metrics go to <out>/log.jsonl. Ctrl-C saves a checkpoint and exits.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from minparcae import backend, checkpoint, data, generate, model, optim

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run is stopped


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    ap.add_argument("--data", default=None, help="text file, folder of .txt/.md/.py, or .jsonl "
                    "with a 'text' field (default: the Python standard library's source)")
    ap.add_argument("--out", default="runs/default", help="run folder: checkpoint, log, tokenizer")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.npz")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                    help="muon: Muon for block matrices, AdamW for the rest")
    ap.add_argument("--schedule", default="trapezoid", choices=["trapezoid", "cosine", "constant"])
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--injection", default=None, choices=list(model.INJECTIONS),
                    help="diagonal (Parcae), linear, add, or none (fixed-depth transformer)")
    ap.add_argument("--mean-recurrence", type=int, default=None, help="μ_rec (default: the preset's)")
    ap.add_argument("--backprop-depth", type=int, default=None, help="μ_bwd (default: the preset's)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--sample-tokens", type=int, default=120, help="tokens sampled at the end (0: none)")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="where tokenised corpora are kept")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def build_config(args, vocab_size):
    overrides = {"vocab_size": vocab_size}
    for flag, field in (("context", "context"), ("injection", "injection"),
                        ("mean_recurrence", "mean_recurrence"), ("backprop_depth", "backprop_depth")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if overrides.get("injection") == "none":
        overrides.update(mean_recurrence=1, backprop_depth=1)
    return model.preset(args.preset, **overrides)


def make_optimizer(args):
    adamw = optim.AdamW(weight_decay=args.weight_decay)
    return optim.Combined(adamw=adamw) if args.optimizer == "muon" else adamw


def main(argv=None):
    args = parse_args(argv)
    device = backend.use_device(args.device)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    base = model.PRESETS[args.preset]
    dataset = data.prepare_data(args.data, vocab_size=args.vocab_size or base.vocab_size,
                                cache_dir=args.cache_dir)
    tok = dataset.tokenizer
    cfg = build_config(args, tok.vocab_size)
    unigram = data.unigram_entropy(dataset.train, tok.vocab_size, dataset.val)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.npz")
    log_path = os.path.join(args.out, "log.jsonl")

    params = model.init_params(cfg, seed=args.seed, dtype=dtype)
    opt = make_optimizer(args)
    rng = np.random.default_rng(args.seed)
    step, skipped = 0, 0
    if args.resume:
        saved, opt_state, meta = checkpoint.load(ckpt_path)
        checkpoint.check_config(meta, cfg.to_dict(), ckpt_path)
        checkpoint.check_params(saved, model.param_shapes(cfg), ckpt_path)
        if meta["tokenizer_fingerprint"] != tok.fingerprint:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt_path} was trained with another "
                                             "tokenizer: resume with the same --data and --vocab-size.")
        params = {k: backend.to_device(saved[k], dtype=dtype) for k in params}
        opt.load_state_dict(opt_state)
        rng.bit_generator.state = meta["rng"]
        step, skipped = meta["step"], meta["skipped"]
        _truncate_log(log_path, step)
    elif os.path.exists(ckpt_path):
        sys.exit(f"{args.out} already holds a run: pass --resume to continue it, or choose a new --out.")

    n_params = model.count_params(cfg)
    tokens_per_step = args.batch_size * cfg.context
    print(f"device {device} | {args.preset}: {n_params:,} parameters, injection {cfg.injection}, "
          f"μ_rec {cfg.mean_recurrence}, μ_bwd {cfg.backprop_depth} | {dataset.meta['source']}: "
          f"{len(dataset.train):,} train / {len(dataset.val):,} val tokens, vocab {tok.vocab_size} | "
          f"unigram baseline {unigram:.3f}")

    def evaluate():
        batches = data.iter_eval_batches(dataset.val, args.batch_size, cfg.context, args.eval_batches)
        return model.evaluate(params, cfg, batches)

    def save(val_loss=None):
        meta = {"config": cfg.to_dict(), "step": step, "rng": rng_state,
                "tokenizer": tok.to_dict(), "tokenizer_fingerprint": tok.fingerprint,
                "args": vars(args), "val_loss": val_loss,
                "data": {"source": dataset.meta["source"], "folder": str(dataset.folder)},
                "unigram": unigram, "skipped": skipped}
        checkpoint.save(ckpt_path, params, opt.state_dict(), meta)
        return step

    val_loss, bad_in_a_row = None, 0
    saved_step = step if args.resume else None
    rng_state = rng.bit_generator.state  # as of the last completed step: what a checkpoint resumes
    bar = tqdm(total=args.steps, initial=step, desc="training", dynamic_ncols=True, disable=None)
    try:
        with open(log_path, "a") as log:
            while step < args.steps:
                t0 = time.perf_counter()
                lr = optim.lr_at(step, args.steps, args.lr, args.warmup, args.schedule)
                x, y = data.get_batch(dataset.train, args.batch_size, cfg.context, rng)
                depths = model.sample_depths(rng, args.batch_size, cfg)
                loss, grads, diag = model.loss_and_grads(params, cfg, x, y, depths=depths, rng=rng)
                grad_norm = optim.clip_grad_norm(grads, args.clip)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    skipped += 1
                    bad_in_a_row += 1
                    rng_state = rng.bit_generator.state
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        bar.close()
                        last = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none yet"
                        sys.exit(f"training stopped: {bad_in_a_row} non-finite steps in a row at step "
                                 f"{step}; the last good checkpoint is {last}. Lower --lr or use the "
                                 "diagonal injection.")
                    continue
                bad_in_a_row = 0
                opt.step(params, grads, lr)
                backend.synchronize()
                step += 1
                rng_state = rng.bit_generator.state
                dt = time.perf_counter() - t0
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "rho": diag["rho"], "state_norm": diag["state_norm"],
                       "residual": diag["residual"], "loop_steps": diag["steps"],
                       "tokens_per_s": tokens_per_step / dt, "skipped": skipped}
                if step % args.eval_every == 0 or step == args.steps:
                    val_loss = evaluate()
                    rec["val_loss"] = val_loss
                    saved_step = save(val_loss)
                    bar.write(f"step {step}: val_loss {val_loss:.4f}")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                                rho=f"{diag['rho']:.3f}")
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        save(val_loss)
        sys.exit(f"interrupted at step {step}; checkpoint saved to {ckpt_path} "
                 f"(continue with --out {args.out} --resume).")
    bar.close()
    if val_loss is None:  # resumed a run that had already finished
        val_loss = evaluate()
    if args.sample_tokens:
        prompt = tok.encode("def ")
        out = generate.generate(params, cfg, [prompt], args.sample_tokens, temperature=0.8, top_k=50,
                                rng=np.random.default_rng(args.seed), stop_id=tok.eot_id)
        print("sample:\n" + tok.decode(prompt + out[0]))
    print(f"unigram baseline: {unigram:.4f}, skipped steps: {skipped}")
    print(f"val_loss: {val_loss:.4f}")
    return val_loss


def _truncate_log(path, step):
    """Drop log lines written after the checkpoint we resume from (a crash can leave some)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.CheckpointError, data.DataError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
