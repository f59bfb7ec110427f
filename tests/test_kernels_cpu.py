"""The Numba CPU kernels against the NumPy reference of the same op (kernels switched off).

Tolerances: float64 within 1e-12 relative (only the summation order differs), float32 within
2e-5 relative to the output's scale."""

import os
import subprocess
import sys

import numpy as np
import pytest

from minparcae import kernels, optim
from minparcae.kernels import cpu
from minparcae.ops import attention, cross_entropy, embedding, mlp, rmsnorm, rotary

TOL = {np.float64: 1e-12, np.float32: 2e-5}


reference = kernels.reference


def close(a, b, dtype):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= TOL[dtype] * scale


@pytest.fixture(params=[np.float64, np.float32])
def dtype(request):
    return request.param


def test_every_kernel_is_registered_for_both_float_types():
    for name in cpu.KERNELS:
        for dt in (np.float32, np.float64):
            assert kernels.fast(name, np.zeros(1, dtype=dt)) is not None, name
    assert kernels.fast("rotary", np.zeros(1, dtype=np.int64)) is None
    kernels.use_kernels(False)
    assert kernels.fast("rotary", np.zeros(1)) is None
    kernels.use_kernels(True)


@pytest.mark.parametrize("shape", [(3, 7, 40), (1, 1, 5), (2, 3, 5, 6)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm(shape, with_weight, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.2 * rng.standard_normal(shape[-1])).astype(dtype) if with_weight else None
    g = rng.standard_normal(shape).astype(dtype)
    y, c = rmsnorm.forward(x, w)
    y_ref, c_ref = reference(rmsnorm.forward, x, w)
    close(y, y_ref, dtype)
    gr, gr_ref = rmsnorm.backward(g, c), reference(rmsnorm.backward, g, c_ref)
    assert set(gr) == set(gr_ref)
    for k in gr:
        assert gr[k].dtype == dtype
        close(gr[k], gr_ref[k], dtype)


def test_rotary_forward_and_backward(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 3, 6)).astype(dtype).transpose(0, 2, 1, 3)  # not contiguous
    cos, sin = rotary.tables(7, 6, dtype=dtype)
    y, c = rotary.forward(x, cos, sin)
    y_ref, _ = reference(rotary.forward, x, cos, sin)
    close(y, y_ref, dtype)
    close(rotary.backward(y, c)["x"], reference(rotary.backward, y, c)["x"], dtype)


def test_rope_then_qk_norm_in_one_pass(dtype):
    """The fused kernel against rotary then RMSNorm, on heads 1..3 of a (B, T, heads, hs) array
    like attention's q/k/v product; the backward writes into those heads only."""
    rng = np.random.default_rng(11)
    qkv = 3.0 * rng.standard_normal((2, 7, 5, 8)).astype(dtype)  # (B, T, heads, hs)
    x = qkv[:, :, 1:4].transpose(0, 2, 1, 3)  # (B, 3, T, hs)
    cos, sin = rotary.tables(7, 8, dtype=dtype)
    y, r = cpu.rope_rmsnorm_forward(qkv, 1, 3, cos, sin, rmsnorm.EPS)
    y_ref, (_, r_ref, _) = reference(rmsnorm.forward, reference(rotary.forward, x, cos, sin)[0])
    close(y, y_ref, dtype)
    close(r, r_ref, dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_ref = reference(rmsnorm.backward, dy, (y_ref, r_ref, None))["x"]
    dx_ref = reference(rotary.backward, dx_ref, (cos, sin))["x"]
    out = np.full_like(qkv, 7.0)
    cpu.rope_rmsnorm_backward(dy, y, r, cos, sin, out, 1)
    close(out[:, :, 1:4].transpose(0, 2, 1, 3), dx_ref, dtype)
    assert (out[:, :, [0, 4]] == 7.0).all()


def test_relu2_mlp(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 6)).astype(dtype)
    w1, w2 = rng.standard_normal((6, 24)).astype(dtype), rng.standard_normal((24, 6)).astype(dtype)
    y, c = mlp.forward(x, w1, w2)
    y_ref, _ = reference(mlp.forward, x, w1, w2)
    close(y, y_ref, dtype)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_cross_entropy(dtype, softcap):
    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((3, 7, 50))).astype(dtype)
    logits[0, 0, 0] = 1e4  # no overflow in the kernel either
    targets = rng.integers(0, 50, (3, 7))
    targets[1, ::2] = cross_entropy.IGNORE_INDEX
    loss, c = cross_entropy.forward(logits, targets, softcap=softcap)
    loss_ref, c_ref = reference(cross_entropy.forward, logits, targets, softcap=softcap)
    close(loss, loss_ref, dtype)
    close(cross_entropy.backward(1.0, c)["logits"], cross_entropy.backward(1.0, c_ref)["logits"], dtype)


def test_scatter_add(dtype):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 9, (3, 11))
    g = rng.standard_normal((3, 11, 5)).astype(dtype)
    _, c = embedding.forward(ids, np.zeros((9, 5), dtype=dtype))
    close(embedding.backward(g, c)["table"], reference(embedding.backward, g, c)["table"], dtype)


@pytest.mark.parametrize("B,T,d,n_head,n_kv_head,hs", [(2, 9, 12, 2, 2, 6), (1, 1, 8, 2, 1, 4),
                                                       (2, 17, 16, 4, 2, 4)])
