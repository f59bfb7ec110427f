"""Training-step speed and memory: minparcae against the PyTorch reference (bench/torch_parcae.py).

    python bench/bench_train.py                                  # CPU: tiny and medium, μ_rec 4 and 16
    python bench/bench_train.py --sizes tiny --repeats 9 --out bench/cpu.md
    python bench/bench_train.py --device gpu                     # adds a torch.compile column

A training step is forward, backward through the last μ_bwd loop steps, and AdamW (the same
hyper-parameters and weight-decay groups on both sides). Both implementations start from the
same float32 parameters, batch and initial state, with every sequence at depth μ_rec (no Poisson
draw), so they do the same work. Steps are timed alternately, one of each per repeat, after one
warm-up step each (after compiling, for torch.compile). The table gives the median tokens/s of
each, and as their ratio the median over the repeats of the ratio within each repeat: two steps
timed back to back see the same machine, so that ratio holds up when the machine's speed drifts
between repeats (on a shared host it can change by 2× within a minute).

Memory, "peak" below: how far memory rose during one step above what the process held just
before it (parameters, optimiser state, batch), so it is the activations, gradients and
temporaries of one step:
  cpu  peak resident set size (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus the
       resident set size at the start of the step, measured after gc.collect() and malloc_trim(0)
       have handed freed memory back to the system. NumPy and PyTorch both allocate through malloc,
       so the one method measures both.
  gpu  PyTorch: torch.cuda.max_memory_allocated − memory_allocated at the start of the step;
       minparcae: the same count for CuPy's memory pool, kept by a memory hook (bytes handed out
       minus bytes returned, highest value during the step).
Threads on CPU: PyTorch gets as many threads as NumPy's BLAS (OpenBLAS) is set to, and minparcae
splits the batch over that many threads (minparcae/runtime.py; BLAS single-threaded inside each).
OPENBLAS_NUM_THREADS=1 gives a one-thread comparison, the steadiest on a shared machine.
"""

import argparse
import ctypes
import gc
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

import torch_parcae
from minparcae import backend, kernels, model, optim, runtime
from sizes import SIZES

LR = 1e-4  # small: the parameters should stay sane over many timed steps
LIBC = ctypes.CDLL("libc.so.6")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--loops", default="4,16", help="comma-separated μ_rec values")
    ap.add_argument("--backprop-depth", type=int, default=2, help="μ_bwd")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps of each implementation")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: per size)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        ap.error(f"unknown size {', '.join(unknown)}: choose from {', '.join(SIZES)}")
    try:
        args.loops = [int(n) for n in args.loops.split(",")]
    except ValueError:
        ap.error(f"--loops takes comma-separated integers, not {args.loops!r}")
    if min(args.repeats, args.backprop_depth, *args.loops) < 1 or (args.batch_size or 1) < 1:
        ap.error("--repeats, --loops, --backprop-depth and --batch-size must be at least 1")
    if args.device == "gpu" and not (torch.cuda.is_available() and backend.gpu_available()):
        ap.error("--device gpu needs a CUDA build of PyTorch and CuPy (minparcae[gpu]) on an NVIDIA GPU")
    return args


def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def cpu_peak_bytes(step):
    gc.collect()
    LIBC.malloc_trim(0)
    start = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return (status_kib("VmHWM") - start) * 1024


def torch_gpu_peak_bytes(step):
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def cupy_peak_bytes(step):
    import cupy

    class PoolPeak(cupy.cuda.MemoryHook):
        name = "pool_peak"
        now = peak = 0

        def malloc_postprocess(self, **kw):
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw):
            self.now -= kw["mem_size"]

    cupy.cuda.Device().synchronize()
    with PoolPeak() as hook:
        step()
        cupy.cuda.Device().synchronize()
    return hook.peak


def minparcae_step(cfg, params, ids, targets, depths, h0):
    ops = kernels.for_array(params["wte"])
    opt = optim.AdamW(update=kernels.adamw_update(params["wte"]))

    def step():  # what train.py does: on the CPU the batch is split over the threads
        _, grads, _ = runtime.loss_and_grads(params, cfg, ids, targets, depths=depths, h0=h0, ops=ops)
        opt.step(params, grads, LR)
    return step


