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

Context. Rotary angles and initial states belong to absolute positions of the window, so the cache
cannot slide past cfg.context: once the sequence is longer, each new token recomputes the window of
the last cfg.context tokens from scratch, exactly as the plain generator does (and as slowly).
"""

import argparse
import time

import numpy as np
from tqdm import tqdm

from . import backend, model
from .backend import array_module, to_host
from .ops import REFERENCE

ADAPTIVE = (None, "state", "kl")


def sample_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row of logits (B, V) on the host: greedy at temperature 0, else sample
    from softmax(logits / temperature) restricted to the top_k tokens and/or the smallest set whose
    probability reaches top_p."""
    logits = np.asarray(to_host(logits), dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
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
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def _log_softmax(z):
    xp = array_module(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


class Decoder:
    """A batch of B sequences being decoded: the KV cache and the exit rule.

    `feed(ids)` runs new tokens (B, n) at positions length..length+n−1 and returns their logits
    (B, n, V) and loop counts (B, n). The cache holds `capacity` positions (default cfg.context);
    `clear()` forgets them all. rng draws the initial states when cfg.eval_state is "like-init"."""

    def __init__(self, params, cfg, batch, n_loops=None, adaptive=None, epsilon=1e-3,
                 capacity=None, rng=None, ops=REFERENCE):
        if adaptive not in ADAPTIVE:
            raise ValueError(f"adaptive depth must be 'state', 'kl' or None, not {adaptive!r}.")
        if epsilon < 0 or (n_loops is not None and n_loops < 1):
            raise ValueError("epsilon must not be negative and the loop count must be at least 1.")
        self.p, self.cfg, self.ops, self.rng, self.batch = params, cfg, ops, rng, batch
        self.xp = array_module(params["wte"])
        self.n_loops = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
        self.adaptive = adaptive if cfg.looped else None  # the fixed-depth baseline has no loop
        self.epsilon = epsilon
        self.kv = model.KVCache(cfg, batch, min(capacity or cfg.context, cfg.context), self.n_loops,
                                self.xp, params["wte"].dtype)
        self._logits = None  # the kl rule's previous predictions, (B, n, V)

    @property
    def length(self):
        return self.kv.length

    def clear(self):
        self.kv.length = 0

    def feed(self, ids):
        """Logits (B, n, V) and loop counts (B, n) of the new tokens ids (B, n)."""
        ids = np.asarray(to_host(ids), dtype=np.int64)
        if self.adaptive is not None and ids.shape[1] > 1:
            steps = [self.feed(ids[:, i:i + 1]) for i in range(ids.shape[1])]
            return (self.xp.concatenate([s[0] for s in steps], axis=1),
                    np.concatenate([s[1] for s in steps], axis=1))
        logits, _, diag = model.forward(self.p, self.cfg, self.xp.asarray(ids), n_loops=self.n_loops,
                                        rng=self.rng, ops=self.ops, kv=self.kv,
                                        exit_rule=self._exit if self.adaptive else None)
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
        self._lend_keys(rows[stop], t)
        return stop

    def _lend_keys(self, rows, t):
        """Rows that stopped after step t lend their step-t keys and values to the later steps."""
        if len(rows) == 0:
            return
        rows, here = self.xp.asarray(rows), slice(self.kv.length, self.kv.length + 1)
        for i in range(self.cfg.n_recurrent):
            k_t, v_t = self.kv.slots[f"core.{i}", t]
            for s in range(t + 1, self.n_loops):
                k_s, v_s = self.kv.slots[f"core.{i}", s]
                k_s[rows, :, here] = k_t[rows, :, here]
                v_s[rows, :, here] = v_t[rows, :, here]


def generate(params, cfg, prompt, n_tokens, n_loops=None, temperature=1.0, top_k=None, top_p=None,
             rng=None, stop_id=None, cache=True, adaptive=None, epsilon=1e-3, return_loops=False,
             progress=False, ops=REFERENCE):
    """Continue each row of `prompt` (B, T0 ints) by up to n_tokens tokens, running the loop
    n_loops times (default μ_rec), or per token until the `adaptive` rule ("state" or "kl") holds
    with threshold epsilon. cache=False is the plain generator: the whole window recomputed for
    every token, at fixed depth. Returns a list of B lists of new ids (each ends at stop_id, which
    is not included), and with return_loops also the loop count of each of those tokens (B lists).
    progress=True shows a bar on a terminal."""
    xp = array_module(params["wte"])
    rng = rng or np.random.default_rng(0)
    ids = np.array(prompt, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token per row.")
    if adaptive is not None and not cache:
        raise ValueError("adaptive depth needs the cached decoder: do not combine it with cache=False.")
    B = ids.shape[0]
    if cache:
        dec = Decoder(params, cfg, B, n_loops, adaptive, epsilon, capacity=ids.shape[1] + n_tokens,
                      rng=rng, ops=ops)
    depth = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
    out, loops = [[] for _ in range(B)], [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for _ in tqdm(range(n_tokens), desc="generating", unit="tok", leave=False,
                  disable=None if progress else True):
        window = ids[:, -cfg.context:]
        if not cache:
            logits, _, _ = model.forward(params, cfg, xp.asarray(window), n_loops=n_loops, rng=rng,
                                         ops=ops)
            logits, used = logits[:, -1], np.full(B, depth)
        else:
            if dec.length in (0, cfg.context):  # the prompt, or no room left: (re)compute the window
                dec.clear()
                logits, used = dec.feed(window)
            else:
                logits, used = dec.feed(window[:, -1:])
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


def evaluate(params, cfg, batches, n_loops=None, adaptive=None, epsilon=1e-3, ops=REFERENCE):
    """Mean loss and mean loop count per token over (x, y) batches, at fixed depth n_loops (default
    μ_rec; `model.evaluate`'s full forward) or adaptive depth with at most n_loops steps (the cached
    decoder, one token at a time, teacher forcing)."""
    if adaptive is None:
        depth = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
        return model.evaluate(params, cfg, batches, n_loops, ops), float(depth)
    total, total_loops, count = 0.0, 0.0, 0
    for x, y in batches:
        dec = Decoder(params, cfg, len(x), n_loops, adaptive, epsilon, capacity=x.shape[1], ops=ops)
        logits, loops = dec.feed(x)
        total += ops.cross_entropy.loss(logits, dec.xp.asarray(y)) * len(x)
        total_loops += loops.mean() * len(x)
        count += len(x)
    if count == 0:
        raise ValueError("no batches to evaluate.")
    return total / count, total_loops / count


def benchmark(params, cfg, n_tokens, loops, prompt_len=8, seed=0, repeats=3, ops=REFERENCE):
    """Greedy generation speed, cached against uncached: rows of (loops, uncached tokens/s,
    cached tokens/s), each the median of `repeats` runs taken in turns after a short warm-up."""
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, prompt_len))
    rows = []
    for n in loops:
        for cache in (False, True):
            generate(params, cfg, prompt, 2, n_loops=n, temperature=0, cache=cache, ops=ops)
        rates = {False: [], True: []}
        for _ in range(repeats):
            for cache in (False, True):
                t0 = time.perf_counter()
                generate(params, cfg, prompt, n_tokens, n_loops=n, temperature=0, cache=cache, ops=ops)
                backend.synchronize()
                rates[cache].append(n_tokens / (time.perf_counter() - t0))
        rows.append((n, float(np.median(rates[False])), float(np.median(rates[True]))))
    return rows


if __name__ == "__main__":
    from . import kernels

    ap = argparse.ArgumentParser(description="Generation tokens/s, cached against uncached, on a "
                                             "randomly initialised preset (the weights do not matter).")
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
    print("| loops | uncached tokens/s | cached tokens/s | speed-up |\n|---|---|---|---|")
    for n, slow, fast in benchmark(params, cfg, args.tokens, [int(n) for n in args.loops.split(",")],
                                   repeats=args.repeats, ops=ops):
        print(f"| {n} | {slow:.1f} | {fast:.1f} | {fast / slow:.1f}× |")
