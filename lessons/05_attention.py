# %% [markdown]
# # Lesson 5: causal self-attention with rotary embeddings and QK-norm, forward and backward
#
# ```bash
# python lessons/05_attention.py
# ```
#
# Attention is how a token reads the tokens before it. Each position emits a query q, a key k and a
# value v; a position's output is an average of the values of earlier positions, weighted by how well
# their keys match its query. minparcae's attention layer (`model.attention_forward`, around the
# core in ops/attention.py) adds two details: rotary embeddings, which tell the dot product q·k how
# far apart two tokens are, and QK-norm, which keeps those dot products in a fixed range. This
# lesson builds the forward from its pieces, checks that the pieces do what they promise, and checks
# the backward with finite differences.

# %%
import numpy as np

from minparcae import model
from minparcae.gradcheck import check_grads, check_op
from minparcae.ops import REFERENCE, attention, rmsnorm, rotary

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Rotary position embeddings (ops/rotary.py)
#
# A head vector q ∈ R^hs is cut into hs/2 adjacent pairs, and at position p pair i is rotated by
# the angle p·θ_i, with θ_i = base^(−2i/hs) (base 50,000): fast rotations in the first pairs, slow
# ones in the last. Writing R_p for that block-diagonal rotation, the score between a query at
# position m and a key at position n is
#
# $$ (R_m q) \cdot (R_n k) = q \cdot R_m^\top R_n k = q \cdot R_{n-m} k, $$
#
# which depends on the positions only through their distance n − m. `rotary.tables` gives the cos
# and sin of p·θ_i, and `rotary.forward` rotates, in `minparcae/ops/rotary.py`:
#
#     y[..., 0::2] = x1 * cos - x2 * sin
#     y[..., 1::2] = x1 * sin + x2 * cos

# %%
hs = 8
q = rng.standard_normal((1, 1, 1, hs))   # (B, H, S, hs) with B = H = S = 1
k = rng.standard_normal((1, 1, 1, hs))


def at(x, position):
    """x rotated as if it sat at `position`."""
    return rotary.forward(x, *rotary.tables(1, hs, offset=position, dtype=np.float64))[0]


near = float((at(q, 3) * at(k, 1)).sum())         # m = 3, n = 1
far = float((at(q, 1003) * at(k, 1001)).sum())    # same distance, 1000 positions later
print(f"q·k at positions (3, 1): {near:.12f}; at (1003, 1001): {far:.12f}")
assert abs(near - far) < 1e-9
assert abs(np.linalg.norm(at(q, 1003)) - np.linalg.norm(q)) < 1e-12   # rotations keep lengths

# %% [markdown]
# A rotation's inverse is its transpose, so the backward is the rotation by −p·θ_i
# (`rotary.backward` passes −sin). Rotating forward and then backward gives the input back:

# %%
cos, sin = rotary.tables(5, hs, dtype=np.float64)
x = rng.standard_normal((2, 3, 5, hs))
back = rotary.backward(*rotary.forward(x, cos, sin))["x"]
assert np.abs(back - x).max() < 1e-15

# %% [markdown]
# ## 2. The forward, piece by piece
#
# For input x (B, S, d), S positions of d features, and H heads of size hs = d/H:
#
# $$ q = x W_q, \quad k = x W_k, \quad v = x W_v \qquad \text{split into heads: } (B, H, S, hs) $$
#
# $$ q \leftarrow N(\mathrm{RoPE}(q)), \quad k \leftarrow N(\mathrm{RoPE}(k)) \qquad N = \text{RMSNorm without gain (QK-norm), with } \varepsilon \text{ the dtype's machine epsilon} $$
#
# $$ s = q k^\top / \sqrt{hs}, \quad s_{ij} = -\infty \text{ for } j > i \qquad (B, H, S, S) \text{, causal} $$
#
# $$ P = \mathrm{softmax}(s) \text{ over } j, \quad Y = P v \qquad (B, H, S, hs) $$
#
# $$ y = \mathrm{concat}_\text{heads}(Y) W_o \qquad (B, S, d) $$
#
# Below, the same lines written out with the library's pieces, then compared with the layer.

