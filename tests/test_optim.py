"""Tests for minparcae.optim: AdamW by hand and against PyTorch, Muon, routing, clipping, schedules."""

import math

import numpy as np
import pytest

from minparcae.optim import (AdamW, Combined, Muon, clip_grad_norm, lr_at, newton_schulz,
                             no_weight_decay, uses_muon)

V, D = 11, 8
SHAPES = {
    "wte": (V, D), "lm_head": (D, V), "ve.core.0": (V, 4),
    "prelude_norm": (D,), "final_norm": (D,), "prelude.0.norm1": (D,),
    "prelude.0.attn.wq": (D, D), "core.1.mlp.fc": (D, 4 * D), "core.1.mlp.proj": (4 * D, D),
    "coda.0.attn.ve_gate": (4, 2),
    "inject.A_log": (D,), "inject.dt_bias": (D,), "inject.B": (D, D), "inject.W": (2 * D, D), "C": (D, D),
}
NO_DECAY = {"wte", "ve.core.0", "prelude_norm", "final_norm", "prelude.0.norm1",
            "inject.A_log", "inject.dt_bias", "inject.B", "C"}
MUON = {"prelude.0.attn.wq", "core.1.mlp.fc", "core.1.mlp.proj"}


def random_dict(rng, dtype=np.float64):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def copy(d):
    return {k: a.copy() for k, a in d.items()}


def run(opt, params, grad_seq, lr=1e-2):
    for grads in grad_seq:
        opt.step(params, copy(grads), lr)


def test_no_weight_decay_rule():
    for name, shape in SHAPES.items():
        assert no_weight_decay(name, shape) == (name in NO_DECAY), name


def test_uses_muon_rule():
    for name, shape in SHAPES.items():
        assert uses_muon(name, shape) == (name in MUON), name


def test_adamw_two_steps_by_hand():
    # A 2-element matrix inside a block, so it is decayed. lr 0.1, betas 0.9/0.95, eps 1e-8, wd 0.1.
    params = {"core.0.mlp.fc": np.array([[1.0, -2.0]])}
    opt = AdamW(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g1, g2 = np.array([[0.5, -1.0]]), np.array([[-0.25, 2.0]])
    eps = 1e-8

    # Step 1: decay p·(1 − 0.1·0.1) = p·0.99 → [0.99, −1.98].
    # m = 0.1·g1 = [0.05, −0.1], v = 0.05·g1² = [0.0125, 0.05]; bias corrections 1 − 0.9 = 0.1 and
    # 1 − 0.95 = 0.05 give m̂ = g1, v̂ = g1², so the step is lr·g1/(|g1| + eps) ≈ lr·sign(g1).
    opt.step(params, {"core.0.mlp.fc": g1}, 0.1)
    p1 = np.array([0.99 - 0.1 * 0.5 / (0.5 + eps), -1.98 + 0.1 * 1.0 / (1.0 + eps)])
    np.testing.assert_allclose(params["core.0.mlp.fc"][0], p1, rtol=0, atol=1e-15)

    # Step 2: decay p1·0.99. m = 0.9·m + 0.1·g2 = [0.02, 0.11]; v = 0.95·v + 0.05·g2² = [0.015, 0.2475];
    # bias corrections 1 − 0.9² = 0.19 and 1 − 0.95² = 0.0975.
    opt.step(params, {"core.0.mlp.fc": g2}, 0.1)
    p2 = np.array([
        p1[0] * 0.99 - 0.1 * (0.02 / 0.19) / (math.sqrt(0.015 / 0.0975) + eps),
        p1[1] * 0.99 - 0.1 * (0.11 / 0.19) / (math.sqrt(0.2475 / 0.0975) + eps),
    ])
    np.testing.assert_allclose(params["core.0.mlp.fc"][0], p2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(p2, [0.854263, -1.897537], atol=1e-6)  # the same numbers, rounded
    assert opt.t == 2


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params, grad_seq = random_dict(rng), [random_dict(rng) for _ in range(5)]
    lrs = [3e-3, 2e-3, 1e-3, 5e-4, 1e-4]
    betas, eps, wd = (0.8, 0.95), 1e-10, 0.1

    tp = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    topt = torch.optim.AdamW([
        {"params": [tp[k] for k in SHAPES if k not in NO_DECAY], "weight_decay": wd},
        {"params": [tp[k] for k in SHAPES if k in NO_DECAY], "weight_decay": 0.0},
    ], lr=lrs[0], betas=betas, eps=eps)
    opt = AdamW(betas=betas, eps=eps, weight_decay=wd)
    for lr, grads in zip(lrs, grad_seq):
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k])
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(params, copy(grads), lr)
    for k in SHAPES:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-13, err_msg=k)


