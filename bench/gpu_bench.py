"""GPU benchmark: each op that the GPU's op set (`kernels.select("gpu")`, the CUDA replacements)
replaces, against the reference op (`ops.REFERENCE`, its CuPy code), then one training step of
minparcae (forward, backward, AdamW) with the GPU's op set and AdamW kernel and with the reference
ops and update, against the PyTorch model of bench/torch_parcae.py on the same weights and batch,
eager and under torch.compile. Prints Markdown tables.

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

from minparcae import backend, kernels, model, optim, runtime
from minparcae.kernels import cuda as K
from minparcae.ops import REFERENCE, embedding, rotary
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


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def kernel_rows(cfg, B, T, repeat):
    """(name, shape, reference ms, GPU set ms, speed-up) for each replaced op at the model's sizes,
    forward and backward unless the name says otherwise; then the one-thread-per-row attention
    kernel and the AdamW update, each against the reference."""
    import cupy as cp
    fast = kernels.select("gpu", np.float32)
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return cp.asarray(scale * rng.standard_normal(shape), dtype=cp.float32)

    d, H, H_kv, V = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.vocab_size
    hs, N, m = d // H, B * T, cfg.mlp_ratio * d
    x, w, g = randn(B, T, d), 1 + randn(d, scale=0.1), randn(B, T, d)
    q, dy = randn(B, H, T, hs), randn(B, H, T, hs)
    k, v = randn(B, H_kv, T, hs), randn(B, H_kv, T, hs)
    qkv = randn(B, T, (H + 2 * H_kv) * hs).reshape(B, T, H + 2 * H_kv, hs)
    cos, sin = rotary.tables(T, hs, cfg.rope_base, xp=cp)
    w_fc, w_proj = randn(d, m, scale=0.03), randn(m, d, scale=0.02)
    z, targets = randn(N, V, scale=3), cp.asarray(rng.integers(0, V, N))
    cache = embedding.Cache(cp.asarray(rng.integers(0, V, (B, T))), (V, d))
    p = {"inject.A_log": randn(d, scale=0.3), "inject.dt_bias": randn(d)}
    adam = {n: randn(d, m) for n in ("p", "g", "m", "v")}
    adam["v"] = cp.abs(adam["v"])
    scale = hs ** -0.5

    def calls(ops):
        """name -> (shape, a call of op set `ops`: forward, then backward from its own cache)."""
        return {
            "RMSNorm": ((N, d), lambda: ops.rmsnorm.backward(g, ops.rmsnorm.forward(x, w)[1])),
            "residual add + RMSNorm": ((N, d), lambda: ops.rmsnorm.backward(
                g, ops.rmsnorm.add_forward(x, g, w)[2], dres=g)),
            "rotary + QK-norm (strided q view)": ((B, H, T, hs), lambda: ops.qk_norm.backward(
                dy, ops.qk_norm.forward(qkv[:, :, :H], cos, sin)[1])),
            "ReLU² MLP (with its matrix products)": ((N, d, m), lambda: ops.mlp.backward(
                g, ops.mlp.forward(x, w_fc, w_proj)[1])),
            "softmax cross-entropy": ((N, V), lambda: ops.cross_entropy.backward(
                1.0, ops.cross_entropy.forward(z, targets)[1])),
            "embedding (backward only)": ((V, d), lambda: ops.embedding.backward(g, cache)),
            "attention (forward only)": ((B, H, T, hs), lambda: ops.attention.forward(q, k, v, scale)),
            "attention": ((B, H, T, hs), lambda: ops.attention.backward(
                dy, ops.attention.forward(q, k, v, scale)[1])),
            "injection state step x = Ā⊙h + u": ((N, d), lambda: ops.injection.state_backward(
                g, ops.injection.state_forward("diagonal", p, x, g)[1], p)),
        }

    fast_calls = calls(fast)
    timings = [(name, shape, ref_fn, fast_calls[name][1]) for name, (shape, ref_fn) in calls(REFERENCE).items()]
    k_rep, v_rep = (cp.repeat(a, H // H_kv, axis=1) for a in (k, v))  # the simple kernel has no groups
    update = kernels.adamw_update(adam["p"])
    timings += [
        ("attention forward, one thread per row (kernel)", (B, H, T, hs),
         lambda: REFERENCE.attention.forward(q, k, v, scale),
         lambda: K.attention_forward_simple(q, k_rep, v_rep, scale)),
        ("AdamW update (kernels.adamw_update)", (d, m),
         lambda: optim.adamw_update(*adam.values(), 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05),
         lambda: update(*adam.values(), 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05)),
    ]
    rows = []
    for name, shape, ref_fn, fast_fn in timings:
        t_ref, t_fast = timed(ref_fn, repeat), timed(fast_fn, repeat)
        speedup = f"{t_ref / t_fast:.2f}×"
        rows.append((name, "×".join(map(str, shape)), f"{t_ref:.3f}", f"{t_fast:.3f}", speedup))
    return rows


def minparcae_step(params_np, cfg, batch, fast, steps):
    """(ms per training step, peak pool bytes) of minparcae on the GPU, with the GPU's op set and
    AdamW kernel (`fast`) or the reference ops and update."""
    import cupy as cp
    ids, targets, depths, h0 = batch
    params = {k: cp.asarray(v) for k, v in params_np.items()}
    ids, targets, h0 = cp.asarray(ids), cp.asarray(targets), cp.asarray(h0)
    ops = kernels.for_array(params["wte"]) if fast else REFERENCE
    opt = optim.AdamW(update=kernels.adamw_update(params["wte"]) if fast else None)
    pool = cp.get_default_memory_pool()

    def step():
        _, grads, _ = runtime.loss_and_grads(params, cfg, ids, targets, depths=depths, h0=h0, ops=ops)
        opt.step(params, grads, 1e-3)

    step()
    backend.synchronize()
    pool.free_all_blocks()  # from here the pool grows to what the steps need at once
    return timed(step, steps), pool.total_bytes()


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
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per op")
    ap.add_argument("--compile", action="store_true", help="also time the PyTorch step under torch.compile")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-op table")
    ap.add_argument("--peak-tflops", type=float, default=FP32_PEAK_TFLOPS,
                    help="the GPU's peak for MFU (default: H100/H200 float32 without tensor cores)")
    args = ap.parse_args(argv)
    cfg = config(args.preset)
    backend.require_gpu("gpu_bench.py")
    import cupy as cp
    B, T = args.batch, min(args.seq, cfg.context)
    flops = model.flops_per_token(replace(cfg, context=T), train=True)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"## minparcae GPU benchmark: {name}, {args.preset}, batch {B} × {T} tokens\n")

    if not args.no_kernels:
        print("### The GPU's op set against the reference ops (CuPy), ms per call\n")
        print(table(("op", "shape", "reference", "GPU set", "speed-up"), kernel_rows(cfg, B, T, args.repeat))
              + "\n", flush=True)

    rng = np.random.default_rng(0)
    params_np = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1))
    depths = np.full(B, cfg.mean_recurrence)  # every sequence runs μ_rec steps, μ_bwd with gradient
    batch = (tokens[:, :-1], tokens[:, 1:], depths, model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng))
    rows = []
    for label, on in (("minparcae, GPU op set and AdamW kernel", True),
                      ("minparcae, reference ops (CuPy)", False)):
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
