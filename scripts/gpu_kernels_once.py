"""Every CUDA kernel once, at parcae-140m's sizes, against the reference: what gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, synccheck), so each kernel is launched with the block and
tile shapes of real training and every result is checked too.

    python3 scripts/gpu_kernels_once.py [--seq 1024]

Sizes: d = 768, 6 heads of 128, MLP 3072, vocabulary 32768, one sequence of --seq tokens. Each
kernel's output must be within 1e-4 of the op's CuPy code (`kernels.reference`), relative to the
reference's largest magnitude. Prints one line per kernel and ends with `KERNELS OK` or
`KERNELS FAIL: <names>` (exit status 1).
"""

import argparse
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from minparcae import kernels, optim  # noqa: E402
from minparcae.kernels import cuda as K  # noqa: E402
from minparcae.ops import attention, cross_entropy, embedding, injection, rmsnorm, rotary  # noqa: E402

TOL = 1e-4
reference = kernels.reference


def error(got, want):
    """max |got − want| over max |want|, both taken to the host in float64."""
    got, want = (cp.asnumpy(cp.asarray(a)).astype(np.float64) for a in (got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))


def cases(T):
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return cp.asarray(scale * rng.standard_normal(shape), dtype=cp.float32)

    d, H, hs, V = 768, 6, 128, 32768
    x, res, g = randn(1, T, d), randn(1, T, d), randn(1, T, d)
    w = 1 + randn(d, scale=0.2)
    y, c = rmsnorm.forward(x, w)
    yield "rmsnorm forward", y, reference(rmsnorm.forward, x, w)[0]
    yield "rmsnorm backward", rmsnorm.backward(g, c)["x"], reference(rmsnorm.backward, g, c)["x"]
    s, y2, xhat, r = K.add_rmsnorm_forward(x, res, w, rmsnorm.EPS)
    y2_ref, c2 = reference(rmsnorm.forward, x + res, w)
    yield "residual add + rmsnorm", y2, y2_ref
    yield "rmsnorm backward + residual", K.rmsnorm_backward(g, xhat, r, w, dres=res)[0], \
        reference(rmsnorm.backward, g, c2)["x"] + res
    view = randn(1, T, H * hs).reshape(1, T, H, hs).transpose(0, 2, 1, 3)
    cos, sin = rotary.tables(T, hs, xp=cp)
    yield "rotary (head view)", rotary.forward(view, cos, sin)[0], reference(rotary.forward, view, cos, sin)[0]
    u = randn(T, 4 * d)
    a, half_a2 = K.relu2_forward(u)
    yield "relu² forward", half_a2, 0.5 * cp.maximum(u, 0) ** 2
    yield "relu² backward", K.relu2_backward(u, a), u * a
    z, targets = randn(T, V, scale=10), cp.asarray(rng.integers(0, V, T))
    yield "cross-entropy", cross_entropy.forward(z, targets)[0], reference(cross_entropy.forward, z, targets)[0]
    ids = cp.asarray(rng.integers(0, V, (1, T)))
    yield "embedding backward (scatter-add)", embedding.backward(g, (ids, (V, d)))["table"], \
        reference(embedding.backward, g, (ids, (V, d)))["table"]
    p = {"inject.A_log": randn(d, scale=0.3), "inject.dt_bias": randn(d)}
    (xs, cs), (xs_ref, cs_ref) = injection.state_forward("diagonal", p, x, res), \
        reference(injection.state_forward, "diagonal", p, x, res)
    yield "injection forward", xs, xs_ref
    yield "injection backward", injection.state_backward(g, cs, p)["inject.A_log"], \
        reference(injection.state_backward, g, cs_ref, p)["inject.A_log"]
    q, k, v, dy = (randn(1, H, T, hs) for _ in range(4))
    yf, cache = K.attention_forward(q, k, v, hs ** -0.5)
    y_ref, cache_ref = attention.causal_attention_forward(q, k, v, hs ** -0.5)
    yield "flash attention forward", yf, y_ref
    for name, got, want in zip(("dq", "dk", "dv"), K.attention_backward(dy, cache),
                               attention.causal_attention_backward(dy, cache_ref)):
        yield f"flash attention backward {name}", got, want
    yield "simple attention forward", K.attention_forward_simple(q, k, v, hs ** -0.5)[0], y_ref
    params = {"core.0.mlp.fc": randn(d, 4 * d)}
    params_ref = {k_: a_.copy() for k_, a_ in params.items()}
    grads = {"core.0.mlp.fc": randn(d, 4 * d)}
    opt, opt_ref = optim.AdamW(), optim.AdamW()
    opt.step(params, grads, 1e-3)
    reference(opt_ref.step, params_ref, grads, 1e-3)
    yield "AdamW step", params["core.0.mlp.fc"], params_ref["core.0.mlp.fc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024, help="sequence length")
    args = ap.parse_args()
    failed = []
    for name, got, want in cases(args.seq):
        err = error(got, want)
        ok = err <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.1e}", flush=True)
        if not ok:
            failed.append(name)
    print(f"KERNELS FAIL: {', '.join(failed)}" if failed else "KERNELS OK", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
