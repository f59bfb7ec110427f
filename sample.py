"""Generate text from a trained checkpoint, choosing the loop count at test time.

    python sample.py --ckpt runs/default --prompt "def " --loops 8 --tokens 200
    python sample.py --ckpt runs/default --loops 1,2,4,8,16      # a sample and val loss per loop count
    python sample.py --ckpt runs/default --loops 16 --adaptive kl --epsilon 1e-3
    python sample.py --ckpt runs/default --no-cache              # the plain generator, to compare speed
    python sample.py --ckpt runs/default --loops 8 --speculative 4,2 --temperature 0
                                                  # draft 4 tokens at 2 loop steps, verify at 8
    python sample.py --ckpt runs/default --loops 8 --kv-slots 1 --warm-start --adaptive kl
    python sample.py --ckpt parcae-140m --loops 1,2,4,8,16 --data notes.txt --prompt "The"
                                                  # an official Parcae model folder, on your own text

A looped model can run its recurrent block more or fewer times than it was trained with; the
validation loss per loop count shows what extra test-time compute buys (and where it saturates).
Generation is KV-cached; with --adaptive each token stops looping once its state (`state`) or its
next-token distribution (`kl`) changes by less than --epsilon, the loop count being the maximum,
and the line shows the mean loop count per token and, when there is validation text (--data, or
the run's own split when it is on this machine), the validation loss at fixed depth (a full
forward) and at adaptive depth (through the cached decoder). --kv-slots keeps fewer KV slots per
recurrent layer than loop steps, --warm-start starts each token's loop from the previous token's
final state, --speculative γ,T_draft drafts with the loop stopped early and verifies at the full
depth (the same greedy output; the same distribution when sampling; past the context it drafts
nothing and decodes token by token), and --past-context chooses how generation continues past the
context: a sliding KV cache or recomputing the window (see minparcae/generate.py;
bench/bench_decoding.py measures the loss of each past the context). With validation text the line
gives the loss under the exit rule, the KV slots and the warm start. On a fixed-depth baseline
checkpoint these loop options do nothing and are dropped with a note. An official model evaluates from
minparcae's fixed initial state per position (`eval_state` "seeded"), where the official code draws
a fresh random one on every call, so the numbers here repeat exactly.
"""

import argparse
import os
import time

import numpy as np

from minparcae import backend, checkpoint, cli, data, generate, kernels


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/default",
                    help="run folder or .npz checkpoint, or an official Parcae model folder "
                         "(config.json, model.pt or model.safetensors, tokenizer.json); default runs/default")
    ap.add_argument("--prompt", default="def ", help="text to continue (default 'def '; empty: the end-of-text token)")
    ap.add_argument("--loops", default=None, help="loop count, or a comma-separated list (default: μ_rec)")
    ap.add_argument("--tokens", type=cli.nonneg_int, default=200, help="tokens to generate per sample (default 200)")
    ap.add_argument("--temperature", type=cli.nonneg_float, default=0.8, help="sampling temperature, 0 for greedy (default 0.8)")
    ap.add_argument("--top-k", type=cli.nonneg_int, default=50, help="sample among the k likeliest tokens, 0 for all (default 50)")
    ap.add_argument("--top-p", type=cli.probability, default=None,
                    help="sample among the smallest set of tokens whose probability reaches p (default: no cut)")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the sampling draws (default 0)")
    ap.add_argument("--adaptive", default=None, choices=["state", "kl"],
                    help="stop looping a token when its state or its prediction stops changing")
    ap.add_argument("--epsilon", type=cli.nonneg_float, default=None,
                    help="threshold of --adaptive (default 1e-3)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole window per token")
    ap.add_argument("--kv-slots", type=cli.positive_int, default=None,
                    help="KV slots per recurrent layer (default: one per loop step); step t uses slot t mod k")
    ap.add_argument("--warm-start", action="store_true",
                    help="start each token's loop from the previous token's final state")
    ap.add_argument("--speculative", default=None, metavar="GAMMA,T_DRAFT",
                    help="draft GAMMA tokens at T_DRAFT loop steps, verify them at the full depth")
    ap.add_argument("--past-context", default="slide", choices=["slide", "recompute"],
                    help="past the context: slide the KV cache (default) or recompute the window")
    ap.add_argument("--eval-batches", type=cli.positive_int, default=8,
                    help="validation batches per loop count (default 8)")
    ap.add_argument("--data", default=None,
                    help="text to measure the validation loss on (a file, a folder or .jsonl; "
                         "default: the run's own validation split, when it is on this machine)")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="compute dtype; bfloat16 and float16 weights are widened to it exactly")
    args = ap.parse_args(argv)
    if args.loops is not None:
        try:
            args.loops = [int(n) for n in args.loops.split(",")]
        except ValueError:
            ap.error(f"argument --loops: takes a number or a comma-separated list of numbers, not "
                     f"{args.loops!r}")
        if min(args.loops) < 1:
            ap.error("argument --loops: every loop count must be at least 1")
    if args.epsilon is not None and not args.adaptive:
        ap.error("--epsilon is the threshold of --adaptive: add --adaptive state or --adaptive kl")
    args.epsilon = 1e-3 if args.epsilon is None else args.epsilon
    if args.no_cache and (args.adaptive or args.kv_slots or args.warm_start or args.speculative):
        ap.error("--adaptive, --kv-slots, --warm-start and --speculative need the cached generator: "
                 "drop --no-cache")
    if args.speculative is not None:
        try:
            gamma, draft = (int(n) for n in args.speculative.split(","))
        except ValueError:
            ap.error(f"argument --speculative: takes GAMMA,T_DRAFT (two numbers, e.g. 4,2), not "
                     f"{args.speculative!r}")
        if gamma < 1 or draft < 1:
            ap.error("argument --speculative: GAMMA and T_DRAFT must be at least 1")
        if draft >= min(args.loops or [draft + 1]):
            ap.error(f"argument --speculative: T_DRAFT ({draft}) must be below every loop count")
        if args.adaptive or args.kv_slots or args.warm_start:
            ap.error("--speculative runs at fixed depth with a KV slot per loop step: drop "
                     "--adaptive, --kv-slots and --warm-start")
        if args.past_context != "slide":
            ap.error("--speculative slides its cache past the context: drop --past-context recompute")
        args.speculative = (gamma, draft)
    return args


