"""Generation: the KV-cached decoder against full-sequence recomputation (logits to 1e-12 in
float64, tokens exactly), for several loop counts and model variants; adaptive depth at ε = 0
against fixed depth; batches against one prompt at a time; the context limit."""

import numpy as np
import pytest

from minparcae import generate as G
from minparcae import model as M

LOGIT_TOL = 1e-12  # float64; measured differences are about 1e-14


def tiny_cfg(**kw):
    base = dict(vocab_size=50, context=16, d_model=16, n_head=2, n_prelude=1, n_recurrent=2,
                n_coda=1, mean_recurrence=3, backprop_depth=2)
    base.update(kw)
    return M.Config(**base)


def perturbed_params(cfg, seed=0, scale=0.3):
    """Initial parameters plus noise: at init the attention and MLP outputs are zero, which would
    leave the cache untested."""
    p = M.init_params(cfg, seed=seed, dtype=np.float64, xp=np)
    rng = np.random.default_rng(seed + 1)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in p.items()}


def reference_logits(p, cfg, ids, n_loops):
    """model.forward on the whole sequence, from its evaluation state."""
    return M.forward(p, cfg, ids, n_loops=n_loops)[0]


VARIANTS = {
    "diagonal": {},
    "grouped-value-embeddings-wide-state": dict(value_embeddings=True, n_kv_head=1, d_state=24),
    "linear": dict(injection="linear"),
    "fixed-depth": dict(injection="none"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_recomputation(variant):
    """Prefill 5 tokens in one pass, then decode 9 one at a time: every position's logits match the
    full forward at each loop count, fewer and more than μ_rec."""
    cfg = tiny_cfg(**VARIANTS[variant])
    p = perturbed_params(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 14))
    for T in (1, 3, 7):
        dec = G.Decoder(p, cfg, 2, T)
        steps = [dec.feed(ids[:, :5])] + [dec.feed(ids[:, i:i + 1]) for i in range(5, 14)]
        logits = np.concatenate([s[0] for s in steps], axis=1)
        loops = np.concatenate([s[1] for s in steps], axis=1)
        ref = reference_logits(p, cfg, ids, T)
        assert np.abs(logits - ref).max() < LOGIT_TOL, (variant, T)
        assert (loops == (T if cfg.looped else 1)).all()


@pytest.mark.parametrize("variant", ["diagonal", "grouped-value-embeddings-wide-state"])
def test_greedy_tokens_equal_the_reference_generator(variant):
    """4 + 20 tokens run past the context of 16: the cached generator recomputes the window there,
    like the reference."""
    cfg = tiny_cfg(**VARIANTS[variant])
    p = perturbed_params(cfg)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 4))
    for T in (2, 5):
        cached = G.generate(p, cfg, prompt, 20, n_loops=T, temperature=0)
        plain = G.generate(p, cfg, prompt, 20, n_loops=T, temperature=0, cache=False)
        assert cached == plain and len(cached[0]) == 20


def test_sampling_equals_the_reference_generator():
    """Temperature, top-k and top-p draw the same tokens from the same rng, from the seeded and the
    zero evaluation state. A random one ("like-init") is drawn afresh wherever a position runs, so
    there the two generators differ, but each repeats itself with the same rng."""
    kw = dict(n_loops=4, temperature=0.9, top_k=20, top_p=0.9)
    for cfg in (tiny_cfg(), tiny_cfg(eval_state="zero")):
        p = perturbed_params(cfg)
        prompt = np.random.default_rng(5).integers(0, cfg.vocab_size, (3, 3))
        cached = G.generate(p, cfg, prompt, 10, rng=np.random.default_rng(6), **kw)
        plain = G.generate(p, cfg, prompt, 10, rng=np.random.default_rng(6), cache=False, **kw)
        assert cached == plain
    cfg = tiny_cfg(eval_state="like-init")
    p = perturbed_params(cfg)
    for cache in (True, False):
        runs = [G.generate(p, cfg, prompt, 10, rng=np.random.default_rng(6), cache=cache, **kw)
                for _ in range(2)]
        assert runs[0] == runs[1]


def test_stop_id_ends_a_row():
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 4))
    full = G.generate(p, cfg, prompt, 8, temperature=0)
    stop = full[0][3]
    out, loops = G.generate(p, cfg, prompt, 8, temperature=0, stop_id=stop, return_loops=True)
    assert out[0] == full[0][:full[0].index(stop)]
    assert [len(row) for row in loops] == [len(row) for row in out]


@pytest.mark.parametrize("rule", ["state", "kl"])
def test_adaptive_depth_at_zero_epsilon_is_fixed_depth(rule):
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10))
    for T in (1, 4):
        logits, loops = G.Decoder(p, cfg, 2, T, adaptive=rule, epsilon=0.0).feed(ids)
        assert (loops == T).all()
        assert np.abs(logits - reference_logits(p, cfg, ids, T)).max() < LOGIT_TOL
    prompt = ids[:, :3]
    assert G.generate(p, cfg, prompt, 8, n_loops=4, temperature=0, adaptive=rule, epsilon=0.0) == \
        G.generate(p, cfg, prompt, 8, n_loops=4, temperature=0, cache=False)


