"""Generate text from a trained checkpoint, choosing the loop count at test time.

    python sample.py --ckpt runs/default --prompt "def " --loops 8 --tokens 200
    python sample.py --ckpt runs/default --loops 1,2,4,8,16      # a sample and val loss per loop count

A looped model can run its recurrent block more or fewer times than it was trained with; the
validation loss per loop count shows what extra test-time compute buys (and where it saturates).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from minparcae import backend, checkpoint, data, generate, model
from minparcae.tokenizer import Tokenizer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/default", help="run folder or .npz checkpoint")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--loops", default=None, help="loop count, or a comma-separated list (default: μ_rec)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches per loop count")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    args = ap.parse_args(argv)
    if args.loops is not None:
        try:
            args.loops = [int(n) for n in args.loops.split(",")]
        except ValueError:
            ap.error(f"--loops takes a number or a comma-separated list of numbers, not {args.loops!r}")
        if min(args.loops) < 1:
            ap.error("every loop count must be at least 1")
    if args.tokens < 0 or args.temperature < 0:
        ap.error("--tokens and --temperature must not be negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    backend.use_device(args.device)
    saved, _, meta = checkpoint.load(args.ckpt)
    cfg = model.Config.from_dict(meta["config"])
    checkpoint.check_params(saved, model.param_shapes(cfg), args.ckpt)
    params = {k: backend.to_device(v) for k, v in saved.items()}
    tok = Tokenizer.from_dict(meta["tokenizer"])
    loops = args.loops or [cfg.mean_recurrence]
    prompt = tok.encode(args.prompt) or [tok.eot_id]

    val = _validation_tokens(meta)
    for n in loops:
        t0 = time.perf_counter()
        out = generate.generate(params, cfg, [prompt], args.tokens, n_loops=n,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                rng=np.random.default_rng(args.seed), stop_id=tok.eot_id)[0]
        dt = time.perf_counter() - t0
        line = f"--- loops {n}: {len(out)} tokens at {len(out) / max(dt, 1e-9):.1f} tokens/s"
        if val is not None:
            batches = data.iter_eval_batches(val, 8, cfg.context, args.eval_batches)
            line += f", val_loss {model.evaluate(params, cfg, batches, n_loops=n):.4f}"
        print(line)
        print(tok.decode(prompt + out))


def _validation_tokens(meta):
    """The run's validation split, when its tokenised cache is still on this machine."""
    folder = meta.get("data", {}).get("folder")
    path = os.path.join(folder or "", "val.bin")
    if not folder or not os.path.exists(path):
        print("(validation data of this run is not on this machine: printing samples only)")
        return None
    with open(os.path.join(folder, "meta.json")) as f:
        dtype = np.dtype(json.load(f)["dtype"])
    return np.memmap(path, dtype=dtype, mode="r")


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.CheckpointError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
