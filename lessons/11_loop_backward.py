"""Lesson 11: backprop through the loop, by hand.

    python lessons/11_loop_backward.py

Lessons 2 to 5 wrote the backward of each op; lesson 7 assembled the forward of the looped model
from them; lesson 9 used `model.backward` as a black box and found that truncating it is exact for
a frozen-state loss. This lesson opens the box. It writes the backward of the loop

    u = B̄ e = Δ ⊙ (e B)               once, before the loop
    x_t = Ā ⊙ h_{t−1} + u              t = 1..T, the injection
    h_t = R(x_t)                       R: n_r blocks, the same weights at every step

from the ops' backward functions, checks it against `model.backward` and against finite
differences, and then uses it to see why backpropagating through only the last few steps, as
training does, loses so little: the gradient that flows back along the state is multiplied by Ā
(and by the blocks' Jacobian) at every step, so an early step's share of the gradient shrinks
about like ρ(Ā)^j with its distance j from the end.

Notation: ℓ is the loss, G_t = ∂ℓ/∂h_t the gradient that reaches the state after step t, T the
number of loop steps, L the sequence length.
"""

from dataclasses import replace

import numpy as np

from minparcae import model
from minparcae.gradcheck import check_grads, rel_error
from minparcae.ops import injection
from minparcae.ops.linear import rows_matmul, rows_t_matmul

rng = np.random.default_rng(0)

# A small model in float64, with two blocks in the loop so that R is a composition. Small noise
# on every parameter plays the part of a little training: at initialisation each block is the
# identity (its output projections are zero), the weights inside it get no gradient, and A_log and
# dt_bias are the same in every coordinate, none of which would test a backward.
cfg = model.Config(vocab_size=64, context=16, d_model=16, n_head=2, n_prelude=1, n_recurrent=2,
                   n_coda=1)
d = cfg.d_model
p = {k: v + 0.1 * rng.standard_normal(v.shape)
     for k, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()}
B, L, T = 2, 12, 12                     # batch, sequence length, loop steps
ids = rng.integers(0, cfg.vocab_size, (B, L))
targets = rng.integers(0, cfg.vocab_size, (B, L))
h0 = model.initial_state(cfg, (B, L, cfg.d_h), "seeded", dtype=np.float64)
cfg_full = replace(cfg, backprop_depth=T)  # μ_bwd = T: every loop step keeps its activations

# ---------------------------------------------------------------------------------------------
# 1. The loop's backward, derived.
#
# Walk the forward backwards. The coda hands us G_T. At step t, going back:
#
#   through R:      G^x_t = ∂ℓ/∂x_t = (∂R/∂x)ᵀ G_t, by the blocks' backward (`model.block_backward`,
#                   lessons 2 to 5), which also produces this step's gradient of the blocks'
#                   weights. The weights are shared by all steps, so their gradient is the sum
#                   of the steps' gradients.
#   through x_t = Ā ⊙ h_{t−1} + u, a product and a sum:
#                   G_{t−1} = Ā ⊙ G^x_t                      the state path: one factor Ā per step
#                   ∂ℓ/∂Ā  += Σ_{rows} G^x_t ⊙ h_{t−1}        Ā is shared too: summed over steps
#                   ∂ℓ/∂u  += G^x_t                          u is the same array at every step
#
# After the last step back, Ā and u are each used once, as parameters of the whole loop:
#
#   Ā = exp(−Δ a), a = exp(A_log), Δ = softplus(dt_bias):
#                   ∂ℓ/∂A_log   = ∂ℓ/∂Ā ⊙ (−Ā Δ a)           (∂a/∂A_log = a)
#                   ∂ℓ/∂Δ |_Ā   = ∂ℓ/∂Ā ⊙ (−Ā a)
#   u = Δ ⊙ (e B):  one call of `injection.input_backward(∂ℓ/∂u)` gives ∂ℓ/∂e, ∂ℓ/∂B and the
#                   part of ∂ℓ/∂dt_bias that comes through B̄ (Δ is in both Ā and B̄).
#                   ∂ℓ/∂dt_bias = (∂ℓ/∂Δ |_Ā + ∂ℓ/∂Δ |_B̄) ⊙ σ(dt_bias)     (softplus' = sigmoid)
#
# Summing ∂ℓ/∂Ā over the steps and applying the chain rule through Ā once is the same as applying
# it at every step and summing (the chain rule is linear in ∂ℓ/∂Ā); `injection.state_backward`,
# which `model.backward` calls, does the latter. Likewise e: its gradient is summed over the steps
# first, and then the prelude's backward runs once, not T times.
#
# The state h_0 before the first step is not a parameter, so G_0 goes nowhere. With truncation
# (μ_bwd < T) the cache holds only the last μ_bwd steps, and the walk stops early: G_{T−μ_bwd} is
# dropped in the same way (section 4).