def test_adamw_decays_only_the_decayed_names():
    # Zero gradients leave m = v = 0, so the only change is the decoupled decay p·(1 − lr·wd).
    rng = np.random.default_rng(1)
    params = random_dict(rng)
    before = copy(params)
    AdamW(weight_decay=0.5).step(params, {k: np.zeros(s) for k, s in SHAPES.items()}, 0.1)
    for k in SHAPES:
        factor = 1.0 if k in NO_DECAY else 1 - 0.1 * 0.5
        np.testing.assert_array_equal(params[k], before[k] * factor, err_msg=k)


@pytest.mark.parametrize("make", [AdamW, Muon, Combined])
def test_state_dict_round_trip_continues_bit_for_bit(make, tmp_path):
    rng = np.random.default_rng(2)
    names = MUON if make is Muon else SHAPES
    params = {k: a for k, a in random_dict(rng, np.float32).items() if k in names}
    grad_seq = [{k: a for k, a in random_dict(rng, np.float32).items() if k in names} for _ in range(6)]

    opt = make()
    run(opt, params, grad_seq[:3])
    np.savez(tmp_path / "ckpt.npz", **{"param." + k: a for k, a in params.items()},
             **{"optim." + k: a for k, a in opt.state_dict().items()})
    run(opt, params, grad_seq[3:])

    saved = dict(np.load(tmp_path / "ckpt.npz"))
    resumed_params = {k[6:]: a for k, a in saved.items() if k.startswith("param.")}
    resumed = make()
    resumed.load_state_dict({k[6:]: a for k, a in saved.items() if k.startswith("optim.")})
    run(resumed, resumed_params, grad_seq[3:])
    for k in params:
        assert resumed_params[k].dtype == np.float32
        np.testing.assert_array_equal(resumed_params[k], params[k], err_msg=k)


def test_clip_grad_norm_scales_large_gradients():
    grads = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([[0.0], [4.0]], dtype=np.float32)}
    norm = clip_grad_norm(grads, 1.0)
    assert isinstance(norm, float) and norm == 5.0
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], [[0.0], [0.8]], rtol=1e-6)
    assert grads["a"].dtype == np.float32
    assert clip_grad_norm(grads, 1.0) == pytest.approx(1.0, rel=1e-6)


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, -0.4])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(0.5, rel=1e-15)
    np.testing.assert_array_equal(grads["a"], [0.3, -0.4])


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_reports_non_finite_without_scaling(bad):
    grads = {"a": np.array([1.0, bad]), "b": np.array([100.0])}
    norm = clip_grad_norm(grads, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) == math.isnan(bad))
    np.testing.assert_array_equal(grads["b"], [100.0])


def test_clip_grad_norm_does_not_overflow_float32():
    grads = {"a": np.full(4, 1e30, dtype=np.float32)}  # g² overflows float32, not float64
    assert clip_grad_norm(grads, 1.0) == pytest.approx(2e30, rel=1e-6)
    np.testing.assert_allclose(grads["a"], 0.5, rtol=1e-6)


def test_lr_cosine_with_warmup():
    lr = lambda s: lr_at(s, 100, 1.0, warmup=10, schedule="cosine", min_lr_frac=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)                    # first warm-up step: 1/10
    assert lr(9) == pytest.approx(1.0)                    # end of warm-up
    assert lr(10) == pytest.approx(1.0)                   # decay starts at the top
    assert lr(55) == pytest.approx(0.55)                  # half way: (1 + 0.1)/2
    assert lr(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr(100) == pytest.approx(0.1) and lr(150) == pytest.approx(0.1)


def test_lr_trapezoid_reference():
    lr = lambda s: lr_at(s, 100, 8e-3, schedule="trapezoid")  # noqa: E731  no warm-up, cool-down 0.5
    assert lr(0) == 8e-3
    assert lr(49) == 8e-3
    assert lr(50) == pytest.approx(8e-3)                  # start of the cool-down
    assert lr(75) == pytest.approx(4e-3)                  # half way down
    assert lr(99) == pytest.approx(8e-3 / 50)             # last step: one step above 0
    assert lr(100) == 0.0


def test_lr_trapezoid_with_warmup_and_floor():
    lr = lambda s: lr_at(s, 200, 1.0, warmup=20, schedule="trapezoid", cooldown_frac=0.25,  # noqa: E731
                         min_lr_frac=0.2)
    assert lr(0) == pytest.approx(0.05) and lr(19) == pytest.approx(1.0)
    assert lr(150) == pytest.approx(1.0)                  # cool-down starts at step 200 − 50
    assert lr(175) == pytest.approx(0.6)
    assert lr(199) == pytest.approx(0.2 + 0.8 / 50)
    assert lr(200) == pytest.approx(0.2)


def test_lr_constant_and_errors():
    assert lr_at(0, 10, 0.5, schedule="constant") == 0.5
    assert lr_at(9, 10, 0.5, schedule="constant") == 0.5
    assert lr_at(1, 10, 0.5, warmup=4, schedule="constant") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 10, 0.5, schedule="linear")
    with pytest.raises(ValueError, match="cooldown_frac"):
        lr_at(0, 10, 0.5, schedule="trapezoid", cooldown_frac=0.0)


