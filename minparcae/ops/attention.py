"""Causal multi-head self-attention with rotary embeddings, QK-norm, grouped-query heads and an
optional gated value embedding. The reference version: it materialises the (T, T) score matrix.

Forward, for H query heads and H_kv key/value heads of size hs (H_kv divides H; query head h
reads key/value head h // (H / H_kv)):

    [q k v] = x [W_q W_k W_v]                             (B, T, d) -> (B, heads, T, hs) each
    v ← v + 2σ(x[..., :n_g] W_g) · ve                     optional value embedding, one gate per KV head
    q ← N(RoPE(q)),  k ← N(RoPE(k))                       N = RMSNorm without weight (QK-norm)
    S = q kᵀ / √hs,  S_ij = −∞ for j > i                  (B, H, T, T)
    P = softmax(S)  (over j),  Y = P v                    (B, H, T, hs)
    y = concat_heads(Y) W_o                               (B, T, d)

Backward, with G = dL/dy (each line is the chain rule through the line above it, bottom up):

    dY = G W_oᵀ (split into heads),  dW_o = concat(Y)ᵀ G
    dP = dY vᵀ,  dv = Pᵀ dY
    dS = P ⊙ (dP − rowsum(dP ⊙ P))                        softmax backward
    dq = dS k / √hs,  dk = dSᵀ q / √hs
    grouped heads: dk, dv of a KV head = sum over the query heads that read it
    through N and RoPE (see rmsnorm.py, rotary.py); through the gate:
        dve = dv · gate,  dgate = Σ_hs dv ⊙ ve,  dz = dgate · 2σ(z)(1 − σ(z))
    dx = [dq dk dv] [W_q W_k W_v]ᵀ  (+ dz W_gᵀ into the first n_g columns)

The three projections are one product with the weights side by side (one BLAS call instead of
three, and a wider one, which BLAS runs faster); so are their backward products.
"""

from .. import kernels
from ..backend import array_module
from . import rmsnorm, rotary
from .linear import matmul, rows_matmul, rows_t_matmul


def _heads(t, n, hs):
    """(B, T, n·hs) -> (B, n, T, hs)"""
    B, T, _ = t.shape
    return t.reshape(B, T, n, hs).transpose(0, 2, 1, 3)


def _merge(t):
    """(B, n, T, hs) -> (B, T, n·hs)"""
    B, n, T, hs = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, n * hs)


def _rope_norm_forward(t, first, n, cos, sin):
    """N(RoPE(·)) of heads first..first+n−1 of t (B, T, heads, hs): the rotary embedding, then
    QK-norm. Returns them as (B, n, T, hs)."""
    kernel = kernels.fast("rope_rmsnorm_forward", t)
    if kernel is not None:
        y, r = kernel(t, first, n, cos, sin, rmsnorm.EPS)
    else:
        heads = t[:, :, first:first + n].transpose(0, 2, 1, 3)
        y, (_, r, _) = rmsnorm.forward(rotary.forward(heads, cos, sin)[0])
    return y, (y, r, cos, sin)


def _rope_norm_backward(dy, cache, out, first):
    """Writes the gradient of _rope_norm_forward's input into heads first.. of out (B, T, heads, hs)."""
    y, r, cos, sin = cache
    kernel = kernels.fast("rope_rmsnorm_backward", dy)
    if kernel is not None:
        kernel(dy, y, r, cos, sin, out, first)
        return
    dx = rotary.backward(rmsnorm.backward(dy, (y, r, None))["x"], (cos, sin))["x"]
    out[:, :, first:first + dy.shape[1]] = dx.transpose(0, 2, 1, 3)