# %%
B, S, H, d = 2, 6, 2, 16
hs = d // H
x = rng.standard_normal((B, S, d))
wq, wk, wv, wo = (rng.standard_normal((d, d)) / d**0.5 for _ in range(4))
cos, sin = rotary.tables(S, hs, dtype=np.float64)


def heads(t):
    """(B, S, H·hs) -> (B, H, S, hs)"""
    return t.reshape(B, S, H, hs).transpose(0, 2, 1, 3)


def layer(x, wq, wk, wv, wo, cos, sin, n_head, n_kv_head, ve=None, w_gate=None):
    """model.attention_forward with the weights as arguments: the layer "L" of a parameter dict,
    with [W_q W_k W_v] side by side as model.with_fused_qkv puts them (one product for the three)."""
    p = {"L.attn.wq": wq, "L.attn.wk": wk, "L.attn.wv": wv, "L.attn.wo": wo, "L.attn.ve_gate": w_gate}
    fused = {**p, "L.attn.wqkv": np.concatenate([wq, wk, wv], axis=1)}
    out, cache = model.attention_forward(fused, "L", x, (cos, sin), (n_head, n_kv_head), REFERENCE, ve)
    return out, (cache, p)


eps = np.finfo(np.float64).eps  # QK-norm's ε, as PyTorch's rms_norm without one (the official code)
qh = rmsnorm.forward(rotary.forward(heads(x @ wq), cos, sin)[0], None, eps)[0]
kh = rmsnorm.forward(rotary.forward(heads(x @ wk), cos, sin)[0], None, eps)[0]
vh = heads(x @ wv)
Yh, core_cache = attention.forward(qh, kh, vh, 1 / hs**0.5)
P = core_cache.p.reshape(B, H, S, S)  # the core groups query heads under their key/value head
y_pieces = Yh.transpose(0, 2, 1, 3).reshape(B, S, d) @ wo
y_op, _ = layer(x, wq, wk, wv, wo, cos, sin, n_head=H, n_kv_head=H)
print(f"pieces vs model.attention_forward: max |difference| {np.abs(y_pieces - y_op).max():.1e}")
assert np.abs(y_pieces - y_op).max() < 1e-14

# %% [markdown]
# Causality: P is lower triangular (position i gives no weight to j > i), so each output depends
# only on the inputs up to its own position. Changing the last three tokens leaves the first
# three outputs bit for bit unchanged.

# %%
assert np.all(np.triu(P, 1) == 0) and np.allclose(P.sum(axis=-1), 1)
x_changed = x.copy()
x_changed[:, 3:] = rng.standard_normal((B, S - 3, d))
y_changed, _ = layer(x_changed, wq, wk, wv, wo, cos, sin, n_head=H, n_kv_head=H)
assert np.array_equal(y_changed[:, :3], y_op[:, :3])
assert not np.allclose(y_changed[:, 3:], y_op[:, 3:])

# %% [markdown]
# ## 3. QK-norm keeps the scores bounded
#
# After the gainless RMSNorm, ‖q‖ = ‖k‖ = √hs (up to eps), so by Cauchy–Schwarz
#
# $$ |s_{ij}| = \frac{|q \cdot k|}{\sqrt{hs}} \le \frac{\lVert q \rVert \lVert k \rVert}{\sqrt{hs}} = \sqrt{hs}, $$
#
# however large the weights grow. Without it, scores scale with the square of the weights and the
# softmax can collapse onto one key, where its gradient vanishes. Scale all weights by 100:

# %%
big = [100 * w for w in (wq, wk)]
qb = rmsnorm.forward(rotary.forward(heads(x @ big[0]), cos, sin)[0], None, eps)[0]
kb = rmsnorm.forward(rotary.forward(heads(x @ big[1]), cos, sin)[0], None, eps)[0]
s_normed = np.abs(qb @ kb.transpose(0, 1, 3, 2)).max() / hs**0.5
qr = rotary.forward(heads(x @ big[0]), cos, sin)[0]
kr = rotary.forward(heads(x @ big[1]), cos, sin)[0]
s_raw = np.abs(qr @ kr.transpose(0, 1, 3, 2)).max() / hs**0.5
print(f"weights ×100: max |s| with QK-norm {s_normed:.2f} (bound √hs = {hs**0.5:.2f}), "
      f"without {s_raw:.0f}")
assert s_normed <= hs**0.5 and s_raw > 1000

# %% [markdown]
# ## 4. The backward
#
# Bottom up, with G = ∂L/∂y, each line is the chain rule through one line of the forward:
#
# $$ dY = G W_o^\top \text{ (split into heads)}, \quad dW_o = \mathrm{concat}(Y)^\top G \qquad \text{(lesson 2)} $$
#
# $$ dP = dY v^\top, \quad dv = P^\top dY \qquad (Y = P v \text{ is linear}) $$
#
# $$ ds = P \odot (dP - \mathrm{rowsum}(dP \odot P)) \qquad \text{softmax} $$
#
# $$ dq = ds\ k / \sqrt{hs}, \quad dk = ds^\top q / \sqrt{hs} \qquad (s = q k^\top / \sqrt{hs}) $$
#
# then back through N (lesson 4) and RoPE (rotate by −pθ), and dx = dq W_qᵀ + dk W_kᵀ + dv W_vᵀ.
#
# The softmax line comes from its Jacobian. For one row p = softmax(s), ∂p_i/∂s_j = p_i(δ_ij − p_j),
# i.e. J = diag(p) − p pᵀ, and J dp = p ⊙ dp − p (p·dp) = p ⊙ (dp − p·dp). Masked entries have
# p = 0, so they receive no gradient. `attention.backward` in `minparcae/ops/attention.py`:
#
#     ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
#
# Check the softmax line alone against the explicit Jacobian of one row:

# %%
p_row = P[0, 0, -1]                              # the last position sees all S keys
dp_row = rng.standard_normal(S)
J = np.diag(p_row) - np.outer(p_row, p_row)
ds_row = p_row * (dp_row - (dp_row * p_row).sum())
assert np.abs(J @ dp_row - ds_row).max() < 1e-15

# %% [markdown]
# Then the core, Y = softmax(q kᵀ/√hs) v, against finite differences:

# %%
R = rng.standard_normal(Yh.shape)
core_in = {"q": qh.copy(), "k": kh.copy(), "v": vh.copy()}
errors = check_grads(lambda: float((attention.forward(**core_in, scale=1 / hs**0.5)[0] * R).sum()),
                     core_in, attention.backward(R, core_cache))
print("softmax(qkᵀ)v:", {k: f"{v:.1e}" for k, v in errors.items()})
assert max(errors.values()) < 1e-8

# %% [markdown]
# And the whole layer, every weight. Here with grouped-query attention: 4 query heads share 2
# key/value heads (each K/V head's gradient is the sum over the query heads that read it), and with
# the optional value embedding ve mixed into v through the gate 2σ(x[..., :n_g] W_g).
# `model.attention_backward` adds the weights' gradients into a dict named like the parameters.


# %%
def layer_backward(dout, state):
    cache, p = state
    grads = {name: np.zeros_like(w) for name, w in p.items()}
    dx, dve = model.attention_backward(dout, cache, "L", grads, REFERENCE)
    return {"x": dx, "ve": dve, "wq": grads["L.attn.wq"], "wk": grads["L.attn.wk"],
            "wv": grads["L.attn.wv"], "wo": grads["L.attn.wo"], "w_gate": grads["L.attn.ve_gate"]}


