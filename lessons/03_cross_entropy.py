# %% [markdown]
# # Lesson 3: softmax cross-entropy, and its surprisingly simple gradient
#
# ```bash
# python lessons/03_cross_entropy.py
# ```
#
# A language model ends in logits: one score z_v per vocabulary entry v, for every position. Training
# minimises the cross-entropy between softmax(z) and the token that really came next. The loss looks
# like it needs a careful backward (an exponential, a sum, a division, a log), but its gradient is
# the difference between what the model predicted and what happened. This lesson derives it, shows
# why the forward subtracts a maximum, and checks both against minparcae's ops/cross_entropy.py.

# %%
import numpy as np

from minparcae.gradcheck import check_grads
from minparcae.ops import cross_entropy

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The loss
#
# For one position with logits z ∈ R^V and target y, the model's probabilities are
#
# $$ p_v = \mathrm{softmax}(z)_v = \frac{e^{z_v}}{\sum_u e^{z_u}}, $$
#
# and the loss is the negative log-probability of the target:
#
# $$ \ell = -\log p_y = \log \sum_u e^{z_u} - z_y = \mathrm{logsumexp}(z) - z_y. $$
#
# Over N positions minparcae takes the mean, L = (1/N) Σ_i ℓ_i.
#
# A model that knows nothing spreads its probability evenly: equal logits give p_v = 1/V and
# ℓ = ln V for every target. That is the loss a freshly initialised model starts near.

# %%
V, N = 50, 6
loss, _ = cross_entropy.forward(np.zeros((N, V)), rng.integers(0, V, N))
print(f"equal logits: loss {float(loss):.6f}, ln V = {np.log(V):.6f}")
assert abs(float(loss) - np.log(V)) < 1e-12

# %% [markdown]
# ## 2. The gradient
#
# Differentiate the two terms of ℓ = logsumexp(z) − z_y:
#
# $$ \frac{\partial \mathrm{logsumexp}(z)}{\partial z_v} = \frac{e^{z_v}}{\sum_u e^{z_u}} = p_v, \qquad \frac{\partial z_y}{\partial z_v} = [v = y], $$
#
# so
#
# $$ \frac{\partial \ell}{\partial z_v} = p_v - [v = y], \qquad \text{i.e.} \qquad \frac{\partial \ell}{\partial z} = \mathrm{softmax}(z) - \mathrm{onehot}(y). $$
#
# No exponential or log survives: the gradient is "predicted minus actual". The forward computes
# both at once, since both need the same exponentials (`softmax_xent` in
# `minparcae/ops/cross_entropy.py`):
#
#     m = z.max(axis=-1, keepdims=True)
#     e = xp.exp(z - m)
#     sum_e = e.sum(axis=-1, keepdims=True)
#     lse = (xp.log(sum_e) + m)[:, 0]                       # logsumexp, per row
#     grad = e / sum_e                                      # softmax
#     grad[rows, targets] -= 1.0                            # minus the one-hot
#     grad *= (valid / n_valid).astype(z.dtype)[:, None]    # the mean over the N rows (section 4)

# %%
z = rng.standard_normal((N, V)) * 3
y = rng.integers(0, V, N)
loss, cache = cross_entropy.forward(z, y)
dz = cross_entropy.backward(1.0, cache)["logits"]
p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
by_hand = (p - np.eye(V)[y]) / N
print(f"gradient vs (softmax − onehot)/N: max |difference| {np.abs(dz - by_hand).max():.1e}")
assert np.abs(dz - by_hand).max() < 1e-15

# %% [markdown]
# And against central differences (lesson 2), through `gradcheck.check_grads`:

# %%
errors = check_grads(lambda: float(cross_entropy.forward(z, y)[0]), {"logits": z}, {"logits": dz})
print(f"finite differences: relative error {errors['logits']:.1e}")
assert errors["logits"] < 1e-7

# %% [markdown]
# Three things the formula says at a glance, each checked:
#  - every row of the gradient sums to zero (Σ_v p_v = 1), so adding a constant to all logits of
#    a position changes nothing: softmax only sees differences;
#  - every entry lies in (−1, 1)/N: a single position can never push a logit arbitrarily hard;
#  - at the target the entry is (p_y − 1)/N: when the model is already sure and right (p_y → 1)
#    the gradient vanishes, and learning concentrates on what it gets wrong.

# %%
row_sums = np.abs(dz.sum(axis=-1)).max()
print(f"largest |row sum| of the gradient: {row_sums:.1e}")
assert row_sums < 1e-16 * V
assert np.all(np.abs(dz) < 1.0 / N)
confident = np.zeros((1, V))
confident[0, 7] = 30.0                              # p_7 ≈ 1 − 5e-12
_, c_conf = cross_entropy.forward(confident, np.array([7]))
g_conf = np.abs(cross_entropy.backward(1.0, c_conf)["logits"]).max()
print(f"confident and right: largest gradient entry {g_conf:.1e}")
assert g_conf < 1e-10

# %% [markdown]
# ## 3. Why subtract the maximum
#
# e^{z} overflows float64 once z > 709 (float32: z > 88). Since logsumexp(z) = m + logsumexp(z − m)
# for any m, the op subtracts the row maximum first: then every exponent is ≤ 0, the largest is
# exactly e⁰ = 1, and nothing overflows or divides by zero, whatever the logits.

# %%
huge = np.array([[1e4, 0.0, -1e4]])
loss_huge, c_huge = cross_entropy.forward(huge, np.array([1]))
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.log(np.exp(huge).sum()) - huge[0, 1]
print(f"logits (1e4, 0, −1e4), target 1: loss {float(loss_huge):.1f}, naive formula {naive}")
assert float(loss_huge) == 1e4 and np.isinf(naive)
assert np.all(np.isfinite(cross_entropy.backward(1.0, c_huge)["logits"]))

