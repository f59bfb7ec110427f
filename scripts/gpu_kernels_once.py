"""Every CUDA kernel once, at parcae-140m's sizes, against the reference: what gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, synccheck), so each kernel is launched with the block and
tile shapes of real training and every result is checked too.

    python3 scripts/gpu_kernels_once.py [--seq 1024]

Each op that the GPU's op set (`kernels.select("gpu")`) replaces runs forward and backward through
that set and through the reference ops (`ops.REFERENCE`, their CuPy code) on the same CuPy arrays;
then the one-thread-per-row attention kernel, and one AdamW step with the kernel that
`kernels.adamw_update` gives against `optim.adamw_update`. Sizes: d = 768, 6 query heads of 128
sharing 2 key/value heads, MLP 3072, vocabulary 32768, one sequence of --seq tokens. Every output
must be within 1e-4 of the reference's, relative to the reference's largest magnitude. Prints one
line per output and ends with `KERNELS OK` or `KERNELS FAIL: <names>` (exit status 1).
"""

import argparse
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")

import numpy as np  # noqa: E402

from minparcae import backend, kernels, optim  # noqa: E402
from minparcae.ops import REFERENCE, embedding, rotary  # noqa: E402

TOL = 1e-4


def error(got, want):
    """max |got − want| over max |want|, both taken to the host in float64."""
    import cupy as cp
    got, want = (cp.asnumpy(cp.asarray(a)).astype(np.float64) for a in (got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))


def gradients(name, got, want):
    """(label, got, want) for each gradient of two backward results."""
    assert got.keys() == want.keys(), (name, sorted(got), sorted(want))
    return [(f"{name} d{k}", got[k], want[k]) for k in want]


def cases(T, d=768, H=6, H_kv=2, V=32768):
    """(name, output, reference output) for every launch of every kernel."""
    import cupy as cp

    from minparcae.kernels import cuda as K

    fast = kernels.select("gpu", np.float32)
    if fast is REFERENCE:
        raise SystemExit("MINPARCAE_KERNELS=0 turns the kernels off: there is nothing to check.")
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return cp.asarray(scale * rng.standard_normal(shape), dtype=cp.float32)

    def both(op, function, *args, **kw):
        return (getattr(getattr(ops, op), function)(*args, **kw) for ops in (fast, REFERENCE))

    hs = d // H
    x, res, g = randn(1, T, d), randn(1, T, d), randn(1, T, d)
    w = 1 + randn(d, scale=0.2)
    (y, c), (y_ref, c_ref) = both("rmsnorm", "forward", x, w)
    yield "rmsnorm forward", y, y_ref
    yield from gradients("rmsnorm backward", fast.rmsnorm.backward(g, c), REFERENCE.rmsnorm.backward(g, c_ref))
    (s, y, c), (s_ref, y_ref, c_ref) = both("rmsnorm", "add_forward", x, res, w)
    yield "residual add", s, s_ref
    yield "residual add + rmsnorm", y, y_ref
    yield from gradients("rmsnorm backward + residual", fast.rmsnorm.backward(g, c, dres=res),
                         REFERENCE.rmsnorm.backward(g, c_ref, dres=res))

    heads = randn(1, T, (H + 2 * H_kv) * hs).reshape(1, T, H + 2 * H_kv, hs)[:, :, :H]  # of x [W_q W_k W_v]
    cos, sin = rotary.tables(T, hs, xp=cp)
    (y, c), (y_ref, c_ref) = both("qk_norm", "forward", heads, cos, sin)
    yield "rotary + QK-norm forward (head view)", y, y_ref
    dy = randn(1, H, T, hs)
    yield from gradients("rotary + QK-norm backward", fast.qk_norm.backward(dy, c),
                         REFERENCE.qk_norm.backward(dy, c_ref))

    w_fc, w_proj = randn(d, 4 * d, scale=0.03), randn(4 * d, d, scale=0.02)
    (y, c), (y_ref, c_ref) = both("mlp", "forward", x, w_fc, w_proj)
    yield "ReLU² MLP forward", y, y_ref
    yield from gradients("ReLU² MLP backward", fast.mlp.backward(g, c), REFERENCE.mlp.backward(g, c_ref))

    z, targets = randn(T, V, scale=10), cp.asarray(rng.integers(0, V, T))
    (loss, c), (loss_ref, c_ref) = both("cross_entropy", "forward", z, targets)
    yield "cross-entropy loss", loss, loss_ref
    yield from gradients("cross-entropy backward", fast.cross_entropy.backward(1.0, c),
                         REFERENCE.cross_entropy.backward(1.0, c_ref))

    cache = embedding.Cache(cp.asarray(rng.integers(0, V, (1, T))), (V, d))
    yield from gradients("embedding backward (scatter-add)", fast.embedding.backward(g, cache),
                         REFERENCE.embedding.backward(g, cache))

    p = {"inject.A_log": randn(d, scale=0.3), "inject.dt_bias": randn(d)}
    (xs, c), (xs_ref, c_ref) = both("injection", "state_forward", "diagonal", p, x, res)
    yield "injection forward", xs, xs_ref
    yield from gradients("injection backward", fast.injection.state_backward(g, c, p),
                         REFERENCE.injection.state_backward(g, c_ref, p))

    q, k, v, dy = randn(1, H, T, hs), randn(1, H_kv, T, hs), randn(1, H_kv, T, hs), randn(1, H, T, hs)
    (y, c), (y_ref, c_ref) = both("attention", "forward", q, k, v, hs ** -0.5)
    yield "flash attention forward", y, y_ref
    yield from gradients("flash attention backward", fast.attention.backward(dy, c),
                         REFERENCE.attention.backward(dy, c_ref))
    k_rep, v_rep = (cp.repeat(a, H // H_kv, axis=1) for a in (k, v))  # the simple kernel has no groups
    yield "simple attention forward", K.attention_forward_simple(q, k_rep, v_rep, hs ** -0.5)[0], y_ref

    params = {"core.0.mlp.fc": randn(d, 4 * d)}
    params_ref = {name: a.copy() for name, a in params.items()}
    grads = {"core.0.mlp.fc": randn(d, 4 * d)}
    opt = optim.AdamW(update=kernels.adamw_update(params["core.0.mlp.fc"]))
    if opt.update is not K.adamw_step:
        raise SystemExit("kernels.adamw_update does not give the AdamW kernel for float32 CuPy arrays.")
    opt_ref = optim.AdamW()
    opt.step(params, grads, 1e-3)
    opt_ref.step(params_ref, grads, 1e-3)
    yield "AdamW step", params["core.0.mlp.fc"], params_ref["core.0.mlp.fc"]


def check(outputs):
    """Print a line per (name, got, want) and return the names of those not within TOL."""
    failed = []
    for name, got, want in outputs:
        err = error(got, want)
        ok = err <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.1e}", flush=True)
        if not ok:
            failed.append(name)
    print(f"KERNELS FAIL: {', '.join(failed)}" if failed else "KERNELS OK", flush=True)
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024, help="sequence length")
    args = ap.parse_args(argv)
    backend.require_gpu("gpu_kernels_once.py")
    sys.exit(1 if check(cases(args.seq)) else 0)


if __name__ == "__main__":
    main()
