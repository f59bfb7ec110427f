"""The Numba CUDA kernels (minparcae/kernels/cuda.py) against the reference of the same op: each
launch wrapper, then the op replacements that kernels.select gives a GPU (cuda.REPLACEMENTS), op by
op through tests/replacements.py and all together in the model.

Without a GPU these run under Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1),
on NumPy arrays, at tiny shapes: rows of width 40 (and 5, narrower than a warp), 3 rows over 2
blocks, 32 threads per block, attention with B=1, H=2, T=5..9, hs=4 or 6 and 2- or 4-row tiles, so
every kernel runs more than one block, and the grid-stride and tile loops more than one pass.
The simulator has no warp shuffles: there the reductions take their shared-memory path. The
shuffle path is compiled for sm_90 here (`test_every_kernel_compiles_for_sm90`, with numba-cuda) and
runs on a GPU, where these same tests launch the kernels on the device (Numba copies the NumPy
arrays) and tests/test_gpu.py checks every kernel at realistic sizes on CuPy arrays.

Tolerance: float32 results within 1e-5 of the float32 reference, relative to the largest magnitude
of the reference output (only the summation order differs); AdamW within 1e-6 relative; the whole
model through the replacements within 1e-6 (loss) and 1e-5 (each gradient, normwise) of float64.
"""

import sys

import numpy as np
import pytest

from minparcae import kernels, model, optim
from minparcae.kernels import cuda as K
from minparcae.ops import REFERENCE, attention, cross_entropy, injection, rmsnorm, rotary
from replacements import EXERCISED, exercise, replaced

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:.*(under-utilization|copy overhead)")


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    """Few threads and blocks, so that tiny shapes still span several blocks; frequent thread
    switches make the simulator's barriers about three times faster."""
    monkeypatch.setattr(K, "MAX_THREADS", 32)
    monkeypatch.setattr(K, "ROW_BLOCKS", 2)
    monkeypatch.setattr(K, "THREADS", 32)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


def close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= tol * scale


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def contiguous_rotary(monkeypatch):
    """Make the replacements hand the rotary kernel a contiguous copy of qk_norm's strided head view:
    Numba takes host arrays to the device, and to the simulator, only when they are contiguous. The
    strided read itself runs on device arrays: on the CuPy stand-in (test_fakecupy.py) and on a GPU
    (test_gpu.py)."""
    kernel = K.rotary
    monkeypatch.setattr(K, "rotary", lambda x, cos, sin: kernel(np.ascontiguousarray(x), cos, sin))


# what each CUDA replacement replaces of its op; its other functions are the reference's
CUDA_FUNCTIONS = {
    "attention": {"forward", "backward"},
    "cross_entropy": {"forward"},
    "embedding": {"backward"},
    "injection": {"state_forward", "state_backward"},
    "mlp": {"forward", "backward"},
    "qk_norm": {"forward", "backward"},
    "rmsnorm": {"forward", "add_forward", "backward"},
}


def test_select_gives_the_cuda_replacements_in_float32_only(monkeypatch):
    """kernels.select("gpu") is the reference with exactly the ops of cuda.REPLACEMENTS replaced,
    each replacing the functions listed above; float64, or MINPARCAE_KERNELS=0, gets the reference."""
    ops = kernels.select("gpu", np.float32)
    for name in ops._fields:
        assert getattr(ops, name) is K.REPLACEMENTS.get(name, getattr(REFERENCE, name)), name
    assert dict(replaced(ops)) == CUDA_FUNCTIONS
    assert kernels.select("gpu", np.float64) is REFERENCE
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    assert kernels.select("gpu", np.float32) is REFERENCE


@pytest.mark.parametrize("name, T, heads", [  # rmsnorm's inputs depend on neither T nor the heads
    (name, T, heads) for name in sorted(K.REPLACEMENTS) for T, heads in [(2, (2, 2)), (9, (4, 2))]
    if name != "rmsnorm" or T == 9])
def test_every_replacement_matches_the_reference(name, T, heads, monkeypatch):
    """Every function of an op that the CUDA set replaces, through tests/replacements.py, against the
    reference op on the same float32 inputs: T = 2 and 9 positions, plain and grouped heads, rows of
    width 40 over the two blocks of a launch."""
    contiguous_rotary(monkeypatch)
    fast = K.REPLACEMENTS[name]
    assert CUDA_FUNCTIONS[name] <= EXERCISED[name]
    got = exercise(name, fast, np.float32, T=T, hs=4, width=40, heads=heads)
    want = exercise(name, getattr(REFERENCE, name), np.float32, T=T, hs=4, width=40, heads=heads)
    assert got.keys() == want.keys()
    for label in want:
        assert np.asarray(got[label]).dtype == np.asarray(want[label]).dtype, label
        close(got[label], want[label])


