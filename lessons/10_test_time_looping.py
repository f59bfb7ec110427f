"""Lesson 10: test-time looping. Loss against loop count, and its ceiling.

    python lessons/10_test_time_looping.py

A looped model's depth is a number chosen when it runs, not when it is built (lesson 7). Trained
with depths drawn around μ_rec (lesson 9), the same weights can be run with fewer loops, to save
compute, or with more. How does the loss depend on T? The Parcae paper finds a saturating
exponential,

    L(T) = L∞ + Z·e^(−zT),

that improves quickly at first and flattens near the training depth μ_rec: looping longer than
the model was trained for does not make it better. This lesson writes the small least-squares fit
for that law, checks it on synthetic data, then trains two small models and measures their curves.
"""

import tempfile
from dataclasses import replace

from common import small_corpus, train  # first: it sets NumPy's BLAS to one thread
import numpy as np

from minparcae import data, model


# ---------------------------------------------------------------------------------------------
# 1. Fitting L(T) = L∞ + Z·e^(−zT).
#
# Three parameters, but only one enters non-linearly. For a fixed decay rate z the model is linear
# in (L∞, Z): with the design matrix X = [1, e^(−zT)] (one row per measured T), the best (L∞, Z) is
# an ordinary least-squares solve. So scan z over a grid, solve the linear problem for each, and
# keep the z with the smallest squared error.

Z_GRID = np.arange(1, 1001) / 200          # z = 0.005, 0.010, ..., 5.000


