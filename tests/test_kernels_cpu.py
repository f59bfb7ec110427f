"""The CPU fast paths (minparcae/kernels/cpu.py) against the reference of the op they replace.

Tolerances: float64 within 1e-12 relative (only the summation order differs), float32 within
2e-5 relative to the output's scale."""

import numpy as np
import pytest

from minparcae import kernels, model, runtime
from minparcae.kernels import cpu
from minparcae.ops import REFERENCE, attention
from replacements import EXERCISED, exercise, replaced

TOL = {np.float64: 1e-12, np.float32: 2e-5}


def close(a, b, dtype, label=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, label
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= TOL[dtype] * scale, label


@pytest.fixture(params=[np.float64, np.float32])
def dtype(request):
    return request.param


def test_select_replaces_only_what_cpu_py_lists(monkeypatch):
    ops = kernels.select("cpu", np.float32)
    assert [name for name, _ in replaced(ops)] == sorted(cpu.REPLACEMENTS)
    assert kernels.select("cpu", np.float64) == ops  # both float types
    assert kernels.adamw_update(np.zeros(1, np.float32)) is None  # NumPy's AdamW is as fast
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    assert kernels.select("cpu") is REFERENCE


@pytest.mark.parametrize("name", sorted(cpu.REPLACEMENTS))
@pytest.mark.parametrize("T", [1, 9, 70])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (3, 1)])
def test_every_replacement_matches_the_reference(name, T, heads, dtype):
    fast = kernels.select("cpu")._asdict()[name]
    assert {f for n, fs in replaced(kernels.select("cpu")) if n == name for f in fs} <= EXERCISED[name]
    got = exercise(name, fast, dtype, T=T, hs=8, heads=heads)
    want = exercise(name, getattr(REFERENCE, name), dtype, T=T, hs=8, heads=heads)
    assert got.keys() == want.keys()
    for label in want:
        assert got[label].dtype == want[label].dtype, label
        close(got[label], want[label], dtype, label)


@pytest.mark.parametrize("block", [cpu.ATTN_BLOCK, 4, 1])
@pytest.mark.parametrize("T", [1, 9, 16, 70])
def test_causal_attention_in_row_blocks(dtype, block, T, monkeypatch):
    """The blocked core with T a multiple of the block size, not a multiple (a short last block),
    smaller than one block, and T = 1."""
    monkeypatch.setattr(cpu, "ATTN_BLOCK", block)
    rng = np.random.default_rng(6)
    q, dy = (rng.standard_normal((2, 4, T, 8)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((2, 2, T, 8)).astype(dtype) for _ in range(2))
    y, c = cpu.attention_forward(q, k, v, 0.35)
    y_ref, c_ref = attention.forward(q, k, v, 0.35)
    close(y, y_ref, dtype)
    g, g_ref = cpu.attention_backward(dy, c), attention.backward(dy, c_ref)
    for key in g_ref:
        assert g[key].dtype == dtype
        close(g[key], g_ref[key], dtype, key)


def test_decoding_runs_the_reference_core():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 1, 4)) for _ in range(3))
    keys, values = np.zeros((1, 2, 5, 4)), np.zeros((1, 2, 5, 4))
    slot = attention.KVSlot(keys, values, 3, None)
    y, _ = cpu.attention_forward(q, k, v, 0.5, slot)
    y_ref, _ = attention.forward(q, k, v, 0.5, attention.KVSlot(keys.copy(), values.copy(), 3, None))
    np.testing.assert_array_equal(y, y_ref)


def test_a_training_step_through_the_cpu_set_matches_the_reference(monkeypatch):
    """The whole model, forward and backward, split over two threads, with the fast set against
    the reference in float64."""
    monkeypatch.setattr(runtime, "_blas_thread_control", lambda: (lambda: 2, lambda n: None))
    cfg = model.Config(vocab_size=30, context=70, d_model=16, n_head=2, n_kv_head=1,
                       value_embeddings=True, mean_recurrence=3, backprop_depth=2)
    p = model.init_params(cfg, seed=1, dtype=np.float64, xp=np)
    p = {k: v + 0.2 * np.random.default_rng(2).standard_normal(v.shape) for k, v in p.items()}
    rng = np.random.default_rng(3)
    ids, targets = rng.integers(0, 30, (3, 70)), rng.integers(0, 30, (3, 70))
    depths = np.array([1, 3, 4])
    runs = [runtime.loss_and_grads(p, cfg, ids, targets, depths=depths, rng=np.random.default_rng(4),
                                   ops=ops) for ops in (kernels.select("cpu"), REFERENCE)]
    assert abs(runs[0][0] - runs[1][0]) < 1e-12
    for k in p:
        close(runs[0][1][k], runs[1][1][k], np.float64, k)
