"""On a CUDA GPU (skipped without one): the GPU's op set, `kernels.select("gpu")` (the reference
with the CUDA replacements of minparcae/kernels/cuda.py), against the reference ops, both on CuPy
arrays: every replaced function through tests/replacements.py, with attention and QK-norm at
parcae-140m's heads, then each op again at parcae-140m's sizes; the flash kernels directly; the
AdamW kernel that `kernels.adamw_update` gives against optim.adamw_update; and the whole model's
loss and gradients on the GPU (float32, the GPU's op set) against NumPy on the CPU (float64, the
reference) for the same weights, batch, depths and initial state.

Without a GPU, tests/test_fakecupy.py runs this file's replacement, injection and AdamW tests on
its CuPy stand-in: the replacement test at tiny sizes with the kernels launched on Numba's
simulator, and the injection and AdamW tests with stand-in kernels, right and wrong, to show that
they catch a wrong kernel.

Tolerances: a kernel output within 1e-4 of the reference, relative to the reference's largest
magnitude (float32 sums of up to 32768 terms in another order, and atomics in any order); AdamW
within 1e-6; the model's loss within 1e-5 relative and every gradient within 1e-4 normwise relative
of float64 (CPU float32 is within about 1.3e-6 of float64 on the same set-up).
"""

import types

import numpy as np
import pytest

from minparcae import backend, kernels, model, optim, runtime
from minparcae.ops import REFERENCE, embedding, rotary
from replacements import EXERCISED, exercise

if not backend.gpu_available():
    pytest.skip("needs a CUDA GPU with CuPy", allow_module_level=True)

import cupy as cp  # noqa: E402

from minparcae.kernels import cuda as K  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = 1e-4
HARNESS_SIZES = dict(T=1024, hs=128, width=768, heads=(6, 2))  # parcae-140m's heads, grouped by 3


def fast_ops():
    """The op set train.py runs for float32 CuPy parameters."""
    ops = kernels.for_array(cp.zeros(1, dtype=cp.float32))
    assert ops is not REFERENCE, "MINPARCAE_KERNELS=0 would compare the reference with itself"
    return ops


def close(a, b, tol=TOL, label=""):
    a, b = cp.asnumpy(cp.asarray(a)).astype(np.float64), cp.asnumpy(cp.asarray(b)).astype(np.float64)
    assert a.shape == b.shape, label
    assert np.isfinite(a).all(), label
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= tol * scale, label


def close_dicts(a, b, tol=TOL):
    assert set(a) == set(b)
    for k in a:
        close(a[k], b[k], tol, k)


def randn(*shape, scale=1.0, seed=0):
    return cp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype=cp.float32)


def to_gpu(a):
    """A NumPy input of tests/replacements.py as a CuPy array. A strided one (QK-norm's head view)
    becomes a view into a larger array, padded by one along its second-last axis, so the op still
    reads strided input."""
    if isinstance(a, dict):
        return {k: to_gpu(v) for k, v in a.items()}
    if not isinstance(a, np.ndarray):
        return a
    if a.flags.c_contiguous:
        return cp.asarray(a)
    padded = cp.zeros(a.shape[:-2] + (a.shape[-2] + 1, a.shape[-1]), dtype=a.dtype)
    padded[..., 1:, :] = cp.asarray(np.ascontiguousarray(a))
    return padded[..., 1:, :]


def on_gpu(op, name):
    """The functions of op `name` that the harness calls, through `op`, with the NumPy arrays the
    harness makes copied to the GPU first."""
    def moved(f):
        return lambda *args, **kw: f(*map(to_gpu, args), **{k: to_gpu(v) for k, v in kw.items()})
    return types.SimpleNamespace(**{f: moved(getattr(op, f)) for f in EXERCISED[name]})


def test_select_gives_the_cuda_set_for_float32_cupy_arrays():
    ops = fast_ops()
    for name in ops._fields:
        assert getattr(ops, name) is K.REPLACEMENTS.get(name, getattr(REFERENCE, name)), name
    assert kernels.for_array(cp.zeros(1, dtype=cp.float64)) is REFERENCE
    assert kernels.adamw_update(cp.zeros(1, dtype=cp.float32)) is K.adamw_step
    assert kernels.adamw_update(cp.zeros(1, dtype=cp.float64)) is None


@pytest.mark.parametrize("name", sorted(K.REPLACEMENTS))
def test_every_replacement_matches_the_reference(name, sizes=HARNESS_SIZES):
    """Every function of op `name`, through the GPU's set and through the reference, on CuPy arrays
    made from the same NumPy inputs; every output stays on the GPU."""
    got = exercise(name, on_gpu(getattr(fast_ops(), name), name), np.float32, **sizes)
    want = exercise(name, on_gpu(getattr(REFERENCE, name), name), np.float32, **sizes)
    assert got.keys() == want.keys()
    for label in want:
        assert type(got[label]) is type(want[label]), label  # a CuPy array, or a host float for a loss
        close(got[label], want[label], label=label)


