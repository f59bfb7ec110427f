"""The one-GPU NCCL smoke test of data parallelism: minparcae.distributed's all-reduce, on device
arrays, over a single rank, must return its input (the sum over one rank is the identity).

    python3 scripts/gpu_nccl_smoke.py [--elements 1000000]

It builds the MPI world by hand (mpi4py's one-process world: no launcher needed), so the NCCL path
(unique id broadcast over MPI, NcclCommunicator, allReduce on CuPy's current stream) runs exactly as
it does for N ranks. Ends with `NCCL OK` or `NCCL FAIL: <why>` (exit status 1).
"""

import argparse
import sys

import numpy as np

from minparcae import backend


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1_000_000, help="elements of the gradient-like array")
    args = ap.parse_args(argv)
    backend.require_gpu("gpu_nccl_smoke.py")
    import cupy

    from minparcae.distributed import MPIWorld
    world = MPIWorld()
    if world.size != 1:
        sys.exit(f"NCCL FAIL: run it as one process, not {world.size} ranks")
    rng = np.random.default_rng(0)
    arrays = [cupy.asarray(rng.standard_normal(shape), dtype=cupy.float32)
              for shape in ((args.elements,), (3, 5), (7,))]
    out = world.sum(arrays)
    ok = all(bool((got == want).all()) and got.shape == want.shape for got, want in zip(out, arrays))
    print(f"all-reduce of {sum(a.size for a in arrays):,} float32 over 1 rank through NCCL: "
          + ("the identity" if ok else "NOT the identity"))
    print("NCCL OK" if ok else "NCCL FAIL: the one-rank sum differs from its input")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
