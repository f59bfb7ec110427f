"""The whole Parcae model: finite-difference checks of every parameter group, truncated backprop,
per-sequence depths, stability of the diagonal injection, memory, parameter counts and FLOPs."""

import math

import numpy as np
import pytest

from minparcae import model as M
from minparcae.gradcheck import check_grads, rel_error
from minparcae.ops import injection

GRAD_TOL = 1e-6  # normwise relative error, float64 central differences (see gradcheck.py)


def tiny_cfg(**kw):
    base = dict(vocab_size=11, context=8, d_model=8, n_head=2, n_prelude=1, n_recurrent=1,
                n_coda=1, mean_recurrence=3, backprop_depth=2)
    base.update(kw)
    return M.Config(**base)


def perturbed_params(cfg, seed=0, scale=0.3):
    """Initial parameters plus noise, so no gradient is zero by symmetry (zero-init projections,
    unit norms, identity B) and every group is really exercised."""
    p = M.init_params(cfg, seed=seed, dtype=np.float64, xp=np)
    rng = np.random.default_rng(seed + 1)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in p.items()}


def batch(cfg, B=2, T=5, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    h0 = 10 * M.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng, np.float64)
    return ids, targets, h0


def truncated_loss_fn(p, cfg, ids, targets, h0, T, k):
    """The loss whose exact gradient truncated backprop computes: the state after the first T − k
    steps is computed once, at the current parameters, and then frozen as a constant; the loss is
    the model run for the remaining k steps from that constant state. Its finite differences
    perturb every parameter except through that frozen state."""
    h_frozen = M.state_after(p, cfg, ids, T - k, h0) if T > k else h0
    return lambda: M.forward(p, cfg, ids, targets, n_loops=k, h0=h_frozen)[0]


def model_grad_errors(cfg, T, n_samples=None):
    p = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg)
    loss, cache, _ = M.forward(p, cfg, ids, targets, n_loops=T, h0=h0, train=True)
    grads = M.backward(p, cfg, cache)
    k = min(T, cfg.backprop_depth) if cfg.looped else 1
    fn = truncated_loss_fn(p, cfg, ids, targets, h0, T, k) if cfg.looped else \
        (lambda: M.forward(p, cfg, ids, targets, h0=h0)[0])
    assert abs(fn() - loss) < 1e-12  # the frozen-state loss is the same function value
    return check_grads(fn, p, grads, n_samples=n_samples), grads


@pytest.mark.parametrize("kind", ["diagonal", "linear", "add"])
@pytest.mark.parametrize("value_embeddings", [False, True])
def test_whole_model_gradients(kind, value_embeddings):
    """T = 3 loop steps, k = 2 with gradient; every parameter group, each injection."""
    cfg = tiny_cfg(injection=kind, value_embeddings=value_embeddings)
    errors, grads = model_grad_errors(cfg, T=3, n_samples=24)
    assert set(errors) == set(M.param_shapes(cfg))  # every parameter was checked
    for name, g in grads.items():  # and none was trivially zero
        assert np.abs(g).max() > 1e-8, name
    groups = {"wte", "prelude.0.attn.wq", "prelude_norm", "core.0.mlp.fc", "C", "coda.0.norm2",
              "final_norm"} | {n for n in errors if n.startswith("inject.")}
    assert groups <= set(errors)
    assert max(errors.values()) < GRAD_TOL, errors


def test_fixed_depth_baseline_gradients():
    cfg = M.fixed_depth_baseline(tiny_cfg(value_embeddings=True))
    errors, _ = model_grad_errors(cfg, T=1)
    assert "C" not in errors and "inject.B" not in errors
    assert max(errors.values()) < GRAD_TOL, errors


def test_untied_head_and_softcap_gradients():
    cfg = tiny_cfg(tie_embeddings=False, logit_scale=0.8, logit_softcap=3.0, n_kv_head=1,
                   d_state=12, n_recurrent=2)
    errors, _ = model_grad_errors(cfg, T=2, n_samples=24)
    assert "lm_head" in errors
    assert max(errors.values()) < GRAD_TOL, errors


def test_official_shapes_gradients():
    """The recurrent block with its own heads (ungrouped, while the prelude and coda group theirs)
    and its own MLP width, and no norm between the prelude and the loop."""
    cfg = tiny_cfg(d_model=8, n_kv_head=1, d_state=12, n_recurrent_head=3, d_mlp=10,
                   d_mlp_recurrent=20, prelude_norm=False, value_embeddings=True, n_recurrent=2)
    assert M.layer(cfg, "core.1")[1:] == (12, 3, 3, 20) and M.layer(cfg, "coda.0")[1:] == (8, 2, 1, 10)
    errors, _ = model_grad_errors(cfg, T=3, n_samples=24)
    assert "prelude_norm" not in errors and errors.keys() == M.param_shapes(cfg).keys()
    assert max(errors.values()) < GRAD_TOL, errors