def test_adaptive_depth_at_huge_epsilon_stops_as_early_as_it_can():
    """The state rule may stop after step 1, the kl rule after step 2 (it compares two
    predictions): every token stopping there is fixed depth 1 or 2."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10))
    for rule, first in (("state", 1), ("kl", 2)):
        logits, loops = G.Decoder(p, cfg, 2, 6, adaptive=rule, epsilon=1e9).feed(ids)
        assert (loops == first).all()
        assert np.abs(logits - reference_logits(p, cfg, ids, first)).max() < LOGIT_TOL


@pytest.mark.parametrize("rule, epsilon", [("state", 0.1), ("kl", 0.01)])
def test_adaptive_exits_reuse_the_last_computed_step(rule, epsilon):
    """With exits spread over the steps, a stopped token's keys and values at the later steps are
    those of its last step (what later tokens attend to)."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 12))
    T = 8
    dec = G.Decoder(p, cfg, 3, T, adaptive=rule, epsilon=epsilon)
    _, loops = dec.feed(ids)
    assert 2 < loops.mean() < T - 0.5 and len(np.unique(loops)) >= 3  # the rule really varies depth
    for b, pos in zip(*np.nonzero(loops < T)):
        last = loops[b, pos] - 1
        for i in range(cfg.n_recurrent):
            for s in range(last + 1, T):
                for got, want in zip(dec.kv.slots[f"core.{i}", s], dec.kv.slots[f"core.{i}", last]):
                    assert np.array_equal(got[b, :, pos], want[b, :, pos])


@pytest.mark.parametrize("adaptive, epsilon", [(None, 0.0), ("state", 0.1), ("kl", 0.01)])
def test_a_batch_equals_one_prompt_at_a_time(adaptive, epsilon):
    cfg = tiny_cfg(value_embeddings=True, n_kv_head=1)
    p = perturbed_params(cfg)
    prompts = np.random.default_rng(7).integers(0, cfg.vocab_size, (3, 4))
    kw = dict(n_loops=6, temperature=0, adaptive=adaptive, epsilon=epsilon, return_loops=True)
    out, loops = G.generate(p, cfg, prompts, 9, **kw)
    for b in range(3):
        one, one_loops = G.generate(p, cfg, prompts[b:b + 1], 9, **kw)
        assert one[0] == out[b] and one_loops[0] == loops[b]


def test_evaluate_matches_the_full_forward_loss():
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    rng = np.random.default_rng(8)
    x, y = rng.integers(0, cfg.vocab_size, (2, 2, 16))
    ref = M.forward(p, cfg, x, y, n_loops=5)[0]
    loss, loops = G.evaluate(p, cfg, [(x, y)], n_loops=5)
    assert abs(loss - ref) < 1e-10 and loops == 5
    loss, loops = G.evaluate(p, cfg, [(x, y)], n_loops=5, adaptive="kl", epsilon=0.0)
    assert abs(loss - ref) < 1e-10 and loops == 5


def test_seeded_initial_states_depend_on_the_position_only():
    cfg = tiny_cfg(d_state=24)
    whole = M.initial_state(cfg, (2, 10, 24), "seeded", dtype=np.float64)
    assert np.array_equal(whole[0], whole[1])  # the same for every row
    assert np.array_equal(whole[:, 6:], M.initial_state(cfg, (2, 4, 24), "seeded", dtype=np.float64,
                                                        start=6))
    assert np.abs(whole).max() <= 3 * M.init_std(cfg.d_model)  # truncated at ±3σ


def test_errors_are_one_sentence():
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    with pytest.raises(ValueError, match="adaptive depth needs the cached decoder"):
        G.generate(p, cfg, [[1, 2]], 3, adaptive="kl", cache=False)
    with pytest.raises(ValueError, match="must be 'state', 'kl' or None"):
        G.Decoder(p, cfg, 1, adaptive="entropy")
    dec = G.Decoder(p, cfg, 1, capacity=4)
    dec.feed([[1, 2, 3]])
    with pytest.raises(ValueError, match="3 \\+ 2 positions exceed the KV cache's capacity 4"):
        dec.feed([[4, 5]])
    with pytest.raises(ValueError, match="needs an rng"):
        G.evaluate(p, tiny_cfg(eval_state="like-init"), [(np.ones((1, 4), int),) * 2])


def test_the_decoder_is_the_models_own_code():
    """The cached decoder runs model.forward (with a KVCache): no second implementation of the
    model exists in generate.py to drift from it."""
    import inspect
    source = inspect.getsource(G)
    for layer_code in ("attention.forward", "rmsnorm.forward", "mlp.forward", "block_forward"):
        assert layer_code not in source
