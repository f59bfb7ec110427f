"""On a CUDA GPU (skipped without one): every CUDA kernel against its op's reference, both on CuPy
arrays at realistic sizes, through the ops themselves (kernels on, then `use_kernels(False)`); and
the whole model's loss and gradients on the GPU (float32, kernels on) against NumPy on the CPU
(float64) for the same weights, batch, depths and initial state.

Tolerances: a kernel output within 1e-4 of the reference, relative to the reference's largest
magnitude (float32 sums of up to 32768 terms in another order, and atomics in any order); the
model's loss within 1e-5 relative and every gradient within 1e-4 normwise relative of float64 (CPU
float32 is within about 1.3e-6 of float64 on the same set-up).
"""

import numpy as np
import pytest

from minparcae import backend, kernels, model, optim
from minparcae.ops import attention, cross_entropy, embedding, injection, mlp, rmsnorm, rotary

if not backend.gpu_available():
    pytest.skip("needs a CUDA GPU with CuPy", allow_module_level=True)

import cupy as cp  # noqa: E402

from minparcae.kernels import cuda as K  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = 1e-4


reference = kernels.reference


def both(fn, *args, **kw):
    """(fn with the CUDA kernels, fn with the CuPy reference)."""
    return fn(*args, **kw), reference(fn, *args, **kw)


def close(a, b, tol=TOL):
    a, b = cp.asnumpy(cp.asarray(a)).astype(np.float64), cp.asnumpy(cp.asarray(b)).astype(np.float64)
    assert a.shape == b.shape
    assert np.isfinite(a).all()
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= tol * scale


def close_dicts(a, b, tol=TOL):
    assert set(a) == set(b)
    for k in a:
        close(a[k], b[k], tol)


def randn(*shape, scale=1.0, seed=0):
    return cp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype=cp.float32)


def test_kernels_are_chosen_for_float32_cupy_arrays():
    for name, (func, _) in K.KERNELS.items():
        assert kernels.fast(name, cp.zeros(1, cp.float32)) is func
        assert kernels.fast(name, cp.zeros(1, cp.float64)) is None


@pytest.mark.parametrize("shape, with_weight", [((8, 1024, 768), True), ((2, 6, 1024, 128), False)])
def test_rmsnorm(shape, with_weight):
    x, g, res = randn(*shape, seed=1), randn(*shape, seed=2), randn(*shape, seed=3)
    w = 1 + randn(shape[-1], scale=0.2, seed=4) if with_weight else None
    (y, c), (y_ref, c_ref) = both(rmsnorm.forward, x, w)
    close(y, y_ref)
    close_dicts(*both(rmsnorm.backward, g, c))
    s, y2, xhat, r = K.add_rmsnorm_forward(x, res, w, rmsnorm.EPS)
    y2_ref, c2_ref = reference(rmsnorm.forward, x + res, w)
    close(s, x + res)
    close(y2, y2_ref)
    close(K.rmsnorm_backward(g, xhat, r, w, dres=res)[0], reference(rmsnorm.backward, g, c2_ref)["x"] + res)


def test_rotary_on_the_strided_head_view():
    B, T, H, hs = 4, 1024, 6, 128
    x = randn(B, T, H * hs, seed=5).reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # as attention's _heads
    cos, sin = rotary.tables(T, hs, xp=cp)
    (y, c), (y_ref, _) = both(rotary.forward, x, cos, sin)
    close(y, y_ref)
    close_dicts(*both(rotary.backward, randn(B, H, T, hs, seed=6), c))


def test_mlp():
    x = randn(8, 512, 768, seed=7)
    w_fc, w_proj = randn(768, 3072, scale=0.03, seed=8), randn(3072, 768, scale=0.02, seed=9)
    (y, c), (y_ref, c_ref) = both(mlp.forward, x, w_fc, w_proj)
    close(y, y_ref)
    close_dicts(*both(mlp.backward, randn(8, 512, 768, seed=10), c))
    a, dg = c[2], randn(*c[2].shape, seed=11)
    close(K.relu2_backward(dg, a), dg * a)


def test_cross_entropy():
    logits = randn(4096, 32768, scale=10, seed=12)
    targets = cp.asarray(np.random.default_rng(13).integers(0, 32768, 4096))
    targets[::10] = cross_entropy.IGNORE_INDEX
    (loss, c), (loss_ref, c_ref) = both(cross_entropy.forward, logits, targets)
    close(loss, loss_ref, 1e-5)
    close(cross_entropy.backward(1.0, c)["logits"], cross_entropy.backward(1.0, c_ref)["logits"])


def test_embedding_backward_scatter_add():
    ids = cp.asarray(np.random.default_rng(14).integers(0, 32768, (8, 1024)))
    ids[:, ::7] = 3  # a row that collects many updates
    dout = randn(8, 1024, 768, seed=15)
    close_dicts(*both(embedding.backward, dout, (ids, (32768, 768))))