@pytest.mark.parametrize("shape", [(3, 40), (2, 1, 5)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm(shape, with_weight):
    rng = np.random.default_rng(0)
    x, g, res = randn(rng, *shape), randn(rng, *shape), randn(rng, *shape)
    w = (1 + 0.2 * randn(rng, shape[-1])) if with_weight else None
    y_ref, cache = rmsnorm.forward(x, w)
    y, xhat, r = K.rmsnorm_forward(x, w, rmsnorm.EPS)
    close(y, y_ref)
    close(xhat, cache.xhat)
    close(r, cache.r)
    grads = rmsnorm.backward(g, cache)
    dx, dw = K.rmsnorm_backward(g, xhat, r, w)
    close(dx, grads["x"])
    if with_weight:
        close(dw, grads["weight"])
    else:
        assert dw is None
    # the residual add fused in: forward of x + res, backward plus the residual branch's gradient
    s, y2, xhat2, r2 = K.add_rmsnorm_forward(x, res, w, rmsnorm.EPS)
    y2_ref, cache2 = rmsnorm.forward(x + res, w)
    close(s, x + res)
    close(y2, y2_ref)
    dx2, _ = K.rmsnorm_backward(g, xhat2, r2, w, dres=res)
    close(dx2, rmsnorm.backward(g, cache2)["x"] + res)


def test_rotary_forward_and_backward():
    """Contiguous input only: Numba takes host arrays to the device (or the simulator) only when
    contiguous. The op's strided head view is a device-array case, in tests/test_fakecupy.py (on the
    CuPy stand-in) and tests/test_gpu.py."""
    rng = np.random.default_rng(1)
    B, H, T, hs = 1, 2, 7, 6
    x = randn(rng, B, H, T, hs)
    cos, sin = rotary.tables(T, hs)
    close(K.rotary(x, cos, sin), rotary.forward(x, cos, sin)[0])
    g = randn(rng, B, H, T, hs)
    close(K.rotary(g, cos, -sin), rotary.backward(g, rotary.Cache(cos, sin))["x"])


def test_relu2_forward_and_backward():
    rng = np.random.default_rng(2)
    u = randn(rng, 3, 40)
    u[0, :3] = 0.0, np.nan, -0.0
    a, g = K.relu2_forward(u)
    a_ref = u * (u > 0)
    np.testing.assert_allclose(a, a_ref, rtol=TOL, equal_nan=True)
    np.testing.assert_allclose(g, 0.5 * a_ref * a_ref, rtol=TOL, equal_nan=True)
    dg = randn(rng, 3, 40)
    np.testing.assert_allclose(K.relu2_backward(dg, a), dg * a, rtol=TOL, equal_nan=True)


def test_softmax_xent():
    rng = np.random.default_rng(3)
    z = 30 * randn(rng, 3, 40)
    z[1] += 1e4  # logits far from 0: the row max keeps exp() in range
    targets = np.array([5, 39, 0])
    valid = np.array([True, True, False])
    loss_rows, grad = K.softmax_xent(z, targets, valid, 2)
    loss_ref, grad_ref = cross_entropy.softmax_xent(z, targets, valid, 2)
    close(loss_rows, loss_ref)
    close(grad, grad_ref)
    assert not grad[2].any() and loss_rows[2] == 0


def test_scatter_add_sums_repeated_rows():
    rng = np.random.default_rng(4)
    rows = np.array([0, 3, 0, 4, 3, 3])
    values = randn(rng, len(rows), 40)
    table = np.zeros((5, 40), np.float32)
    K.scatter_add(table, rows, values)
    expected = np.zeros_like(table)
    np.add.at(expected, rows, values)
    close(table, expected)


@pytest.mark.parametrize("T, hs, tiles", [(5, 4, (4, 4, 2)), (9, 4, (4, 4, 2)), (9, 4, (2, 4, 2)),
                                          (8, 6, (4, 2, 2)), (7, 4, (4, 4, 1))])
def test_flash_attention(T, hs, tiles):
    rng = np.random.default_rng(5)
    q, k, v, dy = (randn(rng, 1, 2, T, hs) for _ in range(4))
    scale = hs ** -0.5
    y_ref, cache_ref = attention.forward(q, k, v, scale)
    y, cache = K.attention_forward(q, k, v, scale, tiles=tiles)
    close(y, y_ref)
    want = attention.backward(dy, cache_ref)
    for got, key in zip(K.attention_backward(dy, cache), "qkv"):
        close(got, want[key])


def test_simple_attention_kernel():
    rng = np.random.default_rng(6)
    q, k, v, dy = (randn(rng, 1, 2, 9, 4) for _ in range(4))
    y, cache = K.attention_forward_simple(q, k, v, 0.5)
    y_ref, cache_ref = attention.forward(q, k, v, 0.5)
    close(y, y_ref)
    want = attention.backward(dy, cache_ref)
    for got, key in zip(K.attention_backward(dy, cache), "qkv"):
        close(got, want[key])


def test_diagonal_injection():
    """The kernels give the state step's output and, through dĀ, every gradient of state_backward."""
    rng = np.random.default_rng(7)
    p = {"inject.A_log": 0.3 * randn(rng, 40), "inject.dt_bias": randn(rng, 40)}
    h, u, dx = randn(rng, 2, 3, 40), randn(rng, 2, 3, 40), randn(rng, 2, 3, 40)
    x_ref, cache = injection.state_forward("diagonal", p, h, u)
    _, _, A_bar, delta, a = cache
    close(K.injection_forward(h, u, A_bar), x_ref)
    dh, dA_bar = K.injection_backward(dx, h, A_bar)
    want = injection.state_backward(dx, cache, p)
    close(dh, want["h"])
    g = dA_bar * A_bar
    close(-g * delta * a, want["inject.A_log"])
    close(-g * a * injection.sigmoid(p["inject.dt_bias"]), want["inject.dt_bias"])


def test_adamw_step_matches_optim_adamw():
    rng = np.random.default_rng(8)
    params = {"core.0.mlp.fc": randn(rng, 5, 8), "core.0.norm1": randn(rng, 8)}  # decayed, not decayed
    ours = {k: v.copy() for k, v in params.items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    opt = optim.AdamW(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for t in range(1, 4):
        grads = {k: randn(rng, *v.shape) for k, v in params.items()}
        opt.step(params, grads, lr=1e-2)
        for name, g in grads.items():
            wd = 0.0 if optim.no_weight_decay(name, g.shape) else 0.1
            K.adamw_step(ours[name], g, *moments[name], 1e-2, 0.8, 0.95, 1e-10, wd, 1 - 0.8 ** t, 1 - 0.95 ** t)
    for name in params:
        close(ours[name], params[name], 1e-6)
        close(moments[name][0], opt.m[name], 1e-6)
        close(moments[name][1], opt.v[name], 1e-6)


def test_adamw_step_refuses_strided_arrays():
    """p, m and v are updated in place through flat views: a strided one would be copied by the
    reshape and its update lost, so the kernel refuses it, as the CPU kernel does."""
    rng = np.random.default_rng(10)
    g = randn(rng, 8, 5)
    for strided in range(3):  # p, m, then v stored transposed
        p_m_v = [np.zeros((5, 8), np.float32).T if i == strided else np.zeros((8, 5), np.float32)
                 for i in range(3)]
        with pytest.raises(ValueError, match="C-contiguous"):
            K.adamw_step(p_m_v[0], g, *p_m_v[1:], 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05)


@pytest.mark.parametrize("hs, tiles, message", [
    (4, (4, 4, 3), "power of two"), (6, (4, 4, 4), "divides"), (8, (8, 4, 8), "divides"),
    (64, (64, 64, 64), "power of two"), (4, (24, 24, 2), "whole warps"), (1024, None, "KB of shared memory")])
def test_flash_attention_refuses_tiles_that_cannot_run(hs, tiles, message):
    x = np.zeros((1, 1, 4, hs), np.float32)
    with pytest.raises(ValueError, match=message):
        K.attention_forward(x, x, x, 1.0, tiles=tiles)


def test_flash_attention_refuses_more_heads_than_the_grid_holds():
    x = np.zeros((1, K.MAX_GRID_Y + 1, 1, 4), np.float32)
    with pytest.raises(ValueError, match="split the batch"):
        K.attention_forward(x, x, x, 1.0)
    cache = (x[0], x[0], x[0], x[0], np.zeros((K.MAX_GRID_Y + 1, 1), np.float32), np.float32(1), (4, 4, 4))
    with pytest.raises(ValueError, match="split the batch"):
        K.attention_backward(x, cache)


def test_flash_shared_memory_of_the_default_tiles():
    """The head sizes of every preset and lesson fit in 48 KB with the default tiles: the largest,
    head size 128 with 16 × 16 tiles, takes 35,200 bytes."""
    assert K.flash_shared_bytes(128, 16, 16) == 35200
    for hs in (4, 8, 16, 32, 64, 128, 256, 512):
        assert K.flash_shared_bytes(hs, *K._flash_tiles(hs)[:2]) <= K.SHARED_BYTES


REDUCING = {"_rmsnorm_forward", "_rmsnorm_backward", "_softmax_xent", "flash.forward"}


def test_every_kernel_compiles_for_sm90(sm90_report):
    """Every kernel as the wrappers launch it, for every head size the presets and lessons use,
    compiled for sm_90 (Hopper) with the warp-shuffle reductions and assembled by nvJitLink
    (tests/sm90_compile.py; no GPU needed): float32 only, no spills and no local memory, static
    shared memory within 48 KB and, for the flash kernels, exactly what `flash_shared_bytes` says."""
    lines = sm90_report.splitlines()
    assert not [line for line in lines if line.startswith("NOT LAUNCHED")], sm90_report
    kernels = {}
    for line in lines:
        if line.startswith("KERNEL "):
            _, name, *fields = line.split()
            kernels.setdefault(name, []).append({k: int(v) for k, v in (f.split("=") for f in fields)})
    assert len(kernels) == 10 + 3 * 6 + 1, sorted(kernels)  # row and elementwise, 6 flash builds, simple
    flash = {}
    for name, builds in kernels.items():
        for b in builds:
            assert b["spill_stores"] == b["spill_loads"] == b["lmem"] == b["f64"] == 0, (name, b)
            assert b["smem"] <= K.SHARED_BYTES and b["regs"] <= 255, (name, b)
            assert b["shfl"] == (name.split("[")[0] in REDUCING), (name, b)
        if name.startswith("flash."):
            constants = tuple(int(c.split("=")[1]) for c in name[name.index("[") + 1:-1].split(","))
            flash[constants] = max(flash.get(constants, 0), builds[0]["smem"])
    assert {D for D, *_ in flash} == {4, 8, 16, 32, 64, 128}
    for constants, smem in flash.items():
        assert smem == K.flash_shared_bytes(*constants[:3]), (constants, smem)


def test_model_through_the_cuda_replacements(monkeypatch):
    """A small model (grouped heads, value embeddings, sequences of unequal depth) run forward and
    backward with the CUDA replacements (`ops` of kernels.select("gpu")) on NumPy float32 arrays:
    loss and gradients within 1e-5 (normwise) of the reference in float64. qk_norm's rotary gets a
    contiguous copy of its head view (`contiguous_rotary`)."""
    contiguous_rotary(monkeypatch)
    ops = REFERENCE._replace(**K.REPLACEMENTS)
    cfg = model.Config(vocab_size=32, context=8, d_model=16, n_head=2, n_kv_head=1, n_prelude=1,
                       n_recurrent=1, n_coda=1, mean_recurrence=2, backprop_depth=2, value_embeddings=True)
    rng = np.random.default_rng(9)
    p32 = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32)
           for k, v in model.init_params(cfg, seed=0, dtype=np.float32, xp=np).items()}
    ids = rng.integers(0, cfg.vocab_size, (2, 6))
    h0 = model.initial_state(cfg, (2, 5, cfg.d_h), "like-init", rng, np.float32)

    def run(p, ops):
        loss, cache, _ = model.forward(p, cfg, ids[:, :-1], ids[:, 1:], depths=np.array([2, 1]),
                                       h0=h0.astype(p["wte"].dtype), train=True, ops=ops)
        assert cache.ops is ops
        return loss, model.backward(p, cfg, cache)

    loss64, grads64 = run({k: v.astype(np.float64) for k, v in p32.items()}, REFERENCE)
    loss32, grads32 = run(p32, ops)
    assert abs(loss32 - loss64) <= 1e-6 * loss64
    assert grads32.keys() == grads64.keys()
    for name, g in grads64.items():
        assert grads32[name].dtype == np.float32, name
        assert np.linalg.norm(grads32[name] - g) <= 1e-5 * np.linalg.norm(g), name
