"""Every op's hand-written backward against central finite differences in float64, and the
attention layer that model.py builds from them.

Tolerance: the normwise relative error of gradcheck.py must be below GRAD_TOL = 1e-6 for every
input of every op (finite differences in float64 with ε = 1e-6 reach about 1e-9 here).
"""

from types import SimpleNamespace

import numpy as np
import pytest

from minparcae import model
from minparcae.gradcheck import check_grads, check_op
from minparcae.ops import (REFERENCE, attention, cross_entropy, embedding, linear, mlp, qk_norm,
                           rmsnorm, rotary)

GRAD_TOL = 1e-6


def rand(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 6), (1, 1, 9)])
def test_linear(shape):
    rng = np.random.default_rng(0)
    err, errs = check_op(linear.forward, linear.backward,
                         {"x": rand(rng, *shape), "w": rand(rng, shape[-1], 4)})
    assert err < GRAD_TOL, errs


@pytest.mark.parametrize("B,T,V,d", [(2, 7, 11, 5), (1, 1, 3, 4), (3, 4, 2, 6)])
def test_embedding(B, T, V, d):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, 0] = ids[-1, -1]  # a repeated token must accumulate both gradients
    err, errs = check_op(embedding.forward, embedding.backward,
                         {"ids": ids, "table": rand(rng, V, d)})
    assert err < GRAD_TOL, errs


def test_embedding_scatter_adds_repeats():
    table = np.zeros((4, 2))
    _, cache = embedding.forward(np.array([[1, 1, 3]]), table)
    g = embedding.backward(np.ones((1, 3, 2)), cache)["table"]
    assert g.tolist() == [[0, 0], [2, 2], [0, 0], [1, 1]]