def causal_attention_forward(q, k, v, scale):
    """Y = softmax(q kᵀ · scale, causal) v for q, k, v of shape (B, H, T, hs); the reference keeps P."""
    xp = array_module(q)
    T = q.shape[2]
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, H, T, T)
    future = xp.triu(xp.ones((T, T), dtype=bool), 1)
    s = xp.where(future, -xp.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v, (q, k, v, p, scale)


def causal_attention_backward(dy, cache):
    q, k, v, p, scale = cache
    dp = dy @ v.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dv = p.transpose(0, 1, 3, 2) @ dy  # (B, H, T, hs)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    return ds @ k, ds.transpose(0, 1, 3, 2) @ q, dv


def forward(x, wq, wk, wv, wo, cos, sin, n_head, n_kv_head, ve=None, w_gate=None):
    """x: (B, T, d); wq: (d, H·hs); wk, wv: (d, H_kv·hs); wo: (H·hs, d); cos, sin: (T, hs/2);
    ve: (B, T, H_kv·hs) and w_gate: (n_g, H_kv), both or neither."""
    xp = array_module(x)
    B, T, d = x.shape
    hs = wq.shape[1] // n_head
    group = n_head // n_kv_head
    w_qkv = xp.concatenate([wq, wk, wv], axis=1)  # (d, (H + 2 H_kv)·hs)
    qkv = rows_matmul(x, w_qkv).reshape(B, T, n_head + 2 * n_kv_head, hs)  # the heads of q, k, v
    v = qkv[:, :, n_head + n_kv_head:].transpose(0, 2, 1, 3)  # (B, H_kv, T, hs), a view
    gate = None
    if ve is not None:
        sig = 1.0 / (1.0 + xp.exp(-(x[..., : w_gate.shape[0]] @ w_gate)))  # (B, T, H_kv)
        gate = 2.0 * sig
        ve = _heads(ve, n_kv_head, hs)
        v = v + gate.transpose(0, 2, 1)[..., None] * ve
    q, q_cache = _rope_norm_forward(qkv, 0, n_head, cos, sin)  # (B, H, T, hs)
    k, k_cache = _rope_norm_forward(qkv, n_head, n_kv_head, cos, sin)  # (B, H_kv, T, hs)
    kr = xp.repeat(k, group, axis=1) if group > 1 else k  # (B, H, T, hs)
    vr = xp.repeat(v, group, axis=1) if group > 1 else v
    scale = 1.0 / hs**0.5
    core_forward, core_backward = causal_attention_forward, causal_attention_backward
    if kernels.fast("attention_forward", q) is not None:
        core_forward = kernels.fast("attention_forward", q)
        core_backward = kernels.fast("attention_backward", q)
    yh, core_cache = core_forward(q, kr, vr, scale)  # (B, H, T, hs)
    y = _merge(yh)  # (B, T, H·hs)
    out = rows_matmul(y, wo)
    cache = (x, w_qkv, wo, core_backward, core_cache, y, q_cache, k_cache, ve, w_gate, gate, n_head,
             n_kv_head)
    return out, cache


def backward(dout, cache):
    (x, w_qkv, wo, core_backward, core_cache, y, q_cache, k_cache, ve, w_gate, gate, n_head,
     n_kv_head) = cache
    xp = array_module(x)
    B, T, d = x.shape
    hs = wo.shape[0] // n_head
    group = n_head // n_kv_head
    dwo = rows_t_matmul(y, dout)
    dy = _heads(rows_matmul(dout, wo.T), n_head, hs)  # (B, H, T, hs)
    dq, dk, dv = core_backward(dy, core_cache)
    if group > 1:  # the query heads of one group all read the same key/value head
        dk = dk.reshape(B, n_kv_head, group, T, hs).sum(axis=2)
        dv = dv.reshape(B, n_kv_head, group, T, hs).sum(axis=2)
    dqkv = xp.empty((B, T, n_head + 2 * n_kv_head, hs), dtype=dout.dtype)  # the heads of [dq dk dv]
    _rope_norm_backward(dq, q_cache, dqkv, 0)
    _rope_norm_backward(dk, k_cache, dqkv, n_head)
    dqkv[:, :, n_head + n_kv_head:] = dv.transpose(0, 2, 1, 3)
    dqkv = dqkv.reshape(B * T, -1)
    dx = matmul(dqkv, w_qkv.T).reshape(B, T, d)
    dw = rows_t_matmul(x, dqkv)  # (d, (H + 2 H_kv)·hs), as w_qkv
    n_q, n_kv = n_head * hs, n_kv_head * hs
    grads = {"wq": dw[:, :n_q], "wk": dw[:, n_q:n_q + n_kv], "wv": dw[:, n_q + n_kv:], "wo": dwo}
    if ve is not None:
        n_g = w_gate.shape[0]
        grads["ve"] = _merge(dv * gate.transpose(0, 2, 1)[..., None])
        dgate = (dv * ve).sum(axis=-1).transpose(0, 2, 1)  # (B, T, H_kv)
        sig = 0.5 * gate
        dz = dgate * 2.0 * sig * (1.0 - sig)
        grads["w_gate"] = x[..., :n_g].reshape(-1, n_g).T @ dz.reshape(-1, n_kv_head)
        dx[..., :n_g] += dz @ w_gate.T
    grads["x"] = dx
    return grads
