"""GPU benchmark: each CUDA kernel against the CuPy code it replaces, then one training step of
minparcae (forward, backward, AdamW) with the kernels on and off, against the PyTorch model of
bench/torch_parcae.py on the same weights and batch, eager and under torch.compile. Prints
Markdown tables.

    python bench/gpu_bench.py                      # parcae-140m, batch 8 × 1024 tokens
    python bench/gpu_bench.py --preset medium --compile --no-kernels

--preset is a model preset or a bench size of bench/sizes.py ("medium"). Times are wall-clock
milliseconds per call after a warm-up call (which compiles the kernels, or the torch.compile
graph), the GPU synchronised before the clock is read, so they include Python's launch overhead.
Every sequence runs μ_rec loop steps, μ_bwd of them with gradient.

MFU is model FLOPs per second (`model.flops_per_token` for that depth and sequence length, times
tokens per second) over a peak: by default 67 TFLOP/s, the float32 rate of an H100/H200 SXM without
tensor cores. Both sides compute in float32 with TF32 off (CuPy's and PyTorch's defaults), so that is
the rate their matrix products can reach; against the TF32 tensor-core peak (about 495 TFLOP/s dense)
the MFU would be 7.4 times smaller. Peak memory: the most CuPy's memory pool held during the steps
(`total_bytes` after the timed steps, the pool emptied before them), and PyTorch's
`max_memory_allocated` (tensors only, without its caching slack).
"""

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

from minparcae import backend, kernels, model, optim
from minparcae.kernels import cuda as K
from minparcae.ops import attention, cross_entropy, embedding, injection, rmsnorm, rotary
from sizes import SIZES

FP32_PEAK_TFLOPS = 67.0  # H100 / H200 SXM, float32 without tensor cores


def timed(fn, repeat):
    """Milliseconds per call of fn, after one warm-up call."""
    fn()
    backend.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    backend.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def reference(fn):
    """fn run with every fast path off (the ops' CuPy code)."""
    def run():
        kernels.use_kernels(False)
        try:
            return fn()
        finally:
            kernels.use_kernels(True)
    return run


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def relu2_reference(u):
    a = u * (u > 0)
    return a, 0.5 * a * a


