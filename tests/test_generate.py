"""Generation: the KV-cached decoder against full-sequence recomputation (logits to 1e-12 in
float64, tokens exactly), for several loop counts and model variants; adaptive depth at ε = 0
against fixed depth; batches against one prompt at a time; the context limit. The decoding
options against references built apart from them: the sliding cache against a windowed full
forward, k KV slots against the per-step cache rewritten as k slots hold it, warm start against a
full forward from the chained states, speculative greedy decoding against plain greedy decoding,
speculative sampling against the exact distribution (χ²)."""

from dataclasses import replace

import numpy as np
import pytest

from minparcae import generate as G
from minparcae import model as M
from minparcae.ops import REFERENCE

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


def test_a_decoder_fuses_the_qkv_weights_once():
    cfg = M.Config(vocab_size=64, context=16, d_model=16, n_head=2)
    p = M.init_params(cfg, seed=0, dtype=np.float64)
    fused = M.with_fused_qkv(p, cfg)
    assert M.with_fused_qkv(fused, cfg) is fused  # not copied again for every token
    dec = G.Decoder(p, cfg, 1)
    assert isinstance(dec.p, M.FusedParams)
    ids = np.arange(6)[None]
    logits = np.concatenate([dec.feed(ids[:, i:i + 1])[0] for i in range(6)], axis=1)
    assert np.abs(logits - M.forward(p, cfg, ids)[0]).max() < 1e-12


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
    """4 + 20 tokens run past the context of 16: with past_context="recompute" the cached generator
    recomputes the window there, like the reference; inside the context the sliding cache (the
    default) is the same generator."""
    cfg = tiny_cfg(**VARIANTS[variant])
    p = perturbed_params(cfg)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 4))
    for T in (2, 5):
        cached = G.generate(p, cfg, prompt, 20, n_loops=T, temperature=0, past_context="recompute")
        plain = G.generate(p, cfg, prompt, 20, n_loops=T, temperature=0, cache=False)
        assert cached == plain and len(cached[0]) == 20
        sliding = G.generate(p, cfg, prompt, 20, n_loops=T, temperature=0)
        assert [row[:12] for row in sliding] == [row[:12] for row in plain]  # 4 + 12 = the context


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
    with pytest.raises(ValueError, match="need the cached decoder"):
        G.generate(p, cfg, [[1, 2]], 3, adaptive="kl", cache=False)
    with pytest.raises(ValueError, match="must be 'state', 'kl' or None"):
        G.Decoder(p, cfg, 1, adaptive="entropy")
    dec = G.Decoder(p, cfg, 1, capacity=4)
    dec.feed([[1, 2, 3]])
    with pytest.raises(ValueError, match="3 \\+ 2 positions exceed the KV cache's capacity 4"):
        dec.feed([[4, 5]])
    with pytest.raises(ValueError, match="runs 1 to 3 of them, not 4"):
        dec.feed([[4]], n_loops=4)
    with pytest.raises(ValueError, match="kv_slots must be at least 1"):
        G.Decoder(p, cfg, 1, kv_slots=0)
    with pytest.raises(ValueError, match="past_context must be 'slide' or 'recompute'"):
        G.generate(p, cfg, [[1, 2]], 3, past_context="wrap")
    with pytest.raises(ValueError, match="need the cached decoder"):
        G.generate(p, cfg, [[1, 2]], 3, warm_start=True, cache=False)
    with pytest.raises(ValueError, match="one sequence at a time"):
        G.generate(p, cfg, [[1, 2], [3, 4]], 3, speculative=(2, 1))
    with pytest.raises(ValueError, match="must be below the full depth"):
        G.generate(p, cfg, [[1, 2]], 3, n_loops=3, speculative=(2, 3))
    with pytest.raises(ValueError, match="do not combine it with adaptive depth"):
        G.generate(p, cfg, [[1, 2]], 3, adaptive="kl", speculative=(2, 1))
    with pytest.raises(ValueError, match="has no loop to stop"):
        G.generate(p, tiny_cfg(injection="none"), [[1, 2]], 3, speculative=(2, 1))
    with pytest.raises(ValueError, match="longer than the context"):
        G.long_text_losses(p, cfg, np.ones((1, 16), int))
    with pytest.raises(ValueError, match="needs an rng"):
        G.evaluate(p, tiny_cfg(eval_state="like-init"), [(np.ones((1, 4), int),) * 2])
    # what a caller of the API gets wrong: one sentence each, not NumPy's error or a silent default
    bad = [(dict(prompt=[[1, 2, 3], [4, 5]]), "same number of tokens"),
           (dict(speculative=(2, 1), past_context="recompute"), "no past_context='recompute'"),
           (dict(n_loops=0), "loop count must be a whole number of at least 1, not 0"),
           (dict(n_loops=0, cache=False), "at least 1, not 0"),
           (dict(temperature=-1.0), "temperature must be 0"),
           (dict(top_k=-3), "top_k must be at least 1"),
           (dict(top_p=0.0), "top_p must be in"),
           (dict(prompt=[[1, 50]]), "must lie in 0..49"),
           (dict(prompt=[[-1, 2]]), "must lie in 0..49"),
           (dict(prompt=[[1.5, 2.0]]), "must be integers")]
    for kw, message in bad:
        kw = {"prompt": [[1, 2]], **kw}
        with pytest.raises(ValueError, match=message):
            G.generate(p, cfg, kw.pop("prompt"), 3, **kw)
    with pytest.raises(ValueError, match="epsilon must not be negative, not -1"):
        G.Decoder(p, cfg, 1, epsilon=-1)
    with pytest.raises(ValueError, match="longer than the model's context"):
        G.evaluate(p, cfg, [(np.ones((1, 20), int),) * 2], adaptive="kl")
    with pytest.raises(ValueError, match="ids of shape \\(B, L\\)"):
        G.long_text_losses(p, cfg, np.ones(40, int))


