# %% [markdown]
# # Lesson 8: stability, the loop as a dynamical system
#
# ```bash
# python lessons/08_stability.py
# ```
#
# Lesson 7 ran h_t = R(Ā h_{t−1} + B̄ e) for a handful of steps. Nothing in that formula stops h from
# growing without bound as T grows, and a state that grows from step to step makes training
# fragile: activations and gradients change scale with the depth (the paper reports loss spikes and
# divergence; section 4 says what minparcae's own sweep saw). Parcae's answer is to read the loop as
# a dynamical system
#
# $$ h_{t+1} = \bar A h_t + \bar B e + \bar R(h_t, e) $$
#
# (R̄ is what the blocks add on top of their input) and to make its linear part stable by
# construction. This lesson iterates the linear part alone, then the whole model, for the three ways
# of injecting e that minparcae implements (ops/injection.py), derives the diagonal kind's Ā and B̄,
# and ends with what training each kind measured:
#
# | injection | Ā and B̄ |
# |---|---|
# | diagonal (Parcae) | Ā = exp(Δ·A), A = −exp(A_log), Δ = softplus(dt_bias); B̄ = Δ·B (section 3) |
# | add | Ā = I, B̄ = I: h + e |
# | linear | Ā = W_h, B̄ = W_e, learned freely: h W_h + e W_e |

# %%
import csv
import tempfile
from dataclasses import replace
from pathlib import Path

from common import small_corpus, train  # first: it sets NumPy's BLAS to one thread
import numpy as np

from minparcae import model
from minparcae.ops import injection
from pictures import Panel, picture

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# A small model, one set of block weights shared by all three kinds (with noise added, as in
# lesson 7, so the blocks are not the identity), and for the linear kind a state matrix W_h where
# training can take it. It starts as a truncated normal with ρ(W_h) ≈ 0.6 (the official code's
# initialisation), inside the unit circle, but nothing keeps it there: in the stability sweep of
# docs/RESULTS.md the highest learning rate carried it to ρ ≈ 17. Here W_h = I + noise of 0.1 per
# entry, just past the boundary.

# %%
d = 16
cfg = model.Config(vocab_size=64, context=16, d_model=d, n_head=2, n_prelude=1, n_recurrent=1,
                   n_coda=1)
blocks = {k: v + 0.3 * rng.standard_normal(v.shape)
          for k, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()
          if not k.startswith("inject.")}
KINDS = ("diagonal", "add", "linear")
configs, params = {}, {}
for kind in KINDS:
    configs[kind] = replace(cfg, injection=kind)
    params[kind] = model.init_params(configs[kind], seed=0, dtype=np.float64, xp=np)
    params[kind].update({k: v for k, v in blocks.items() if k in params[kind]})
rho_init_linear = injection.spectral_radius("linear", params["linear"])
print(f"linear kind at initialisation: ρ(W_h) = {rho_init_linear:.3f}")
assert 0.3 < rho_init_linear < 1
W_h_init = params["linear"]["inject.W"][:d].copy()                                # for later
params["linear"]["inject.W"][:d] = np.eye(d) + 0.1 * rng.standard_normal((d, d))  # W_h = I + noise

# %% [markdown]
# The spectral radius ρ(Ā), the largest |eigenvalue| of the state map, decides what the linear
# part does: for ρ < 1 it forgets, for ρ = 1 it remembers everything, for ρ > 1 it amplifies.
# `injection.spectral_radius(kind, p)` computes it.

# %%
rho = {kind: injection.spectral_radius(kind, params[kind]) for kind in KINDS}
print("ρ(Ā):", {kind: round(r, 4) for kind, r in rho.items()})
assert rho["diagonal"] < 1 and rho["add"] == 1 and rho["linear"] > 1

# %% [markdown]
# The Parcae paper states its condition with the spectral norm ‖Ā‖₂, the largest singular value,
# rather than with ρ(Ā). For a diagonal Ā the two are the same number: its eigenvalues are its
# entries and its singular values their absolute values, so for Parcae's injection the two
# conditions are one. For a general matrix only ρ(M) ≤ ‖M‖₂ holds (equality for normal matrices):
# ρ says where repeated steps end up, ‖M‖₂ bounds how much one step can stretch a state. The linear
# kind's W_h at initialisation has ρ < 1 and ‖W_h‖₂ > 1: its top singular direction grows in the
# first step and dies away over many.

# %%
A_bar_diag = np.diag(injection.diagonal_decay(params["diagonal"]["inject.A_log"],
                                              params["diagonal"]["inject.dt_bias"])[0])