def kernel_rows(cfg, B, T, repeat):
    """(name, shape, reference ms, kernel ms, speed-up) for each kernel at the model's sizes; the
    reference is the op's CuPy code, except where the name says otherwise."""
    import cupy as cp
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return cp.asarray(scale * rng.standard_normal(shape), dtype=cp.float32)

    d, H, V = cfg.d_model, cfg.n_head, cfg.vocab_size
    hs, N = d // H, B * T
    x, w, g = randn(B, T, d), 1 + randn(d, scale=0.1), randn(B, T, d)
    q, k, v, dy = (randn(B, H, T, hs) for _ in range(4))
    head_view = randn(B, T, d).reshape(B, T, H, hs).transpose(0, 2, 1, 3)
    cos, sin = rotary.tables(T, hs, xp=cp)
    u = randn(N, cfg.mlp_ratio * d)
    z, targets = randn(N, V, scale=3), cp.asarray(rng.integers(0, V, N))
    valid = targets >= 0
    ids = cp.asarray(rng.integers(0, V, (B, T)))
    p = {"inject.A_log": randn(d, scale=0.3), "inject.dt_bias": randn(d)}
    A_bar = injection.diagonal_decay(p["inject.A_log"], p["inject.dt_bias"])[0]
    fc = {n: randn(d, cfg.mlp_ratio * d) for n in ("m", "v", "p", "g")}
    fc["v"] = cp.abs(fc["v"])
    opt = optim.AdamW()
    opt.step({"core.0.mlp.fc": fc["p"]}, {"core.0.mlp.fc": fc["g"]}, 1e-3)  # allocates its moments
    scale = hs ** -0.5
    _, flash_cache = K.attention_forward(q, k, v, scale)
    _, ref_cache = attention.causal_attention_forward(q, k, v, scale)

    def rms_step(a, weight):
        out, c = rmsnorm.forward(a, weight)
        return rmsnorm.backward(out, c)

    cases = [
        ("RMSNorm fwd+bwd", (N, d), reference(lambda: rms_step(x, w)), lambda: rms_step(x, w)),
        ("QK-norm fwd+bwd", (B * H * T, hs), reference(lambda: rms_step(q, None)), lambda: rms_step(q, None)),
        ("residual add + RMSNorm (reference: add, then the RMSNorm kernel)", (N, d),
         lambda: rmsnorm.forward(x + g, w), lambda: K.add_rmsnorm_forward(x, g, w, 1e-5)),
        ("rotary (strided q view)", (B, H, T, hs), reference(lambda: rotary.forward(head_view, cos, sin)),
         lambda: rotary.forward(head_view, cos, sin)),
        ("ReLU² forward", tuple(u.shape), lambda: relu2_reference(u), lambda: K.relu2_forward(u)),
        ("softmax cross-entropy", (N, V), lambda: cross_entropy.softmax_xent(z, targets, valid, N),
         lambda: K.softmax_xent(z, targets, valid, N)),
        ("embedding backward", (V, d), reference(lambda: embedding.backward(g, (ids, (V, d)))),
         lambda: embedding.backward(g, (ids, (V, d)))),
        ("attention forward (flash)", (B, H, T, hs), lambda: attention.causal_attention_forward(q, k, v, scale),
         lambda: K.attention_forward(q, k, v, scale)),
        ("attention forward (simple)", (B, H, T, hs), lambda: attention.causal_attention_forward(q, k, v, scale),
         lambda: K.attention_forward_simple(q, k, v, scale)),
        ("attention backward (flash)", (B, H, T, hs),
         lambda: attention.causal_attention_backward(dy, ref_cache),
         lambda: K.attention_backward(dy, flash_cache)),
        ("injection x = Ā⊙h + u", (N, d), lambda: A_bar * x + g, lambda: K.injection_forward(x, g, A_bar)),
        ("injection backward", (N, d), lambda: (g * A_bar, (g * x).reshape(-1, d).sum(axis=0)),
         lambda: K.injection_backward(g, x, A_bar)),
        ("AdamW step", tuple(fc["p"].shape),
         reference(lambda: opt.step({"core.0.mlp.fc": fc["p"]}, {"core.0.mlp.fc": fc["g"]}, 1e-3)),
         lambda: K.adamw_step(fc["p"], fc["g"], fc["m"], fc["v"], 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05)),
    ]
    rows = []
    for name, shape, ref_fn, kernel_fn in cases:
        t_ref, t_kernel = timed(ref_fn, repeat), timed(kernel_fn, repeat)
        speedup = f"{t_ref / t_kernel:.2f}×"
        rows.append((name, "×".join(map(str, shape)), f"{t_ref:.3f}", f"{t_kernel:.3f}", speedup))
    return rows


def minparcae_step(params_np, cfg, batch, use_kernels, steps):
    """(ms per training step, peak pool bytes) of minparcae on the GPU."""
    import cupy as cp
    ids, targets, depths, h0 = batch
    params = {k: cp.asarray(v) for k, v in params_np.items()}
    ids, targets, h0 = cp.asarray(ids), cp.asarray(targets), cp.asarray(h0)
    opt = optim.AdamW()
    kernels.use_kernels(use_kernels)
    pool = cp.get_default_memory_pool()

    def step():
        loss, cache, _ = model.forward(params, cfg, ids, targets, depths=depths, h0=h0, train=True)
        grads = model.backward(params, cfg, cache)
        opt.step(params, grads, 1e-3)

    try:
        step()
        backend.synchronize()
        pool.free_all_blocks()  # from here the pool grows to what the steps need at once
        return timed(step, steps), pool.total_bytes()
    finally:
        kernels.use_kernels(True)