@pytest.mark.parametrize("B, H, T, hs", [(2, 6, 1024, 128), (1, 4, 1000, 64), (1, 2, 300, 256)])
def test_flash_attention(B, H, T, hs):
    q, k, v, dy = (randn(B, H, T, hs, seed=s) for s in (16, 17, 18, 19))
    y, cache = K.attention_forward(q, k, v, hs ** -0.5)
    y_ref, cache_ref = attention.causal_attention_forward(q, k, v, hs ** -0.5)
    close(y, y_ref)
    for got, want in zip(K.attention_backward(dy, cache), attention.causal_attention_backward(dy, cache_ref)):
        close(got, want)
    close(K.attention_forward_simple(q, k, v, hs ** -0.5)[0], y_ref)


def test_attention_op_with_grouped_heads_and_value_embedding():
    B, T, d, H, H_kv = 2, 512, 768, 6, 2
    hs = d // H
    x, ve = randn(B, T, d, seed=20), randn(B, T, H_kv * hs, seed=21)
    ws = [randn(d, n, scale=0.03, seed=22 + i) for i, n in enumerate((H * hs, H_kv * hs, H_kv * hs))]
    wo, w_gate = randn(H * hs, d, scale=0.02, seed=25), randn(32, H_kv, scale=0.1, seed=26)
    cos, sin = rotary.tables(T, hs, xp=cp)
    args = (x, *ws, wo, cos, sin, H, H_kv)
    (y, c), (y_ref, c_ref) = both(attention.forward, *args, ve=ve, w_gate=w_gate)
    close(y, y_ref)
    g = randn(B, T, d, seed=27)
    close_dicts(attention.backward(g, c), reference(attention.backward, g, c_ref))


def test_diagonal_injection():
    """The state step through the ops (kernels on) against the ops' CuPy code (kernels off); on float32
    CuPy arrays the op itself dispatches to the kernels, so only `reference` gives a reference."""
    p = {"inject.A_log": randn(768, scale=0.3, seed=28), "inject.dt_bias": randn(768, seed=29)}
    h, u, dx = randn(8, 1024, 768, seed=30), randn(8, 1024, 768, seed=31), randn(8, 1024, 768, seed=32)
    (x, cache), (x_ref, cache_ref) = both(injection.state_forward, "diagonal", p, h, u)
    close(x, x_ref)
    close_dicts(injection.state_backward(dx, cache, p), reference(injection.state_backward, dx, cache_ref, p))


def test_adamw_step_matches_optim_adamw():
    """Three steps of optim.AdamW with the kernel against the same steps with the ops' CuPy code:
    parameters and both moments."""
    params = {"core.0.mlp.fc": randn(768, 3072, seed=33), "core.0.norm1": randn(768, seed=34)}
    ours = {k: v.copy() for k, v in params.items()}
    opt, opt_ref = (optim.AdamW(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1) for _ in range(2))
    for t in range(1, 4):
        grads = {k: randn(*v.shape, seed=40 + t) for k, v in params.items()}
        opt.step(ours, grads, lr=1e-2)
        reference(opt_ref.step, params, grads, lr=1e-2)
    close_dicts(ours, params, 1e-6)
    close_dicts(opt.m, opt_ref.m, 1e-6)
    close_dicts(opt.v, opt_ref.v, 1e-6)


@pytest.mark.parametrize("overrides", [{}, {"value_embeddings": True, "n_kv_head": 2}])
def test_model_loss_and_gradients_match_the_cpu(overrides):
    cfg = model.preset("tiny", **overrides)
    rng = np.random.default_rng(0)
    p32 = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
    # move every weight off its init (zero output projections would zero many gradients)
    p32 = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p32.items()}
    B, T = 4, 64
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1))
    h0 = model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng, np.float32)
    depths = np.array([3, 5, 1, 4])  # sequences that join the loop late, and more steps than μ_bwd

    def run(p, xp):
        dt = p["wte"].dtype
        loss, cache, _ = model.forward(p, cfg, xp.asarray(ids[:, :-1]), xp.asarray(ids[:, 1:]), depths=depths,
                                       h0=xp.asarray(h0, dtype=dt), train=True)
        return loss, model.backward(p, cfg, cache)

    loss_gpu, grads_gpu = run({k: cp.asarray(v) for k, v in p32.items()}, cp)
    loss_cpu, grads_cpu = run({k: v.astype(np.float64) for k, v in p32.items()}, np)
    assert abs(loss_gpu - loss_cpu) <= 1e-5 * abs(loss_cpu)
    for name, g in grads_cpu.items():
        err = np.linalg.norm(cp.asnumpy(grads_gpu[name]) - g) / np.linalg.norm(g)
        assert err <= 1e-4, (name, err)
