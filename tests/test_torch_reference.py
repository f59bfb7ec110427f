"""minparcae against an independent PyTorch autograd reference (bench/torch_parcae.py), in float64.

Finite differences check the hand-written backward on models of width 8; this checks the loss and
every parameter gradient on a model too large for them (width 64, 4 heads, 32 positions), for each
injection, and for the remaining features together. Measured: the loss agrees to 4e-16 and the
worst normwise relative gradient error over all parameters is 1.9e-15 to 2.5e-15 in every case,
far inside TOL.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import torch_parcae  # noqa: E402  (needs torch)
from minparcae import model as M  # noqa: E402
from minparcae import optim  # noqa: E402

TOL = 1e-10  # normwise relative error per parameter, and relative error of the loss


def config(**kw):
    base = dict(vocab_size=97, context=32, d_model=64, n_head=4, n_prelude=1, n_recurrent=2,
                n_coda=1, mean_recurrence=4, backprop_depth=2)
    base.update(kw)
    return M.Config(**base)


def perturbed_params(cfg, seed=0):
    """Initial parameters plus noise of a similar size, so that zero output projections and
    gates, unit norms and the identity B hide nothing."""
    p = M.init_params(cfg, seed=seed, dtype=np.float64, xp=np)
    rng = np.random.default_rng(seed + 1)
    noise = {1: 0.2, 2: 0.5 * M.init_std(cfg.d_model)}
    return {k: v + noise[v.ndim] * rng.standard_normal(v.shape) for k, v in p.items()}


def batch(cfg, B=3, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    targets = rng.integers(0, cfg.vocab_size, (B, cfg.context))
    targets[0, :3] = -1  # ignored positions
    h0 = 10 * M.initial_state(cfg, (B, cfg.context, cfg.d_h), "like-init", rng, np.float64)
    return ids, targets, h0


def relative_errors(cfg, depths):
    p = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg, B=len(depths))
    loss, cache, _ = M.forward(p, cfg, ids, targets, depths=np.array(depths), h0=h0, train=True)
    grads = M.backward(p, cfg, cache)
    ref_loss, ref_grads = torch_parcae.loss_and_grads(p, cfg, ids, targets, depths, h0)
    assert set(ref_grads) == set(grads) == set(M.param_shapes(cfg))
    errors = {"loss": abs(loss - ref_loss) / abs(ref_loss)}
    for name, g in ref_grads.items():
        assert np.abs(g).max() > 1e-8, f"{name}: zero gradient, the comparison would be empty"
        errors[name] = np.linalg.norm(grads[name] - g) / np.linalg.norm(g)
    return errors


@pytest.mark.parametrize("kind", ["diagonal", "linear", "add", "none"])
def test_gradients_match_torch(kind):
    """Every sequence at depth 4, the last 2 steps with gradient (none: the blocks once)."""
    errors = relative_errors(config(injection=kind), depths=[4, 4, 4])
    assert max(errors.values()) < TOL, errors


def test_gradients_match_torch_all_features():
    """Value embeddings, grouped-query heads, a wider loop state, per-sequence depths shorter and
    longer than μ_bwd, an untied head, a logit scale and a soft-cap."""
    cfg = config(value_embeddings=True, n_kv_head=2, d_state=96, tie_embeddings=False,
                 logit_scale=1.5, logit_softcap=3.0)
    errors = relative_errors(cfg, depths=[1, 3, 6])
    assert max(errors.values()) < TOL, errors


def test_gradients_match_torch_official_shapes():
    """What the official configs can set beyond that: the recurrent block's own head count (every
    head with its own k and v while the prelude and coda group theirs) and MLP widths, and no
    norm between the prelude and the loop."""
    cfg = config(value_embeddings=True, n_kv_head=2, n_recurrent_head=8, d_mlp=100,
                 d_mlp_recurrent=72, prelude_norm=False)
    errors = relative_errors(cfg, depths=[2, 5, 3])
    assert max(errors.values()) < TOL, errors


def test_training_step_matches_torch():
    """One AdamW step of each side from the same parameters lands on the same parameters, so the
    benchmark times the same work."""
    cfg = config(value_embeddings=True)
    p0 = perturbed_params(cfg)
    ids, targets, h0 = batch(cfg)
    depths = [4, 4, 4]
    step = torch_parcae.TrainStep(p0, cfg, decay=lambda k, s: not optim.no_weight_decay(k, s), lr=1e-2)
    ids_t, targets_t, h0_t = step.batch(ids, targets, h0)
    step(ids_t, targets_t, depths, h0_t)
    p = {k: v.copy() for k, v in p0.items()}
    _, cache, _ = M.forward(p, cfg, ids, targets, depths=np.array(depths), h0=h0, train=True)
    optim.AdamW().step(p, M.backward(p, cfg, cache), lr=1e-2)
    for name, t in step.p.items():  # relative to the size of the update
        err = np.linalg.norm(p[name] - t.detach().numpy()) / np.linalg.norm(p[name] - p0[name])
        assert err < TOL, (name, err)
