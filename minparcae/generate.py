"""Text generation with the loop count chosen at test time, on the model's own code.

The plain generator (`generate(..., cache=False)`) runs the whole cropped sequence through
`model.forward` for every new token. The cached one (`Decoder`) gives `model.forward` a
`model.KVCache`: the prompt runs once (prefill), then one token at a time, each attention layer
reading the keys and values of the positions already seen:

    prelude.i, coda.i        one slot per layer                        (B, H_kv, L, hs)
    core.i at loop step t    one slot per (layer, step): T·n_r slots   (B, H_kv, L, hs)

At loop step t every position holds its own h_t, so a token at step t attends to the earlier
positions' keys and values of step t: the looped model needs a slot per step, the cache grows
with T, and a token costs T passes of the recurrent block over one position.

Initial state: cfg.eval_state. "seeded" gives position p the same h_0 in a full forward and in a
decoder that runs it alone (model.initial_state), so the two generators agree, as a test checks;
"zero" is zero; "like-init" draws a fresh random state wherever a position is run, so there the
two generators differ.

Adaptive depth (`adaptive="state"` or `"kl"`, threshold ε, at most T steps). A token stops looping
after step t when

    state:  ‖h_t − h_{t−1}‖ / ‖h_t‖ < ε
    kl:     KL(p_t ‖ p_{t−1}) < ε,    p_t = softmax(coda(h_t)),  t ≥ 2

and its prediction is the coda of its last state. The state rule costs a norm. The kl rule runs C,
the n_c coda blocks, the final norm and the V×d head after every step: about
2(d_h·d + n_c·12d² + V·d) FLOPs per token per step (plus attention) against the recurrent block's
2·n_r·12·d_h², i.e. 1.2 passes of the block in the tiny preset and 2.8 in parcae-140m, where the
head dominates. ε = 0 never stops a token early, so it equals fixed depth T.
Cache misses: a token that stopped after step t computes no keys and values at steps t+1..T; later
tokens read its step-t ones there (copied in when it stops). The alternatives cost compute (run its
final state through each later step's layers) or drop context (mask it out); the copy costs
nothing and keeps the token visible. As each token's exit depends on the ones before it, an
adaptive decoder feeds the prompt one token at a time; fixed depth prefills it in one pass.

Cache policies (`kv_slots`). None keeps a slot per loop step, as above: exact, and T·n_r core
slots per layer. An integer k < T keeps k slots per core layer: step t writes slot t mod k and
reads it, so for an earlier position a token sees the keys of that position's latest step that
mapped to the same slot (k = 1: its last step, whichever it was). Memory stops growing with T; the
answer is no longer the full model's, and how much that costs is measured, not assumed. A position
that ran fewer than k steps lends its last step's keys to the slots it never wrote. The prompt
still prefills in one pass (exact there: every position is at the same step); evaluating a policy
feeds tokens one at a time, as generation does.

Warm start (`warm_start=True`). Token i's loop starts from token i−1's final state instead of the
fixed initial state: the state lives in the same d_h space at every position, and Ā contracts
whatever it starts from, so it is used as it is. With an exit rule a token whose state starts near
where it will settle should stop sooner. Tokens are fed one at a time (each needs the previous
final state).

Past the context (`past_context`). Rotary scores depend only on the distance between positions,
so "slide" (the default) keeps the last cfg.context positions in a sliding KV cache
(model.KVCache slide=True) and a new token costs what it cost inside the context. The kept keys
were computed while older positions were in view, so this is not identical to running the model
on the window; "recompute" does that: each token past the context recomputes the last cfg.context
tokens from scratch, as the plain generator does (and as slowly).

Self-speculative decoding (`speculative`). The loop is its own draft model: γ tokens are drafted
at T_draft < T loop steps, then one pass at the full T verifies them all, and the longest agreeing
prefix is kept plus one token from the full model. A draft token at step t < T_draft computes
exactly what the full model computes at step t (the earlier positions' step-t keys are in the
cache), so the draft is the full model stopped early. Greedy decoding keeps a draft token when it is
the full model's argmax, so the output equals plain greedy decoding at T; sampling keeps draft
token d with probability min(1, p(d)/q(d)) and on a rejection draws from max(0, p − q) normalised
(p: full model, q: draft, after temperature, top-k and top-p), which makes the output distribution
exactly the full model's (Leviathan et al. 2023, Chen et al. 2023). One sequence at a time. A
verify pass writes γ + 1 positions at once, which a sliding cache cannot take past its capacity
(the chunk would overwrite keys its own earlier queries read), so once the cache is full (past the
context, or from the start when the prompt fills the context) it decodes token by token at full
depth, drafting nothing; `stats` counts the drafts and rounds. It slides past the context: there is
no "recompute" variant.
"""

