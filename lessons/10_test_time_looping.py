# %% [markdown]
# # Lesson 10: test-time looping. Loss against loop count, and its ceiling
#
# ```bash
# python lessons/10_test_time_looping.py
# ```
#
# A looped model's depth is a number chosen when it runs, not when it is built (lesson 7). Trained
# with depths drawn around μ_rec (lesson 9), the same weights can be run with fewer loops, to save
# compute, or with more. How does the loss depend on T? The Parcae paper finds a saturating
# exponential,
#
# $$ L(T) = L_\infty + Z e^{-zT}, $$
#
# that improves quickly at first and flattens near the training depth μ_rec: looping longer than
# the model was trained for does not make it better. This lesson writes the small least-squares fit
# for that law, checks it on synthetic data, then trains small models at three training depths and
# watches where each one's curve bottoms out.

# %%
import tempfile
import time
from dataclasses import replace

from common import small_corpus, train  # first: it sets NumPy's BLAS to one thread
import numpy as np

from minparcae import data, model
from pictures import Panel, picture

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

# %% [markdown]
# ## 1. Fitting L(T) = L∞ + Z·e^(−zT)
#
# Three parameters, but only one enters non-linearly. For a fixed decay rate z the model is linear
# in (L∞, Z): with the design matrix X = [1, e^(−zT)] (one row per measured T), the best (L∞, Z) is
# an ordinary least-squares solve. So scan z over a grid, solve the linear problem for each, and
# keep the z with the smallest squared error.

# %%
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


# %% [markdown]
# Check on synthetic data: when the true z lies on the grid the fit recovers all three parameters
# to rounding; when it lies between grid points, to within the grid spacing.

# %%
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

# %% [markdown]
# ## 2. Measuring L(T)
#
# Train small looped models briefly on real text, the recipe of lesson 9, at three training depths,
# μ_rec = 2, 4 and 8, each backpropagating through half of its mean depth (μ_bwd = μ_rec/2, the
# paper's ratio). Then evaluate each one's validation loss at every T from 1 to 3μ_rec with its own
# weights (`model.evaluate(..., n_loops=T)`; evaluation starts the loop from a fixed seeded state,
# so each number is reproducible). The models have no prelude and no coda blocks (n_p = n_c = 0):
# all of their depth comes from the loop, so the effect of T shows after a few seconds of training.
# (Put one prelude and one coda block around the loop, n_prelude=1 and n_coda=1, and the same short
# training gives a nearly flat curve: try it.)

