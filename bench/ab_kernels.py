"""What a CPU fast path is worth in a whole training step: the same step timed with it and without
it (everything else as train.py runs it), alternately, in one process.

    python bench/ab_kernels.py attention                 # medium, μ_rec 16
    python bench/ab_kernels.py rmsnorm,qk_norm,mlp --size tiny --loops 4 --repeats 10
    python bench/ab_kernels.py split --loops 4           # the runtime's batch split over the cores

The names: ops that kernels/cpu.py replaces, weighed together when several are given (without
them: the reference ops), or `split` (without it: model.forward and model.backward on the whole
batch, BLAS multithreaded, instead of runtime.loss_and_grads). A step is what bench_train.py times:
forward, backward and AdamW. Each repeat times one step each way, back to back, so the speed-up
reported is the median over repeats of (time without) / (time with), which holds when the
machine's speed drifts between repeats; the quartiles show the spread. A fast path stays only
while that spread lies clear of 1 (kernels/__init__.py).
"""

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from bench_train import LR
from minparcae import kernels, model, optim, runtime
from minparcae.kernels import cpu
from minparcae.ops import REFERENCE
from sizes import SIZES

CHOICES = sorted(cpu.REPLACEMENTS) + ["split"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", help=f"comma-separated, from {', '.join(CHOICES)}")
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--loops", type=int, default=16, help="μ_rec (every sequence runs this many steps)")
    ap.add_argument("--backprop-depth", type=int, default=2, help="μ_bwd")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    paths = args.paths.split(",")
    if set(paths) - set(CHOICES) or ("split" in paths and len(paths) > 1):
        ap.error(f"name ops from {', '.join(CHOICES[:-1])}, or split alone")
    if min(args.loops, args.backprop_depth, args.repeats) < 1:
        ap.error("--loops, --backprop-depth and --repeats must be at least 1")
    base, B = SIZES[args.size]
    cfg = replace(base, mean_recurrence=args.loops, backprop_depth=args.backprop_depth)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    targets = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    h0 = model.initial_state(cfg, (B, cfg.context, cfg.d_h), "like-init", rng)
    depths = np.full(B, cfg.mean_recurrence)
    params = model.init_params(cfg, seed=0, dtype=np.float32)
    fast = kernels.for_array(params["wte"])
    if paths == ["split"]:
        sides = {True: (fast, True), False: (fast, False)}
    else:
        sides = {True: (fast, True), False: (fast._replace(**{p: getattr(REFERENCE, p) for p in paths}), True)}
    opts = {on: optim.AdamW() for on in sides}

    def step(on):
        ops, split = sides[on]
        t0 = time.perf_counter()
        if split:
            _, grads, _ = runtime.loss_and_grads(params, cfg, ids, targets, depths=depths, h0=h0, ops=ops)
        else:
            _, cache, _ = model.forward(params, cfg, ids, targets, depths=depths, h0=h0, train=True, ops=ops)
            grads = model.backward(params, cfg, cache)
        opts[on].step(params, grads, LR)
        return time.perf_counter() - t0

    for on in (True, False):  # compilation and first-call allocations
        step(on)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (True, False):
            times[on].append(step(on))
    ratios = [off / on for on, off in zip(times[True], times[False])]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    print(f"{args.size}, μ_rec {cfg.mean_recurrence} / μ_bwd {cfg.backprop_depth}, {B} × {cfg.context} "
          f"tokens, threads {runtime.threads()}: {args.paths}\n"
          f"  with {statistics.median(times[True]) * 1e3:.0f} ms, without "
          f"{statistics.median(times[False]) * 1e3:.0f} ms per step (medians of {args.repeats}); "
          f"speed-up {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