norm_diag = np.linalg.norm(A_bar_diag, 2)
U, singular, _ = np.linalg.svd(W_h_init)
h_top = U[:, 0]                                   # the unit state that h ← h W_h stretches most
one_step = np.linalg.norm(h_top @ W_h_init)
many_steps = np.linalg.norm(h_top @ np.linalg.matrix_power(W_h_init, 64))
print(f"diagonal Ā: ‖Ā‖₂ = {norm_diag:.6f}, ρ(Ā) = {rho['diagonal']:.6f}")
print(f"linear W_h at initialisation: ρ = {rho_init_linear:.3f}, ‖W_h‖₂ = {singular[0]:.3f}; "
      f"a unit state after 1 step {one_step:.3f}, after 64 steps {many_steps:.0e}")
assert abs(norm_diag - rho["diagonal"]) < 1e-15
assert rho_init_linear < 1 < singular[0] and abs(one_step - singular[0]) < 1e-12
assert many_steps < 1e-6

# %% [markdown]
# ## 1. The linear part alone: h_{t+1} = Ā h_t + B̄ e
#
# Unrolled, h_T = Ā^T h_0 + Σ_{s<T} Ā^s B̄ e. Three behaviours follow.
#  - ρ(Ā) < 1: Ā^T → 0, and the sum converges: h_T → h* = (I − Ā)⁻¹ B̄ e, whatever h_0 was. Two
#    different starting states approach each other like ρ^T.
#  - Ā = I (add): h_T = h_0 + T·e. The state grows linearly with T, and a difference in h_0 is
#    never forgotten nor amplified: marginally stable, on the edge between the two others.
#  - ρ(Ā) > 1: Ā^T blows up along the leading eigenvector, and h_T grows like ρ^T.
#
# One loop step of the linear part is `injection.state_forward(kind, p, h, u)` with u = B̄e from
# `injection.input_forward`, exactly what the model runs before the blocks; here without them.

# %%
e = rng.standard_normal((1, 1, d))
h0 = rng.standard_normal((1, 1, d))
delta = 1e-3 * rng.standard_normal((1, 1, d))                 # a small change of the start
print("\nlinear part alone: ‖h_T‖, and ‖h_T − h'_T‖ for two starts 1e-3 apart")
linear_part, linear_path = {}, {}     # linear_path: (‖h_t‖, ‖h_t − h_{t−1}‖) for every t
for kind in KINDS:
    p = params[kind]
    u, _ = injection.input_forward(kind, p, e)
    h, h_other, norms, linear_path[kind] = h0, h0 + delta, {}, []
    for t in range(1, 129):
        h_prev, h = h, injection.state_forward(kind, p, h, u)[0]
        h_other = injection.state_forward(kind, p, h_other, u)[0]
        linear_path[kind].append((np.linalg.norm(h), np.linalg.norm(h - h_prev)))
        if t in (1, 4, 16, 64, 128):
            norms[t] = (np.linalg.norm(h), np.linalg.norm(h - h_other))
    linear_part[kind] = (u, h, norms)
    print(f"  {kind:8s}", "  ".join(f"T={t}: {n:.3g}, {dn:.0e}" for t, (n, dn) in norms.items()))

# %%
# Diagonal: converged to the fixed point, and the two starts have merged (0.447^64 ≈ 4e-23).
u, h, norms = linear_part["diagonal"]
A_bar = injection.diagonal_decay(params["diagonal"]["inject.A_log"],
                                 params["diagonal"]["inject.dt_bias"])[0]
h_star = u / (1 - A_bar)                                      # (I − Ā)⁻¹ B̄ e, Ā diagonal
assert np.abs(h - h_star).max() < 1e-12 and norms[64][1] < 1e-15
# Add: exactly h_0 + T·e, and the difference between the two starts is still 1e-3 in size.
u, h, norms = linear_part["add"]
assert np.abs(h - (h0 + 128 * e)).max() < 1e-10
assert abs(norms[128][1] - np.linalg.norm(delta)) < 1e-12
# Linear: once the leading eigenvector dominates, growth by the factor ρ per step.
u, h, norms = linear_part["linear"]
rate = (norms[128][0] / norms[64][0]) ** (1 / 64)
print(f"  linear: growth per step {rate:.4f}, ρ = {rho['linear']:.4f}")
assert abs(rate - rho["linear"]) < 1e-3

