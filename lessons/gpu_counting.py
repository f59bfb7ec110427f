"""Watch a kernel on Numba's CUDA simulator: which thread reads and writes which element of which
array, in global and in shared memory. Lesson 6 counts its kernels' memory traffic with it, and
grades its exercises (`report`, `exercises`).

On the simulator a kernel is plain Python run by one Python thread per CUDA thread, and an array
argument is anything that can be indexed. `watch` passes each NumPy array in a `Watched` wrapper
that logs every element it gives out or takes in under the simulated thread that asks, and gives
the kernel's `cuda.shared.array`s the same wrapper, so one launch yields exact counts per thread,
per block and per element. A GPU offers no such view: this module needs the simulator.
"""

import inspect
import linecache
import sys
import threading
from contextlib import contextmanager

import numpy as np
from numba import config

import exercise  # lessons/exercise.py, beside this file

MAX_SHOWN = 8  # wrong elements listed by `report`; the rest are counted


def _dims(d):
    """A launch dimension (an int or a tuple of up to three) as a 3-tuple."""
    d = (d,) if np.isscalar(d) else tuple(d)
    return tuple(int(n) for n in d) + (1,) * (3 - len(d))


class Traffic:
    """The accesses of one launch: for each array and kind ("read", "write"), the flat indices each
    thread touched, in order. Threads are named (block, thread), each a 3-tuple as in CUDA."""

    def __init__(self, grid, block):
        self.grid, self.block = _dims(grid), _dims(block)
        self.threads = [(b, t) for b in np.ndindex(*self.grid) for t in np.ndindex(*self.block)]
        self.arrays = {}  # name -> (shape, "global" | "shared")
        self.log = {}  # (name, kind) -> {thread: [flat index, ...]}

    def add(self, name, shape, space):
        self.arrays[name] = (shape, space)
        for kind in ("read", "write"):
            self.log[name, kind] = {}

    def record(self, name, kind, flat):
        thread = threading.current_thread()
        if not hasattr(thread, "threadIdx"):
            raise RuntimeError(f"{name} was accessed outside a simulated kernel")
        key = (tuple(thread.blockIdx), tuple(thread.threadIdx))
        # Each thread appends to its own list; list.append is atomic, so no lock is needed.
        self.log[name, kind].setdefault(key, []).append(flat)

    def names(self, space):
        return [n for n, (_, s) in self.arrays.items() if s == space]

    def per_thread(self, kind, space="global", names=None):
        """Accesses of each thread (in `self.threads` order) to the arrays named, or all of `space`."""
        names = self.names(space) if names is None else names
        return np.array([sum(len(self.log[n, kind].get(th, ())) for n in names) for th in self.threads])

    def per_element(self, name, kind="read", block=None):
        """How often each element of array `name` was accessed (by the threads of `block` only, if
        given), in the array's shape."""
        shape = self.arrays[name][0]
        flat = [i for (b, _), idx in self.log[name, kind].items() if block in (None, b) for i in idx]
        return np.bincount(np.array(flat, dtype=np.int64), minlength=int(np.prod(shape))).reshape(shape)

    def most_by_one_block(self, names, kind="read"):
        """The most accesses any one block made to any one element of the arrays named."""
        return max(int(self.per_element(n, kind, b).max(initial=0)) for n in names
                   for b in np.ndindex(*self.grid))

    def writers(self, name):
        """For each element of `name`, the last thread that wrote it, or None."""
        shape = self.arrays[name][0]
        last = np.full(int(np.prod(shape)), None, dtype=object)
        for thread, idx in self.log[name, "write"].items():
            for i in idx:
                last[i] = thread  # threads write distinct elements in a correct kernel
        return last.reshape(shape)

    def shared_floats(self):
        """Elements of shared memory the kernel declared per block."""
        return sum(int(np.prod(shape)) for shape, space in self.arrays.values() if space == "shared")

    def name_block(self, block):
        """A block as "block b", with only the axes the launch uses: "block 2", "block (1, 0)"."""
        return "block " + _axes(block, self.grid)

    def name_thread(self, thread):
        """A thread as "block b thread t", with only the axes the launch uses."""
        block, t = thread
        return f"{self.name_block(block)} thread {_axes(t, self.block)}"


def _axes(index, dims):
    used = [str(i) for i, n in zip(index, dims) if n > 1] or ["0"]
    return used[0] if len(used) == 1 else "(" + ", ".join(used) + ")"