def torch_step(cfg, params_np, ids, targets, depths, h0, device, compile=False):
    run = torch_parcae.TrainStep(params_np, cfg, lambda k, s: not optim.no_weight_decay(k, s),
                                 device=device, lr=LR, compile=compile)
    ids_t, targets_t, h0_t = run.batch(ids, targets, h0)
    return lambda: run(ids_t, targets_t, depths, h0_t)


def bench_one(cfg, batch_size, repeats, device):
    """Step seconds of each implementation per repeat, and peak bytes, on one config."""
    rng = np.random.default_rng(0)
    T = cfg.context
    ids = rng.integers(0, cfg.vocab_size, (batch_size, T))
    targets = rng.integers(0, cfg.vocab_size, (batch_size, T))
    h0 = model.initial_state(cfg, (batch_size, T, cfg.d_h), "like-init", rng)  # float32, host
    depths = np.full(batch_size, cfg.mean_recurrence)
    params = model.init_params(cfg, seed=0, dtype=np.float32)  # on the active device
    host = {k: backend.to_host(v).copy() for k, v in params.items()}
    torch_device = "cuda" if device == "gpu" else "cpu"
    steps = {"minparcae": minparcae_step(cfg, params, backend.to_device(ids), backend.to_device(targets),
                                         depths, backend.to_device(h0)),
             "torch": torch_step(cfg, host, ids, targets, depths, h0, torch_device)}
    if device == "gpu":
        try:
            steps["torch.compile"] = torch_step(cfg, host, ids, targets, depths, h0, "cuda", compile=True)
            steps["torch.compile"]()  # compiles
        except Exception as err:  # the table says n/a; the reason goes to the console
            print(f"torch.compile failed ({type(err).__name__}: {err}); reporting n/a")
            steps.pop("torch.compile")

    def sync():
        backend.synchronize()
        if device == "gpu":
            torch.cuda.synchronize()

    def timed(step):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    for step in steps.values():  # JIT compilation, first-call allocations, optimiser state
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    if device == "gpu":
        peak = {name: (cupy_peak_bytes if name == "minparcae" else torch_gpu_peak_bytes)(step)
                for name, step in steps.items()}
    else:
        peak = {name: cpu_peak_bytes(step) for name, step in steps.items()}
    return times, peak


def table(rows, compiled):
    head = ["size", "parameters", "μ_rec / μ_bwd", "tokens / step", "minparcae tok/s", "torch tok/s",
            "minparcae / torch", "minparcae peak MiB", "torch peak MiB"]
    if compiled:
        head += ["torch.compile tok/s", "torch.compile peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size, cfg, tokens, times, peak in rows:
        tok_s = {name: tokens / statistics.median(t) for name, t in times.items()}
        ratio = statistics.median(t / m for t, m in zip(times["torch"], times["minparcae"]))
        cells = [size, f"{model.count_params(cfg) / 1e6:.1f}M",
                 f"{cfg.mean_recurrence} / {cfg.backprop_depth}", f"{tokens:,}",
                 f"{tok_s['minparcae']:,.0f}", f"{tok_s['torch']:,.0f}",
                 f"{ratio:.2f}",
                 f"{peak['minparcae'] / 2**20:.0f}", f"{peak['torch'] / 2**20:.0f}"]
        if compiled:
            cells += ([f"{tok_s['torch.compile']:,.0f}", f"{peak['torch.compile'] / 2**20:.0f}"]
                      if "torch.compile" in tok_s else ["n/a", "n/a"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    backend.use_device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(runtime.threads())
    rows = []
    for size in args.sizes.split(","):
        base, default_batch = SIZES[size]
        batch_size = args.batch_size or default_batch
        for loops in args.loops:
            cfg = replace(base, mean_recurrence=loops, backprop_depth=args.backprop_depth)
            times, peak = bench_one(cfg, batch_size, args.repeats, args.device)
            rows.append((size, cfg, batch_size * cfg.context, times, peak))
            print(f"{size} μ_rec {loops}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms"
                                                          for k, v in times.items()), flush=True)
    if args.device == "cpu":
        setup = (f"cpu: minparcae threads (NumPy's OpenBLAS) {runtime.threads()}, PyTorch threads "
                 f"{torch.get_num_threads()}")
    else:
        setup = f"gpu: {torch.cuda.get_device_name()}"
    setup += f"; float32; medians of {args.repeats} alternating steps; torch {torch.__version__}, numpy {np.__version__}"
    text = setup + "\n\n" + table(rows, compiled=args.device == "gpu") + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
