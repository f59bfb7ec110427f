"""The attention core alone (scores, causal softmax, P·V and their backward) on the CPU: the fast
path (kernels/cpu.py: row blocks, BLAS and two Numba passes), the reference (ops/attention.py), and
PyTorch's scaled_dot_product_attention.

    python bench/bench_attention.py                          # the medium size's shape, (4, 6, 256, 64)
    python bench/bench_attention.py --shape 8,4,128,32       # tiny
    OPENBLAS_NUM_THREADS=1 python bench/bench_attention.py

Each implementation runs forward then backward on the same float32 q, k, v, dy; they take turns,
and the table gives the median of --repeats turns. PyTorch gets as many threads as NumPy's BLAS.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from minparcae.runtime import threads as blas_threads
from minparcae.kernels import cpu
from minparcae.ops import attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4,6,256,64", help="B,H,T,hs")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    B, H, T, hs = (int(n) for n in args.shape.split(","))
    torch.set_num_threads(blas_threads())
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((B, H, T, hs)).astype(np.float32) for _ in range(4))
    scale = 1.0 / hs**0.5

    def numpy_pair(fwd, bwd):
        def run():
            t0 = time.perf_counter()
            _, cache = fwd(q, k, v, scale)
            t1 = time.perf_counter()
            bwd(dy, cache)
            return t1 - t0, time.perf_counter() - t1
        return run

    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    tdy = torch.from_numpy(dy)

    def torch_run():
        t0 = time.perf_counter()
        y = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)
        t1 = time.perf_counter()
        torch.autograd.grad(y, (tq, tk, tv), tdy)
        return t1 - t0, time.perf_counter() - t1

    runs = {"minparcae fast path": numpy_pair(cpu.attention_forward, cpu.attention_backward),
            "minparcae reference": numpy_pair(attention.forward, attention.backward),
            "torch SDPA": torch_run}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # compilation, first allocations
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
    print(f"(B, H, T, hs) = ({B}, {H}, {T}, {hs}), float32, BLAS threads {blas_threads()}, "
          f"median of {args.repeats}\n\n| implementation | forward ms | backward ms |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(f for f, _ in t) * 1e3:.2f} | "
              f"{statistics.median(b for _, b in t) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
