# %% [markdown]
# # Lesson 1: arrays on CPU and GPU, the `xp` backend
#
# ```bash
# python lessons/01_backend.py
# ```
#
# Everything in minparcae is arithmetic on arrays. On a laptop those arrays are NumPy arrays; on an
# NVIDIA GPU they are CuPy arrays. CuPy copies NumPy's interface almost name for name (`cupy.exp`,
# `cupy.matmul`, `a.sum(axis=-1)`, ...), so a function that receives its array module as a variable,
# by convention called `xp`, runs unchanged on either device. This lesson shows how minparcae picks
# that module, how an op finds it, how data moves between devices, and why the gradient checks of the
# next lessons run in float64.

# %%
import numpy as np

from minparcae import backend, kernels
from minparcae.ops import REFERENCE, injection, rmsnorm

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

# %% [markdown]
# ## 1. Which device?
#
# `backend.use_device` decides where new arrays (parameters, batches) are created: an explicit
# choice ("cpu" or "gpu"), else the environment variable MINPARCAE_DEVICE, else "auto", which
# takes the GPU only when CuPy imports *and* the CUDA runtime answers. `backend.get_xp()` returns
# the module of the active device.

# %%
xp = backend.get_xp()
print(f"active device: {backend.device()}  (array module: {xp.__name__})")
assert backend.device() in ("cpu", "gpu")
assert xp.__name__ == ("numpy" if backend.device() == "cpu" else "cupy")

# %% [markdown]
# ## 2. Ops never choose a device: they ask their input
#
# Every op begins with `xp = array_module(x)`, the module that owns its input. Here is softplus,
# which Parcae uses for its step size Δ = softplus(dt_bias) (lesson 8), as written in
# `minparcae/ops/injection.py`:
#
#     def softplus(x):
#         xp = array_module(x)
#         return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))
#
# The formula is softplus(x) = log(1 + eˣ) rewritten as max(x, 0) + log(1 + e^(−|x|)), which is the
# same number but never exponentiates a large positive value.

# %%
x_host = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0])
x = backend.to_device(x_host)                          # a copy on the active device
assert backend.array_module(x) is xp
y = backend.to_host(injection.softplus(x))             # computed there, copied back to NumPy
with np.errstate(over="ignore"):
    naive = np.log(1.0 + np.exp(x_host))               # e^1000 overflows to inf
print("softplus:", y)
print("naive log(1 + e^x):", naive)
assert abs(y[2] - np.log(2.0)) < 1e-15                  # softplus(0) = ln 2
assert y[4] == 1000.0 and np.isinf(naive[4])           # the rewritten form survives x = 1000
assert y[0] == 0.0                                     # and underflows gracefully at x = −1000

# %% [markdown]
# `to_device` and `to_host` are the only two places data crosses between devices. On the CPU both
# are (almost) free; on a GPU they are copies over the PCIe bus, which is why the trainer keeps
# parameters on the device and only brings back a few scalars per step.

# %%
assert np.array_equal(backend.to_host(backend.to_device(x_host)), x_host)

# %% [markdown]
# When a GPU is present, the same op runs on both devices and agrees to float32 rounding.

# %%
if backend.gpu_available():
    import cupy
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    cpu_out, _ = rmsnorm.forward(a)
    gpu_out, _ = rmsnorm.forward(cupy.asarray(a))
    diff = float(np.abs(cupy.asnumpy(gpu_out) - cpu_out).max())
    print(f"RMSNorm, CPU vs GPU: max |difference| = {diff:.1e}")
    assert diff < 1e-5
else:
    print("no GPU here: every op below runs on NumPy, and would run unchanged on CuPy")

# %% [markdown]
# ## 3. float32 for training, float64 for checking
#
# Parameters and activations default to float32 (`backend.dtype()`), which halves memory and is
# what GPUs are fast at. Its unit roundoff is u = 2⁻²⁴ ≈ 6e-8: 1 + 1e-8 is exactly 1 in float32.
# Gradient checks (lesson 2) compare a hand-written backward with the central difference
#
# $$ g \approx \frac{f(\theta + \varepsilon) - f(\theta - \varepsilon)}{2\varepsilon}, $$
#
# whose rounding error is about u·|f|/ε. In float32 that swamps the answer; in float64
# (u = 2⁻⁵³ ≈ 1e-16) it leaves about ten correct digits at ε = 1e-6. So every check runs in float64.

# %%
assert backend.dtype() is np.float32
print(f"unit roundoff: float32 {np.finfo(np.float32).eps / 2:.1e}, "
      f"float64 {np.finfo(np.float64).eps / 2:.1e}")
assert np.float32(1) + np.float32(1e-8) == np.float32(1)
assert np.float64(1) + np.float64(1e-8) != np.float64(1)

for dtype in (np.float32, np.float64):
    theta, eps = dtype(0.5), dtype(1e-6)
    numeric = (np.exp(theta + eps) - np.exp(theta - eps)) / (2 * eps)
    err = abs(float(numeric) - np.exp(0.5)) / np.exp(0.5)
    print(f"d/dθ e^θ at 0.5 by central differences in {np.dtype(dtype).name}: "
          f"relative error {err:.1e}")
    assert (err > 1e-3) if dtype is np.float32 else (err < 1e-9)

# %% [markdown]
# ## 4. The reference, and the fast paths beside it
#
# Every op in minparcae/ops is the readable reference, and the model runs an `Ops` set of them:
# `ops.REFERENCE` unless it is handed another. `kernels.select(device)` hands it a set in which a
# few ops are replaced by compiled versions with the same functions and the same numbers (on the
# CPU the row-wise ops and the attention core, as Numba kernels; on a GPU most ops, as CUDA
# kernels). The lessons explain the reference,
# so they run exactly that, the default: nothing to switch off.

