# %% [markdown]
# # Lesson 7: the looped block. Prelude, recurrence, coda
#
# ```bash
# python lessons/07_looped_block.py
# ```
#
# A transformer gets deeper by stacking more blocks, each with its own weights. A looped transformer
# gets deeper by running the same blocks again. Parcae splits the model in three:
#
#     ids ─wte─▶ prelude (n_p blocks) ─RMSNorm─▶ e                     run once
#     h_t = R(Ā h_{t−1} + B̄ e),  t = 1..T                                R: n_r blocks, run T times
#     h_T ─C─▶ coda (n_c blocks) ─RMSNorm─▶ logits = x wteᵀ             run once
#
# The prelude turns tokens into e, the input injected at every loop step; the recurrent block R
# refines a state h for T steps; the coda reads out the final state. This lesson assembles that
# forward pass from the library's pieces and checks it against model.forward, then counts what the
# loop costs: the parameters do not grow with T, the FLOPs do, and the activation memory that
# training keeps grows with the number of steps that are backpropagated, μ_bwd, not with T.

# %%
from dataclasses import replace

import numpy as np

from minparcae import model
from minparcae.ops import REFERENCE, embedding, injection, rmsnorm, rotary

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The parts
#
# A Config describes the whole model; `model.layers` lists its blocks in order and
# `model.param_shapes` every parameter (the flat dict that is also the checkpoint).

# %%
cfg = model.Config(vocab_size=64, context=16, d_model=16, n_head=2, n_prelude=1, n_recurrent=2,
                   n_coda=1, mean_recurrence=4, backprop_depth=2)
print("blocks:", [spec.name for spec in model.layers(cfg)])
shapes = model.param_shapes(cfg)
print("injection and read-out:", {k: v for k, v in shapes.items()
                                   if k.startswith(("inject.", "C", "prelude_norm"))})
assert [spec.name for spec in model.layers(cfg)] == ["prelude.0", "core.0", "core.1", "coda.0"]

# %% [markdown]
# ## 2. The forward pass, assembled by hand
#
# A freshly initialised block is the identity map (its output projections start at zero, so
# x + attn(·) + mlp(·) = x). To see every part at work, add noise to all parameters, as a little
# training would.

# %%
p = {k: v + 0.3 * rng.standard_normal(v.shape)
     for k, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()}
B, S, T = 2, 12, 5                           # batch, sequence length, loop steps
ids = rng.integers(0, cfg.vocab_size, (B, S))
h0 = model.initial_state(cfg, (B, S, cfg.d_h), "seeded", dtype=np.float64)
# rotary cos/sin tables (lesson 5), by head size; every block here has heads of size d / n_head
hs = cfg.d_model // cfg.n_head
rope = {hs: rotary.tables(S, hs, cfg.rope_base, dtype=np.float64)}
# Each attention layer makes q, k and v in one product with [W_q W_k W_v] side by side;
# model.forward lays those out once per forward (`with_fused_qkv`), and so does this lesson.
pf = model.with_fused_qkv(p, cfg)

# %% [markdown]
# Prelude: embed, run the prelude blocks once, normalise. e is fixed for the whole loop.

# %%
x, _ = embedding.forward(ids, p["wte"])                                  # (B, S, d)
for i in range(cfg.n_prelude):
    x, _ = model.block_forward(pf, f"prelude.{i}", x, rope, cfg, REFERENCE)
e, _ = rmsnorm.forward(x, p["prelude_norm"])

# %% [markdown]
# Recurrence: h_t = R(Ā h_{t−1} + B̄ e). B̄e does not change between steps, so it is computed once
# (`injection.input_forward`); each step only applies Ā to the state (`injection.state_forward`)
# and runs the shared blocks, the same parameters "core.0", "core.1" on every step.

# %%
u, _ = injection.input_forward(cfg.injection, p, e)                      # B̄ e
h = h0
for _ in range(T):
    x, _ = injection.state_forward(cfg.injection, p, h, u)               # Ā h + B̄ e
    for i in range(cfg.n_recurrent):
        x, _ = model.block_forward(pf, f"core.{i}", x, rope, cfg, REFERENCE)
    h = x

# %% [markdown]
# Coda: map the state back to the model width with C, run the coda blocks, read out through the
# tied embedding.

# %%
x = h @ p["C"]
for i in range(cfg.n_coda):
    x, _ = model.block_forward(pf, f"coda.{i}", x, rope, cfg, REFERENCE)
x, _ = rmsnorm.forward(x, p["final_norm"])
logits_by_hand = x @ p["wte"].T                                          # (B, S, V)

