# %% [markdown]
# # Lesson 4: RMSNorm, forward and backward
#
# ```bash
# python lessons/04_rmsnorm.py
# ```
#
# A transformer adds the output of every block to a running sum, the residual stream, whose scale
# drifts from layer to layer (and, in a looped model, from loop to loop). Before each block reads the
# stream, RMSNorm rescales every token's vector to a fixed root-mean-square. This lesson derives its
# backward from the Jacobian, checks it three ways, and shows the geometric fact behind it: a
# normalisation cannot feel a change of scale, so its gradient has no component along its input.

# %%
import numpy as np

from minparcae.gradcheck import check_op, numeric_grad, rel_error
from minparcae.ops import rmsnorm

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The forward
#
# For one token's vector x ∈ R^n:
#
# $$ r = \frac{1}{\sqrt{\mathrm{mean}_j x_j^2 + \mathrm{eps}}}, \qquad \hat x = x r, \qquad y = \hat x \odot w $$
#
# with a learned gain w (initialised to ones) and eps = 1e-5. `minparcae/ops/rmsnorm.py`:
#
#     r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
#     xhat = x * r
#     y = xhat if weight is None else xhat * weight
#
# Whatever the scale of the input, each row of x̂ comes out with RMS 1 (up to eps).

# %%
n = 16
x = rng.standard_normal((3, n)) * np.array([[1e-1], [1.0], [1e3]])   # three very different scales
y, cache = rmsnorm.forward(x, np.ones(n))
rms = np.sqrt((y * y).mean(axis=-1))
print("input RMS :", np.sqrt((x * x).mean(axis=-1)))
print("output RMS:", rms)
assert np.allclose(rms, 1.0, atol=1e-3)
# Without eps the output does not depend on the input's scale at all: x and 5x give the same y.
assert np.allclose(rmsnorm.forward(5.0 * x, eps=0.0)[0], rmsnorm.forward(x, eps=0.0)[0], atol=1e-14)

# %% [markdown]
# ## 2. The backward, from the Jacobian
#
# With m = mean_j x_j², r = (m + eps)^(−1/2), and ∂m/∂x_j = 2x_j/n:
#
# $$ \frac{\partial r}{\partial x_j} = -\tfrac{1}{2} (m + \mathrm{eps})^{-3/2} \cdot \frac{2 x_j}{n} = -\frac{r^3 x_j}{n} $$
#
# $$ \frac{\partial \hat x_i}{\partial x_j} = r \delta_{ij} + x_i \frac{\partial r}{\partial x_j} = r \delta_{ij} - \frac{r^3 x_i x_j}{n} $$
#
# so the Jacobian of one row is
#
# $$ J = \frac{\partial \hat x}{\partial x} = r \left(I - \frac{\hat x \hat x^\top}{n}\right), $$
#
# a symmetric matrix. Given G = ∂L/∂y, first ĝ = G ⊙ w (the gain), then dL/dx = Jᵀ ĝ = J ĝ:
#
# $$ \frac{dL}{dx} = r \left(\hat g - \hat x \cdot \mathrm{mean}_j(\hat g_j \hat x_j)\right), \qquad \frac{dL}{dw} = \sum_\text{rows} G \odot \hat x. $$
#
# Note what the backward needs: only x̂ and r, which the forward cached. `minparcae/ops/rmsnorm.py`:
#
#     grads["weight"] = (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
#     dout = dout * weight
#     grads["x"] = r * (dout - xhat * (dout * xhat).mean(axis=-1, keepdims=True))
#
# Check (a): the formula for J against a Jacobian measured row by row with finite differences.

# %%
x1 = rng.standard_normal(n)
_, c1 = rmsnorm.forward(x1)
xhat1, r1 = c1[0], c1[1]
J_formula = r1 * (np.eye(n) - np.outer(xhat1, xhat1) / n)
J_numeric = np.empty((n, n))
for i in range(n):
    _, J_numeric[i] = numeric_grad(lambda: rmsnorm.forward(x1)[0][i], x1)  # row i: ∂x̂_i/∂x
err_J = rel_error(J_formula, J_numeric)
print(f"Jacobian r(I − x̂x̂ᵀ/n) vs finite differences: relative error {err_J:.1e}")
assert err_J < 1e-8

# %% [markdown]
# Check (b): the op's backward is J applied to G, without ever forming the n × n matrix.

# %%
G1 = rng.standard_normal(n)
err_JG = rel_error(rmsnorm.backward(G1, c1)["x"], J_formula @ G1)
print(f"backward vs J·G: relative error {err_JG:.1e}")
assert err_JG < 1e-14

