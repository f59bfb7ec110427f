"""Where a minparcae training step spends its time, by op, to decide what to fuse next.

    python bench/profile_step.py                      # tiny, μ_rec 4, μ_bwd 2, 8 × 128 tokens
    python bench/profile_step.py --size medium --loops 16 --steps 3

Every function of every op in the step's op set (the CPU's fast set, or the reference with
MINPARCAE_KERNELS=0), the model's own functions and the optimiser run inside a timer. The timers
nest, and each reports its exclusive time: a call's duration minus that of the timed calls inside
it. The layers' products go through `linear`, so `linear.*` is the BLAS time of the projections
and the MLP; `mlp.*` is then its ReLU² alone, and `model.*` is what model.py does itself (the
head's product, residual adds, the attention layer's head split and merge and gate, the loop's
bookkeeping). The categories group those rows.
"""

import argparse
import functools
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np

from minparcae import backend, kernels, model, optim
from sizes import SIZES

CATEGORY = {  # row label prefix -> category
    "linear.": "matrix products (q/k/v/o, MLP, C, injection)",
    "model.": "model code (lm head product, residual adds, head split and merge, gate, loop bookkeeping)",
    "attention.": "attention core (scores, softmax, P·V)",
    "cross_entropy.": "cross-entropy",
    "embedding.": "embeddings (gather, scatter-add)",
    "optim.": "optimiser (AdamW)",
}
ELEMENTWISE = "elementwise / row-wise (norms, QK-norm with rotary, ReLU², injection)"
OP_FUNCTIONS = ("forward", "backward", "add_forward", "loss", "input_forward", "input_backward",
                "state_forward", "state_backward")


class OpTimer:
    """Exclusive wall time per label, for nested timed calls."""

    def __init__(self, sync):
        self.sync, self.own, self.calls, self.stack = sync, defaultdict(float), Counter(), []

    def wrap(self, label, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            self.stack.append(0.0)  # time spent in timed calls inside this one
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self.own[label] += dt - self.stack.pop()
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1] += dt
        return timed

    def patch(self, module, name, label):
        setattr(module, name, self.wrap(label, getattr(module, name)))


def instrument(timer, ops, opt):
    """Wrap every function of the op set's ops, the model's functions and the optimiser's update in
    timers (the op modules and namespaces are patched in place: this is a one-off script)."""
    for name, op in ops._asdict().items():
        for fn in OP_FUNCTIONS:
            if callable(getattr(op, fn, None)):
                timer.patch(op, fn, f"{name}.{fn}")
    for fn in ("forward", "backward", "block_forward", "block_backward", "attention_forward",
               "attention_backward", "coda_forward", "loop_forward", "loop_backward"):
        timer.patch(model, fn, f"model.{fn}")
    opt.update = timer.wrap("optim.adamw_update", opt.update)


def category(label):
    return next((c for prefix, c in CATEGORY.items() if label.startswith(prefix)), ELEMENTWISE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--loops", type=int, default=4, help="μ_rec (every sequence runs this many steps)")
    ap.add_argument("--backprop-depth", type=int, default=2, help="μ_bwd")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: per size)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed warm-up step")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = ap.parse_args()
    if min(args.steps, args.loops, args.backprop_depth, args.batch_size or 1) < 1:
        ap.error("--steps, --loops, --backprop-depth and --batch-size must be at least 1")
    backend.use_device(args.device)
    base, default_batch = SIZES[args.size]
    cfg = replace(base, mean_recurrence=args.loops, backprop_depth=args.backprop_depth)
    B, T = args.batch_size or default_batch, cfg.context
    rng = np.random.default_rng(0)
    ids = backend.to_device(rng.integers(0, cfg.vocab_size, (B, T)))
    targets = backend.to_device(rng.integers(0, cfg.vocab_size, (B, T)))
    h0 = backend.to_device(model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng))
    depths = np.full(B, cfg.mean_recurrence)
    params = model.init_params(cfg, seed=0)
    ops = kernels.for_array(params["wte"])
    opt = optim.AdamW(update=kernels.adamw_update(params["wte"]))

    def step():
        _, cache, _ = model.forward(params, cfg, ids, targets, depths=depths, h0=h0, train=True,
                                    ops=ops)
        grads = model.backward(params, cfg, cache)
        del cache
        opt.step(params, grads, 1e-4)

    step()  # JIT compilation and the optimiser's state are not what we want to see
    timer = OpTimer(backend.synchronize)
    instrument(timer, ops, opt)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - t0) / args.steps
    per_step = {label: t / args.steps for label, t in timer.own.items()}

    print(f"{args.size}, μ_rec {cfg.mean_recurrence} / μ_bwd {cfg.backprop_depth}, {B} × {T} tokens, "
          f"{backend.device()}: {total * 1e3:.1f} ms per step (timers included), mean of {args.steps}\n")
    print("| category | ms / step | % |\n|---|---|---|")
    by_category = defaultdict(float)
    for label, t in per_step.items():
        by_category[category(label)] += t
    for c, t in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {c} | {t * 1e3:.1f} | {100 * t / total:.1f} |")
    print(f"| untimed (the step function, Python between calls) | "
          f"{(total - sum(per_step.values())) * 1e3:.1f} | "
          f"{100 * (total - sum(per_step.values())) / total:.1f} |")
    print("\n| op (exclusive time) | category | calls / step | ms / step | % |\n|---|---|---|---|---|")
    for label, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {category(label)} | {timer.calls[label] // args.steps} | {t * 1e3:.1f} | "
              f"{100 * t / total:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as err:  # e.g. --device gpu without a usable GPU
        sys.exit(f"error: {err}")