logits, _, diag = model.forward(p, cfg, ids, n_loops=T, h0=h0)
print(f"by hand vs model.forward at T = {T}: max |difference| "
      f"{np.abs(logits_by_hand - logits).max():.1e}")
assert np.abs(logits_by_hand - logits).max() < 1e-12
assert diag["steps"] == T

# %% [markdown]
# The loop count is a run-time argument, not part of the weights: the same parameters give a
# prediction at any T. (Lesson 10 asks how good it is.)

# %%
for T_other in (1, 2, 8):
    assert model.forward(p, cfg, ids, n_loops=T_other, h0=h0)[0].shape == logits.shape

# %% [markdown]
# ## 3. Parameters against FLOPs
#
# Running R T times makes the model as deep as a transformer with n_p + T·n_r + n_c blocks, at the
# compute of that transformer but with the parameters of one with n_p + n_r + n_c. Compare, at the
# `tiny` preset's sizes, the looped model with the plain transformer unrolled to the same depth
# (`injection="none"`, n_r·T core blocks). `model.count_params` counts parameters and
# `model.flops_per_token(cfg, train=False, n_loops=T)` the matrix-multiply FLOPs of one forward.

# %%
tiny = model.preset("tiny")
n_core = sum(int(np.prod(s)) for k, s in model.param_shapes(tiny).items() if k.startswith("core."))
looped_extra = model.count_params(tiny) - model.count_params(model.fixed_depth_baseline(tiny))
print(f"\n`tiny`: {model.count_params(tiny):,} parameters, of which the recurrent block holds "
      f"{n_core:,}; the injection, C and prelude norm add {looped_extra:,}")
print("   T   looped params   unrolled params   looped MFLOP/token   unrolled MFLOP/token")
for T in (1, 2, 4, 8, 16):
    unrolled = replace(model.fixed_depth_baseline(tiny), n_recurrent=tiny.n_recurrent * T)
    n_loop, n_unroll = model.count_params(tiny), model.count_params(unrolled)
    f_loop = model.flops_per_token(tiny, train=False, n_loops=T)
    f_unroll = model.flops_per_token(unrolled, train=False)
    print(f"  {T:2d}   {n_loop:13,}   {n_unroll:15,}   {f_loop / 1e6:18.2f}   "
          f"{f_unroll / 1e6:20.2f}")
    # Same compute, up to B and C (one multiply-add each per entry, 2 FLOPs)...
    assert f_loop - f_unroll == 2 * (2 * tiny.d_model * tiny.d_h)
    # ...while the unrolled model pays for T − 1 more copies of the recurrent block.
    assert n_unroll - n_loop == (T - 1) * n_core - looped_extra

# %% [markdown]
# Training costs more than a forward: 2 FLOPs per multiply-add forward, 4 backward. Outside the loop
# every parameter pays 6; the recurrent block pays 2 on each of the μ_rec forward steps and 4 more
# on each of the μ_bwd steps that are backpropagated (lesson 9):
#
# $$ \text{FLOPs/token} \approx 6 N_{outside} + 2 N_{core} \mu_{rec} + 4 N_{core} \mu_{bwd} \qquad \text{(+ attention, counted alike)} $$
#
# So one more backpropagated step costs twice what one more forward step costs:

# %%
forward_step = (model.flops_per_token(tiny, train=False, n_loops=2)
                - model.flops_per_token(tiny, train=False, n_loops=1))
backward_step = (model.flops_per_token(replace(tiny, backprop_depth=3))
                 - model.flops_per_token(replace(tiny, backprop_depth=2)))
assert abs(backward_step - 2 * forward_step) < 1e-9 * forward_step
full = replace(tiny, backprop_depth=tiny.mean_recurrence)
saved = 1 - model.flops_per_token(tiny) / model.flops_per_token(full)
print(f"one loop step: {forward_step / 1e6:.2f} MFLOP/token forward, {backward_step / 1e6:.2f} "
      f"backward; training with μ_bwd = {tiny.backprop_depth} of μ_rec = {tiny.mean_recurrence} "
      f"costs {saved:.0%} less than backpropagating every step")

# %% [markdown]
# ## 4. Activation memory
#
# The backward needs the activations of every op it passes through. minparcae's loop keeps them
# only for the last μ_bwd steps (truncated backprop through the loop, lesson 9); the steps before
# run forward only and are forgotten. So the activation memory of a training step depends on μ_bwd
# and not on T. `model.cache_nbytes` adds up the arrays a training forward kept (the parameters
# are excluded: they are not activations).

# %%
p32 = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
targets = rng.integers(0, cfg.vocab_size, (B, S))