class Watched:
    """An array as a simulated kernel sees it, one element per index, each access logged. Slices
    are refused: the counts are of elements, and a kernel on a GPU reads elements too."""

    def __init__(self, array, name, traffic, space="global"):
        self.array, self.name, self.traffic = array, name, traffic
        self.shape, self.ndim, self.size, self.dtype = array.shape, array.ndim, array.size, array.dtype
        traffic.add(name, array.shape, space)

    def _flat(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.ndim or not all(isinstance(i, (int, np.integer)) for i in index):
            raise IndexError(f"{self.name}[{index}]: index one element at a time, with {self.ndim} "
                             f"integer{'s' if self.ndim > 1 else ''} (the counts are per element)")
        if not all(0 <= i < n for i, n in zip(index, self.shape)):
            raise IndexError(f"{self.name}[{', '.join(str(int(i)) for i in index)}] is outside "
                             f"{self.name}'s shape {self.shape}")
        return int(np.ravel_multi_index(index, self.shape))

    def __getitem__(self, index):
        self.traffic.record(self.name, "read", self._flat(index))
        return self.array[index]

    def __setitem__(self, index, value):
        self.traffic.record(self.name, "write", self._flat(index))
        self.array[index] = value

    def __len__(self):
        return self.shape[0]


@contextmanager
def _watched_shared(traffic):
    """Make `cuda.shared.array` return `Watched` arrays during one launch: one per source line of the
    kernel, as the simulator's own (which it replaces for the launch), created under a lock so two
    threads of a block can never get two different arrays. Float arrays start as NaN, so a read
    before any thread wrote shows up in the result."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            raise NotImplementedError("watched kernels declare static shared arrays only")
        dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else np.dtype(dtype)
        frame = sys._getframe(1)
        where = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(where)
            if found is None:
                name = linecache.getline(*where).split("=")[0].strip()  # the variable it is bound to
                if name in traffic.arrays:
                    name = f"{name}@{where[1]}"
                fill = np.nan if np.issubdtype(dtype, np.floating) else 0
                found = self._allocations[where] = Watched(np.full(shape, fill, dtype), name, traffic,
                                                           "shared")
        return found

    kernelapi.FakeCUDAShared.array = array
    try:
        yield
    finally:
        kernelapi.FakeCUDAShared.array = original


def watch(kernel, grid, block, *args):
    """Launch kernel[grid, block](*args) on the simulator with every NumPy array argument watched,
    named as the kernel names its parameter. The arrays are updated in place; returns the Traffic."""
    if not config.ENABLE_CUDASIM:
        raise RuntimeError("counting memory accesses needs Numba's CUDA simulator: run with "
                           "NUMBA_ENABLE_CUDASIM=1")
    names = list(inspect.signature(kernel.py_func).parameters)
    traffic = Traffic(grid, block)
    args = [Watched(a, name, traffic) if isinstance(a, np.ndarray) else a for name, a in zip(names, args)]
    with _watched_shared(traffic):
        kernel[traffic.grid, traffic.block](*args)
    return traffic


def _thread_grid(traffic, counts):
    """Per-thread counts as lines of text, a line per block, threads in order."""
    width = max(len(str(int(c))) for c in counts)
    per_block = int(np.prod(traffic.block))
    return [f"{traffic.name_block(b):>12}: "
            + " ".join(f"{int(c):>{width}}" for c in counts[n * per_block:(n + 1) * per_block])
            for n, b in enumerate(np.ndindex(*traffic.grid))]


def report(title, traffic, outputs, budgets):
    """Print a verdict on one launch and return True when it is right and within budget.

    outputs: (name, got, want, tol): the array the kernel wrote, the reference, and the largest
    |got − want| allowed relative to max |want|. budgets: (what, kind, space, limit): the most
    accesses of `kind` ("read", "write") to `space` ("global", "shared") any one thread may make;
    each is shown thread by thread."""
    ok = True
    print(f"{title}: grid {traffic.grid[:1] if traffic.grid[1:] == (1, 1) else traffic.grid}, "
          f"block {traffic.block[:1] if traffic.block[1:] == (1, 1) else traffic.block}")
    for name, got, want, tol in outputs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        bad = ~(np.abs(got - want) <= tol * np.abs(want).max())  # NaN (never written) is wrong too
        ok &= not bad.any()
        print(f"  {name}: {bad.size - bad.sum()} of {bad.size} right "
              f"(|got − want| ≤ {tol:g} · max|want|)")
        if bad.any():
            writers = traffic.writers(name) if name in traffic.arrays else None
            for index in list(zip(*np.nonzero(bad)))[:MAX_SHOWN]:
                at = f"{name}[{', '.join(map(str, index))}]"
                who = None if writers is None else writers[index]
                by = "never written" if who is None else f"written by {traffic.name_thread(who)}"
                print(f"    {at} = {got[index]:.6g}, want {want[index]:.6g}: {by}")
            if bad.sum() > MAX_SHOWN:
                print(f"    ... and {bad.sum() - MAX_SHOWN} more")
    for what, kind, space, limit in budgets:
        counts = traffic.per_thread(kind, space)
        within = counts.max() <= limit
        ok &= within
        print(f"  {what}: most {counts.max()}, budget {limit}: {'ok' if within else 'OVER BUDGET'}")
        for line in _thread_grid(traffic, counts):
            print("    " + line)
    print(f"{title}: {'passed' if ok else 'FAILED'}")
    return bool(ok)


def exercises(numbers, solutions_file):
    """Read `--exercise N [--solution]` from the command line and return `run_exercise(number,
    kernel, check)`: when N is `number`, it grades `kernel` (or, with --solution, the kernel of the
    same name in `solutions_file`) with `check(kernel) -> passed`, then ends the program, with exit
    status 0 if it passed and 1 if not; for any other exercise, or none, it does nothing. The
    command line and the grading are lessons/exercise.py's, which the other lessons use too."""
    chosen, use_solution = exercise.arguments(numbers)

    def run_exercise(number, kernel, check):
        if chosen != number:
            return
        # `report` prints the verdict; an error names the simulated thread: tid=[x, y, z] ctaid=[...]
        passed = exercise.grade(number, kernel, check, solutions_file if use_solution else None,
                                noun="kernel")
        sys.exit(0 if passed else 1)

    return run_exercise