# %% [markdown]
# The first 64 steps as a picture: the size of the state, ‖h_t‖, and of each step, ‖h_t − h_{t−1}‖,
# on a log scale, where a factor per step is a straight line. A step of the linear part is Ā times
# the step before it (h_t − h_{t−1} = Ā (h_{t−1} − h_{t−2})), so the steps shrink or grow by ρ each
# time. The diagonal kind's steps shrink by 0.447 each until they reach float64's rounding, about
# 1e-16 of ‖h*‖; a few steps later h_t stops changing at all, and a step of 0 has no place on a log
# scale. The additive kind moves by e at every step, forever; the linear kind's steps grow by
# ρ = 1.35.

# %%
t = np.arange(1, 65)
path = {kind: np.array(linear_path[kind][:64]) for kind in KINDS}          # (64, 2) each
picture("linear_part", [
    Panel("‖h_t‖", {kind: (t, path[kind][:, 0]) for kind in KINDS}, x="loop step t", log=True),
    Panel("‖h_t − h_{t−1}‖", {kind: (t, path[kind][:, 1]) for kind in KINDS}, x="loop step t",
          log=True)], title="the linear part alone, h_t = Ā h_{t−1} + B̄ e")
# while the steps are large enough for their difference to be exact to rounding (t ≤ 16)
shrink = path["diagonal"][1:16, 1] / path["diagonal"][:15, 1]
off = np.abs(shrink - rho["diagonal"]).max()
last_move = np.flatnonzero(path["diagonal"][:, 1])[-1] + 1
print(f"diagonal: each step ρ times the one before, to {off:.0e}; the last step that changes h "
      f"at t = {last_move}, of {path['diagonal'][last_move - 1, 1]:.0e}")
assert off < 1e-9
assert 30 < last_move < 64
assert np.allclose(path["add"][:, 1], np.linalg.norm(e), rtol=1e-12)     # every step is e
assert abs(path["linear"][-1, 1] / path["linear"][-2, 1] - rho["linear"]) < 1e-3

# %% [markdown]
# ## 2. The whole loop, blocks included
#
# Each block is pre-norm: it adds attn(N(x)) and mlp(N(x)) to x, and both read a normalised input,
# so what a block adds is bounded however large x gets. With ‖R̄‖ ≤ F,
#
# $$ \lVert h_{t+1} \rVert \le \rho \lVert h_t \rVert + \lVert \bar B e \rVert + F, $$
#
# and for ρ < 1 the state stays below (‖B̄ e‖ + F)/(1 − ρ) at every depth. For ρ = 1 the bound grows
# by a constant per step, and for ρ > 1 nothing holds it. `model.state_after(p, cfg, ids, T, h0)`
# runs the model's own loop for T steps and returns h_T. Run one step at a time, each from the
# state the last one left, it is the same loop (the cell checks that 64 single steps give h_64 bit
# for bit), and every h_t is there to measure; ‖h_T‖ per token, averaged:

# %%
ids = rng.integers(0, cfg.vocab_size, (2, 12))
start = model.initial_state(cfg, (2, 12, d), "seeded", dtype=np.float64)
loop_path = {}     # (64, 2): mean ‖h_t‖ and mean ‖h_t − h_{t−1}‖ per token, t = 1..64
for kind in KINDS:
    h, rows = start, []
    for _ in range(64):
        h_prev, h = h, model.state_after(params[kind], configs[kind], ids, 1, h)
        rows.append((np.linalg.norm(h, axis=-1).mean(), np.linalg.norm(h - h_prev, axis=-1).mean()))
    loop_path[kind] = np.array(rows)
    assert np.array_equal(h, model.state_after(params[kind], configs[kind], ids, 64, start))
steps = (1, 4, 16, 32, 64)
state_norm = {kind: {T: loop_path[kind][T - 1, 0] for T in steps} for kind in KINDS}
print("\nwhole loop: mean ‖h_T‖ per token")
print("  T       " + "".join(f"{T:>11d}" for T in steps))
for kind in KINDS:
    print(f"  {kind:8s}" + "".join(f"{state_norm[kind][T]:11.3g}" for T in steps))

grow = {kind: state_norm[kind][64] / state_norm[kind][32] for kind in KINDS}
print("‖h_64‖ / ‖h_32‖:", {kind: f"{g:.3g}" for kind, g in grow.items()})
assert grow["diagonal"] < 1.1                  # bounded: it has settled
assert 1.8 < grow["add"] < 2.2                 # linear growth: twice the steps, twice the norm
assert grow["linear"] > 1e3                    # exponential growth

# %% [markdown]
# As a picture, with the steps: the additive kind drifts, by a step that settles near a constant
# (e plus what the blocks add, which is bounded), so ‖h_t‖ grows linearly; the linear
# kind's state and steps grow by a factor per step. The diagonal kind's state stays in a band, but
# unlike the linear part alone it never comes to rest: these noisy blocks are no contraction, and
# each step still moves h by about a tenth of its size. Bounded is what ρ(Ā) < 1 promises once the
# blocks are in, not convergent.