@pytest.mark.parametrize("shape, with_weight", [((8, 1024, 768), True), ((2, 6, 1024, 128), False)])
def test_rmsnorm(shape, with_weight):
    fast = fast_ops().rmsnorm
    x, g, res = randn(*shape, seed=1), randn(*shape, seed=2), randn(*shape, seed=3)
    w = 1 + randn(shape[-1], scale=0.2, seed=4) if with_weight else None
    (y, c), (y_ref, c_ref) = fast.forward(x, w), REFERENCE.rmsnorm.forward(x, w)
    close(y, y_ref)
    close_dicts(fast.backward(g, c), REFERENCE.rmsnorm.backward(g, c_ref))
    (s, y2, c2), (s_ref, y2_ref, c2_ref) = (op.add_forward(x, res, w) for op in (fast, REFERENCE.rmsnorm))
    close(s, s_ref)
    close(y2, y2_ref)
    close_dicts(fast.backward(g, c2, dres=res), REFERENCE.rmsnorm.backward(g, c2_ref, dres=res))


def test_qk_norm_on_the_strided_head_view():
    """The query heads as the attention layer takes them from x [W_q W_k W_v]: a strided view."""
    B, T, H, H_kv, hs = 4, 1024, 6, 2, 128
    qkv = randn(B, T, (H + 2 * H_kv) * hs, seed=5).reshape(B, T, H + 2 * H_kv, hs)
    cos, sin = rotary.tables(T, hs, xp=cp)
    fast = fast_ops().qk_norm
    for heads in (qkv[:, :, :H], qkv[:, :, H:H + H_kv]):
        (y, c), (y_ref, c_ref) = fast.forward(heads, cos, sin), REFERENCE.qk_norm.forward(heads, cos, sin)
        close(y, y_ref)
        dy = randn(*y.shape, seed=6)
        close_dicts(fast.backward(dy, c), REFERENCE.qk_norm.backward(dy, c_ref))


def test_mlp():
    x = randn(8, 512, 768, seed=7)
    w_fc, w_proj = randn(768, 3072, scale=0.03, seed=8), randn(3072, 768, scale=0.02, seed=9)
    fast = fast_ops().mlp
    (y, c), (y_ref, c_ref) = fast.forward(x, w_fc, w_proj), REFERENCE.mlp.forward(x, w_fc, w_proj)
    close(y, y_ref)
    dy = randn(8, 512, 768, seed=10)
    close_dicts(fast.backward(dy, c), REFERENCE.mlp.backward(dy, c_ref))


@pytest.mark.parametrize("kw", [{}, dict(scale=0.5, softcap=15.0)], ids=["plain", "capped"])
def test_cross_entropy(kw):
    logits = randn(4096, 32768, scale=10, seed=12)
    targets = cp.asarray(np.random.default_rng(13).integers(0, 32768, 4096))
    targets[::10] = REFERENCE.cross_entropy.IGNORE_INDEX
    fast = fast_ops().cross_entropy
    (loss, c), (loss_ref, c_ref) = (op.forward(logits, targets, **kw) for op in (fast, REFERENCE.cross_entropy))
    assert type(loss) is float
    close(loss, loss_ref, 1e-5)
    close(fast.backward(0.5, c)["logits"], REFERENCE.cross_entropy.backward(0.5, c_ref)["logits"])


def test_embedding_backward_scatter_add():
    ids = cp.asarray(np.random.default_rng(14).integers(0, 32768, (8, 1024)))
    ids[:, ::7] = 3  # a row that collects many updates
    dout = randn(8, 1024, 768, seed=15)
    cache = embedding.Cache(ids, (32768, 768))
    close_dicts(fast_ops().embedding.backward(dout, cache), REFERENCE.embedding.backward(dout, cache))


@pytest.mark.parametrize("B, H, T, hs", [(2, 6, 1024, 128), (1, 4, 1000, 64), (1, 2, 300, 256)])
def test_flash_attention(B, H, T, hs):
    q, k, v, dy = (randn(B, H, T, hs, seed=s) for s in (16, 17, 18, 19))
    y, cache = K.attention_forward(q, k, v, hs ** -0.5)
    y_ref, cache_ref = REFERENCE.attention.forward(q, k, v, hs ** -0.5)
    close(y, y_ref)
    want = REFERENCE.attention.backward(dy, cache_ref)
    for got, key in zip(K.attention_backward(dy, cache), "qkv"):
        close(got, want[key], label=key)
    close(K.attention_forward_simple(q, k, v, hs ** -0.5)[0], y_ref)