def test_full_backprop_when_k_equals_T():
    """With k = T nothing is truncated: the gradient equals finite differences of the plain loss."""
    cfg = tiny_cfg(backprop_depth=4, value_embeddings=True)
    p = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg)
    _, cache, _ = M.forward(p, cfg, ids, targets, n_loops=4, h0=h0, train=True)
    grads = M.backward(p, cfg, cache)
    errors = check_grads(lambda: M.forward(p, cfg, ids, targets, n_loops=4, h0=h0)[0], p, grads,
                         n_samples=24)
    assert max(errors.values()) < GRAD_TOL, errors


def test_truncation_changes_the_gradient():
    """k < T is really truncated: its gradient differs from full backprop, in the loop's
    parameters, while the coda's own gradient (after the loop) is identical."""
    cfg = tiny_cfg(mean_recurrence=4)
    p = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg)
    full_cfg = M.Config(**{**cfg.to_dict(), "backprop_depth": 4})
    full = M.backward(p, full_cfg, M.forward(p, full_cfg, ids, targets, n_loops=4, h0=h0, train=True)[1])
    trunc = M.backward(p, cfg, M.forward(p, cfg, ids, targets, n_loops=4, h0=h0, train=True)[1])
    np.testing.assert_allclose(trunc["coda.0.mlp.fc"], full["coda.0.mlp.fc"], rtol=1e-12)
    assert rel_error(trunc["core.0.attn.wq"], full["core.0.attn.wq"]) > 1e-3
    assert rel_error(trunc["inject.A_log"], full["inject.A_log"]) > 1e-3


@pytest.mark.parametrize("value_embeddings", [False, True])
def test_per_sequence_depths_match_separate_runs(value_embeddings):
    """A batch of two sequences with depths 2 and 5 equals running each alone with its own depth
    (the batch loss is the mean of the two, since both have the same number of targets)."""
    cfg = tiny_cfg(value_embeddings=value_embeddings, backprop_depth=3)
    p = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg)
    loss, cache, diag = M.forward(p, cfg, ids, targets, depths=np.array([2, 5]), h0=h0, train=True)
    grads = M.backward(p, cfg, cache)
    assert diag["steps"] == 5
    alone = []
    for b, depth in enumerate([2, 5]):
        l_b, c_b, _ = M.forward(p, cfg, ids[b:b + 1], targets[b:b + 1], n_loops=depth,
                                h0=h0[b:b + 1], train=True)
        alone.append((l_b, M.backward(p, cfg, c_b)))
    assert abs(loss - (alone[0][0] + alone[1][0]) / 2) < 1e-12
    for name in grads:
        np.testing.assert_allclose(grads[name], (alone[0][1][name] + alone[1][1][name]) / 2,
                                   rtol=1e-9, atol=1e-13, err_msg=name)


def test_diagonal_injection_is_stable_for_extreme_parameters():
    """ρ(Ā) = max_i exp(−Δ_i a_i) with Δ = softplus(dt_bias) > 0 and a = exp(A_log) > 0.

    The strict inequality ρ < 1 is the statement that every decay rate Δ_i a_i is > 0, which is
    checked exactly here. (In floating point exp(−x) rounds to 1.0 once x < 2^-53, as happens at
    A_log = dt_bias = −20 where Δa ≈ 4e-18; Ā is then 1 to machine precision but never above it.)"""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        for _ in range(200):
            A_log = rng.uniform(-20, 20, 16).astype(dtype)
            dt_bias = rng.uniform(-20, 20, 16).astype(dtype)
            A_bar, delta, a = injection.diagonal_decay(A_log, dt_bias)
            assert np.all(delta * a > 0)
            assert np.all(np.isfinite(A_bar)) and np.all(A_bar >= 0) and np.all(A_bar <= 1)
            big = delta * a > 1e-6  # where the rate is resolvable in float32, Ā is strictly < 1
            assert np.all(A_bar[big] < 1)
        corners = np.array([-20.0, 20.0], dtype=dtype)
        A_bar, delta, a = injection.diagonal_decay(*np.meshgrid(corners, corners))
        assert np.all(delta * a > 0) and np.all(A_bar <= 1)
    p = {"inject.A_log": np.array([3.0, -2.0]), "inject.dt_bias": np.array([0.5, -1.0])}
    expected = math.exp(-math.log1p(math.exp(-1.0)) * math.exp(-2.0))
    assert abs(injection.spectral_radius("diagonal", p) - expected) < 1e-12