# %% [markdown]
# Check (c): the whole op with its gain, on a batch, against central differences.

# %%
worst, errors = check_op(rmsnorm.forward, rmsnorm.backward,
                         {"x": rng.standard_normal((2, 5, n)), "weight": rng.standard_normal(n)})
print("check_op:", {k: f"{v:.1e}" for k, v in errors.items()})
assert worst < 1e-8

# %% [markdown]
# ## 3. The gradient is orthogonal to the input
#
# Since ‖x̂‖² = n·m/(m + eps) ≈ n, the matrix x̂x̂ᵀ/n is (nearly) the projection onto the direction
# of x, and J = r(I − x̂x̂ᵀ/n) removes that direction. That is the scale invariance of section 1 in
# the language of derivatives: moving x along itself does not change x̂, so no gradient flows that
# way. With eps = 0 the projection is exact and x · dL/dx vanishes to rounding; with eps > 0 a
# trace of order eps/m is left.

# %%
for eps in (0.0, rmsnorm.EPS):
    _, c = rmsnorm.forward(x1, eps=eps)
    dx = rmsnorm.backward(G1, c)["x"]
    cos = abs(x1 @ dx) / (np.linalg.norm(x1) * np.linalg.norm(dx))
    print(f"eps = {eps:g}: |cos(x, dL/dx)| = {cos:.1e}")
    assert cos < (1e-14 if eps == 0.0 else 1e-4)

# %% [markdown]
# The blocks of the model use RMSNorm with a gain; the attention of lesson 5 uses it without one
# (QK-norm), on queries and keys.

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/04_rmsnorm.py --exercise 1              # or 2
#     python lessons/04_rmsnorm.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `rmsnorm_backward`: section 2's backward from the input alone: recompute r and x̂, then dL/dx
#    and dL/dw for a batch (B, S, n), dL/dw summed over every row. Graded against
#    `rmsnorm.backward`.
# 2. `layernorm_backward`: the same derivation for LayerNorm without a gain, which also subtracts
#    the row mean: y = (x − μ) r with μ = mean_j x_j and r = 1/√(mean_j (x_j − μ)² + eps). Its
#    Jacobian removes two directions where RMSNorm's removes one. Graded against central
#    differences (lesson 2) to 1e-7.

# %%
import numpy as np

from exercise import cmp
from minparcae.gradcheck import numeric_grad
from minparcae.ops import rmsnorm


def rmsnorm_backward(dout, x, w, eps=rmsnorm.EPS):
    """y = x r ⊙ w, r = 1/√(mean_j x_j² + eps) per row; dout = dL/dy. Returns (dL/dx, dL/dw)."""
    raise NotImplementedError  # exercise 1: ĝ = G ⊙ w; dL/dx = r (ĝ − x̂ · mean_j(ĝ_j x̂_j))


def check_rmsnorm_backward(fn):
    rng = np.random.default_rng(1)
    ok = []
    for scale in (1.0, 1e3):  # the rows' own size must cancel out, whatever it is
        x, w = scale * rng.standard_normal((2, 5, 16)), rng.standard_normal(16)
        y, cache = rmsnorm.forward(x, w)
        G = rng.standard_normal(y.shape)
        want = rmsnorm.backward(G, cache)
        dx, dw = fn(G, x, w)
        ok += [cmp(f"dx, |x| ~ {scale:g}", dx, want["x"]), cmp(f"dw, |x| ~ {scale:g}", dw, want["weight"])]
    return all(ok)


# %%
def layernorm_forward(x, eps=rmsnorm.EPS):
    """y = (x − μ) / √(mean_j (x_j − μ)² + eps) over the last axis, μ = mean_j x_j."""
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)


def layernorm_backward(dout, x, eps=rmsnorm.EPS):
    """dout = dL/dy for y = layernorm_forward(x, eps). Returns dL/dx."""
    raise NotImplementedError  # exercise 2: as section 2, with x̂ = (x − μ) r and ∂μ/∂x_j = 1/n


def check_layernorm_backward(fn):
    rng = np.random.default_rng(2)
    x, G = rng.standard_normal((3, 2, 8)), rng.standard_normal((3, 2, 8))
    _, want = numeric_grad(lambda: float((layernorm_forward(x) * G).sum()), x)
    # central differences at ε = 1e-6 carry ~1e-10 of rounding here; a wrong term is off by O(1)
    return cmp("dx", fn(G, x), want.reshape(x.shape), rtol=1e-7)


# %%
EXERCISES = {1: (rmsnorm_backward, check_rmsnorm_backward),
             2: (layernorm_backward, check_layernorm_backward)}

# %%
print("lesson 4 passed")