@pytest.mark.parametrize("shape", [(4, 8), (2, 7, 6), (1, 1, 5), (2, 3, 1, 6)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm(shape, with_weight):
    rng = np.random.default_rng(2)
    inputs = {"x": rand(rng, *shape)}
    if with_weight:
        inputs["weight"] = 1.0 + 0.3 * rand(rng, shape[-1])
    err, errs = check_op(rmsnorm.forward, rmsnorm.backward, inputs)
    assert err < GRAD_TOL, errs


def test_rmsnorm_normalises():
    x = np.random.default_rng(3).standard_normal((5, 64)) * 7
    y, _ = rmsnorm.forward(x)
    np.testing.assert_allclose(np.sqrt((y**2).mean(-1)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("B,H,T,hs,base", [(2, 3, 7, 6, 50_000.0), (1, 1, 1, 4, 10_000.0),
                                           (1, 2, 5, 2, 100.0)])
def test_rotary(B, H, T, hs, base):
    rng = np.random.default_rng(4)
    cos, sin = rotary.tables(T, hs, base=base, dtype=np.float64)
    err, errs = check_op(rotary.forward, rotary.backward, {"x": rand(rng, B, H, T, hs)},
                         cos=cos, sin=sin)
    assert err < GRAD_TOL, errs


def test_rotary_pairs_and_norm():
    rng = np.random.default_rng(5)
    x = rand(rng, 1, 1, 3, 4)
    cos, sin = rotary.tables(3, 4, base=100.0, dtype=np.float64)
    y, _ = rotary.forward(x, cos, sin)
    # position 0 is the identity; position 2, pair 1 is rotated by 2 * 100**(-2/4) = 0.2 rad
    np.testing.assert_allclose(y[0, 0, 0], x[0, 0, 0])
    a = 0.2
    x2, x3 = x[0, 0, 2, 2], x[0, 0, 2, 3]
    np.testing.assert_allclose(y[0, 0, 2, 2:], [x2 * np.cos(a) - x3 * np.sin(a),
                                               x2 * np.sin(a) + x3 * np.cos(a)])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))


@pytest.mark.parametrize("shape,m", [((2, 7, 6), 24), ((1, 1, 5), 3), ((3, 4), 9)])
def test_mlp(shape, m):
    rng = np.random.default_rng(6)
    d = shape[-1]
    err, errs = check_op(mlp.forward, mlp.backward,
                         {"x": rand(rng, *shape), "w_fc": rand(rng, d, m), "w_proj": rand(rng, m, d)})
    assert err < GRAD_TOL, errs


def attention_inputs(rng, B, T, d, n_head, n_kv_head, hs, with_ve):
    cos, sin = rotary.tables(T, hs, dtype=np.float64)
    inputs = {"x": rand(rng, B, T, d), "wq": rand(rng, d, n_head * hs, scale=0.5),
              "wk": rand(rng, d, n_kv_head * hs, scale=0.5),
              "wv": rand(rng, d, n_kv_head * hs, scale=0.5), "wo": rand(rng, n_head * hs, d)}
    if with_ve:
        inputs["ve"] = rand(rng, B, T, n_kv_head * hs)
        inputs["w_gate"] = rand(rng, min(32, d), n_kv_head)
    static = dict(cos=cos, sin=sin, n_head=n_head, n_kv_head=n_kv_head)
    return inputs, static


def layer_forward(x, wq, wk, wv, wo, cos, sin, n_head, n_kv_head, ve=None, w_gate=None, ops=REFERENCE):
    """model.attention_forward with the op convention of check_op (weights as inputs)."""
    p = {"L.attn.wq": wq, "L.attn.wk": wk, "L.attn.wv": wv, "L.attn.wo": wo, "L.attn.ve_gate": w_gate}
    fused = {**p, "L.attn.wqkv": np.concatenate([wq, wk, wv], axis=1)}  # as with_fused_qkv does
    out, cache = model.attention_forward(fused, "L", x, (cos, sin), (n_head, n_kv_head), ops, ve)
    return out, (cache, p, ops)


def layer_backward(dout, state):
    cache, p, ops = state
    grads = {k: np.zeros_like(v) for k, v in p.items() if v is not None}
    dx, dve = model.attention_backward(dout, cache, "L", grads, ops)
    out = {"x": dx, **{k.split(".")[-1]: g for k, g in grads.items()}, "ve": dve}
    out["w_gate"] = out.pop("ve_gate", None)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("B,T,d,n_head,n_kv_head,hs", [
    (2, 7, 12, 2, 2, 6),   # odd sequence length, head size 6
    (1, 1, 8, 2, 2, 4),    # a sequence of length 1
    (2, 5, 10, 4, 2, 4),   # grouped-query: 4 query heads share 2 key/value heads
    (1, 6, 8, 3, 1, 2),    # multi-query
])
@pytest.mark.parametrize("with_ve", [False, True])
def test_attention_layer(B, T, d, n_head, n_kv_head, hs, with_ve):
    rng = np.random.default_rng(7)
    inputs, static = attention_inputs(rng, B, T, d, n_head, n_kv_head, hs, with_ve)
    err, errs = check_op(layer_forward, layer_backward, inputs, **static)
    assert err < GRAD_TOL, errs


@pytest.mark.parametrize("N,H,H_kv,T,hs", [(2, 2, 2, 7, 3), (1, 4, 2, 5, 4), (1, 3, 1, 6, 2),
                                           (1, 2, 2, 1, 4)])
def test_attention_core(N, H, H_kv, T, hs):
    rng = np.random.default_rng(17)
    inputs = {"q": rand(rng, N, H, T, hs), "k": rand(rng, N, H_kv, T, hs), "v": rand(rng, N, H_kv, T, hs)}
    err, errs = check_op(attention.forward, attention.backward, inputs, scale=0.4)
    assert err < GRAD_TOL, errs


def test_attention_core_with_a_kv_cache_equals_the_full_sequence():
    """Positions fed one, then three, then two at a time through a KV slot give the full causal
    forward's outputs, also for a subset of the batch's rows."""
    rng = np.random.default_rng(18)
    q, k, v = rand(rng, 3, 4, 6, 5), rand(rng, 3, 2, 6, 5), rand(rng, 3, 2, 6, 5)
    full, _ = attention.forward(q, k, v, 0.3)
    keys, values = np.zeros((3, 2, 8, 5)), np.zeros((3, 2, 8, 5))
    rows = np.array([0, 2])
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        slot = attention.KVSlot(keys, values, lo, rows)
        y, _ = attention.forward(q[rows, :, lo:hi], k[rows, :, lo:hi], v[rows, :, lo:hi], 0.3, slot)
        np.testing.assert_allclose(y, full[rows, :, lo:hi], rtol=1e-12, atol=1e-12)
    assert not keys[1].any()  # row 1 was not run


@pytest.mark.parametrize("T,heads,hs", [(5, 3, 4), (1, 1, 2)])
def test_qk_norm(T, heads, hs):
    rng = np.random.default_rng(19)
    cos, sin = rotary.tables(T, hs, dtype=np.float64)
    big = rand(rng, 2, T, heads + 2, hs)
    view = big[:, :, 1:1 + heads]  # a strided view, as the layer passes the heads of q/k/v
    err, errs = check_op(qk_norm.forward, qk_norm.backward, {"x": view.copy()}, cos=cos, sin=sin)
    assert err < GRAD_TOL, errs
    y, _ = qk_norm.forward(view, cos, sin)
    np.testing.assert_array_equal(y, qk_norm.forward(view.copy(), cos, sin)[0])
    assert y.shape == (2, heads, T, hs)
    np.testing.assert_allclose((y * y).mean(axis=-1), 1.0, rtol=1e-4)  # unit RMS, up to eps


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_qk_norm_epsilon_is_the_machine_epsilon(dtype):
    """As PyTorch's rms_norm without an eps (the official QK-norm): y = x / √(mean x² + ε) with ε
    the dtype's machine epsilon. Heads of RMS 1e-2 come out at RMS √(1e-4 / (1e-4 + ε)):
    1 − 1.1e-12 in float64, 1 − 6e-4 in float32; an ε of 1e-5 would give 0.953."""
    eps = float(np.finfo(dtype).eps)
    assert qk_norm.eps_for(dtype) == eps
    cos, sin = rotary.tables(3, 8, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 8))
    x *= 1e-2 / np.sqrt((x * x).mean(axis=-1, keepdims=True))  # every head at RMS 1e-2
    y, _ = qk_norm.forward(x.astype(dtype), cos.astype(dtype), sin.astype(dtype))
    rms = np.sqrt((y.astype(np.float64) ** 2).mean(axis=-1))
    np.testing.assert_allclose(rms, np.sqrt(1e-4 / (1e-4 + eps)), rtol=1e-12 if dtype == np.float64 else 1e-6)
    y5, _ = qk_norm.forward(x, cos, sin, eps=1e-5)
    np.testing.assert_allclose(np.sqrt((y5 ** 2).mean(axis=-1)), np.sqrt(1e-4 / 1.1e-4), rtol=1e-12)


def test_attention_layer_is_causal():
    rng = np.random.default_rng(8)
    inputs, static = attention_inputs(rng, 1, 6, 8, 2, 2, 4, True)
    y1, _ = layer_forward(**inputs, **static)
    inputs["x"][:, 4:] += 10.0  # change the future: outputs at positions < 4 must not move
    inputs["ve"][:, 4:] -= 3.0
    y2, _ = layer_forward(**inputs, **static)
    np.testing.assert_array_equal(y1[:, :4], y2[:, :4])
    assert np.abs(y1[:, 4:] - y2[:, 4:]).max() > 1e-3


def test_attention_layer_wide_gate_input():
    """With d > 32 the gate reads only the first 32 channels of x."""
    rng = np.random.default_rng(9)
    inputs, static = attention_inputs(rng, 1, 3, 40, 2, 2, 4, True)
    assert inputs["w_gate"].shape == (32, 2)
    err, errs = check_op(layer_forward, layer_backward, inputs, **static)
    assert err < GRAD_TOL, errs


def ce_check(logits, targets, **kw):
    inputs = {"logits": logits}

    def loss():
        return cross_entropy.forward(logits, targets, **kw)[0]

    _, cache = cross_entropy.forward(logits, targets, **kw)
    grads = cross_entropy.backward(1.0, cache)
    return check_grads(loss, inputs, grads)["logits"]


@pytest.mark.parametrize("shape,V", [((2, 7), 11), ((1, 1), 5), ((13,), 3)])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.7, None), (1.3, 4.0)])
def test_cross_entropy(shape, V, scale, softcap):
    rng = np.random.default_rng(10)
    logits = rand(rng, *shape, V, scale=2.0)
    targets = rng.integers(0, V, size=shape)
    targets.reshape(-1)[::3] = cross_entropy.IGNORE_INDEX
    targets.reshape(-1)[-1] = 0  # at least one valid target
    assert ce_check(logits, targets, scale=scale, softcap=softcap) < GRAD_TOL