def test_attention_layer_with_grouped_heads_and_value_embedding():
    """model.attention_forward and attention_backward (projections, value gate, QK-norm, the core,
    output projection) through the GPU's set and through the reference."""
    cfg = model.preset("parcae-140m", n_kv_head=2)
    name, B, T = "coda.1", 2, 512  # grouped heads: outside the loop
    assert name in model.value_embedding_layers(cfg)
    H, H_kv, hs = cfg.n_head, cfg.kv_heads, cfg.d_model // cfg.n_head
    shapes = {k: s for k, s in model.param_shapes(cfg).items() if k.startswith(f"{name}.attn.")}
    assert set(shapes) == {f"{name}.attn.{w}" for w in ("wq", "wk", "wv", "wo", "ve_gate")}
    p = {k: randn(*s, scale=0.03, seed=20 + i) for i, (k, s) in enumerate(sorted(shapes.items()))}
    x, ve = randn(B, T, cfg.d_model, seed=26), randn(B, T, H_kv * hs, seed=27)
    rope = rotary.tables(T, hs, cfg.rope_base, xp=cp)
    dout = randn(B, T, cfg.d_model, seed=28)
    results = []
    fused = {**p, f"{name}.attn.wqkv": cp.concatenate([p[f"{name}.attn.{w}"] for w in ("wq", "wk", "wv")],
                                                      axis=1)}  # as model.with_fused_qkv lays them out
    for ops in (fast_ops(), REFERENCE):
        y, cache = model.attention_forward(fused, name, x, rope, (H, H_kv), ops, ve=ve)
        grads = {k: cp.zeros_like(a) for k, a in p.items()}
        dx, dve = model.attention_backward(dout, cache, name, grads, ops)
        results.append({"y": y, "dx": dx, "dve": dve, **grads})
    close_dicts(*results)


def test_diagonal_injection():
    """The loop's state step, x = Ā ⊙ h + u, forward and backward."""
    p = {"inject.A_log": randn(768, scale=0.3, seed=28), "inject.dt_bias": randn(768, seed=29)}
    h, u, dx = randn(8, 1024, 768, seed=30), randn(8, 1024, 768, seed=31), randn(8, 1024, 768, seed=32)
    fast = fast_ops().injection
    (x, cache), (x_ref, cache_ref) = (op.state_forward("diagonal", p, h, u)
                                      for op in (fast, REFERENCE.injection))
    close(x, x_ref)
    close_dicts(fast.state_backward(dx, cache, p), REFERENCE.injection.state_backward(dx, cache_ref, p))


def test_adamw_step_matches_optim_adamw():
    """Three steps of optim.AdamW with the kernel (kernels.adamw_update) against the same steps with
    optim.adamw_update: parameters and both moments."""
    params = {"core.0.mlp.fc": randn(768, 3072, seed=33), "core.0.norm1": randn(768, seed=34)}
    ours = {k: v.copy() for k, v in params.items()}
    opt, opt_ref = (optim.AdamW(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, update=update)
                    for update in (kernels.adamw_update(ours["core.0.mlp.fc"]), None))
    assert opt.update is K.adamw_step and opt_ref.update is optim.adamw_update
    for t in range(1, 4):
        grads = {k: randn(*v.shape, seed=40 + t) for k, v in params.items()}
        opt.step(ours, grads, lr=1e-2)
        opt_ref.step(params, grads, lr=1e-2)
    close_dicts(ours, params, 1e-6)
    close_dicts(opt.m, opt_ref.m, 1e-6)
    close_dicts(opt.v, opt_ref.v, 1e-6)


@pytest.mark.parametrize("overrides", [{}, {"value_embeddings": True, "n_kv_head": 2}])
def test_model_loss_and_gradients_match_the_cpu(overrides):
    """runtime.loss_and_grads, as train.py calls it: on the GPU with the op set kernels.for_array
    chooses, against the reference in float64 on the CPU."""
    cfg = model.preset("tiny", **overrides)
    rng = np.random.default_rng(0)
    p32 = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
    # move every weight off its init (zero output projections would zero many gradients)
    p32 = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p32.items()}
    B, T = 4, 64
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1))
    h0 = model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng, np.float32)
    depths = np.array([3, 5, 1, 4])  # sequences that join the loop late, and more steps than μ_bwd

    p_gpu = {k: cp.asarray(v) for k, v in p32.items()}
    ops = kernels.for_array(p_gpu["wte"])
    assert ops == fast_ops()
    loss_gpu, grads_gpu, _ = runtime.loss_and_grads(p_gpu, cfg, cp.asarray(ids[:, :-1]),
                                                    cp.asarray(ids[:, 1:]), depths=depths,
                                                    h0=cp.asarray(h0), ops=ops)
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    loss_cpu, grads_cpu, _ = runtime.loss_and_grads(p64, cfg, ids[:, :-1], ids[:, 1:], depths=depths,
                                                    h0=h0.astype(np.float64), ops=REFERENCE)
    assert abs(loss_gpu - loss_cpu) <= 1e-5 * abs(loss_cpu)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name, g in grads_cpu.items():
        err = np.linalg.norm(cp.asnumpy(grads_gpu[name]) - g) / np.linalg.norm(g)
        assert err <= 1e-4, (name, err)