# %%
picture("whole_loop", [
    Panel("‖h_t‖", {kind: (t, loop_path[kind][:, 0]) for kind in KINDS}, x="loop step t",
          log=True),
    Panel("‖h_t − h_{t−1}‖", {kind: (t, loop_path[kind][:, 1]) for kind in KINDS},
          x="loop step t", log=True)], title="the whole loop, h_t = R(Ā h_{t−1} + B̄ e)")
late = slice(15, 64)                                                       # t = 16..64
band = loop_path["diagonal"][late, 0]
moves = loop_path["diagonal"][late, 1] / band
print(f"diagonal, t = 16..64: ‖h_t‖ from {band.min():.1f} to {band.max():.1f}, each step moving h "
      f"by {moves.min():.0%} to {moves.max():.0%} of it")
print(f"add: step at t = 32 {loop_path['add'][31, 1]:.3f}, at t = 64 {loop_path['add'][63, 1]:.3f}")
assert band.max() < 1.5 * band.min() and moves.min() > 0.02
assert abs(loop_path["add"][63, 1] / loop_path["add"][31, 1] - 1) < 0.01
assert loop_path["linear"][63, 1] > 1e4 * loop_path["linear"][15, 1]

# %% [markdown]
# ## 3. Stable by construction: the negative-diagonal, zero-order-hold parameterisation
#
# Parcae starts from a continuous-time system, dh/dτ = A h + B e, with A diagonal and negative,
# A = −exp(A_log). Each coordinate decays towards its target: the system is stable for every value
# of A_log. Hold e constant over a step of length Δ and solve exactly (the "zero-order hold"):
#
# $$ h(\tau + \Delta) = \exp(\Delta A) h(\tau) + \int_0^\Delta \exp(sA) ds \cdot B e = \exp(\Delta A) h(\tau) + A^{-1}(\exp(\Delta A) - I) B e, $$
#
# which is h ← Ā h + B̄ e with
#
# $$ \bar A = \exp(\Delta A) = \exp(-\Delta \exp(A_\text{log})), \qquad \Delta = \mathrm{softplus}(\mathrm{dt}_\text{bias}) > 0, $$
#
# $$ \bar B = (\Delta A)^{-1}(\exp(\Delta A) - I) \cdot \Delta B = A^{-1}(\bar A - I) B. $$
#
# Every entry of Ā is exp of a negative number, so it lies in (0, 1): ρ(Ā) < 1 for *every* value
# of A_log and dt_bias, and no gradient step can leave that set. `injection.diagonal_decay` in
# `minparcae/ops/injection.py` computes Ā with the rate Δ·a it comes from (a = exp(A_log)):
#
#     delta, a = softplus(dt_bias), xp.exp(A_log)
#     return xp.exp(-delta * a), delta, a
#
# At initialisation A_log = 0 and dt_bias = softplus⁻¹(ln √5), so Δ = ln √5 ≈ 0.805 and
# Ā = exp(−Δ) = √(1/5) ≈ 0.447 in every coordinate.

# %%
p_init = model.init_params(cfg, seed=0, dtype=np.float64, xp=np)
A_bar, Delta, a = injection.diagonal_decay(p_init["inject.A_log"], p_init["inject.dt_bias"])
print(f"\nat initialisation: Δ = {Delta[0]:.4f}, Ā = {A_bar[0]:.4f} (√(1/5) = {np.sqrt(0.2):.4f})")
assert np.allclose(A_bar, np.sqrt(0.2)) and np.allclose(Delta, np.log(np.sqrt(5)))

# %% [markdown]
# The input term is another matter. minparcae, like the official Parcae code, keeps the exact Ā but
# not the exact B̄: it takes B̄ = Δ·B, the first-order (Euler) rule, which treats exp(sA) as I over
# the step. `input_forward` in `minparcae/ops/injection.py`:
#
#     return delta * eB, InputCache(kind, e, eB, delta)
#
# Per coordinate, with the rate r = Δ·a, the exact B̄ is (1 − e^(−r))/r times Δ·B: the two agree as
# r → 0, and at initialisation (r = ln √5) the factor is 0.687. Stability does not depend on it (it
# is a property of Ā alone), and B is learned, so training can absorb a factor. What the choice
# changes is the fixed point of the linear part, h* = (I − Ā)⁻¹ B̄ e: with the exact B̄ it is
# −A⁻¹ B e = B e / a, the continuous system's own resting point, whatever the step Δ; with Δ·B it
# is Δ/(1 − e^(−r)) · B e, which grows with Δ. Check the factor, then both B̄ against the
# differential equation itself, integrated over one step with 1000 Runge–Kutta substeps at random
# parameters, then the fixed points:

# %%
factor = (1 - A_bar) / (Delta * a)                # exact B̄ / (Δ·B) at initialisation
zoh_rng = np.random.default_rng(1)
p_ode = {"inject.A_log": zoh_rng.uniform(-1, 1, d), "inject.dt_bias": zoh_rng.uniform(-1, 1, d),
         "inject.B": zoh_rng.standard_normal((d, d))}
A_bar, Delta, a = injection.diagonal_decay(p_ode["inject.A_log"], p_ode["inject.dt_bias"])
A = -a                                            # the continuous A, diagonal, kept as its entries
e_ode, h_start = zoh_rng.standard_normal(d), zoh_rng.standard_normal(d)
Be = e_ode @ p_ode["inject.B"]                    # B e (B is stored (in, out))
h, n_sub = h_start.copy(), 1000
for _ in range(n_sub):                            # classic RK4 on dh/dτ = A h + B e, per coordinate
    k1 = A * h + Be
    k2 = A * (h + Delta / n_sub / 2 * k1) + Be
    k3 = A * (h + Delta / n_sub / 2 * k2) + Be
    k4 = A * (h + Delta / n_sub * k3) + Be
    h = h + Delta / n_sub / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
B_bar_zoh = (A_bar - 1) / A                       # A⁻¹(Ā − I), times B: a factor per coordinate
u_minparcae, _ = injection.input_forward("diagonal", p_ode, e_ode)
err_zoh = np.abs(A_bar * h_start + B_bar_zoh * Be - h).max() / np.abs(h).max()
err_euler = np.abs(A_bar * h_start + u_minparcae - h).max() / np.abs(h).max()
print(f"exact B̄ / (Δ·B) at initialisation: {factor[0]:.3f} in every coordinate")
print(f"one step of dh/dτ = Ah + Be: relative error of Āh + B̄e with the exact B̄ {err_zoh:.1e}, "
      f"with minparcae's Δ·B {err_euler:.2f}")
assert np.allclose(factor, 0.687, rtol=0, atol=1e-3)
assert np.array_equal(u_minparcae, Delta * Be)    # minparcae's B̄ is Δ·B
assert err_zoh < 1e-10 and err_euler > 0.05
# The fixed points: run the linear part h ← Ā h + B̄ e for 400 steps from h = 0, at two step sizes.
euler_offsets = []
for dt_bias in (-1.0, 2.0):
    A_bar, Delta, a = injection.diagonal_decay(p_ode["inject.A_log"], np.full(d, dt_bias))
    rest = {}
    for name, B_bar in (("exact", (A_bar - 1) / -a), ("Δ·B", Delta)):
        h = np.zeros(d)
        for _ in range(400):
            h = A_bar * h + B_bar * Be
        rest[name] = np.abs(h - Be / a).max()
    print(f"Δ = {Delta[0]:.3f}: max |h_400 − Be/a| with the exact B̄ {rest['exact']:.0e}, "
          f"with Δ·B {rest['Δ·B']:.2f}")
    assert rest["exact"] < 1e-12 and rest["Δ·B"] > 0.1
    euler_offsets.append(rest["Δ·B"])
assert euler_offsets[1] > euler_offsets[0]        # Δ·B's resting point moves away as Δ grows

# %% [markdown]
# Now perturb the injection parameters at random, 1000 times, by amounts far beyond any training
# step, and compare with the same experiment on the linear kind's W_h near the boundary, at I
# (where the additive kind sits for good).

# %%
trials = 1000
radius_diag = [injection.spectral_radius("diagonal", {
    "inject.A_log": rng.uniform(-8, 8, d), "inject.dt_bias": rng.uniform(-8, 8, d)})
    for _ in range(trials)]
W = params["linear"]["inject.W"].copy()
radius_linear = []
for _ in range(trials):
    W[:d] = np.eye(d) + 0.01 * rng.standard_normal((d, d))   # a tiny change of W_h = I
    radius_linear.append(injection.spectral_radius("linear", {"inject.W": W}))
print(f"diagonal, A_log and dt_bias anywhere in [−8, 8]: smallest 1 − ρ {1 - max(radius_diag):.1e}")
share_unstable = np.mean(np.array(radius_linear) > 1)
print(f"linear, W_h = I + 0.01·noise: ρ > 1 in {share_unstable:.0%} of trials")
assert max(radius_diag) < 1
# (Strictly below 1 in float64. Far outside this range the rate Δ·a can fall under 2⁻⁵³, and
# exp(−Δ·a) then rounds to exactly 1.0: never above it.)
assert share_unstable > 0.95