def test_cross_entropy_value_and_mean_over_valid():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]))
    loss, _ = cross_entropy.forward(logits, np.array([0, 2, -1]))
    assert abs(loss - (-np.log(0.5) - np.log(0.8)) / 2) < 1e-12


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.7, 3.0)])
def test_cross_entropy_loss_alone_equals_the_forward(scale, softcap):
    """Evaluation's `loss` (no gradient made) gives the training forward's number."""
    rng = np.random.default_rng(12)
    logits, targets = rand(rng, 3, 5, 9, scale=2.0), rng.integers(0, 9, (3, 5))
    targets[0, 1] = cross_entropy.IGNORE_INDEX
    trained = cross_entropy.forward(logits, targets, scale=scale, softcap=softcap)[0]
    assert abs(cross_entropy.loss(logits, targets, scale=scale, softcap=softcap) - trained) < 1e-12


def test_cross_entropy_all_ignored_but_one():
    rng = np.random.default_rng(11)
    logits = rand(rng, 6, 7)
    targets = np.full(6, cross_entropy.IGNORE_INDEX)
    targets[4] = 3
    loss, cache = cross_entropy.forward(logits, targets)
    z = logits[4]
    assert abs(float(loss) - (np.log(np.exp(z).sum()) - z[3])) < 1e-12
    g = cross_entropy.backward(1.0, cache)["logits"]
    assert np.all(g[[0, 1, 2, 3, 5]] == 0)
    assert ce_check(logits, targets) < GRAD_TOL