def torch_step(params_np, cfg, batch, steps, compile):
    """(ms per training step, peak bytes) of bench/torch_parcae.py's TrainStep on the GPU."""
    import torch
    import torch_parcae
    ids, targets, depths, h0 = batch
    train = torch_parcae.TrainStep(params_np, cfg, lambda n, s: not optim.no_weight_decay(n, s),
                                   device="cuda", lr=1e-3, compile=compile)
    ids_t, targets_t, h0_t = train.batch(ids, targets, h0)
    train(ids_t, targets_t, depths, h0_t)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train(ids_t, targets_t, depths, h0_t)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, torch.cuda.max_memory_allocated()


def config(name):
    """A model preset, or a bench size of bench/sizes.py; exits with one sentence for anything else."""
    if name in SIZES:
        return SIZES[name][0]
    if name in model.PRESETS:
        return model.preset(name)
    sys.exit(f"unknown size {name!r}: use a preset ({', '.join(model.PRESETS)}) or a bench size "
             f"({', '.join(SIZES)}).")


def row(label, ms, peak_bytes, tokens, flops_per_token, peak_tflops):
    tokens_per_s = tokens / ms * 1e3
    mfu = tokens_per_s * flops_per_token / (peak_tflops * 1e12)
    return label, f"{ms:.1f}", f"{tokens_per_s:,.0f}", f"{100 * mfu:.1f}%", f"{peak_bytes / 2**30:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="parcae-140m", help="model preset or bench size (medium)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (at most the context)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per kernel")
    ap.add_argument("--compile", action="store_true", help="also time the PyTorch step under torch.compile")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    ap.add_argument("--peak-tflops", type=float, default=FP32_PEAK_TFLOPS,
                    help="the GPU's peak for MFU (default: H100/H200 float32 without tensor cores)")
    args = ap.parse_args(argv)
    cfg = config(args.preset)
    if backend.use_device("auto") != "gpu":
        sys.exit("gpu_bench.py needs an NVIDIA GPU with CuPy: install minparcae[gpu] on a machine with one.")
    import cupy as cp
    B, T = args.batch, min(args.seq, cfg.context)
    flops = model.flops_per_token(replace(cfg, context=T), train=True)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"## minparcae GPU benchmark: {name}, {args.preset}, batch {B} × {T} tokens\n")

    if not args.no_kernels:
        print("### Kernels against the CuPy code they replace, ms per call\n")
        print(table(("op", "shape", "reference", "kernel", "speed-up"), kernel_rows(cfg, B, T, args.repeat))
              + "\n", flush=True)

    rng = np.random.default_rng(0)
    params_np = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1))
    depths = np.full(B, cfg.mean_recurrence)  # every sequence runs μ_rec steps, μ_bwd with gradient
    batch = (tokens[:, :-1], tokens[:, 1:], depths, model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng))
    rows = []
    for label, on in (("minparcae, kernels on", True), ("minparcae, kernels off (CuPy)", False)):
        ms, peak = minparcae_step(params_np, cfg, batch, on, args.steps)
        rows.append(row(label, ms, peak, B * T, flops, args.peak_tflops))
        print(f"{label}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    cp.get_default_memory_pool().free_all_blocks()
    for compile in (False, True) if args.compile else (False,):
        label = "PyTorch (torch_parcae.py)" + (", torch.compile" if compile else ", eager")
        try:
            ms, peak = torch_step(params_np, cfg, batch, args.steps, compile)
            rows.append(row(label, ms, peak, B * T, flops, args.peak_tflops))
        except Exception as e:  # a comparison, not the subject: report and go on
            rows.append((label, f"failed: {type(e).__name__}: {e}"[:120], "", "", ""))
        print(f"{label}: done", file=sys.stderr, flush=True)
    print(f"### Training step: forward, backward, AdamW (depth {cfg.mean_recurrence}, {cfg.backprop_depth} "
          f"with gradient; float32; {flops / 1e9:.2f} GFLOP per token; MFU of {args.peak_tflops:g} TFLOP/s)\n")
    print(table(("implementation", "ms / step", "tokens / s", "MFU", "peak GiB"), rows))


if __name__ == "__main__":
    main()