# %% [markdown]
# The additive kind sits exactly on the boundary ρ = 1. The linear kind starts inside it but is
# free to move, and once training brings W_h near the boundary almost every small change pushes
# its largest eigenvalue outside the unit circle, and then the loop amplifies, as in sections 1
# and 2. The diagonal kind cannot get there: that is the whole stability argument.

# %% [markdown]
# ## 4. What it bought in training
#
# Training moves Ā: the diagonal kind's only within (0, 1), the linear kind's anywhere. Watch it
# happen, for a few seconds per kind, on lesson 9's small model (width 32, one prelude, loop and
# coda block, μ_rec = 4, μ_bwd = 2) trained by `train` in lessons/common.py (lesson 9's recipe,
# the gradient clipped to norm 1 as in minparcae's trainer) for 80 steps of 8 sequences of 32
# tokens, at two peak learning rates, 6e-3 and 2e-2. Every step records the training loss, ρ of
# the injection as it stands, and ‖h_T‖, the final loop state's norm per token, averaged.

# %%
RATES = (6e-3, 2e-2)
runs = {}                        # (kind, rate) → {"loss", "rho", "state_norm"}: one value a step
with tempfile.TemporaryDirectory() as tmp:
    dataset = small_corpus(tmp, vocab_size=384)
    for rate in RATES:
        for kind in KINDS:
            small = model.Config(vocab_size=dataset.tokenizer.vocab_size, context=32, d_model=32,
                                 n_head=2, n_prelude=1, n_recurrent=1, n_coda=1,
                                 mean_recurrence=4, backprop_depth=2, injection=kind)
            trace = {}
            _, trace["loss"] = train(small, dataset, steps=80, lr=rate, batch_size=8, trace=trace,
                                     desc=f"{kind}, lr {rate:g}")
            runs[kind, rate] = {name: np.array(values) for name, values in trace.items()}

# %% [markdown]
# One row of panels per learning rate: the loss, ρ of the state map, and ‖h_T‖ on a log scale.

# %%
step = np.arange(1, 81)
picture("training", [
    Panel(f"{title}, lr {rate:g}", {kind: (step, runs[kind, rate][name]) for kind in KINDS},
          x="training step", log=name == "state_norm")
    for rate in RATES
    for name, title in (("loss", "training loss"), ("rho", "ρ(Ā)"), ("state_norm", "‖h_T‖"))],
    title="three injections trained at two learning rates")

# %% [markdown]
# At 6e-3 the three train alike, the linear kind a little behind, and its ρ stays inside the unit
# circle. At 2e-2 its W_h leaves the circle within the first ten steps, ρ keeps climbing, its state
# grows by orders of magnitude, and its loss stalls half a nat above the others'. The diagonal
# kind's ρ rises with the rate too, but it cannot reach 1. No run diverges by the rule of the sweep
# below (a loss that turns non-finite, or a 15-step mean that ends more than 1 nat above its own
# lowest), as none did there. At this size the linear kind leaves the unit circle at a lower rate
# than in the sweep, where with clipping it took the highest, 6e-2. (The final loss below is the
# training loss of the last 10 steps, averaged.)

# %%
print("\n  peak lr  injection  final loss  max ρ(Ā)  max ‖h_T‖")
final = {}
for (kind, rate), run in runs.items():
    smooth = np.convolve(run["loss"], np.ones(15) / 15, "valid")
    final[kind, rate] = run["loss"][-10:].mean()
    print(f"  {rate:7.0e}  {kind:9s}  {final[kind, rate]:10.3f}  {run['rho'].max():8.3f}  "
          f"{run['state_norm'].max():9.3g}")
    assert np.isfinite(run["loss"]).all() and smooth[-1] < smooth.min() + 1
    assert run["loss"][-10:].mean() < run["loss"][0] - 1        # every run learned something
low, high = RATES
assert all(runs["diagonal", rate]["rho"].max() < 1 for rate in RATES)
assert runs["linear", low]["rho"].max() < 1 and runs["linear", high]["rho"].max() > 1.2
assert runs["linear", high]["state_norm"].max() > 10 * runs["diagonal", high]["state_norm"].max()
assert final["linear", high] > final["diagonal", high] + 0.3
assert abs(final["add", low] - final["diagonal", low]) < 0.1