import argparse
import time

import numpy as np
from tqdm import tqdm

from . import backend, model
from .backend import array_module, to_host
from .ops import REFERENCE

ADAPTIVE = (None, "state", "kl")


def token_probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution sampling draws from, per row of logits (B, V), on the host in float64:
    softmax(logits / temperature) restricted to the top_k tokens and/or the smallest set whose
    probability reaches top_p, renormalised. temperature must be positive."""
    z = np.asarray(to_host(logits), dtype=np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row of logits (B, V) on the host: greedy at temperature 0, else a draw
    from token_probabilities."""
    if temperature == 0:
        return np.asarray(to_host(logits), dtype=np.float64).argmax(axis=-1)
    p = token_probabilities(logits, temperature, top_k, top_p)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def _log_softmax(z):
    xp = array_module(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


PAST_CONTEXT = ("slide", "recompute")


class Decoder:
    """A batch of B sequences being decoded: the KV cache, the exit rule and the warm-start state.

    `feed(ids)` runs new tokens (B, n) at positions length..length+n−1 and returns their logits
    (B, n, V) and loop counts (B, n). The cache holds `capacity` positions (default cfg.context),
    with `kv_slots` core slots per layer (None: one per loop step) and, with slide=True, slides past
    its capacity one token at a time; `clear()` forgets every position. rng draws the initial states
    when cfg.eval_state is "like-init". See the module docstring for each option. The weights must not
    change while a Decoder decodes: it keeps a fused copy of the q, k, v projections."""

    def __init__(self, params, cfg, batch, n_loops=None, adaptive=None, epsilon=1e-3,
                 capacity=None, rng=None, ops=REFERENCE, kv_slots=None, warm_start=False, slide=False):
        if adaptive not in ADAPTIVE:
            raise ValueError(f"adaptive depth must be 'state', 'kl' or None, not {adaptive!r}.")
        if not epsilon >= 0:
            raise ValueError(f"epsilon must not be negative, not {epsilon}.")
        if n_loops is not None and n_loops < 1:
            raise ValueError(f"the loop count must be at least 1, not {n_loops}.")
        if kv_slots is not None and kv_slots < 1:
            raise ValueError(f"kv_slots must be at least 1 (or None for one per loop step), not {kv_slots}.")
        # fused once: the weights stay the same for the Decoder's life (model.with_fused_qkv)
        self.p = model.with_fused_qkv(params, cfg)
        self.cfg, self.ops, self.rng, self.batch = cfg, ops, rng, batch
        self.xp = array_module(params["wte"])
        self.n_loops = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
        self.adaptive = adaptive if cfg.looped else None  # the fixed-depth baseline has no loop
        self.warm_start = warm_start and cfg.looped
        self.epsilon = epsilon
        self.kv_slots = min(kv_slots or self.n_loops, self.n_loops)
        self.kv = model.KVCache(cfg, batch, min(capacity or cfg.context, cfg.context), self.kv_slots,
                                self.xp, params["wte"].dtype, slide=slide)
        self._logits = None  # the kl rule's previous predictions, (B, n, V)
        self._state = None  # warm start: the last position's final state, (B, 1, d_h)

    @property
    def length(self):
        return self.kv.length

    def clear(self):
        self.kv.length = 0
        self._state = None

    def rewind(self, length):
        """Forget the positions from `length` on (speculative decoding drops rejected drafts).
        Positions a sliding cache has overwritten cannot come back."""
        if not 0 <= length <= self.kv.length:
            raise ValueError(f"cannot rewind a cache of {self.kv.length} positions to {length}.")
        if length != self.kv.length and self.kv.length > self.kv.capacity:
            raise ValueError("a sliding cache that has passed its capacity cannot rewind: its oldest "
                             "positions are overwritten.")
        if self.warm_start and length != self.kv.length:
            raise ValueError("a warm-started decoder cannot rewind: its state belongs to the last token.")
        self.kv.length = length

    def feed(self, ids, n_loops=None):
        """Logits (B, n, V) and loop counts (B, n) of the new tokens ids (B, n), at n_loops loop
        steps (default the decoder's own; at most its own with an exit rule or fewer slots)."""
        ids = np.asarray(to_host(ids), dtype=np.int64)
        if n_loops is not None and not 1 <= n_loops <= self.n_loops:
            raise ValueError(f"a decoder of {self.n_loops} loop steps runs 1 to {self.n_loops} of "
                             f"them, not {n_loops}.")
        sliding = self.kv.slide and self.kv.length + ids.shape[1] > self.kv.capacity
        if (self.adaptive is not None or self.warm_start or sliding) and ids.shape[1] > 1:
            steps = [self.feed(ids[:, i:i + 1], n_loops) for i in range(ids.shape[1])]
            return (self.xp.concatenate([s[0] for s in steps], axis=1),
                    np.concatenate([s[1] for s in steps], axis=1))
        h0 = self._state if self.warm_start else None
        start = self.kv.length
        logits, _, diag = model.forward(self.p, self.cfg, self.xp.asarray(ids),
                                        n_loops=n_loops or self.n_loops, h0=h0, rng=self.rng,
                                        ops=self.ops, kv=self.kv,
                                        exit_rule=self._exit if self.adaptive else None)
        if n_loops is not None and n_loops < self.kv_slots:  # as if every row stopped there
            self._lend_keys(np.arange(self.batch), n_loops - 1, start, ids.shape[1])
        if self.warm_start:
            self._state = diag["state"][:, -1:]
        return logits, np.broadcast_to(diag["loops"][:, None], ids.shape)

    def _exit(self, t, rows, h, h_prev, logits_of):
        """model.loop_forward's exit rule: which of `rows` stop after step t (see the docstring)."""
        xp = self.xp
        if t == self.n_loops - 1:  # the last step: nothing to decide
            return np.zeros(len(rows), dtype=bool)
        idx = None if len(rows) == self.batch else xp.asarray(rows)
        if self.adaptive == "state":  # h = h_t of the rows that ran, (N, n, d_h)
            change = xp.sqrt(((h - h_prev) ** 2).sum(axis=(1, 2)) / (h * h).sum(axis=(1, 2)))
        else:
            new = logits_of(h, idx)  # (N, n, V)
            if t == 0:
                self._logits, change = new, xp.full(len(rows), xp.inf)
            else:
                lp, lq = _log_softmax(new), _log_softmax(model.take_rows(self._logits, idx))
                change = xp.maximum((xp.exp(lp) * (lp - lq)).sum(axis=(1, 2)), 0)  # rounding
                self._logits = model.put_rows(self._logits, idx, new)
        stop = to_host(change < self.epsilon)
        self._lend_keys(rows[stop], t, self.kv.length, 1)
        return stop

    def _lend_keys(self, rows, t, start, n):
        """Rows that stopped after step t lend the step-t keys and values of positions
        start..start+n−1 to the core slots they never wrote (t + 1 .. kv_slots − 1; with fewer slots
        than steps, usually none), so that a later token reading a deeper step finds them."""
        if len(rows) == 0 or t + 1 >= self.kv_slots:
            return
        at = self.kv.index(start)
        rows, here = self.xp.asarray(rows), slice(at, at + n)
        for i in range(self.cfg.n_recurrent):
            k_t, v_t = self.kv.slots[f"core.{i}", t]
            for s in range(t + 1, self.kv_slots):
                k_s, v_s = self.kv.slots[f"core.{i}", s]
                k_s[rows, :, here] = k_t[rows, :, here]
                v_s[rows, :, here] = v_t[rows, :, here]


def _check_options(cfg, cache, adaptive, kv_slots, warm_start, past_context, speculative):
    if past_context not in PAST_CONTEXT:
        raise ValueError(f"past_context must be 'slide' or 'recompute', not {past_context!r}.")
    if not cache and (adaptive is not None or kv_slots is not None or warm_start or speculative):
        raise ValueError("adaptive depth, kv_slots, warm start and speculative decoding need the "
                         "cached decoder: do not combine them with cache=False.")
    if speculative is not None:
        if not cfg.looped:
            raise ValueError("speculative decoding drafts with the loop stopped early: the "
                             "fixed-depth baseline has no loop to stop.")
        gamma, draft = speculative
        if gamma < 1 or draft < 1:
            raise ValueError(f"speculative decoding needs γ ≥ 1 drafted tokens and a draft depth ≥ 1, "
                             f"not {speculative}.")
        if adaptive is not None or kv_slots is not None or warm_start:
            raise ValueError("speculative decoding runs at fixed depth with a slot per loop step: do "
                             "not combine it with adaptive depth, kv_slots or warm start.")
        if past_context != "slide":
            raise ValueError("speculative decoding slides its cache past the context: it has no "
                             "past_context='recompute'.")


def _check_sampling(cfg, ids, n_loops, temperature, top_k, top_p):
    if n_loops is not None and (int(n_loops) != n_loops or n_loops < 1):
        raise ValueError(f"the loop count must be a whole number of at least 1, not {n_loops}.")
    if not temperature >= 0 or not np.isfinite(temperature):
        raise ValueError(f"the temperature must be 0 (greedy) or positive, not {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no cut), not {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no cut), not {top_p}.")
    if ids.size and not 0 <= ids.min() <= ids.max() < cfg.vocab_size:
        raise ValueError(f"prompt ids must lie in 0..{cfg.vocab_size - 1} (the vocabulary), not "
                         f"{ids.min()}..{ids.max()}.")


def _prompt_array(prompt):
    """The prompt as a (B, T0) int64 array; rows of different lengths are refused."""
    try:
        ids = np.asarray(to_host(prompt))
    except ValueError:  # NumPy refuses ragged rows
        lengths = sorted({len(row) for row in prompt})
        raise ValueError(f"every row of the prompt must hold the same number of tokens (there is no "
                         f"padding), not {lengths}.") from None
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token per row.")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"prompt ids must be integers, not {ids.dtype}.")
    return ids.astype(np.int64)


def generate(params, cfg, prompt, n_tokens, n_loops=None, temperature=1.0, top_k=None, top_p=None,
             rng=None, stop_id=None, cache=True, adaptive=None, epsilon=1e-3, return_loops=False,
             progress=False, ops=REFERENCE, kv_slots=None, warm_start=False, past_context="slide",
             speculative=None, stats=None):
    """Continue each row of `prompt` (B, T0 ints) by up to n_tokens tokens, running the loop
    n_loops times (default μ_rec), or per token until the `adaptive` rule ("state" or "kl") holds
    with threshold epsilon. cache=False is the plain generator: the whole window recomputed for
    every token, at fixed depth. kv_slots, warm_start, past_context ("slide" or "recompute") and
    speculative = (γ, T_draft) are the decoding options of the module docstring. Returns a list of
    B lists of new ids (each ends at stop_id, which is not included), and with return_loops also
    the loop count of each of those tokens (B lists). `stats`, a dict, receives counts: the loop
    steps run per position ("position_steps"), and for speculative decoding the drafted and
    accepted tokens (batch totals). progress=True shows a bar on a terminal."""
    _check_options(cfg, cache, adaptive, kv_slots, warm_start, past_context, speculative)
    ids = _prompt_array(prompt)
    _check_sampling(cfg, ids, n_loops, temperature, top_k, top_p)
    rng = rng or np.random.default_rng(0)
    stats = {} if stats is None else stats
    if speculative is not None:
        return _speculative(params, cfg, ids, n_tokens, n_loops, *speculative, temperature, top_k,
                            top_p, rng, stop_id, return_loops, progress, ops, stats)
    xp = array_module(params["wte"])
    B = ids.shape[0]
    if cache:
        dec = Decoder(params, cfg, B, n_loops, adaptive, epsilon, capacity=ids.shape[1] + n_tokens,
                      rng=rng, ops=ops, kv_slots=kv_slots, warm_start=warm_start,
                      slide=past_context == "slide")
    depth = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
    out, loops = [[] for _ in range(B)], [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    stats["position_steps"] = 0
    for _ in tqdm(range(n_tokens), desc="generating", unit="tok", leave=False,
                  disable=None if progress else True):
        window = ids[:, -cfg.context:]
        if not cache:
            logits, _, _ = model.forward(params, cfg, xp.asarray(window), n_loops=n_loops, rng=rng,
                                         ops=ops)
            logits, used = logits[:, -1], np.full(B, depth)
            stats["position_steps"] += depth * window.size
        else:
            if dec.length == 0 or (not dec.kv.slide and dec.length == dec.kv.capacity):
                dec.clear()  # the prompt, or no room left: (re)compute the window
                logits, used = dec.feed(window)
            else:
                logits, used = dec.feed(window[:, -1:])
            stats["position_steps"] += int(used.sum())
            logits, used = logits[:, -1], used[:, -1]
        nxt = sample_token(logits, rng, temperature, top_k, top_p)
        for b, t in enumerate(nxt):
            if not done[b]:
                if stop_id is not None and t == stop_id:
                    done[b] = True
                else:
                    out[b].append(int(t))
                    loops[b].append(int(used[b]))
        if done.all():
            break
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return (out, loops) if return_loops else out


def _speculative(params, cfg, ids, n_tokens, n_loops, gamma, draft_loops, temperature, top_k, top_p,
                 rng, stop_id, return_loops, progress, ops, stats):
    """generate(..., speculative=(gamma, draft_loops)) for one sequence (module docstring)."""
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time, not a batch of {ids.shape[0]}.")
    T = n_loops or cfg.mean_recurrence
    if draft_loops >= T:
        raise ValueError(f"the draft depth ({draft_loops}) must be below the full depth ({T}).")
    window = ids[:, -cfg.context:]
    dec = Decoder(params, cfg, 1, T, capacity=window.shape[1] + n_tokens + gamma + 1, rng=rng,
                  ops=ops, slide=True)
    if window.shape[1] > 1:
        dec.feed(window[:, :-1])
    stats.update(position_steps=T * (window.shape[1] - 1), drafted=0, accepted=0, rounds=0)
    last, out = int(window[0, -1]), []
    greedy = temperature == 0

    def dist(logits):  # (n, V) -> the distribution sampling uses, or None when greedy
        return None if greedy else token_probabilities(logits, temperature, top_k, top_p)

    bar = tqdm(total=n_tokens, desc="generating", unit="tok", leave=False,
               disable=None if progress else True)
    while len(out) < n_tokens and (not out or out[-1] != stop_id):
        start = dec.length
        if start + gamma + 1 > dec.kv.capacity:  # no room for a verify pass: one token at full depth
            logits = dec.feed([[last]])[0][:, -1]
            new = [int(sample_token(logits, rng, temperature, top_k, top_p)[0])]
            stats["position_steps"] += T
        else:
            drafts, q = [], []
            for _ in range(gamma):
                logits = dec.feed([[drafts[-1] if drafts else last]], n_loops=draft_loops)[0][:, -1]
                q.append(dist(logits))
                drafts.append(int(sample_token(logits, rng, temperature, top_k, top_p)[0]))
            dec.rewind(start)
            logits = to_host(dec.feed([[last] + drafts])[0][0])  # (γ + 1, V) at full depth
            p = dist(logits)
            new = []
            for j, d in enumerate(drafts):
                if greedy:
                    keep = int(logits[j].argmax()) == d
                else:
                    keep = rng.random() < min(1.0, p[j, d] / q[j][0, d])
                if not keep:
                    if greedy:
                        new.append(int(logits[j].argmax()))
                    else:
                        residual = np.maximum(p[j] - q[j][0], 0.0)
                        new.append(int(rng.choice(len(residual), p=residual / residual.sum())))
                    break
                new.append(d)
            else:  # every draft kept: the full model's next token comes free
                new.append(int(logits[gamma].argmax()) if greedy
                           else int(rng.choice(p.shape[-1], p=p[gamma])))
            kept = len(new) - 1
            dec.rewind(start + 1 + kept)  # last and the kept drafts are cached at full depth
            stats["position_steps"] += draft_loops * gamma + T * (gamma + 1)
            stats["drafted"] += gamma
            stats["accepted"] += kept
            stats["rounds"] += 1
        for t in new:
            if len(out) == n_tokens or (out and out[-1] == stop_id):
                break
            out.append(t)
            bar.update(1)
        last = new[-1]
    bar.close()
    if stop_id is not None and stop_id in out:
        out = out[:out.index(stop_id)]
    return ([out], [[T] * len(out)]) if return_loops else [out]


def evaluate(params, cfg, batches, n_loops=None, adaptive=None, epsilon=1e-3, ops=REFERENCE,
             kv_slots=None, warm_start=False):
    """Mean loss and mean loop count per token over (x, y) batches, at fixed depth n_loops (default
    μ_rec; `model.evaluate`'s full forward) or through the cached decoder one token at a time
    (teacher forcing) with adaptive depth (at most n_loops steps), fewer KV slots or a warm start."""
    if adaptive is None and kv_slots is None and not warm_start:
        depth = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
        return model.evaluate(params, cfg, batches, n_loops, ops), float(depth)
    total, total_loops, count = 0.0, 0.0, 0
    for x, y in batches:
        if x.shape[1] > cfg.context:
            raise ValueError(f"evaluation windows of {x.shape[1]} tokens are longer than the model's "
                             f"context ({cfg.context}).")
        dec = Decoder(params, cfg, len(x), n_loops, adaptive, epsilon, capacity=x.shape[1], ops=ops,
                      kv_slots=kv_slots, warm_start=warm_start)
        steps = [dec.feed(x[:, i:i + 1]) for i in range(x.shape[1])]  # as generation reads them
        logits = dec.xp.concatenate([s[0] for s in steps], axis=1)
        loops = np.concatenate([s[1] for s in steps], axis=1)
        total += ops.cross_entropy.loss(logits, dec.xp.asarray(y)) * len(x)
        total_loops += loops.mean() * len(x)
        count += len(x)
    if count == 0:
        raise ValueError("no batches to evaluate.")
    return total / count, total_loops / count


def long_text_losses(params, cfg, ids, n_loops=None, past_context="slide", ops=REFERENCE):
    """Per-token losses (host float64) of a sequence ids (B, L) longer than the context, teacher
    forced through the cached decoder: the first cfg.context − 1 predictions from one pass, every
    later one either from the sliding cache ("slide") or from the last cfg.context tokens recomputed
    ("recompute"). Entry i is the loss of predicting ids[:, i + 1]."""
    if past_context not in PAST_CONTEXT:
        raise ValueError(f"past_context must be 'slide' or 'recompute', not {past_context!r}.")
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"long_text_losses takes ids of shape (B, L), not {ids.shape}.")
    B, L = ids.shape
    if L <= cfg.context:
        raise ValueError(f"a long text must be longer than the context ({cfg.context}), not {L} tokens.")
    dec = Decoder(params, cfg, B, n_loops, ops=ops, slide=past_context == "slide")
    first = dec.feed(ids[:, :cfg.context])[0]
    rows = [first[:, :-1], first[:, -1:]]
    for i in range(cfg.context, L - 1):
        if past_context == "slide":
            rows.append(dec.feed(ids[:, i:i + 1])[0])
        else:
            dec.clear()
            rows.append(dec.feed(ids[:, i + 1 - cfg.context:i + 1])[0][:, -1:])
    logits = np.asarray(to_host(dec.xp.concatenate(rows, axis=1)), dtype=np.float64)
    logp = _log_softmax(logits)
    return -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def benchmark(params, cfg, n_tokens, loops, prompt_len=8, seed=0, repeats=3, ops=REFERENCE):
    """Greedy generation speed of the plain generator and of the cached one past the context with
    each policy: rows of (loops, uncached, cached "recompute", cached "slide") tokens/s, each the
    median of `repeats` runs taken in turns after a short warm-up. Within the context the two
    cached columns are the same decoder."""
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, prompt_len))
    kinds = ((False, "recompute"), (True, "recompute"), (True, "slide"))
    rows = []
    for n in loops:
        for cache, past in kinds:
            generate(params, cfg, prompt, 2, n_loops=n, temperature=0, cache=cache,
                     past_context=past, ops=ops)
        rates = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for cache, past in kinds:
                t0 = time.perf_counter()
                generate(params, cfg, prompt, n_tokens, n_loops=n, temperature=0, cache=cache,
                         past_context=past, ops=ops)
                backend.synchronize()
                rates[cache, past].append(n_tokens / (time.perf_counter() - t0))
        rows.append((n, *(float(np.median(rates[kind])) for kind in kinds)))
    return rows


if __name__ == "__main__":
    from . import kernels

    ap = argparse.ArgumentParser(description="Generation tokens/s, cached (both ways past the "
                                             "context) against uncached, on a randomly initialised "
                                             "preset (the weights do not matter).")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--loops", default="4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    args = ap.parse_args()
    backend.use_device(args.device)
    cfg = model.preset(args.preset)
    params = model.init_params(cfg)
    ops = kernels.for_array(params["wte"])
    print(f"{args.preset}, {args.tokens} tokens, greedy, batch 1, {backend.device()}, "
          f"medians of {args.repeats}\n")
    print("| loops | uncached tokens/s | cached, recompute past the context | cached, sliding | "
          "sliding / uncached |\n|---|---|---|---|---|")
    for n, slow, recompute, slide in benchmark(params, cfg, args.tokens,
                                               [int(n) for n in args.loops.split(",")],
                                               repeats=args.repeats, ops=ops):
        print(f"| {n} | {slow:.1f} | {recompute:.1f} | {slide:.1f} | {slide / slow:.1f}× |")