def activation_bytes(c, n_loops):
    _, cache, _ = model.forward(p32, c, ids, targets, n_loops=n_loops, rng=rng, train=True)
    return model.cache_nbytes(cache, exclude=p32.values())


print(f"\nactivation memory of one training step, μ_bwd = {cfg.backprop_depth}:")
by_T = {T: activation_bytes(cfg, T) for T in (2, 4, 8, 16, 32)}
for T, nbytes in by_T.items():
    print(f"  T = {T:2d}: {nbytes:,} bytes")
assert len(set(by_T.values())) == 1

print("and at T = 16 with growing μ_bwd:")
by_k = {k: activation_bytes(replace(cfg, backprop_depth=k), 16) for k in (1, 2, 3, 4)}
for k, nbytes in by_k.items():
    print(f"  μ_bwd = {k}: {nbytes:,} bytes")
per_step = by_k[2] - by_k[1]
assert all(by_k[k + 1] - by_k[k] == per_step > 0 for k in (1, 2, 3))   # linear in μ_bwd
print(f"each backpropagated loop step keeps {per_step:,} bytes, whatever T is")

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/07_looped_block.py --exercise 1              # or 2
#     python lessons/07_looped_block.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `run_loop`: section 2's recurrence as one function, for any of the three injections
#    (`cfg.injection`: "diagonal", "add" or "linear"; lesson 8 compares them): B̄e once, then T
#    steps of the injection and the shared blocks. Graded against `model.state_after`, the model's
#    own loop, for each injection at T = 1 and T = 5.
# 2. `train_flops_per_token`: section 3's count of a training step, from nothing but the FLOPs of
#    forward passes at any loop count you ask for: what one loop step costs, what the rest costs,
#    and then forward and backward. Graded against `model.flops_per_token(cfg)` on three configs.

# %%
from dataclasses import replace

import numpy as np

from exercise import cmp
from minparcae import model
from minparcae.ops import REFERENCE, injection, rmsnorm


def run_loop(pf, cfg, e, h0, T, rope):
    """h_T of h_t = R(Ā h_{t−1} + B̄ e) from h_0 = h0 (B, S, d_h), R: the blocks core.0 ..
    core.{n_r − 1}; pf: the parameters with fused qkv; rope: the rotary tables by head size."""
    raise NotImplementedError  # exercise 1: injection.input_forward once, then T steps


def check_run_loop(fn):
    rng = np.random.default_rng(1)
    ok = []
    for kind in ("diagonal", "add", "linear"):
        cfg = model.Config(vocab_size=64, context=16, d_model=16, n_head=2, n_prelude=1,
                           n_recurrent=2, n_coda=1, injection=kind)
        p = {k: v + 0.3 * rng.standard_normal(v.shape)      # noise: no block is the identity
             for k, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()}
        if kind == "linear":                                  # keep ρ(W_h) below 1: no blow-up
            p["inject.W"][:cfg.d_h] *= 0.5 / injection.spectral_radius(kind, p)
        ids = rng.integers(0, cfg.vocab_size, (2, 8))
        h0 = model.initial_state(cfg, (2, 8, cfg.d_h), "seeded", dtype=np.float64)
        pf = model.with_fused_qkv(p, cfg)
        x, rope, _, _ = model.prelude_forward(pf, cfg, ids, REFERENCE)
        e = rmsnorm.forward(x, p["prelude_norm"])[0]
        for T in (1, 5):
            ok.append(cmp(f"h_T, {kind}, T = {T}", fn(pf, cfg, e, h0, T, rope),
                          model.state_after(p, cfg, ids, T, h0)))
    return all(ok)


# %%
def train_flops_per_token(cfg, forward_flops):
    """forward_flops(T): FLOPs per token of a forward pass at T loop steps. Returns the FLOPs per
    token of a training step: cfg.mean_recurrence steps forward, the last cfg.backprop_depth of
    them backward, every backward costing twice its forward."""
    raise NotImplementedError  # exercise 2: a loop step = forward_flops(2) − forward_flops(1)


def check_train_flops_per_token(fn):
    tiny = model.preset("tiny")
    ok = []
    for name, cfg in (("tiny", tiny), ("μ_rec 8, μ_bwd 4", replace(tiny, mean_recurrence=8,
                                                                      backprop_depth=4)),
                      ("linear injection", replace(tiny, injection="linear"))):
        got = fn(cfg, lambda T: model.flops_per_token(cfg, train=False, n_loops=T))
        ok.append(cmp(name, got, model.flops_per_token(cfg)))
    return all(ok)


# %%
EXERCISES = {1: (run_loop, check_run_loop), 2: (train_flops_per_token, check_train_flops_per_token)}

# %%
print("lesson 7 passed")