# %%
fast = kernels.select("cpu")
replaced = [name for name in fast._fields if getattr(fast, name) is not getattr(REFERENCE, name)]
print(f"replaced on the CPU: {', '.join(replaced)}; the reference elsewhere")
assert getattr(REFERENCE, "rmsnorm") is rmsnorm and replaced

# %% [markdown]
# ## Exercises
#
# Every lesson has two or three exercises, at its end (lesson 6's come where its kernels are
# taught): a function for you to write, whose body is `raise NotImplementedError` under a one-line
# spec, and the check that grades it. A check runs
# your function on small inputs and prints a line for each value it compares: exact, approximate
# (within a tolerance it states, as float64 rounding in another order gives) or WRONG, with the
# size and the place of the largest error. From the repository root:
#
#     python lessons/01_backend.py --exercise 1              # grade your onehot (or 2, 3)
#     python lessons/01_backend.py --exercise 1 --solution   # grade lessons/solutions/01_backend.py's
#
# It exits with status 0 once your answer is right. With `--exercise N` a lesson runs only its
# first cell and the cells of its Exercises section, which import what they need, so grading takes
# a moment even in the lessons that train a model. In a notebook, call the check on your function:
# `check_onehot(onehot)`. Solutions are in `lessons/solutions/`, one file per lesson.
#
# 1. `onehot`: the one-hot rows of a vector of token ids, on the ids' own device. The check runs it
#    on NumPy and on `tests/fakecupy.py`, a CPU stand-in for CuPy that refuses, as CuPy does, to
#    mix host and device arrays: an answer that makes its array with `np.` fails there.
# 2. `unit_roundoff`: section 3's u for a floating dtype, found by halving, without `np.finfo`.
# 3. `log_sigmoid`: log σ(x) = −softplus(−x), rewritten as section 2 rewrites softplus, so that it
#    is finite and accurate for any x, in float32 too.

# %%
import os
import sys

import numpy as np

from exercise import cmp, expect
from minparcae import backend

# tests/fakecupy.py, the stand-in for CuPy (a notebook has no __file__: it runs in lessons/)
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "01_backend.py")))
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))
import fakecupy  # noqa: E402


def onehot(ids, V):
    """ids: (N,) integers in [0, V). Returns (N, V) float32 with a 1 at [i, ids[i]], 0 elsewhere,
    on the device of ids."""
    raise NotImplementedError  # exercise 1: xp = backend.array_module(ids), then xp.zeros(...)


def check_onehot(fn):
    ids, V = np.array([3, 0, 4, 3, 1]), 6
    want = np.eye(V, dtype=np.float32)[ids]
    out = fn(ids, V)
    ok = [cmp("on NumPy", out, want),
          expect("dtype", getattr(out, "dtype", None) == np.float32, f"{getattr(out, 'dtype', out)}, "
                                                                      "want float32")]
    with fakecupy.installed() as cupy:  # `import cupy` gives the stand-in until the block ends
        gpu_ids = cupy.asarray(ids)
        try:
            out = fn(gpu_ids, V)
        except TypeError as error:  # the stand-in's refusal to mix host and device arrays
            return expect("on a GPU", False, f"TypeError: {error}")
        on_gpu = backend.array_module(out) is cupy
        ok += [expect("on a GPU", on_gpu, f"returned a {type(out).__module__} array for a CuPy "
                                          "input: make it with the input's module")]
        if on_gpu:
            ok.append(cmp("values on GPU", backend.to_host(out), want))
    return all(ok)


# %%
def unit_roundoff(dtype):
    """The largest power of two u for which dtype(1) + dtype(u) == dtype(1), as a float."""
    raise NotImplementedError  # exercise 2: halve u, in `dtype` arithmetic, until 1 + u == 1


def check_unit_roundoff(fn):
    return all([cmp(np.dtype(t).name, fn(t), np.finfo(t).eps / 2, rtol=0)
                for t in (np.float16, np.float32, np.float64)])


# %%
def log_sigmoid(x):
    """log(1 / (1 + e^(−x))) for an array x, finite for any x, in x's dtype and on x's device."""
    raise NotImplementedError  # exercise 3: −softplus(−x), with softplus written as section 2 does


def check_log_sigmoid(fn):
    x = np.array([-1000.0, -40.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 5.0])
    tail = np.array([20.0, 40.0, 300.0, 700.0])         # log σ(x) ≈ −e^(−x): down to 1e-304
    want, want_tail = -np.logaddexp(0, -x), -np.logaddexp(0, -tail)
    x32 = np.array([-1000.0, -1.0, 0.0, 1000.0], dtype=np.float32)
    got32 = fn(x32)
    return all([
        cmp("x ≤ 5", fn(x), want, rtol=1e-15),
        # each entry to 1e-14 of itself: 1 + e^(−x) rounds to 1 in float64 for x > 37
        cmp("x ≥ 20, each", fn(tail) / want_tail, np.ones_like(tail), rtol=1e-14),
        expect("float32 dtype", got32.dtype == np.float32, f"{got32.dtype}, want float32"),
        cmp("float32", got32, -np.logaddexp(0, -x32.astype(np.float64)), rtol=1e-6)])


# %%
EXERCISES = {1: (onehot, check_onehot), 2: (unit_roundoff, check_unit_roundoff),
             3: (log_sigmoid, check_log_sigmoid)}

# %%
print("lesson 1 passed")
