# %% [markdown]
# # Lesson 2: a linear layer's backward by hand, and finite differences to check it
#
# ```bash
# python lessons/02_linear.py
# ```
#
# minparcae has no autograd. Every op is a pair: `forward(...) -> (out, cache)` computes the output
# and keeps what the backward will need; `backward(dout, cache) -> grads` receives G = ∂L/∂out, the
# gradient of some scalar loss L with respect to the op's output, and returns the gradients with
# respect to the op's inputs. Chaining these pairs backwards through a network is backpropagation.
# This lesson derives the simplest pair, the linear layer, checks it numerically, and then composes
# two of them into the MLP that every transformer block contains.

# %%
import numpy as np

from minparcae.gradcheck import check_op, numeric_grad, rel_error
from minparcae.ops import linear, mlp

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The forward: y = x W
#
# x is (N, n_in): N rows (in the model, every token of every sequence), n_in features each.
# W is (n_in, n_out). minparcae stores every matrix (in, out), so every layer is `x @ W`.

# %%
x = rng.standard_normal((5, 3))
W = rng.standard_normal((3, 4))
y, cache = linear.forward(x, W)
assert y.shape == (5, 4) and np.allclose(y, x @ W)

# %% [markdown]
# ## 2. The backward, by hand
#
# Write the product out: y_ij = Σ_k x_ik W_kj. Then, with G_ij = ∂L/∂y_ij and the chain rule,
#
# $$ \frac{\partial L}{\partial x_{ik}} = \sum_j G_{ij} \frac{\partial y_{ij}}{\partial x_{ik}} = \sum_j G_{ij} W_{kj} \quad\Rightarrow\quad \frac{dL}{dx} = G W^\top \qquad (N, n_{in}) $$
#
# $$ \frac{\partial L}{\partial W_{kj}} = \sum_i G_{ij} \frac{\partial y_{ij}}{\partial W_{kj}} = \sum_i x_{ik} G_{ij} \quad\Rightarrow\quad \frac{dL}{dW} = x^\top G \qquad (n_{in}, n_{out}) $$
#
# A shortcut to remember them: a gradient has the shape of the thing it is the gradient of, and
# there is only one way to multiply G (N, n_out) with W (n_in, n_out) into (N, n_in), and one way
# to multiply x with G into (n_in, n_out). `minparcae/ops/linear.py`:
#
#     def backward(dout, cache):
#         x, w = cache
#         return {"x": rows_matmul(dout, w.T), "w": rows_t_matmul(x, dout)}
#
# where rows_matmul(t, w) is t W and rows_t_matmul(x, g) is xᵀ g, once all leading axes are
# flattened into rows: x may be (B, S, n_in), B sequences of S positions, and dW then sums over
# all B·S of them.
#
# To test it we need a scalar loss. Any will do; a projection onto a fixed random R,
#
# $$ L = \sum_{ij} y_{ij} R_{ij}, $$
#
# has ∂L/∂y = R exactly, so R is the G that the backward receives.

# %%
R = rng.standard_normal(y.shape)
grads = linear.backward(R, cache)

# %% [markdown]
# ## 3. Finite differences
#
# Nudge one entry θ_i of an input by ±ε, recompute L, and divide:
#
# $$ \frac{\partial L}{\partial \theta_i} \approx \frac{L(\theta + \varepsilon e_i) - L(\theta - \varepsilon e_i)}{2\varepsilon}. $$
#
# `gradcheck.numeric_grad` does exactly this, entry by entry, perturbing the array in place.


# %%
def loss():
    return float((linear.forward(x, W)[0] * R).sum())


_, g_x = numeric_grad(loss, x)
_, g_W = numeric_grad(loss, W)
err_x = rel_error(grads["x"], g_x)
err_W = rel_error(grads["w"], g_W)
print(f"linear: relative error dx {err_x:.1e}, dW {err_W:.1e}")
assert err_x < 1e-9 and err_W < 1e-9

# %% [markdown]
# The error is normwise, max|a − n| / max(|a|, |n|), so one number per tensor, free of scale. A
# wrong backward does not give 1e-3, it gives O(1). A classic slip is forgetting a transpose; with
# a square W the shapes still fit, so only a check like this one notices:

# %%
W_sq = rng.standard_normal((3, 3))
_, c_sq = linear.forward(x, W_sq)
R_sq = rng.standard_normal((5, 3))
wrong_dx = R_sq @ W_sq                                  # should be R_sq @ W_sq.T
_, g_sq = numeric_grad(lambda: float((linear.forward(x, W_sq)[0] * R_sq).sum()), x)
err_wrong = rel_error(wrong_dx, g_sq)
err_right = rel_error(linear.backward(R_sq, c_sq)["x"], g_sq)
print(f"forgotten transpose: relative error {err_wrong:.2f} (the right backward: {err_right:.1e})")
assert err_wrong > 0.1 and err_right < 1e-9

# %% [markdown]
# ## 4. Composing ops: the ReLU² MLP
#
# Each transformer block holds an MLP, ops/mlp.py, built from two linear layers:
#
# $$ u = x W_{fc}, \qquad a = \mathrm{relu}(u), \qquad g = \tfrac{1}{2} a^2, \qquad y = g W_{proj} $$
#
# Its backward is the chain rule read bottom up, each linear layer handled by the pair above. The
# only new factor is d(½ relu(u)²)/du = relu(u) = a, which the forward already computed and kept
# in its cache. The backward in `minparcae/ops/mlp.py`:
#
#     g_proj = linear.backward(dout, cache.proj)    # dL/dg and dL/dW_proj
#     du = g_proj["x"] * cache.a                    # dL/du = dL/dg ⊙ a
#     g_fc = linear.backward(du, cache.fc)          # dL/dx and dL/dW_fc
#
# `gradcheck.check_op` runs the whole recipe for any op: it projects the output onto a random R,
# calls the backward with dout = R, and compares every returned gradient with central differences.

# %%
worst, errors = check_op(mlp.forward, mlp.backward,
                         {"x": rng.standard_normal((2, 3, 8)),
                          "w_fc": rng.standard_normal((8, 32)) / 8**0.5,
                          "w_proj": rng.standard_normal((32, 8)) / 32**0.5})
print("MLP:", {k: f"{v:.1e}" for k, v in errors.items()})
assert worst < 1e-8

# %% [markdown]
# ## 5. Choosing ε
#
# Taylor-expand both nudges: f(θ ± ε) = f ± ε f' + ½ε² f'' ± ⅙ε³ f''' + ..., so the difference
# quotient is f' + ⅙ε² f''' + ...: the f'' terms cancel, and the central difference is exact for
# any quadratic. The MLP is piecewise quadratic in W_fc (½ relu(u)² on each side of u = 0), so the
# sweep below sees two effects only. At large ε the nudge carries some u across ReLU's kink at 0,
# where the formula changes. At small ε rounding takes over: float64 knows L only to about
# 1e-16·|L|, dividing by 2ε amplifies that, and the error grows like 1/ε. For smooth ops (softmax,
# RMSNorm) the ⅙ε² f''' term joins in, and the total is smallest near ε ≈ (1e-16)^(1/3) ≈ 5e-6;
# minparcae uses ε = 1e-6 (gradcheck.EPS), which leaves about ten correct digits.

# %%
xm = rng.standard_normal((2, 8))
w_fc = rng.standard_normal((8, 32)) / 8**0.5
w_proj = rng.standard_normal((32, 8)) / 32**0.5
Rm = rng.standard_normal((2, 8))
_, mlp_cache = mlp.forward(xm, w_fc, w_proj)
exact = mlp.backward(Rm, mlp_cache)["w_fc"]
print("   ε       error of dW_fc")
errs = {}
for eps in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9, 1e-11):
    idx, g = numeric_grad(lambda: float((mlp.forward(xm, w_fc, w_proj)[0] * Rm).sum()), w_fc,
                          eps=eps)
    errs[eps] = rel_error(exact.reshape(-1)[idx], g)
    print(f"  {eps:.0e}   {errs[eps]:.1e}")
