"""What some of the CPU fast paths are worth in a whole training step: the same step timed with
them and without them (the rest of the kernels on), alternately, in one process.

    python bench/ab_kernels.py split_batch                       # medium, μ_rec 16
    python bench/ab_kernels.py rope_rmsnorm_forward,rope_rmsnorm_backward --loops 4
    python bench/ab_kernels.py adamw_step --size tiny --repeats 10
    python bench/ab_kernels.py matmul --off split_batch          # with the batch not split

The names are those of kernels/cpu.py's registry. A step is what bench_train.py times:
model.loss_and_grads and AdamW. Each repeat times one step each way, back to back, so the speed-up
reported is the median over repeats of (time without) / (time with), which holds when the
machine's speed drifts between repeats.
"""

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from bench_train import LR, blas_threads
from minparcae import model, optim
from minparcae.kernels import cpu
from sizes import SIZES


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", help="comma-separated names from the CPU registry")
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--loops", type=int, default=16, help="μ_rec (every sequence runs this many steps)")
    ap.add_argument("--backprop-depth", type=int, default=2, help="μ_bwd")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--off", default="", help="comma-separated kernels to switch off on both sides")
    args = ap.parse_args()
    names = args.kernels.split(",")
    off = [k for k in args.off.split(",") if k]
    unknown = [k for k in names + off if k not in cpu.KERNELS]
    if unknown:
        ap.error(f"not in the CPU registry: {', '.join(unknown)} (known: {', '.join(sorted(cpu.KERNELS))})")
    if min(args.loops, args.backprop_depth, args.repeats) < 1:
        ap.error("--loops, --backprop-depth and --repeats must be at least 1")
    base, B = SIZES[args.size]
    cfg = replace(base, mean_recurrence=args.loops, backprop_depth=args.backprop_depth)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    targets = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    h0 = model.initial_state(cfg, (B, cfg.context, cfg.d_h), "like-init", rng)
    depths = np.full(B, cfg.mean_recurrence)
    params, opt = model.init_params(cfg, seed=0, dtype=np.float32), optim.AdamW()
    saved = {k: cpu.KERNELS[k] for k in names}
    for k in off:
        cpu.KERNELS.pop(k)

    def use(on):
        for k in names:
            if on:
                cpu.KERNELS[k] = saved[k]
            else:
                cpu.KERNELS.pop(k)

    def step():
        t0 = time.perf_counter()
        _, grads, _ = model.loss_and_grads(params, cfg, ids, targets, depths=depths, h0=h0)
        opt.step(params, grads, LR)
        return time.perf_counter() - t0

    for on in (True, False):  # compilation and first-call allocations
        use(on)
        step()
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (True, False):
            use(on)
            times[on].append(step())
    use(True)
    ratios = [off / on for on, off in zip(times[True], times[False])]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    print(f"{args.size}, μ_rec {cfg.mean_recurrence} / μ_bwd {cfg.backprop_depth}, {B} × {cfg.context} "
          f"tokens, BLAS threads {blas_threads()}: {', '.join(names)}"
          + (f" (off on both sides: {', '.join(off)})" if off else "") + "\n"
          f"  with {statistics.median(times[True]) * 1e3:.0f} ms, without "
          f"{statistics.median(times[False]) * 1e3:.0f} ms per step (medians of {args.repeats}); "
          f"speed-up {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