@pytest.mark.parametrize("shape", [(16, 16), (64, 64), (32, 96), (96, 32), (64, 256), (256, 64), (3, 50)])
def test_newton_schulz_singular_values_in_band(shape):
    G = np.random.default_rng(3).standard_normal(shape)
    X = newton_schulz(G)
    assert X.dtype == np.float32 and X.shape == shape
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    s_out = np.linalg.svd(X, compute_uv=False)
    assert 0.6 < s_out.min() and s_out.max() < 1.25
    # Only the singular values move: Uᵀ X V is diagonal.
    core = U.T @ X @ Vt.T
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=2e-4)


@pytest.mark.parametrize("shape,scale", [((8, 32), 2.0), ((32, 8), 1.0), ((8, 8), 1.0)])
def test_muon_two_steps_by_hand(shape, scale):
    rng = np.random.default_rng(4)
    W = rng.standard_normal(shape)
    g1, g2 = rng.standard_normal(shape), rng.standard_normal(shape)
    params, opt, lr, mu = {"core.0.mlp.fc": W.copy()}, Muon(momentum=0.9), 0.02, 0.9
    opt.step(params, {"core.0.mlp.fc": g1.copy()}, lr)
    M = g1                                                # M = μ·0 + g1
    W1 = W - lr * scale * newton_schulz(g1 + mu * M).astype(W.dtype)  # scale = √max(1, d_out/d_in)
    np.testing.assert_allclose(params["core.0.mlp.fc"], W1, rtol=0, atol=1e-12)
    opt.step(params, {"core.0.mlp.fc": g2.copy()}, lr)
    M = mu * M + g2
    W2 = W1 - lr * scale * newton_schulz(g2 + mu * M).astype(W.dtype)
    np.testing.assert_allclose(params["core.0.mlp.fc"], W2, rtol=0, atol=1e-12)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon().step({"final_norm": np.ones(4)}, {"final_norm": np.ones(4)}, 0.1)


def test_combined_routes_each_name():
    rng = np.random.default_rng(5)
    params, grads = random_dict(rng), random_dict(rng)
    opt = Combined(muon_lr_ratio=3.0)
    adamw_only, muon_only = AdamW(), Muon()
    expect_a, expect_m = copy(params), copy(params)
    opt.step(params, copy(grads), 1e-2)
    adamw_only.step(expect_a, {k: g.copy() for k, g in grads.items() if k not in MUON}, 1e-2)
    muon_only.step(expect_m, {k: g.copy() for k, g in grads.items() if k in MUON}, 3e-2)
    for k in SHAPES:
        np.testing.assert_array_equal(params[k], (expect_m if k in MUON else expect_a)[k], err_msg=k)
    state = opt.state_dict()
    assert state["adamw.step"] == 1
    assert {k[len("muon.m."):] for k in state if k.startswith("muon.")} == MUON
    assert {k[len("adamw.m."):] for k in state if k.startswith("adamw.m.")} == set(SHAPES) - MUON


@pytest.mark.parametrize("make", [AdamW, Combined])
def test_float32_follows_float64(make):
    rng = np.random.default_rng(6)
    p64, grad_seq = random_dict(rng), [random_dict(rng) for _ in range(4)]
    p32 = {k: a.astype(np.float32) for k, a in p64.items()}
    opt64, opt32 = make(), make()
    run(opt64, p64, grad_seq, lr=1e-3)
    run(opt32, p32, [{k: a.astype(np.float32) for k, a in g.items()} for g in grad_seq], lr=1e-3)
    for k in SHAPES:
        assert p32[k].dtype == np.float32 and p64[k].dtype == np.float64
        np.testing.assert_allclose(p32[k], p64[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for k, a in opt32.state_dict().items():
        assert isinstance(a, int) or a.dtype == np.float32, k