def test_attention(dtype, B, T, d, n_head, n_kv_head, hs):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, d)).astype(dtype)
    w = {n: (0.5 * rng.standard_normal(s)).astype(dtype) for n, s in
         (("wq", (d, n_head * hs)), ("wk", (d, n_kv_head * hs)), ("wv", (d, n_kv_head * hs)),
          ("wo", (n_head * hs, d)))}
    cos, sin = rotary.tables(T, hs, dtype=dtype)
    args = dict(cos=cos, sin=sin, n_head=n_head, n_kv_head=n_kv_head)
    y, c = attention.forward(x, **w, **args)
    y_ref, c_ref = reference(attention.forward, x, **w, **args)
    close(y, y_ref, dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    gr, gr_ref = attention.backward(g, c), reference(attention.backward, g, c_ref)
    for k in gr_ref:
        close(gr[k], gr_ref[k], dtype)


@pytest.mark.parametrize("block", [cpu.ATTN_BLOCK, 4, 1])
@pytest.mark.parametrize("T", [1, 9, 16, 70])
@pytest.mark.parametrize("heads", [(2, 3), (1, 1)])
def test_causal_attention_core_in_row_blocks(dtype, block, T, heads, monkeypatch):
    """The blocked core against the reference's full (T, T) scores, with T a multiple of the block
    size, not a multiple (a short last block), smaller than one block, and T = 1; with the heads
    split over the BLAS threads, and a single head (one job). BLAS's thread count comes back."""
    monkeypatch.setattr(cpu, "ATTN_BLOCK", block)
    control = cpu._blas_thread_control()
    threads = control[0]() if control else None
    rng = np.random.default_rng(6)
    q, k, v, dy = (rng.standard_normal(heads + (T, 8)).astype(dtype) for _ in range(4))
    y, c = cpu.attention_forward(q, k, v, 0.35)
    y_ref, c_ref = attention.causal_attention_forward(q, k, v, 0.35)
    assert y.dtype == dtype
    close(y, y_ref, dtype)
    for g, g_ref in zip(cpu.attention_backward(dy, c), attention.causal_attention_backward(dy, c_ref)):
        assert g.dtype == dtype
        close(g, g_ref, dtype)
    assert (control[0]() if control else None) == threads


def test_adamw_step_matches_the_reference(dtype):
    rng = np.random.default_rng(8)
    shapes = {"core.0.mlp.fc": (7, 300), "core.0.norm1": (300,)}  # decayed, not decayed
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    ref = {k: v.copy() for k, v in params.items()}
    start = {k: v.copy() for k, v in params.items()}
    fast, slow = optim.AdamW(betas=(0.8, 0.95), eps=1e-10), optim.AdamW(betas=(0.8, 0.95), eps=1e-10)
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        fast.step(params, grads, lr=1e-2)
        reference(slow.step, ref, grads, lr=1e-2)
    for name in shapes:
        assert params[name].dtype == dtype
        close(params[name], ref[name], dtype)
        close(fast.m[name], slow.m[name], dtype)
        close(fast.v[name], slow.v[name], dtype)
        assert np.abs(params[name] - start[name]).mean() > 1e-3  # the update did something


@pytest.mark.parametrize("threads", [1, 3])
def test_matmul_split_over_threads(dtype, threads, monkeypatch):
    """Row and column splits, transposed operands, and a product too small to split."""
    monkeypatch.setattr(cpu, "_threads", lambda: threads)
    monkeypatch.setattr(cpu, "MATMUL_SPLIT_MIN", 1000)
    rng = np.random.default_rng(12)
    a = rng.standard_normal((40, 30)).astype(dtype)
    b = rng.standard_normal((30, 50)).astype(dtype)
    for x, y in ((a, b[:, :20]), (a[:10], b), (b.T, a.T), (a[:3, :4], b[:4, :5])):  # M ≥ N, M < N
        close(cpu.matmul(x, y), x @ y, dtype)


KERNEL_CALLS = """
import numpy as np
from minparcae.kernels import cpu
x = np.random.default_rng(0).standard_normal((2048, 512)).astype(np.float32)
w = np.ones(512, np.float32)
ref = cpu.rmsnorm_forward(x, w, 1e-5)[0]
"""


def test_the_two_builds_of_a_kernel_keep_separate_disk_caches(tmp_path):
    """Numba's disk cache keys a function by its name and line. Were the serial build cached
    under the parallel build's key, a process that found the parallel code there would run it from
    two threads at once inside model.loss_and_grads, and Numba's workqueue would abort it."""
    if cpu._blas_thread_control() is None:
        pytest.skip("no controllable OpenBLAS: _parallel runs its jobs in order")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")
    parallel_first = KERNEL_CALLS  # the main thread compiles (and caches) the parallel build
    then_threads = KERNEL_CALLS + """
def job(lo, hi):
    for _ in range(50):
        assert np.array_equal(cpu.rmsnorm_forward(x, w, 1e-5)[0], ref)
cpu._parallel(job, [(0, 1), (1, 2)])
"""
    for code in (parallel_first, then_threads):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    names = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert {"cpu._rmsnorm_forward", "cpu._rmsnorm_forward_serial"} <= names, names