def test_linear_and_additive_radius():
    p = {"inject.W": np.vstack([np.diag([1.5, 0.5]), np.ones((2, 2))])}
    assert abs(injection.spectral_radius("linear", p) - 1.5) < 1e-12
    assert injection.spectral_radius("add", {}) == 1.0


def test_activation_memory_does_not_grow_with_loop_count():
    cfg = tiny_cfg(d_model=16, backprop_depth=2)
    p = M.init_params(cfg, dtype=np.float32, xp=np)
    ids, targets, _ = batch(cfg, B=2, T=8)
    rng = np.random.default_rng(0)
    sizes = {}
    for T in (4, 32):
        _, cache, diag = M.forward(p, cfg, ids, targets, n_loops=T, rng=rng, train=True)
        assert diag["steps"] == T and len(cache.steps) == 2
        sizes[T] = M.cache_nbytes(cache, exclude=p.values())
    assert sizes[4] == sizes[32] > 0
    _, cache3, _ = M.forward(p, M.Config(**{**cfg.to_dict(), "backprop_depth": 3}), ids, targets,
                             n_loops=32, rng=rng, train=True)
    assert M.cache_nbytes(cache3, exclude=p.values()) > sizes[32]  # but it grows with k


def test_parameter_counts_match_the_formula():
    for name, cfg in M.PRESETS.items():
        n = sum(math.prod(s) for s in M.param_shapes(cfg).values())
        assert n == M.count_params(cfg), name
        base = M.fixed_depth_baseline(cfg)
        assert sum(math.prod(s) for s in M.param_shapes(base).values()) == M.count_params(base)
    cfg = M.PRESETS["parcae-140m"]
    n = M.count_params(cfg)
    print(f"parcae-140m: {n:,} parameters")
    # 32768·768 embedding, 6 blocks of 12·768² + 2·768, 3 value-embedding tables of 32768·768,
    # B and C (768² each), A_log, dt_bias, three norms, three value-embedding gates of 32·6
    d, V = 768, 32768
    by_hand = V * d + 6 * (12 * d * d + 2 * d) + 3 * (V * d + 32 * 6) + 2 * d * d + 2 * d + 2 * d
    assert n == by_hand == 144_323_136


@pytest.mark.parametrize("kind", ["diagonal", "linear", "add", "none"])
def test_init_matches_the_shapes_and_the_scheme(kind):
    cfg = tiny_cfg(injection=kind, d_model=32, n_head=4, value_embeddings=True)
    p = M.init_params(cfg, seed=3, dtype=np.float64, xp=np)
    assert {k: v.shape for k, v in p.items()} == M.param_shapes(cfg)
    assert all(v.flags.c_contiguous for v in p.values())  # layout must not vary with the init
    assert not p["core.0.attn.wo"].any() and not p["prelude.0.mlp.proj"].any()
    std = math.sqrt(2 / (5 * 32))
    assert abs(p["coda.0.mlp.fc"].std() - std) < 0.1 * std
    if kind == "diagonal":
        np.testing.assert_allclose(injection.diagonal_decay(p["inject.A_log"],
                                                            p["inject.dt_bias"])[0], math.sqrt(0.2))
        np.testing.assert_allclose(p["inject.B"], np.eye(32), atol=1e-12)
    if kind == "linear":  # the official scheme: one truncated normal (±3σ) for [W_h; W_e]
        W = p["inject.W"]
        assert abs(W.std() - std) < 0.05 * std and np.abs(W).max() <= 3 * std
    # value-embedding tables N(0, 1) and their gates uniform in ±1/√fan_in, as PyTorch's defaults
    ve, gate = p["ve.coda.0"], p["coda.0.attn.ve_gate"]
    assert abs(ve.std() - 1) < 0.05 and abs(ve.mean()) < 0.05
    assert 0.5 / math.sqrt(32) < np.abs(gate).max() <= 1 / math.sqrt(32)
    if kind != "none":  # C is a scaled orthogonal map
        C = p["C"]
        np.testing.assert_allclose(C.T @ C, np.eye(32) * (std**2 * 32), atol=1e-12)