# %% [markdown]
# The paper reports that the diagonal injection trains at learning rates where the other two
# diverge. minparcae's stability sweep (docs/RESULTS.md, section 1: one small model per kind, peak
# learning rates from 2e-3 to 6e-2, two seeds each, 300 steps) measured something milder. No run
# diverged: no loss went non-finite, and none ended more than 1 nat above the lowest it reached,
# with gradient clipping or without. What sets the kinds apart is the size of their state. The
# diagonal kind's ρ stayed below 1 and its state bounded at every rate. At the highest rate the
# linear kind's W_h left the unit circle, its state grew to 10²⁴ per token, and its loss ended at
# the unigram baseline (6.56 nats on that validation text: token frequencies and nothing else), as
# did one of the additive kind's two seeds. Below that rate the additive kind trained as well as the
# diagonal one, within 0.06 nats either way, and the linear kind 0.1-0.2 nats behind. The table is
# the sweep's own record (docs/results/stability/runs.csv, with clipping), averaged over the seeds:

# %%
UNIGRAM = 6.56                                    # docs/RESULTS.md: the unigram baseline
results = Path(__file__).resolve().parent.parent / "docs" / "results"
sweep = {}
for clip, folder in (("clip", "stability"), ("no clip", "stability_noclip")):
    with open(results / folder / "runs.csv", newline="") as f:
        for row in csv.DictReader(f):
            sweep.setdefault((clip, row["injection"], float(row["lr"])), []).append(row)


def over_seeds(kind, lr, field, reduce=np.mean, clip="clip"):
    return reduce([float(row[field]) for row in sweep[clip, kind, lr]])


rates = sorted({lr for _, _, lr in sweep})
print("\nstability sweep: validation loss / largest ρ / largest ‖h_T‖ per token")
print("   peak lr" + "".join(f"{kind:>30s}" for kind in KINDS))
for lr in rates:
    print(f"  {lr:8.0e}" + "".join(
        f"{over_seeds(kind, lr, 'val_loss'):12.3f} / {over_seeds(kind, lr, 'max_rho', max):5.3g}"
        f" / {over_seeds(kind, lr, 'max_state_norm', max):7.2g}" for kind in KINDS))
runs = [row for rows in sweep.values() for row in rows]
print(f"runs diverged: {sum(row['diverged_text'] != 'no' for row in runs)} of {len(runs)}, "
      f"with and without clipping")
assert len(runs) == 48 and all(row["diverged_text"] == "no" for row in runs)
assert all(np.isfinite(float(row["final_loss"])) for row in runs)
top, lower = rates[-1], rates[:-1]
assert all(over_seeds("diagonal", lr, "max_rho", max) < 1 for lr in rates)
assert over_seeds("diagonal", top, "max_state_norm", max) < 1e3
assert over_seeds("linear", top, "max_rho", max) > 10
assert over_seeds("linear", top, "max_state_norm", max) > 1e20
assert abs(over_seeds("linear", top, "val_loss") - UNIGRAM) < 0.1
add_top = sorted(float(row["val_loss"]) for row in sweep["clip", "add", top])
print(f"additive kind at {top:.0e}, per seed: {add_top[0]:.3f} and {add_top[1]:.3f}")
assert abs(add_top[1] - UNIGRAM) < 0.1 and add_top[0] < UNIGRAM - 1
for lr in lower:
    gap_add = over_seeds("add", lr, "val_loss") - over_seeds("diagonal", lr, "val_loss")
    gap_linear = over_seeds("linear", lr, "val_loss") - over_seeds("diagonal", lr, "val_loss")
    print(f"  {lr:.0e}: additive − diagonal {gap_add:+.3f}, linear − diagonal {gap_linear:+.3f}")
    assert abs(gap_add) < 0.06 and 0.1 < gap_linear < 0.2

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/08_stability.py --exercise 1              # or 2, 3
#     python lessons/08_stability.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `zoh`: section 3's exact zero-order hold, Ā and the exact B̄ = A⁻¹(Ā − I)B (not minparcae's
#    Δ·B). Graded against the differential equation dh/dτ = A h + B e itself, integrated over one
#    step with 1000 Runge–Kutta substeps, to 1e-10; also at A_log = −40, where the rate Δ·a is
#    about 1e-17, Ā rounds to 1, and 1 − Ā says nothing about how far below 1 it was.
# 2. `linear_rho_and_norm`: ρ(W_h) and ‖W_h‖₂ of the linear injection, from its matrix W as
#    minparcae stores it (the h rows first: x = [h; e] W). Graded against `injection.spectral_radius`
#    and NumPy's matrix norm.
# 3. `fixed_point`: h* of the linear part h ← Ā h + B̄ e (section 1), for the diagonal and the linear
#    kinds with ρ < 1, without iterating. Graded by one step of the injection, which must leave h*
#    where it is, to 1e-12.