def test_cross_entropy_all_ignored_is_zero():
    loss, cache = cross_entropy.forward(np.ones((3, 4)), np.full(3, -1))
    assert float(loss) == 0.0
    assert not cross_entropy.backward(1.0, cache)["logits"].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_large_logits(dtype):
    """Logits of 1e4 must not overflow: the loss is finite and exact."""
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 0.0]], dtype=dtype)
    loss, cache = cross_entropy.forward(logits, np.array([1, 0]))
    assert np.isfinite(float(loss))
    assert abs(float(loss) - (1e4 + np.log(2)) / 2) < 1e-3
    g = cross_entropy.backward(1.0, cache)["logits"]
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, [[0.5, -0.5, 0.0], [-0.25, 0.25, 0.0]], atol=1e-6)


def test_check_catches_a_wrong_backward():
    """The checker must fail a backward that is subtly wrong (RMSNorm missing its projection term)."""
    def wrong_backward(dout, cache):
        xhat, r, weight = cache
        return {"x": r * dout * weight, "weight": (dout * xhat).reshape(-1, xhat.shape[-1]).sum(0)}

    rng = np.random.default_rng(12)
    inputs = {"x": rand(rng, 3, 5), "weight": rand(rng, 5)}
    err, errs = check_op(rmsnorm.forward, wrong_backward, inputs)
    assert errs["weight"] < GRAD_TOL  # the part that is right still passes...
    assert errs["x"] > 1e-2  # ...and the wrong one is caught by a wide margin