d, H, H_kv = 16, 4, 2
hs = d // H
cos, sin = rotary.tables(S, hs, dtype=np.float64)
inputs = {"x": rng.standard_normal((B, S, d)),
          "wq": rng.standard_normal((d, d)) / d**0.5,
          "wk": rng.standard_normal((d, H_kv * hs)) / d**0.5,
          "wv": rng.standard_normal((d, H_kv * hs)) / d**0.5,
          "wo": rng.standard_normal((d, d)) / d**0.5,
          "ve": rng.standard_normal((B, S, H_kv * hs)),
          "w_gate": rng.standard_normal((8, H_kv))}
worst, errors = check_op(layer, layer_backward, inputs, cos=cos, sin=sin, n_head=H, n_kv_head=H_kv)
print("model.attention_forward/backward:", {k: f"{v:.1e}" for k, v in errors.items()})
assert worst < 1e-8 and set(errors) == set(inputs)

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/05_attention.py --exercise 1              # or 2, 3
#     python lessons/05_attention.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `rotary_backward`: the gradient through section 1's rotation, for every head and position.
#    Graded against `rotary.backward`.
# 2. `softmax_backward`: section 4's softmax line for whole (B, H, S, S) blocks of causal
#    probabilities, without forming a Jacobian. Graded against J·dp with the explicit Jacobian
#    diag(p) − ppᵀ of every row.
# 3. `attention_backward`: the core Y = softmax(q kᵀ · scale, causal) v backwards, to dq, dk and
#    dv (every query head with its own key and value head). Graded against `attention.backward`.

# %%
import numpy as np

from exercise import cmp
from minparcae.ops import attention, rotary


def rotary_backward(dout, cos, sin):
    """dout = dL/dy for y = rotary.forward(x, cos, sin)[0], x: (B, H, S, hs); cos, sin: (S, hs/2).
    Returns dL/dx."""
    raise NotImplementedError  # exercise 1: rotate each pair (2i, 2i + 1) of dout by −pθ_i


def check_rotary_backward(fn):
    rng = np.random.default_rng(1)
    cos, sin = rotary.tables(5, 8, dtype=np.float64)
    G = rng.standard_normal((2, 3, 5, 8))
    return cmp("dx", fn(G, cos, sin), rotary.backward(G, rotary.Cache(cos, sin))["x"])


# %%
def softmax_backward(dp, p):
    """p = softmax(s) along the last axis, (..., S); dp = dL/dp. Returns dL/ds."""
    raise NotImplementedError  # exercise 2: p ⊙ (dp − Σ_j dp_j p_j), row by row


def check_softmax_backward(fn):
    rng = np.random.default_rng(2)
    B, H, S = 2, 3, 5
    s = np.where(np.tri(S, dtype=bool), rng.standard_normal((B, H, S, S)), -np.inf)  # causal
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = rng.standard_normal(p.shape)
    J = p[..., :, None] * np.eye(S) - p[..., :, None] * p[..., None, :]  # (B, H, S, S, S), one per row
    return cmp("ds", fn(dp, p), np.einsum("...ij,...j->...i", J, dp))


# %%
def attention_backward(dy, q, k, v, scale):
    """Y = softmax(q kᵀ · scale, causal) v for q, k, v: (B, H, S, hs); dy = dL/dY.
    Returns (dL/dq, dL/dk, dL/dv)."""
    raise NotImplementedError  # exercise 3: recompute P, then dP = dY vᵀ, dv = Pᵀ dY, ds, dq, dk


def check_attention_backward(fn):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    y, cache = attention.forward(q, k, v, 0.5)
    G = rng.standard_normal(y.shape)
    want = attention.backward(G, cache)
    dq, dk, dv = fn(G, q, k, v, 0.5)
    return all([cmp("dq", dq, want["q"]), cmp("dk", dk, want["k"]), cmp("dv", dv, want["v"])])


# %%
EXERCISES = {1: (rotary_backward, check_rotary_backward),
             2: (softmax_backward, check_softmax_backward),
             3: (attention_backward, check_attention_backward)}

# %%
print("lesson 5 passed")