def test_a_shallow_feed_lends_its_last_steps_keys_to_the_deeper_slots():
    """feed(ids, n_loops=k) below the decoder's depth leaves the core slots of steps k..T−1 unwritten
    at those positions; they get step k−1's keys and values (as a token that exits early lends
    them), so a later full-depth token reads those, never the cache's uninitialised memory."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 7))
    T, k = 4, 2
    shallow = G.Decoder(p, cfg, 2, T)
    for slot in shallow.kv.slots.values():  # what np.empty might hold
        for a in slot:
            a[...] = np.nan
    shallow.feed(ids[:, :6], n_loops=k)
    got = shallow.feed(ids[:, 6:])[0]
    assert np.isfinite(got).all()
    by_hand = G.Decoder(p, cfg, 2, T)
    by_hand.feed(ids[:, :6], n_loops=k)
    for i in range(cfg.n_recurrent):
        for t in range(k, T):
            for a, b in zip(by_hand.kv.slots[f"core.{i}", t], by_hand.kv.slots[f"core.{i}", k - 1]):
                a[:, :, :6] = b[:, :, :6]
    assert np.abs(got - by_hand.feed(ids[:, 6:])[0]).max() < LOGIT_TOL


def test_the_decoder_is_the_models_own_code():
    """The cached decoder runs model.forward (with a KVCache): no second implementation of the
    model exists in generate.py to drift from it."""
    import inspect
    source = inspect.getsource(G)
    for layer_code in ("attention.forward", "rmsnorm.forward", "mlp.forward", "block_forward"):
        assert layer_code not in source


# ----------------------------------------------------------------------------- decoding options


class WindowAttention:
    """ops/attention with a sliding-window mask over a whole sequence: position i attends to
    positions i − window + 1 .. i. The reference for the sliding KV cache."""

    def __init__(self, window):
        self.window = window

    def forward(self, q, k, v, scale, kv=None):
        assert kv is None
        H, n = q.shape[1], q.shape[2]
        kk = np.repeat(k, H // k.shape[1], axis=1)
        vv = np.repeat(v, H // v.shape[1], axis=1)
        s = q @ kk.swapaxes(-1, -2) * scale
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        s = np.where((j > i) | (j <= i - self.window), -np.inf, s)
        w = np.exp(s - s.max(axis=-1, keepdims=True))
        return (w / w.sum(axis=-1, keepdims=True)) @ vv, None


def window_reference(p, cfg, ids, T):
    """Logits of every position of a sequence longer than the context, each attending to the last
    cfg.context positions, from one full forward at absolute positions."""
    longer = replace(cfg, context=ids.shape[1])
    return M.forward(p, longer, ids, n_loops=T,
                     ops=REFERENCE._replace(attention=WindowAttention(cfg.context)))[0]


@pytest.mark.parametrize("variant", ["diagonal", "grouped-value-embeddings-wide-state"])
def test_the_sliding_cache_is_a_window_over_absolute_positions(variant):
    """Past the context, the sliding cache's logits equal a full forward in which every position
    attends to the last cfg.context positions (rotary and seeded states at absolute positions), to
    1e-12; inside the context they equal the model's. long_text_losses reads the same logits, and
    its "recompute" losses are those of the plain window forward."""
    cfg = tiny_cfg(**VARIANTS[variant])
    p = perturbed_params(cfg)
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, (2, 40))
    T = 3
    ref = window_reference(p, cfg, ids, T)
    dec = G.Decoder(p, cfg, 2, T, slide=True)
    first = dec.feed(ids[:, :10])[0]
    rest = dec.feed(ids[:, 10:])[0]  # crosses the capacity: one token at a time from there
    got = np.concatenate([first, rest], axis=1)
    assert dec.length == 40 and dec.kv.capacity == cfg.context
    assert np.abs(got - ref).max() < LOGIT_TOL
    assert np.abs(got[:, :16] - reference_logits(p, cfg, ids[:, :16], T)).max() < LOGIT_TOL
    logp = ref - np.log(np.exp(ref).sum(axis=-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    assert np.abs(G.long_text_losses(p, cfg, ids, T) - want).max() < 1e-10
    recomputed = G.long_text_losses(p, cfg, ids, T, past_context="recompute")
    for i in (16, 25, 38):  # the prediction of ids[:, i + 1] from the window ending at i
        z = reference_logits(p, cfg, ids[:, i - 15:i + 1], T)[:, -1]
        lp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        assert np.abs(recomputed[:, i] + lp[np.arange(2), ids[:, i + 1]]).max() < 1e-10
    assert np.abs(recomputed[:, :15] - want[:, :15]).max() < 1e-10  # inside the context: the same


def test_a_sliding_cache_past_its_capacity_refuses_chunks_and_rewinds():
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    dec = G.Decoder(p, cfg, 1, 3, capacity=8, slide=True)
    dec.feed([list(range(8))])
    kv = dec.kv
    with pytest.raises(ValueError, match="one token at a time past its capacity 8"):
        M.forward(p, cfg, np.array([[1, 2]]), n_loops=3, kv=kv)
    dec.feed([[9]])
    with pytest.raises(ValueError, match="cannot rewind"):
        dec.rewind(8)
    with pytest.raises(ValueError, match="more than its context"):
        M.forward(p, cfg, np.array([[1]]), kv=M.KVCache(cfg, 1, 32, 3, slide=True))


def slot_policy_reference(p, cfg, ids, T, k):
    """The k-slot policy built from the exact per-step cache: after each token, every step-t slot
    of its position is overwritten with the keys of its latest step that maps to slot t mod k, which
    is what a k-slot cache holds for it."""
    dec = G.Decoder(p, cfg, ids.shape[0], T)
    rows = []
    for i in range(ids.shape[1]):
        rows.append(dec.feed(ids[:, i:i + 1])[0])
        for layer in range(cfg.n_recurrent):
            latest = {t: max(u for u in range(T) if u % k == t % k) for t in range(T)}
            kept = {u: [a[:, :, i].copy() for a in dec.kv.slots[f"core.{layer}", u]] for u in range(T)}
            for t in range(T):
                for a, src in zip(dec.kv.slots[f"core.{layer}", t], kept[latest[t]]):
                    a[:, :, i] = src
    return np.concatenate(rows, axis=1)


def test_fewer_kv_slots_read_each_positions_latest_step():
    """kv_slots = k < T: step t writes and reads slot t mod k. Token by token its logits equal the
    per-step cache rewritten as a k-slot cache holds it; k ≥ T is the exact decoder; the cache
    shrinks to k core slots per layer; evaluate() reports the policy's loss."""
    cfg = tiny_cfg(value_embeddings=True, n_kv_head=1)
    p = perturbed_params(cfg)
    ids = np.random.default_rng(12).integers(0, cfg.vocab_size, (2, 9))
    T = 5
    exact = reference_logits(p, cfg, ids, T)
    for k in (1, 2, 3):
        dec = G.Decoder(p, cfg, 2, T, kv_slots=k)
        got = np.concatenate([dec.feed(ids[:, i:i + 1])[0] for i in range(9)], axis=1)
        assert np.abs(got - slot_policy_reference(p, cfg, ids, T, k)).max() < LOGIT_TOL, k
        assert np.abs(got - exact).max() > 1e-3  # an approximation, visibly
        per_step = G.Decoder(p, cfg, 2, T).kv
        core = cfg.n_recurrent * 2 * 2 * cfg.d_model  # k and v, batch 2, per position per slot
        assert per_step.nbytes - dec.kv.nbytes == (T - k) * core * cfg.context * 8
        assert dec.kv.bytes_per_position() * cfg.context == dec.kv.nbytes
    dec = G.Decoder(p, cfg, 2, T, kv_slots=T + 2)
    got = np.concatenate([dec.feed(ids[:, i:i + 1])[0] for i in range(9)], axis=1)
    assert dec.kv_slots == T and np.abs(got - exact).max() < LOGIT_TOL
    x, y = ids[:, :-1], ids[:, 1:]
    loss, loops = G.evaluate(p, cfg, [(x, y)], T, kv_slots=1)
    z = slot_policy_reference(p, cfg, x, T, 1)
    lp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    assert abs(loss + np.take_along_axis(lp, y[..., None], axis=-1).mean()) < 1e-10 and loops == T


