"""Data parallelism over processes: MPI starts and coordinates them, NCCL reduces on GPUs.

    mpirun -n 2 python train.py --batch-size 32 ...      # or mpiexec; one process per GPU or core

Each of the N ranks holds the whole model and optimiser. Every rank draws the whole global batch
from the same seeded generator (window offsets, loop depths, initial states), exactly as one
process would, and then reads and runs only its own contiguous 1/N of the sequences. Its loss and
gradients are of the mean over its shard; scaled by 1/N and summed over the ranks they are the
mean over the global batch. The sum is one all-reduce per step over a single flat buffer (every
gradient, the loss and the diagnostics side by side): MPI's Allreduce on host arrays, NCCL's
allReduce on device arrays, with NCCL's unique id broadcast over MPI. The optimiser then runs on
identical gradients on every rank, so the weights stay identical without being sent. Rank 0 alone
prints, logs, evaluates, samples and writes checkpoints; every rank reads the checkpoint on
--resume, and a run may resume with a different N.

Without an MPI launcher (no OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_SIZE above 1 in the environment)
`init()` returns the single-process world and mpi4py is never imported.

Failure. A rank that raises, or exits on its own where the others would not, prints its error
and calls MPI_Abort, which takes every rank down at once instead of leaving the others waiting in
the next all-reduce. Exits that every rank takes together (a stop request, which is agreed through
the step's all-reduce, or too many non-finite steps, which every rank sees identically) are
marked `agreed` and end normally.
"""

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from . import cli
from .backend import array_module
from .files import describe_os_error

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def launched_size():
    """How many ranks the MPI launcher started, from its environment (1 without one)."""
    for var in SIZE_VARIABLES:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


class Single:
    """One process: every collective is the identity."""
    rank, size, local_rank = 0, 1, 0
    agreed = False

    @property
    def main(self):
        return self.rank == 0

    def shard(self, n):
        return slice(0, n)

    def sum(self, arrays):
        return list(arrays)

    def any(self, flag):
        return bool(flag)

    def barrier(self):
        pass

    def bcast(self, obj):
        return obj

    @contextlib.contextmanager
    def guard(self):
        yield


ABORT_GRACE_S = 1.0  # seconds a failing rank waits, so that its message is printed, before MPI_Abort


class MPIWorld(Single):
    """N ranks under an MPI launcher."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("this process was started by an MPI launcher, but mpi4py is not "
                               "installed: pip install mpi4py (and an MPI, e.g. pip install mpich).") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        self._nccl = None

    def shard(self, n):
        """This rank's rows of a global batch of n: a contiguous 1/size of them."""
        if n % self.size:
            raise ValueError(f"--batch-size {n} must divide by the {self.size} ranks: each rank takes "
                             f"an equal share of the global batch.")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def sum(self, arrays):
        """The element-wise sums over the ranks of `arrays` (all host or all device arrays of one
        dtype), through one flat buffer and one all-reduce; returns new arrays of the same shapes."""
        arrays = list(arrays)
        xp = array_module(arrays[0])
        flat = xp.concatenate([xp.asarray(a, dtype=arrays[0].dtype).ravel() for a in arrays])
        if xp is np:
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        else:
            self._nccl_sum(flat)
        out, at = [], 0
        for a in arrays:
            n = int(np.prod(a.shape))
            out.append(flat[at:at + n].reshape(a.shape))
            at += n
        return out

    def _nccl_sum(self, flat):
        import cupy
        from cupy.cuda import nccl
        if self._nccl is None:
            uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self._nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kinds[flat.dtype], nccl.NCCL_SUM,
                             cupy.cuda.get_current_stream().ptr)

    def any(self, flag):
        """Whether `flag` holds on any rank."""
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def barrier(self):
        self.comm.Barrier()

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    @contextlib.contextmanager
    def guard(self):
        """Run the body; an exception, or an exit the other ranks do not take too, aborts them all."""
        try:
            yield
        except SystemExit as exit_:
            if self.agreed or exit_.code in (None, 0):
                raise
            self._abort(f"stopped: {exit_.code}")
        except cli.USER_ERRORS as err:  # one sentence, as in one process (cli.run)
            self._abort(f"error: {err}")
        except OSError as err:
            self._abort(f"error: {describe_os_error(err)}")
        except BaseException as err:  # noqa: BLE001 (every failure must take the others down)
            self._abort("".join(traceback.format_exception(err)).rstrip())

    def _abort(self, message):
        print(f"rank {self.rank} of {self.size}: {message}\nstopping every rank (MPI_Abort).",
              file=sys.stderr, flush=True)
        # The launcher forwards a rank's output through a pipe and stops reading it once an abort
        # reaches it; without a pause the message was lost about one time in thirty.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)


def init():
    """The world this process belongs to: MPIWorld under an MPI launcher with more than one rank,
    else Single (and mpi4py is not imported)."""
    return MPIWorld() if launched_size() > 1 else Single()


def use_gpu_of_local_rank(world):
    """Give each rank on a machine its own GPU (the local rank's), before anything is allocated."""
    if world.size > 1:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        if world.local_rank >= n:
            raise RuntimeError(f"rank {world.rank} is local rank {world.local_rank} on a machine "
                               f"with {n} GPU(s): start at most one rank per GPU.")
        cupy.cuda.Device(world.local_rank).use()