# %% [markdown]
# ## 4. Ignored targets
#
# A target equal to IGNORE_INDEX (−1) contributes neither to the loss nor to N, and its row of the
# gradient is zero: the mask `valid` does that. Padding uses it.

# %%
y_pad = y.copy()
y_pad[:2] = cross_entropy.IGNORE_INDEX
loss_pad, c_pad = cross_entropy.forward(z, y_pad)
dz_pad = cross_entropy.backward(1.0, c_pad)["logits"]
rest, _ = cross_entropy.forward(z[2:], y[2:])
print(f"two of six targets ignored: loss {float(loss_pad):.6f} = loss of the other four "
      f"{float(rest):.6f}")
assert abs(float(loss_pad) - float(rest)) < 1e-14
assert not dz_pad[:2].any()

# %% [markdown]
# ## 5. Optional soft-cap
#
# Some models squash logits through z ← c·tanh(z/c) before the softmax, so no logit exceeds c.
# The gradient picks up one chain-rule factor,
#
# $$ \frac{d}{dz} c \tanh(z/c) = 1 - \tanh^2(z/c) = 1 - (z_{capped}/c)^2, $$
#
# which is the factor `1.0 - (z / softcap) ** 2` in the op's backward.

# %%
loss_cap, c_cap = cross_entropy.forward(z, y, softcap=2.0)
dz_cap = cross_entropy.backward(1.0, c_cap)["logits"]
errors = check_grads(lambda: float(cross_entropy.forward(z, y, softcap=2.0)[0]),
                     {"logits": z}, {"logits": dz_cap})
print(f"soft-capped at 2: loss {float(loss_cap):.4f}, finite differences {errors['logits']:.1e}")
assert errors["logits"] < 1e-7

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/03_cross_entropy.py --exercise 1              # or 2, 3
#     python lessons/03_cross_entropy.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `cross_entropy_loss`: L of section 1 over the targets that are not IGNORE_INDEX (section 4),
#    and 0 when every target is ignored. The check gives it logits near 1e4 too, where e^z
#    overflows unless the row maximum comes out first (section 3).
# 2. `cross_entropy_grad`: dL/dz of the same loss, softmax − onehot over the valid rows, divided by
#    their number, and zero rows for the ignored ones.
# 3. `softcap_backward`: the chain rule through the soft-cap of section 5, from the gradient with
#    respect to the capped logits to the gradient with respect to the raw ones.
#
# All three are graded against `minparcae/ops/cross_entropy.py` in float64.

# %%
import numpy as np

from exercise import cmp
from minparcae.ops import cross_entropy


def cross_entropy_loss(logits, targets):
    """logits: (N, V); targets: (N,) ids, −1 for ignored. The mean of logsumexp(z) − z_y over the
    rows whose target is not −1, as a float (0.0 if there are none)."""
    raise NotImplementedError  # exercise 1: subtract each row's maximum before exponentiating


def cross_entropy_cases():
    """(name, logits, targets): ordinary logits with two targets ignored, the same shifted by 1e4,
    and a batch whose every target is ignored."""
    rng = np.random.default_rng(1)
    z, y = 3 * rng.standard_normal((6, 10)), rng.integers(0, 10, 6)
    y[[1, 4]] = cross_entropy.IGNORE_INDEX
    return [("z", z, y), ("z + 1e4", z + 1e4, y), ("all ignored", z, np.full(6, -1))]


def check_cross_entropy_loss(fn):
    # rtol 1e-10: at 1e4 the logits carry only ~1e-12 of absolute precision, in any order of sums
    return all([cmp(f"L, {name}", fn(z, y), cross_entropy.loss(z, y), rtol=1e-10)
                for name, z, y in cross_entropy_cases()])


# %%
def cross_entropy_grad(logits, targets):
    """dL/dlogits (N, V) of cross_entropy_loss: zero rows where the target is −1."""
    raise NotImplementedError  # exercise 2: (softmax − onehot) / N_valid on the valid rows


def check_cross_entropy_grad(fn):
    ok = []
    for name, z, y in cross_entropy_cases():
        want = cross_entropy.backward(1.0, cross_entropy.forward(z, y)[1])["logits"]
        ok.append(cmp(f"dL/dz, {name}", fn(z, y), want, rtol=1e-10))
    return all(ok)


# %%
def softcap_backward(dcapped, logits, c):
    """dcapped = dL/dz_c, where z_c = c·tanh(logits / c). Returns dL/dlogits."""
    raise NotImplementedError  # exercise 3: one factor, d(c·tanh(z/c))/dz, per entry


def check_softcap_backward(fn):
    rng = np.random.default_rng(2)
    z, y = 4 * rng.standard_normal((5, 8)), rng.integers(0, 8, 5)
    ok = []
    for c in (2.0, 30.0):
        capped = c * np.tanh(z / c)
        dcapped = cross_entropy.backward(1.0, cross_entropy.forward(capped, y)[1])["logits"]
        want = cross_entropy.backward(1.0, cross_entropy.forward(z, y, softcap=c)[1])["logits"]
        ok.append(cmp(f"dL/dz, c = {c:g}", fn(dcapped, z, c), want))
    return all(ok)


# %%
EXERCISES = {1: (cross_entropy_loss, check_cross_entropy_loss),
             2: (cross_entropy_grad, check_cross_entropy_grad),
             3: (softcap_backward, check_softcap_backward)}

# %%
print("lesson 3 passed")