def fit_saturating(T, L, z_grid=Z_GRID):
    """Least-squares fit of L(T) = L∞ + Z·e^(−zT). Returns (L∞, Z, z)."""
    T, L = np.asarray(T, dtype=np.float64), np.asarray(L, dtype=np.float64)
    best = None
    for z in z_grid:
        X = np.stack([np.ones_like(T), np.exp(-z * T)], axis=1)      # (n, 2)
        (L_inf, Z), *_ = np.linalg.lstsq(X, L, rcond=None)
        sse = float(((X @ [L_inf, Z] - L) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, L_inf, Z, z)
    return best[1:]


def saturating(T, L_inf, Z, z):
    return L_inf + Z * np.exp(-z * np.asarray(T, dtype=np.float64))


# Check on synthetic data: when the true z lies on the grid the fit recovers all three parameters
# to rounding; when it lies between grid points, to within the grid spacing.
T_syn = np.arange(1, 13)
truth = (3.2, 1.5, 0.7)                                      # 0.7 = 140/200 is on the grid
fitted = fit_saturating(T_syn, saturating(T_syn, *truth))
print("synthetic, z on the grid:  true (L∞, Z, z) =", truth, " fitted =",
      tuple(round(float(v), 12) for v in fitted))
assert np.allclose(fitted, truth, rtol=0, atol=1e-10)
off_grid = (3.2, 1.5, 0.6183)
fitted = fit_saturating(T_syn, saturating(T_syn, *off_grid))
print("synthetic, z off the grid: true (L∞, Z, z) =", off_grid, " fitted =",
      tuple(round(float(v), 4) for v in fitted))
assert abs(fitted[2] - off_grid[2]) <= 0.0025 and abs(fitted[0] - off_grid[0]) < 1e-3

# ---------------------------------------------------------------------------------------------
# 2. Measuring L(T).
#
# Train a small looped model briefly on real text, the recipe of lesson 9, at μ_rec = 4, then
# evaluate its validation loss at every T from 1 to 3μ_rec with the same weights
# (`model.evaluate(..., n_loops=T)`; evaluation starts the loop from a fixed seeded state, so each
# number is reproducible). The model has no prelude and no coda blocks (n_p = n_c = 0): all of its
# depth comes from the loop, so the effect of T shows after a few seconds of training. (Put one
# prelude and one coda block around the loop, n_prelude=1 and n_coda=1, and the same short
# training gives a nearly flat curve: try it.)

with tempfile.TemporaryDirectory() as tmp:
    dataset = small_corpus(tmp, vocab_size=384)
    cfg = model.Config(vocab_size=dataset.tokenizer.vocab_size, context=32, d_model=32, n_head=2,
                       n_prelude=0, n_recurrent=1, n_coda=0, mean_recurrence=4, backprop_depth=2)

    def loss_curve(params, c, loop_counts):
        return np.array([model.evaluate(params, c, data.iter_eval_batches(dataset.val, 32,
                                                                          c.context, 4), n_loops=T)
                         for T in loop_counts])

    mu = cfg.mean_recurrence
    T_eval = np.arange(1, 3 * mu + 1)
    params, _ = train(cfg, dataset, steps=300, lr=1e-2)
    L = loss_curve(params, cfg, T_eval)

    # The same recipe at μ_rec = 1 (and μ_bwd = 1): a model trained mostly at a single step.
    shallow = replace(cfg, mean_recurrence=1, backprop_depth=1)
    params_shallow, _ = train(shallow, dataset, steps=300, lr=1e-2)
    L_shallow = loss_curve(params_shallow, shallow, T_eval)

L_inf, Z, z = fit_saturating(T_eval, L)
fit = saturating(T_eval, L_inf, Z, z)
rel_err = np.abs(fit - L) / L
print(f"\nvalidation loss of the model trained at μ_rec = {mu}, and the fit "
      f"L∞ = {L_inf:.4f}, Z = {Z:.4f}, z = {z:.3f}:")
print("   T   measured   fitted   trained at μ_rec = 1")
for T, l, f, s in zip(T_eval, L, fit, L_shallow):
    print(f"  {T:2d}   {l:8.4f}   {f:6.4f}   {s:8.4f}" + ("   ← μ_rec" if T == mu else ""))
print(f"mean relative error of the fit: {rel_err.mean():.1e}")

# The law describes the measurements, and the loop helps: more loops, lower loss (Z > 0).
assert rel_err.mean() < 1e-3
assert Z > 0 and L[mu - 1] < L[0]

# ---------------------------------------------------------------------------------------------
# 3. The ceiling.
#
# The fit says how fast the returns run out: after T loops the part of the gain still to come is
# e^(−zT). The loss at μ_rec is already within a small fraction of L∞, and three times as many
# loops buy almost nothing: whatever the model learned to do in its loop, it learned to do in
# about μ_rec steps, and L∞ is the ceiling that training set. The model trained at μ_rec = 1 shows
# the same thing from the other side: three of its training sequences in four ran a single step,
# and looping it more at test time gains next to nothing before its loss turns up. (The two
# models' best losses are close, and which one is lower changes with the random seed: weighing
# looped against fixed-depth models takes the paper's scale. What a lesson this small can show is
# the shape of each curve.)

remaining = np.exp(-z * mu)
gain_to_mu = L[0] - L[mu - 1]
gain_after_mu = L[mu - 1] - L[-1]
print(f"\nafter μ_rec = {mu} loops, {remaining:.1%} of the fitted gain is still to come")
print(f"loss gained from T = 1 to μ_rec: {gain_to_mu:.4f}; "
      f"from μ_rec to 3μ_rec: {gain_after_mu:.4f}")
shallow_gain = L_shallow[0] - L_shallow.min()
print(f"model trained at μ_rec = 1: best loss at T = {int(T_eval[L_shallow.argmin()])}, "
      f"{shallow_gain:.4f} below its loss at T = 1; at T = {T_eval[-1]}: "
      f"{L_shallow[-1] - L_shallow[0]:+.4f}")
assert remaining < 0.05
assert gain_after_mu < 0.1 * gain_to_mu
assert shallow_gain < 0.1 * gain_to_mu and L_shallow[-1] > L_shallow.min()
print("lesson 10 passed")
