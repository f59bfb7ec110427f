"""The matrix products of a training step alone: NumPy's BLAS (OpenBLAS in the PyPI wheels, what
minparcae multiplies with) and PyTorch's (MKL in its x86 CPU wheels), on the shapes a size's step
multiplies, float32.

    python bench/bench_gemm.py                               # medium, as many threads as BLAS
    OPENBLAS_NUM_THREADS=1 python bench/bench_gemm.py        # one thread on every side

Products take up most of a medium step (see profile_step.py) and both implementations make the
same ones, so a difference here carries straight into bench_train.py's ratio. Each
implementation runs --calls products back to back, after a pause that lets the other's idle
threads go to sleep; they take turns, and the table gives the median GFLOP/s of --repeats turns.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from minparcae.runtime import threads as blas_threads
from sizes import SIZES


def shapes(cfg, rows):
    """(name, (M, K), (K, N)) of the step's products: forward x W, backward G Wᵀ and xᵀ G."""
    d, m, V = cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size
    qkv = d + 2 * cfg.kv_heads * (d // cfg.n_head)
    return [("q/k/v x W", (rows, d), (d, qkv)), ("MLP fc x W", (rows, d), (d, m)),
            ("MLP proj x W", (rows, m), (m, d)), ("attn out x W", (rows, d), (d, d)),
            ("lm head x W", (rows, d), (d, V)), ("MLP fc xᵀ G", (d, rows), (rows, m)),
            ("MLP proj G Wᵀ", (rows, d), (d, m))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    if min(args.repeats, args.calls) < 1:
        ap.error("--repeats and --calls must be at least 1")
    threads = blas_threads()
    torch.set_num_threads(threads)
    cfg, batch = SIZES[args.size]
    rng = np.random.default_rng(0)
    print(f"{args.size}: {batch} × {cfg.context} rows; BLAS and PyTorch threads {threads}; float32; "
          f"GFLOP/s, median of {args.repeats} turns of {args.calls} products\n")
    print("| product | (M, K) × (K, N) | NumPy | PyTorch | PyTorch / NumPy |")
    print("|---|---|---|---|---|")
    for name, sa, sb in shapes(cfg, batch * cfg.context):
        a = rng.standard_normal(sa, dtype=np.float32)
        b = rng.standard_normal(sb, dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        runs = {"numpy": lambda: a @ b, "torch": lambda: torch.mm(ta, tb)}
        flops = 2.0 * sa[0] * sa[1] * sb[1] * args.calls
        rates = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                time.sleep(0.2)  # the other side's spinning threads time out
                run()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    run()
                rates[k].append(flops / (time.perf_counter() - t0) / 1e9)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"| {name} | {sa} × {sb} | {med['numpy']:.0f} | {med['torch']:.0f} | "
              f"{med['torch'] / med['numpy']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