# %%
MU_RECS = (2, 4, 8)
with tempfile.TemporaryDirectory() as tmp:
    dataset = small_corpus(tmp, vocab_size=384)
    base = model.Config(vocab_size=dataset.tokenizer.vocab_size, context=32, d_model=32, n_head=2,
                        n_prelude=0, n_recurrent=1, n_coda=0)
    curves, train_flops = {}, {}
    for mu in MU_RECS:
        cfg = replace(base, mean_recurrence=mu, backprop_depth=mu // 2)
        started = time.perf_counter()
        params, _ = train(cfg, dataset, steps=300, lr=1e-2, desc=f"μ_rec = {mu}")
        curves[mu] = np.array([                                  # L(T) for T = 1..3μ_rec
            model.evaluate(params, cfg, data.iter_eval_batches(dataset.val, 32, cfg.context, 4),
                           n_loops=T)
            for T in range(1, 3 * mu + 1)])
        train_flops[mu] = model.flops_per_token(cfg)
        print(f"trained at μ_rec = {mu} (μ_bwd = {mu // 2}), evaluated at T = 1..{3 * mu}: "
              f"{time.perf_counter() - started:.0f} s")

# %% [markdown]
# The fit, on the μ_rec = 4 curve first. How good is it? The whole effect of looping is the gap
# between one loop and the ceiling, L(1) − L∞: a few hundredths of a nat here, about 1% of the loss
# itself. So the fit's error is measured against that gap. Measured against L (≈ 3.8), any curve
# at the right level looks accurate: a flat line through the mean loss is off by under 1% of L.

# %%
mu = 4
L = curves[mu]
T_eval = np.arange(1, len(L) + 1)
L_inf, Z, z = fit_saturating(T_eval, L)
fit = saturating(T_eval, L_inf, Z, z)
effect = L[0] - L_inf                                        # L(1) − L∞
err = np.abs(fit - L).mean()
flat_err = np.abs(L.mean() - L).mean()                       # a flat line through the mean
print(f"\nvalidation loss of the model trained at μ_rec = {mu}, and the fit "
      f"L∞ = {L_inf:.4f}, Z = {Z:.4f}, z = {z:.3f}:")
print("   T   measured   fitted")
for T, measured, fitted in zip(T_eval, L, fit):
    print(f"  {T:2d}   {measured:8.4f}   {fitted:6.4f}" + ("   ← μ_rec" if T == mu else ""))
print(f"mean |fitted − measured| = {err:.1e} nats, {err / effect:.1%} of the effect "
      f"L(1) − L∞ = {effect:.4f}; a flat line's: {flat_err / effect:.0%} of it")
print(f"(the same two errors relative to L: {err / L.mean():.0e} and {flat_err / L.mean():.0e})")

# %% [markdown]
# The law describes the measurements to within 2% of the effect, where the flat line misses by over
# 10% (and yet by under 1% of L); and the loop helps: more loops, lower loss (Z > 0).

# %%
assert err < 0.02 * effect and flat_err > 0.1 * effect and flat_err < 0.01 * L.mean()
assert Z > 0 and L[mu - 1] < L[0]

# %% [markdown]
# The μ_rec = 8 curve follows the law as closely. (At μ_rec = 2 the whole gain from looping is a few
# thousandths of a nat, and past its best the curve turns back up by a sizeable part of that gain,
# section 3; the law can only fall and flatten, so it is not fitted there.)

# %%
L8 = curves[8]
T8 = np.arange(1, len(L8) + 1)
fit8 = fit_saturating(T8, L8)
effect8 = L8[0] - fit8[0]
err8 = np.abs(saturating(T8, *fit8) - L8).mean()
print(f"μ_rec = 8: L∞ = {fit8[0]:.4f}, z = {fit8[2]:.3f}; mean |fitted − measured| "
      f"{err8 / effect8:.1%} of the effect L(1) − L∞ = {effect8:.4f}")
assert err8 < 0.02 * effect8

# %% [markdown]
# ## 3. The ceiling, and how training depth moves it
#
# The fit says how fast the returns run out: after T loops the part of the gain still to come is
# e^(−zT). For the μ_rec = 4 model, the loss at μ_rec is already within a small fraction of L∞, and
# three times as many loops buy almost nothing: whatever the model learned to do in its loop, it
# learned to do in about μ_rec steps, and L∞ is the ceiling that training set.

# %%
remaining = np.exp(-z * mu)
gain_to_mu = L[0] - L[mu - 1]
gain_after_mu = L[mu - 1] - L[-1]
print(f"\nafter μ_rec = {mu} loops, {remaining:.1%} of the fitted gain is still to come")
print(f"loss gained from T = 1 to μ_rec: {gain_to_mu:.4f}; "
      f"from μ_rec to 3μ_rec: {gain_after_mu:.4f}")
assert remaining < 0.05
assert gain_after_mu < 0.1 * gain_to_mu

# %% [markdown]
# Where each curve bottoms out moves with the depth it was trained at. The table puts the three side
# by side, each to 3μ_rec, with its lowest loss starred. Trained at μ_rec = 2, the model is best
# after a loop or two and gets worse when looped further; at μ_rec = 4 the floor comes a few loops
# later; at μ_rec = 8 the curve keeps falling for longer and then lies flat (past T = μ_rec it moves
# by under 0.002 nats, so its minimum can fall anywhere on that floor). Train with another `seed`
# and the digits move, the μ_rec = 8 minimum most: the order is what to look for.

# %%
best_T = {mu: int(np.argmin(c)) + 1 for mu, c in curves.items()}
print("\n   T" + "".join(f"   μ_rec = {mu}" for mu in MU_RECS))
for T in range(1, 3 * max(MU_RECS) + 1):
    cells = [f"{curves[mu][T - 1]:10.4f}" + ("*" if T == best_T[mu] else " ")
             if T <= len(curves[mu]) else " " * 11 for mu in MU_RECS]
    print(f"  {T:2d}  " + "  ".join(cells))
print("loop count with the lowest loss:", ", ".join(f"T = {best_T[mu]} for μ_rec = {mu}"
                                                  for mu in MU_RECS))
assert best_T[2] <= 2 and best_T[2] < best_T[4] < best_T[8]
L2 = curves[2]
rise = L2[-1] - L2.min()
print(f"μ_rec = 2, looped to T = {len(L2)}: {rise:.4f} above its best, "
      f"{rise / (L2[0] - L2.min()):.0%} of what looping had gained it")
assert rise > 0.2 * (L2[0] - L2.min())
print(f"μ_rec = 8, from T = 8 on: the loss moves within {np.ptp(L8[7:]):.4f}")
assert np.ptp(L8[7:]) < 0.002

# %% [markdown]
# The three curves drawn, each on its own y scale (the μ_rec = 2 curve spans under a hundredth of a
# nat, the μ_rec = 8 curve more than a tenth), with the law where section 2 fits it, the lowest
# loss starred and T = μ_rec dotted: a fall over the first few loops, then a floor (for μ_rec = 2
# a slow climb) that begins later the deeper the model was trained.

# %%
fits = {4: (L_inf, Z, z), 8: fit8}
panels = []
for mu in MU_RECS:
    L_mu = curves[mu]
    T_mu = np.arange(1, len(L_mu) + 1)
    series = {"measured": (T_mu, L_mu, {"marker": "o", "ms": 4, "ls": "none", "color": "C0"})}
    if mu in fits:
        series["fitted L∞ + Z·e^(−zT)"] = (T_mu, saturating(T_mu, *fits[mu]),
                                           {"ls": "--", "color": "C1"})
    series["lowest"] = ([best_T[mu]], [L_mu.min()],
                        {"marker": "*", "ms": 13, "ls": "none", "color": "C3"})
    series["_T = μ_rec"] = ([mu, mu], [L_mu.min(), L_mu.max()], {"ls": ":", "color": "gray"})
    panels.append(Panel(f"trained at μ_rec = {mu}" + ("" if mu in fits else " (not fitted)"),
                        series, x="loop count T", y="validation loss"))
picture("loss_against_loops", panels, title="L(T) for three training depths")
assert np.ptp(curves[2]) < 0.01 and np.ptp(curves[8]) > 0.1

# %% [markdown]
# The deeper-trained model also settles lower, and leans harder on its loop: run with a single loop
# it is the worst of the three. It paid for that in training: more loop steps per token, forward
# and backward (`model.flops_per_token`). Whether deeper loops pay at matched compute is another
# experiment: docs/RESULTS.md's isoFLOP sweep gives each μ_rec the same training FLOPs. At its
# smaller budget μ_rec = 1 came out best in every seed; at three times that budget μ_rec = 2 caught
# up to within the seed noise.

# %%
lowest = {mu: c.min() for mu, c in curves.items()}
print("lowest loss:", ", ".join(f"{lowest[mu]:.4f} (μ_rec = {mu})" for mu in MU_RECS)
      + "; at T = 1:", ", ".join(f"{curves[mu][0]:.4f}" for mu in MU_RECS))
print("training FLOPs per token relative to μ_rec = 2:",
      ", ".join(f"{train_flops[mu] / train_flops[2]:.2f}" for mu in MU_RECS))
assert lowest[8] < min(lowest[2], lowest[4])
assert curves[8][0] > max(curves[2][0], curves[4][0])
assert train_flops[2] < train_flops[4] < train_flops[8]

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work); grading trains nothing:
#
#     python lessons/10_test_time_looping.py --exercise 1              # or 2
#     python lessons/10_test_time_looping.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `three_point_fit`: L(T) = L∞ + Z·e^(−zT) through three points at equally spaced T, exactly,
#    with no grid: the differences of successive losses shrink by the same factor at every step.
#    Graded on curves that fall, one that rises, and spacings other than 1, each parameter to 1e-9.
# 2. `best_loop_count`: section 3 says when more loops stop paying; put a price on them. With
#    every loop step costing `price` nats (say, what its compute could buy elsewhere), return the
#    T ≥ 1 that minimises L(T) + price·T, from the law's parameters and without trying every T.
#    Graded exactly against the best of T = 1..10⁵.