def loop_backward(p, cfg, cache, dh):
    """Backprop G_T = dh (B, L, d_h) through the cached loop steps of the diagonal injection.

    Returns (gradients of the loop's parameters: core.* and inject.*, ∂ℓ/∂e (B, L, d),
    trace): trace holds, newest step first, the gradient G_t that reached the step's output and
    that step's own contribution to the core weights' gradient (for section 4)."""
    A_bar, delta, a = injection.diagonal_decay(p["inject.A_log"], p["inject.dt_bias"])  # (d_h,)
    core = [k for k in p if k.startswith("core.")]
    grads = {k: np.zeros_like(p[k]) for k in core}
    dA_bar = np.zeros_like(A_bar)                        # ∂ℓ/∂Ā, summed over steps
    du = np.zeros_like(dh)                               # ∂ℓ/∂u, summed over steps
    trace = []
    for step in reversed(cache.steps):
        assert step.rows is None                         # every sequence runs all T steps here
        g_step = {k: np.zeros_like(p[k]) for k in core}  # this step's share of the core gradient
        g = dh                                           # G_t
        for i in reversed(range(cfg.n_recurrent)):       # through R, last block first
            g, _ = model.block_backward(g, step.blocks[i], f"core.{i}", g_step, cache.ops)
        h_prev = step.state.h                            # h_{t−1}, kept by state_forward
        dA_bar += (g * h_prev).sum(axis=(0, 1))          # g is now G^x_t
        du += g
        trace.append((dh, g_step))
        dh = A_bar * g                                   # G_{t−1} = Ā ⊙ G^x_t
        for k in core:
            grads[k] += g_step[k]
    # the discretisation, once
    grads["inject.A_log"] = dA_bar * (-A_bar * delta * a)
    d_delta = dA_bar * (-A_bar * a)                      # ∂ℓ/∂Δ through Ā
    gi = injection.input_backward(du, cache.inject, p)   # through u = Δ ⊙ (e B), once
    grads["inject.B"] = gi["inject.B"]
    grads["inject.dt_bias"] = gi["inject.dt_bias"] + d_delta * injection.sigmoid(p["inject.dt_bias"])
    return grads, gi["e"], trace


# ---------------------------------------------------------------------------------------------
# 2. The whole model's backward around it, and the check against model.backward.
#
# Before the loop in the backward comes everything after it in the forward: the loss, the tied
# read-out logits = x wteᵀ, the final norm, the coda blocks and C, which together give G_T. After
# it comes the prelude, once: the prelude norm, the prelude blocks and the embedding. Each line is
# one op's backward; the gradients of wte from the read-out and from the embedding add up.


def backward_by_hand(p, cfg, cache):
    ops = cache.ops
    grads = {k: np.zeros_like(v) for k, v in p.items()}
    dlogits = ops.cross_entropy.backward(1.0, cache.loss)["logits"]      # (B, L, V)
    grads["wte"] += rows_t_matmul(dlogits, cache.x_final)                # logits = x wteᵀ
    dx = rows_matmul(dlogits, p["wte"])
    g = ops.rmsnorm.backward(dx, cache.final_norm)
    grads["final_norm"] += g["weight"]
    dx = g["x"]
    for i in reversed(range(cfg.n_coda)):
        dx, _ = model.block_backward(dx, cache.coda[i], f"coda.{i}", grads, ops)
    g = ops.linear.backward(dx, cache.C)                                 # h_T C
    grads["C"] += g["w"]
    loop_grads, de, trace = loop_backward(p, cfg, cache, g["x"])         # g["x"] is G_T
    grads.update(loop_grads)
    g = ops.rmsnorm.backward(de, cache.prelude_norm)                     # e = RMSNorm(x) w
    grads["prelude_norm"] += g["weight"]
    dx = g["x"]
    for i in reversed(range(cfg.n_prelude)):
        dx, _ = model.block_backward(dx, cache.prelude[i], f"prelude.{i}", grads, ops)
    grads["wte"] += ops.embedding.backward(dx, cache.wte)["table"]
    return grads, trace


loss, cache, diag = model.forward(p, cfg_full, ids, targets, n_loops=T, h0=h0, train=True)
mine, trace = backward_by_hand(p, cfg, cache)
ref = model.backward(p, cfg, cache)
errors = {k: rel_error(mine[k], ref[k]) for k in p}
print(f"loss {loss:.6f} at T = {T}, ρ(Ā) = {diag['rho']:.3f}; {len(trace)} loop steps walked back")
print("by hand vs model.backward, normwise relative error (max |mine − ref| / max |ref|):")
for k in ("inject.A_log", "inject.dt_bias", "inject.B", "core.0.attn.wq", "core.1.mlp.fc",
          "prelude.0.mlp.fc", "wte"):
    print(f"  {k:18s} {errors[k]:.1e}")
worst = max(errors, key=errors.get)
print(f"  worst of all {len(errors)} tensors: {worst} {errors[worst]:.1e}")
# The two walk the same ops in the same order except for where the chain rule through Ā is
# applied (once here, per step there), so they may differ by rounding only: ~1e-16 of the scale.
assert max(errors.values()) < 1e-10
assert all(np.abs(ref[k]).max() > 0 for k in p)           # and no gradient is trivially zero

# ---------------------------------------------------------------------------------------------
# 3. Against finite differences.
#
# model.backward could share a mistake with the lesson (they call the same block backward), so
# check against the loss itself: central differences (lesson 2) of model.forward's loss, with the
# same initial state, on 4 random entries of each tensor along the loop's path. At ε = 1e-6 their
# rounding error is about u·ℓ/ε ≈ 1e-9 in absolute terms, a few parts in 1e8 of gradients of this
# size. Allow 1e-6: a wrong gradient is off by O(1).


def loss_fn():
    return model.forward(p, cfg, ids, targets, n_loops=T, h0=h0)[0]


checked = ("inject.A_log", "inject.dt_bias", "inject.B", "core.0.attn.wq", "core.0.attn.wv",
           "core.1.mlp.fc", "core.1.norm1", "prelude.0.attn.wk", "prelude_norm", "wte")
fd = check_grads(loss_fn, {k: p[k] for k in checked}, mine, n_samples=4)
print("\nby hand vs central differences on 4 entries per tensor:")
for k, err in fd.items():
    print(f"  {k:18s} {err:.1e}")
assert max(fd.values()) < 1e-6

print("lesson 11 passed")