# %%
import numpy as np

from exercise import cmp
from minparcae.ops import injection


def zoh(A_log, dt_bias, B):
    """A = −exp(A_log), Δ = softplus(dt_bias), both (d_h,); B: (d, d_h), stored (in, out).
    Returns (Ā (d_h,), B̄ (d, d_h)) of the exact zero-order hold: h ← Ā ⊙ h + e B̄."""
    raise NotImplementedError  # exercise 1: B̄ = B·(1 − Ā)/a per column; mind 1 − Ā when Ā ≈ 1


def one_step_by_ode(A_log, dt_bias, n_sub=1000):
    """(Ā, B̄ / B) by integrating dh/dτ = −a h + f over one step Δ with classic RK4, per coordinate:
    from h = 1 with f = 0 it ends at Ā, from h = 0 with f = 1 at B̄'s factor."""
    _, Delta, a = injection.diagonal_decay(A_log, dt_bias)
    ends = []
    for h, f in ((np.ones_like(a), 0.0), (np.zeros_like(a), 1.0)):
        dt = Delta / n_sub
        for _ in range(n_sub):
            k1 = -a * h + f
            k2 = -a * (h + dt / 2 * k1) + f
            k3 = -a * (h + dt / 2 * k2) + f
            k4 = -a * (h + dt * k3) + f
            h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ends.append(h)
    return ends


def check_zoh(fn):
    rng = np.random.default_rng(1)
    B = rng.standard_normal((6, 4))
    ok = []
    for name, A_log in (("A_log ~ U(−1, 3)", rng.uniform(-1, 3, 4)), ("A_log = −40", np.full(4, -40.0))):
        dt_bias = rng.uniform(-1, 1, 4)
        A_bar, factor = one_step_by_ode(A_log, dt_bias)
        got_A, got_B = fn(A_log, dt_bias, B)
        ok += [cmp(f"Ā, {name}", got_A, A_bar, rtol=1e-10), cmp(f"B̄, {name}", got_B, B * factor, rtol=1e-10)]
    return all(ok)


# %%
def linear_rho_and_norm(W):
    """W: (d_h + d, d_h), the linear injection's inject.W: x = h W[:d_h] + e W[d_h:].
    Returns (ρ(W_h), ‖W_h‖₂), the largest |eigenvalue| and the largest singular value of W_h."""
    raise NotImplementedError  # exercise 2: np.linalg.eigvals and np.linalg.norm(·, 2) of W_h


def check_linear_rho_and_norm(fn):
    rng = np.random.default_rng(2)
    ok = []
    for d_h, d in ((6, 6), (4, 10)):
        W = rng.standard_normal((d_h + d, d_h)) / d_h**0.5
        rho, norm = fn(W)
        ok += [cmp(f"ρ, d_h {d_h}, d {d}", rho, injection.spectral_radius("linear", {"inject.W": W})),
               cmp(f"‖W_h‖₂, d_h {d_h}, d {d}", norm, np.linalg.norm(W[:d_h], 2))]
    return all(ok)


# %%
def fixed_point(kind, p, e):
    """h* with h* = Ā h* + B̄ e, for kind "diagonal" (p: inject.A_log, inject.dt_bias, inject.B) or
    "linear" (p: inject.W, with ρ(W_h) < 1); e: (B, S, d). Returns h*: (B, S, d_h)."""
    raise NotImplementedError  # exercise 3: solve (I − Ā) h* = B̄ e; rows are vectors: h W_h


def check_fixed_point(fn):
    rng = np.random.default_rng(3)
    d, d_h = 5, 4
    e = rng.standard_normal((2, 3, d))
    W = rng.standard_normal((d_h + d, d_h))
    W[:d_h] *= 0.8 / injection.spectral_radius("linear", {"inject.W": W})  # ρ(W_h) = 0.8
    ok = []
    for kind, p in (("diagonal", {"inject.A_log": rng.uniform(-2, 1, d_h),
                                  "inject.dt_bias": rng.uniform(-2, 1, d_h),
                                  "inject.B": rng.standard_normal((d, d_h))}),
                    ("linear", {"inject.W": W})):
        h = fn(kind, p, e)
        u, _ = injection.input_forward(kind, p, e)
        ok.append(cmp(f"step(h*), {kind}", injection.state_forward(kind, p, h, u)[0], h))
    return all(ok)


# %%
EXERCISES = {1: (zoh, check_zoh), 2: (linear_rho_and_norm, check_linear_rho_and_norm),
             3: (fixed_point, check_fixed_point)}

# %%
print("lesson 8 passed")
