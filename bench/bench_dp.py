"""Data-parallel training speed: one process against MPI ranks, on this machine's CPU cores.

    python bench/bench_dp.py                           # tiny and medium, 2 ranks, 8 timed steps
    python bench/bench_dp.py --sizes medium --ranks 2 --steps 12

Three ways to spend the same cores on one training step of the same global batch (the bench size's
batch × 2, so that it divides): one process on one thread; one process whose batch is split over
the cores' threads (minparcae/runtime.py, what `python train.py` does); and N MPI ranks of one
thread each (minparcae/distributed.py, what `mpirun -n N python train.py` does), where each rank
runs 1/N of the batch and the gradients are summed in one all-reduce. A step is the forward,
backward, (for ranks) the all-reduce, and AdamW, on random tokens at μ_rec 4, μ_bwd 2, every
sequence at depth μ_rec. The table gives the median tokens/s over the timed steps after two
warm-up steps, and for the ranks the all-reduce's share of the step (rank 0's median).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def worker(size, steps):
    """Time `steps` training steps in this process (a rank when launched by MPI); print JSON."""
    from minparcae import distributed, kernels, model, optim, runtime
    from sizes import SIZES

    world = distributed.init()
    base, batch = SIZES[size]
    cfg = replace(base, mean_recurrence=4, backprop_depth=2)
    B = 2 * batch
    shard = world.shard(B)
    params = model.init_params(cfg, seed=0)
    ops = kernels.for_array(params["wte"])
    opt = optim.AdamW(update=kernels.adamw_update(params["wte"]))
    rng = np.random.default_rng(0)
    step_s, reduce_s = [], []
    for i in range(steps + 2):
        ids = rng.integers(0, cfg.vocab_size, (B, cfg.context + 1))
        h0 = model.initial_state(cfg, (B, cfg.context, cfg.d_h), cfg.state_init, rng)
        depths = np.full(B, cfg.mean_recurrence)
        t0 = time.perf_counter()
        loss, grads, _ = runtime.loss_and_grads(params, cfg, ids[shard, :-1], ids[shard, 1:],
                                                depths=depths[shard], h0=h0[shard], ops=ops)
        t1 = time.perf_counter()
        if world.size > 1:
            names = sorted(grads)
            grads = dict(zip(names, world.sum([grads[k] / world.size for k in names])))
        t2 = time.perf_counter()
        opt.step(params, grads, 1e-3)
        t3 = time.perf_counter()
        if i >= 2:
            step_s.append(t3 - t0)
            reduce_s.append(t2 - t1)
    if world.main:
        print(json.dumps({"tokens_per_s": B * cfg.context / statistics.median(step_s),
                          "reduce_share": statistics.median(r / s for r, s in zip(reduce_s, step_s))}))


def launch(size, steps, threads, ranks):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", size, "--steps", str(steps)]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    n = args.ranks
    print(f"| size | 1 process, 1 thread | 1 process, {n} threads (batch split) | {n} ranks × 1 thread "
          f"| all-reduce share | ranks / threads |\n|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        one = launch(size, args.steps, 1, 1)
        split = launch(size, args.steps, n, 1)
        ranks = launch(size, args.steps, 1, n)
        print(f"| {size} | {one['tokens_per_s']:.0f} | {split['tokens_per_s']:.0f} | "
              f"{ranks['tokens_per_s']:.0f} | {ranks['reduce_share']:.1%} | "
              f"{ranks['tokens_per_s'] / split['tokens_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