def main(argv=None):
    args = parse_args(argv)
    backend.use_device(args.device)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    loaded = checkpoint.load_model(args.ckpt, dtype)
    cfg, tok, meta = loaded.cfg, loaded.tokenizer, loaded.meta
    print(f"{args.ckpt}: {loaded.description}")
    params = {k: backend.to_device(v) for k, v in loaded.params.items()}
    ops = kernels.for_array(params["wte"])
    loops = args.loops or [cfg.mean_recurrence]
    if not cfg.looped:
        ignored = [flag for flag, on in (("--loops", args.loops), ("--adaptive", args.adaptive),
                                         ("--kv-slots", args.kv_slots), ("--warm-start", args.warm_start),
                                         ("--speculative", args.speculative)) if on]
        if ignored:
            print(f"(a fixed-depth baseline has no loop: {', '.join(ignored)} dropped)")
        loops, args.adaptive, args.kv_slots, args.warm_start, args.speculative = [1], None, None, False, None
    prompt = tok.encode(args.prompt) or [tok.eot_id]

    if args.data is not None:
        val = data.encode_source(args.data, tok)
        if len(val) < cfg.context + 1:  # shorter texts are evaluated in one shorter window
            val = val if len(val) >= 2 else None
    elif meta is not None:
        val = _validation_tokens(meta, cfg.context)
    else:
        print("(pass --data to measure the validation loss on your own text: printing samples only)")
        val = None
    if val is not None:
        window = min(cfg.context, len(val) - 1)
        val = list(data.iter_eval_batches(val, 8, window, args.eval_batches))
    for n in loops:
        slots = args.kv_slots if args.kv_slots and args.kv_slots < n else None  # k ≥ n is exact
        options = {"kv_slots": slots, "warm_start": args.warm_start}
        approximate = args.adaptive or slots or args.warm_start
        t0 = time.perf_counter()
        stats = {}
        out, used = generate.generate(params, cfg, [prompt], args.tokens, n_loops=n,
                                      temperature=args.temperature, top_k=args.top_k or None,
                                      top_p=args.top_p,
                                      rng=np.random.default_rng(args.seed), stop_id=tok.eot_id,
                                      cache=not args.no_cache, adaptive=args.adaptive,
                                      epsilon=args.epsilon, return_loops=True, progress=True,
                                      ops=ops, past_context=args.past_context,
                                      speculative=args.speculative, stats=stats, **options)
        backend.synchronize()
        out, dt = out[0], time.perf_counter() - t0
        line = (f"--- loops {n}: {len(out)} tokens at {len(out) / max(dt, 1e-9):.1f} tokens/s "
                f"({'uncached' if args.no_cache else 'cached'})")
        if args.adaptive:
            line += f", mean loops {np.mean(used[0]) if out else 0:.2f}"
        if stats.get("drafted"):
            line += (f", {stats['accepted']} of {stats['drafted']} drafted tokens kept "
                     f"({stats['accepted'] / stats['drafted']:.0%})")
        elif args.speculative:
            line += ", nothing drafted (past the context a verify pass does not fit: token by token)"

        if val is not None:
            fixed, _ = generate.evaluate(params, cfg, val, n, ops=ops)
            line += f", val_loss {fixed:.4f}"
            if approximate:
                loss, mean = generate.evaluate(params, cfg, val, n, args.adaptive, args.epsilon, ops,
                                               **options)
                what = ", ".join(w for w, on in ((f"{args.adaptive} exit", args.adaptive),
                                                 (f"{slots} KV slots", slots),
                                                 ("warm start", args.warm_start)) if on)
                line += f" at {n} loops, {loss:.4f} at {mean:.2f} loops per token ({what})"
        print(line)
        print(tok.decode(prompt + out))


def _validation_tokens(meta, context):
    """The run's validation split, when its tokenised cache is still on this machine, whole, and
    at least one window long."""
    folder = meta.get("data", {}).get("folder")
    if not folder or not os.path.isdir(folder):
        print("(validation data of this run is not on this machine: printing samples only)")
        return None
    try:
        _, val, _ = data.open_tokens(folder)
    except data.DataError as err:
        print(f"(validation data of this run is unusable, {err} Printing samples only)")
        return None
    if len(val) < context + 1:
        print(f"(the validation split holds {len(val)} tokens, less than one window of "
              f"{context + 1}: printing samples only)")
        return None
    return val


if __name__ == "__main__":
    cli.run(main)