# %%
import numpy as np

from exercise import cmp


def three_point_fit(T, L):
    """T: three loop counts t, t + s, t + 2s; L: the losses there. Returns (L∞, Z, z) of the law
    L(T) = L∞ + Z·e^(−zT) through the three points."""
    raise NotImplementedError  # exercise 1: (L₂ − L₃) / (L₁ − L₂) = e^(−zs)


def check_three_point_fit(fn):
    ok = []
    for T, (L_inf, Z, z) in (((1, 2, 3), (3.2, 1.5, 0.7)), ((2, 5, 8), (3.8, 0.05, 0.31)),
                             ((1, 3, 5), (2.0, -0.4, 1.1))):
        L = L_inf + Z * np.exp(-z * np.array(T, dtype=np.float64))
        got = fn(np.array(T), L)
        curve = f"T {T[0]}, {T[1]}, {T[2]}"
        ok += [cmp(f"L∞, {curve}", got[0], L_inf, rtol=1e-9), cmp(f"Z, {curve}", got[1], Z, rtol=1e-9),
               cmp(f"z, {curve}", got[2], z, rtol=1e-9)]
    return all(ok)


# %%
def best_loop_count(L_inf, Z, z, price):
    """The integer T ≥ 1 minimising L∞ + Z·e^(−zT) + price·T (Z > 0, z > 0, price > 0)."""
    raise NotImplementedError  # exercise 2: one more loop gains Z·e^(−zT)(1 − e^(−z))


def check_best_loop_count(fn):
    T = np.arange(1, 100_001)
    ok = []
    # the optimum of the continuous T, rounded, is off by one in the last case (2.45 rounds to 2)
    for L_inf, Z, z, price in ((3.2, 1.5, 0.7, 0.01), (3.2, 1.5, 0.7, 2.0), (3.8, 0.05, 0.31, 1e-4),
                               (3.0, 1.5, 0.05, 1e-6), (3.0, 1.0, 3.0, 0.0019)):
        want = T[np.argmin(L_inf + Z * np.exp(-z * T) + price * T)]
        ok.append(cmp(f"Z {Z:g}, z {z:g}, price {price:g}", fn(L_inf, Z, z, price), want, rtol=0))
    return all(ok)


# %%
EXERCISES = {1: (three_point_fit, check_three_point_fit), 2: (best_loop_count, check_best_loop_count)}

# %%
print("lesson 10 passed")