def test_warm_start_begins_each_token_from_the_previous_final_state():
    """A warm-started decoder equals one full forward whose initial states are, position by
    position, the seeded state for the first and the previous position's state after T steps
    (from model.state_after on the prefix) for the others."""
    cfg = tiny_cfg(d_state=24)
    p = perturbed_params(cfg)
    ids = np.random.default_rng(13).integers(0, cfg.vocab_size, (2, 7))
    T = 4
    h0 = M.initial_state(cfg, (2, 1, 24), "seeded", dtype=np.float64)
    for i in range(1, 7):
        h0 = np.concatenate([h0, M.state_after(p, cfg, ids[:, :i], T, h0)[:, -1:]], axis=1)
    ref = M.forward(p, cfg, ids, n_loops=T, h0=h0)[0]
    dec = G.Decoder(p, cfg, 2, T, warm_start=True)
    got = np.concatenate([dec.feed(ids[:, :3])[0], dec.feed(ids[:, 3:])[0]], axis=1)
    assert np.abs(got - ref).max() < LOGIT_TOL
    assert np.abs(got[:, 1:] - reference_logits(p, cfg, ids, T)[:, 1:]).max() > 1e-3
    with pytest.raises(ValueError, match="cannot rewind"):
        dec.rewind(3)
    # with an exit rule: the state a token stopped at is the next one's start
    loss, loops = G.evaluate(p, cfg, [(ids[:, :-1], ids[:, 1:])], 6, adaptive="state", epsilon=0.05,
                             warm_start=True)
    assert np.isfinite(loss) and 1 <= loops <= 6