assert errs[1e-1] > 1e-4            # too large: the nudge crosses ReLU's kink
assert errs[1e-11] > 1e-7           # too small: rounding dominates
assert errs[1e-3] < 1e-12 and errs[1e-5] < 1e-10
assert errs[1e-9] > 10 * errs[1e-5]  # rounding error ∝ 1/ε

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work):
#
#     python lessons/02_linear.py --exercise 1              # or 2, 3
#     python lessons/02_linear.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `linear_backward`: section 2's backward, for an x with leading axes, (B, S, n_in): dW sums
#    over all B·S rows. Graded against `linear.backward`, also with a square W, where a forgotten
#    transpose still has the right shape.
# 2. `mlp_backward`: section 4's chain rule, written out: recompute the forward, then walk back
#    through both linear layers and the ReLU² between them. Graded against `mlp.backward`.
# 3. `central_differences`: section 3's estimate for every entry of an array, which must be left
#    as it was found. Graded on a smooth function whose gradient is known, to 1e-8.

# %%
import numpy as np

from exercise import cmp, expect
from minparcae.ops import linear, mlp


def linear_backward(dout, x, w):
    """y = x w, x: (..., n_in), w: (n_in, n_out), dout = dL/dy. Returns (dL/dx, dL/dw)."""
    raise NotImplementedError  # exercise 1: dL/dx = G Wᵀ, dL/dW = xᵀ G summed over every row


def check_linear_backward(fn):
    rng = np.random.default_rng(1)
    ok = []
    for what, x_shape, w_shape in (("(B, S, n_in)", (2, 3, 4), (4, 5)), ("square W", (5, 3), (3, 3))):
        x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        y, cache = linear.forward(x, w)
        G = rng.standard_normal(y.shape)
        ref = linear.backward(G, cache)
        dx, dw = fn(G, x, w)
        ok += [cmp(f"dx, {what}", dx, ref["x"]), cmp(f"dW, {what}", dw, ref["w"])]
    return all(ok)


# %%
def mlp_backward(dout, x, w_fc, w_proj):
    """y = ½ relu(x W_fc)² W_proj, dout = dL/dy. Returns (dL/dx, dL/dW_fc, dL/dW_proj)."""
    raise NotImplementedError  # exercise 2: u = x W_fc, a = relu(u), then back: dL/du = dL/dg ⊙ a


def check_mlp_backward(fn):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8))
    w_fc, w_proj = rng.standard_normal((8, 16)) / 8**0.5, rng.standard_normal((16, 8)) / 16**0.5
    y, cache = mlp.forward(x, w_fc, w_proj)
    G = rng.standard_normal(y.shape)
    ref = mlp.backward(G, cache)
    dx, dw_fc, dw_proj = fn(G, x, w_fc, w_proj)
    return all([cmp("dx", dx, ref["x"]), cmp("dW_fc", dw_fc, ref["w_fc"]),
                cmp("dW_proj", dw_proj, ref["w_proj"])])


# %%
def central_differences(f, x, eps=1e-6):
    """f: a function of no arguments that reads the array x and returns a float. Returns the
    array, shaped like x, of (f(x + ε e_i) − f(x − ε e_i)) / 2ε; x ends as it began."""
    raise NotImplementedError  # exercise 3: nudge x.flat[i] up, then down, then put it back


def check_central_differences(fn):
    # L = Σ tanh(x W) ⊙ R is smooth, and dL/dx = ((1 − tanh²(x W)) ⊙ R) Wᵀ exactly; central
    # differences at ε = 1e-6 agree to about 1e-10 (lesson 2, section 5), a one-sided difference
    # only to about ε.
    rng = np.random.default_rng(3)
    x, W, R = rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal((3, 5))
    before = x.copy()
    got = fn(lambda: float((np.tanh(x @ W) * R).sum()), x)
    want = ((1 - np.tanh(before @ W) ** 2) * R) @ W.T
    return all([cmp("dL/dx", got, want, rtol=1e-8),
                expect("x afterwards", np.array_equal(x, before),
                       "x was changed: put each entry back after nudging it")])


# %%
EXERCISES = {1: (linear_backward, check_linear_backward), 2: (mlp_backward, check_mlp_backward),
             3: (central_differences, check_central_differences)}

# %%
print("lesson 2 passed")