def test_nonsquare_injection_is_orthogonal():
    cfg = tiny_cfg(d_state=12)
    p = M.init_params(cfg, dtype=np.float64, xp=np)
    B = p["inject.B"]  # (d, d_h) = (8, 12): orthonormal rows
    np.testing.assert_allclose(B @ B.T, np.eye(8), atol=1e-12)


def test_evaluation_is_reproducible_and_training_state_is_random():
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids, targets, _ = batch(cfg)
    a = M.forward(p, cfg, ids, targets)[0]
    assert M.forward(p, cfg, ids, targets)[0] == a  # seeded evaluation state
    z = M.Config(**{**cfg.to_dict(), "eval_state": "zero"})
    assert M.forward(p, z, ids, targets)[0] == M.forward(p, z, ids, targets)[0] != a
    rng = np.random.default_rng(0)
    t1 = M.forward(p, cfg, ids, targets, rng=rng, train=True)[0]
    t2 = M.forward(p, cfg, ids, targets, rng=rng, train=True)[0]
    assert t1 != t2  # a fresh like-init draw per training step


def test_depth_sampling_is_seeded_and_poisson():
    cfg = tiny_cfg(mean_recurrence=6)
    d1 = M.sample_depths(np.random.default_rng(5), 4000, cfg)
    d2 = M.sample_depths(np.random.default_rng(5), 4000, cfg)
    assert (d1 == d2).all() and d1.min() >= 1
    assert abs(d1.mean() - 6) < 0.15  # the max(1, ·) moves the mean by only P(0) = e^-6


def test_float32_model_matches_float64():
    cfg = tiny_cfg(d_model=16, n_head=2, value_embeddings=True, mean_recurrence=4)
    p64 = perturbed_params(cfg, scale=0.1)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    ids, targets, h0 = batch(cfg)
    res = {}
    for p, h in ((p64, h0), (p32, h0.astype(np.float32))):
        loss, cache, _ = M.forward(p, cfg, ids, targets, h0=h, train=True)
        res[p["wte"].dtype] = (loss, M.backward(p, cfg, cache))
    (l32, g32), (l64, g64) = res[np.dtype(np.float32)], res[np.dtype(np.float64)]
    assert abs(l32 - l64) < 1e-5 * abs(l64)
    for k in g64:
        assert g32[k].dtype == np.float32, k
        assert rel_error(g32[k], g64[k]) < 1e-3, k  # float32: ~1e-5 typical, stated bound 1e-3


def test_baseline_ignores_loop_count_and_counts():
    cfg = tiny_cfg()
    base = M.fixed_depth_baseline(cfg)
    p = perturbed_params(base)
    ids, targets, _ = batch(base)
    assert M.forward(p, base, ids, targets, n_loops=1)[0] == M.forward(p, base, ids, targets, n_loops=7)[0]
    extra = M.count_params(cfg) - M.count_params(base)
    d = cfg.d_model
    assert extra == d * d + d * d + 2 * d + d  # B, C, A_log and dt_bias, prelude norm


def test_flops_follow_the_loop():
    cfg = M.PRESETS["parcae-140m"]
    shapes = M.param_shapes(cfg)
    # multiply-adds per token read off the shapes: core blocks vs everything used once
    core = sum(math.prod(s) for n, s in shapes.items() if n.startswith("core.") and len(s) == 2)
    once = sum(math.prod(s) for n, s in shapes.items()
               if n.startswith(("prelude.", "coda.")) and len(s) == 2) + math.prod(shapes["wte"])
    once += math.prod(shapes["C"]) + math.prod(shapes["inject.B"])
    attn_layer = 4 * 768 * (cfg.context + 1) / 2  # FLOPs: 2 per multiply-add
    for T in (1, 8, 16):
        expected = 2 * once + 2 * core * T + attn_layer * (4 + 2 * T)
        assert M.flops_per_token(cfg, train=False, n_loops=T) == pytest.approx(expected)
    train = M.flops_per_token(cfg)
    assert train == pytest.approx(6 * once + 3 * 4 * attn_layer + (2 * 8 + 4 * 4) * (core + attn_layer))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="heads"):
        M.Config(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="injection must be one of"):
        M.Config(injection="sideways")
    with pytest.raises(ValueError, match="unknown preset"):
        M.preset("huge")
    cfg = tiny_cfg()
    p = M.init_params(cfg, xp=np)
    with pytest.raises(ValueError, match="exceed the model's context 8"):
        M.forward(p, cfg, np.zeros((1, 9), dtype=np.int64))