FLOAT32_TOL = 2e-4  # float32 has ~7 digits; the ops chain a few reductions


@pytest.mark.parametrize("name", ["linear", "rmsnorm", "rotary", "mlp", "attention layer", "qk_norm",
                                  "cross_entropy"])
def test_float32_matches_float64(name):
    rng = np.random.default_rng(13)
    if name == "linear":
        op, inputs, static = linear, {"x": rand(rng, 2, 7, 6), "w": rand(rng, 6, 5)}, {}
    elif name == "rmsnorm":
        op, inputs, static = rmsnorm, {"x": rand(rng, 2, 7, 6), "weight": rand(rng, 6)}, {}
    elif name == "rotary":
        cos, sin = rotary.tables(7, 6, dtype=np.float64)
        op, inputs, static = rotary, {"x": rand(rng, 2, 3, 7, 6)}, {"cos": cos, "sin": sin}
    elif name == "mlp":
        op, inputs, static = mlp, {"x": rand(rng, 2, 7, 6), "w_fc": rand(rng, 6, 24),
                                   "w_proj": rand(rng, 24, 6)}, {}
    elif name == "attention layer":
        op = SimpleNamespace(forward=layer_forward, backward=layer_backward)
        inputs, static = attention_inputs(rng, 2, 7, 12, 4, 2, 6, True)
    elif name == "qk_norm":
        cos, sin = rotary.tables(7, 6, dtype=np.float64)
        op, inputs, static = qk_norm, {"x": rand(rng, 2, 7, 3, 6)}, {"cos": cos, "sin": sin}
    else:
        op = cross_entropy
        inputs = {"logits": rand(rng, 2, 7, 50, scale=3.0)}
        static = {"targets": rng.integers(0, 50, (2, 7)), "softcap": 15.0}

    def run(dtype):
        cast = {k: v.astype(dtype) for k, v in inputs.items()}
        st = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
              for k, v in static.items()}
        out, cache = op.forward(**cast, **st)
        dout = np.ones_like(out) if np.ndim(out) else dtype(1.0)
        return out, op.backward(dout, cache)

    out64, g64 = run(np.float64)
    out32, g32 = run(np.float32)
    assert name == "cross_entropy" or out32.dtype == np.float32  # its loss is a Python float
    scale = np.abs(out64).max()
    assert np.abs(out32 - out64).max() <= FLOAT32_TOL * scale
    for k in g64:
        assert g32[k].dtype == np.float32, k
        assert np.abs(g32[k] - g64[k]).max() <= FLOAT32_TOL * np.abs(g64[k]).max(), k


def test_rmsnorm_with_residual_add():
    """s = x + res, y = RMSNorm(s), with L = Σ y ⊙ R + Σ s ⊙ R_s: backward(R, dres=R_s) is dL/dx
    (and dL/dres, the same)."""
    rng = np.random.default_rng(14)
    inputs = {"x": rand(rng, 2, 5, 6), "res": rand(rng, 2, 5, 6), "weight": 1 + 0.3 * rand(rng, 6)}
    R, R_s = rand(rng, 2, 5, 6), rand(rng, 2, 5, 6)

    def loss():
        s, y, _ = rmsnorm.add_forward(**inputs)
        return float((y * R).sum() + (s * R_s).sum())

    s, y, cache = rmsnorm.add_forward(**inputs)
    np.testing.assert_allclose(s, inputs["x"] + inputs["res"])
    g = rmsnorm.backward(R, cache, dres=R_s)
    errors = check_grads(loss, inputs, {"x": g["x"], "res": g["x"], "weight": g["weight"]})
    assert max(errors.values()) < GRAD_TOL, errors