@pytest.mark.parametrize("gamma, draft", [(1, 1), (3, 1), (4, 2)])
def test_greedy_speculative_decoding_is_plain_greedy_decoding(gamma, draft):
    """Drafted at T_draft and verified at T, greedy output equals the plain cached decoder's at T,
    token for token, also past the context (4 + 30 tokens, context 16) and with a stop token."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    prompt = np.random.default_rng(14).integers(0, cfg.vocab_size, (1, 4))
    T = 4
    plain = G.generate(p, cfg, prompt, 30, n_loops=T, temperature=0)
    stats = {}
    spec = G.generate(p, cfg, prompt, 30, n_loops=T, temperature=0, speculative=(gamma, draft),
                      stats=stats)
    assert spec == plain and len(spec[0]) == 30
    assert stats["rounds"] > 0 and 0 <= stats["accepted"] <= stats["drafted"] == gamma * stats["rounds"]
    stop = plain[0][7]
    assert G.generate(p, cfg, prompt, 30, n_loops=T, temperature=0, speculative=(gamma, draft),
                      stop_id=stop) == [plain[0][:plain[0].index(stop)]]


def _chi_square_limit(df, z=3.719):  # the 1e-4 upper quantile, Wilson–Hilferty
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_draws_from_the_full_model():
    """With sampling, the first two tokens' joint distribution is the full-T model's, exactly
    computed over all V² pairs (V = 6; the draft at T_draft = 1 is 0.23 from it in total variation): a χ² test
    at p = 1e-4 over 1,200 draws accepts it, and the same test rejects the draft model's own
    samples, so it has the power to see a wrong distribution."""
    cfg = tiny_cfg(vocab_size=6, logit_scale=0.5, n_prelude=0, n_recurrent=1, mean_recurrence=3)
    p = perturbed_params(cfg, seed=1, scale=0.5)
    prompt = np.array([[1]])
    T, draft, V, n = 3, 1, 6, 1200

    def joint(loops):
        first = np.exp(M.forward(p, cfg, prompt, n_loops=loops)[0][0, -1])
        first /= first.sum()
        pairs = np.array([[a, b] for a in range(V) for b in range(V)])
        seqs = np.concatenate([np.repeat(prompt, V * V, axis=0), pairs[:, :1]], axis=1)
        second = np.exp(M.forward(p, cfg, seqs, n_loops=loops)[0][:, -1])
        second /= second.sum(axis=-1, keepdims=True)
        return first[pairs[:, 0]] * second[np.arange(V * V), pairs[:, 1]]

    full, drafted = joint(T), joint(draft)
    assert 0.5 * np.abs(full - drafted).sum() > 0.1  # the draft is a different model
    rng = np.random.default_rng(15)
    counts = np.zeros(V * V)
    accepted = 0
    for _ in range(n):
        stats = {}
        a, b = G.generate(p, cfg, prompt, 2, n_loops=T, temperature=1.0, speculative=(2, draft),
                          rng=rng, stats=stats)[0]
        counts[a * V + b] += 1
        accepted += stats["accepted"]
    assert 0 < accepted < 2 * n  # drafts were both kept and rejected

    def chi2(expected_p):
        keep = expected_p * n >= 5  # pool the rare pairs into one cell
        e = np.append(expected_p[keep] * n, expected_p[~keep].sum() * n)
        o = np.append(counts[keep], counts[~keep].sum())
        return ((o - e) ** 2 / e).sum(), len(e) - 1

    stat, df = chi2(full)
    assert stat < _chi_square_limit(df), (stat, df)
    stat, df = chi2(drafted)
    assert stat > _chi_square_limit(df), (stat, df)
