"""Text generation with the loop count chosen at test time: a KV-cached decoder, and the plain
reference it must match.

The reference (`generate(..., cache=False)`) runs the whole cropped sequence through
`model.forward` for every new token. The cached `Decoder` runs the prompt once (prefill), then one
token at a time, keeping the keys and values of every attention layer for the positions seen so far:

    prelude.i, coda.i        one cache per layer                       (B, H_kv, L, hs)
    core.i at loop step t    one cache per (layer, step): T·n_r caches  (B, H_kv, L, hs)

At loop step t every position of the full-sequence forward holds its own h_t, so a token at step t
attends to the earlier positions' keys and values of step t: the looped model needs a cache per
step, the cache grows with T, and a token costs T passes of the recurrent block over one position.

Initial state. `model.forward`'s evaluation state "seeded" is one draw of shape (B, T, d_h), so a
position's h_0 depends on the sequence length and the batch size: a cache cannot follow that. Here
position p's h_0 is its own truncated-normal draw from a generator seeded with (seed, p), the same
for every row of the batch (`initial_states`). Both generators use it (the reference passes it to
`model.forward` as h0), so they agree. "zero" stays zero; "like-init" draws the seed once per call.

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
the last cfg.context tokens from scratch, exactly as the reference does (and as slowly).
"""

import argparse
import time

import numpy as np
from tqdm import tqdm

from . import backend, model
from .backend import array_module, to_host
from .ops import attention, cross_entropy, injection, mlp, rmsnorm, rotary

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


def state_seed(cfg, rng=None):
    """The seed of the per-position initial states for cfg.eval_state: fixed for "seeded", drawn
    from rng for "like-init", None for "zero"."""
    if cfg.eval_state == "zero":
        return None
    if cfg.eval_state == "seeded":
        return model.EVAL_STATE_SEED
    if rng is None:
        raise ValueError("eval_state 'like-init' draws a random initial state: pass an rng.")
    return int(rng.integers(2**62))


def initial_states(cfg, start, n, seed, xp=np, dtype=np.float32):
    """h_0 of positions start..start+n−1, (n, d_h): row p is model.initial_state's truncated normal
    from a generator seeded with (seed, p), so it depends on the position alone; zero for seed None."""
    if seed is None:
        return xp.zeros((n, cfg.d_h), dtype=dtype)
    rows = [model.initial_state(cfg, (cfg.d_h,), "like-init", np.random.default_rng((seed, p)),
                                np.float64) for p in range(start, start + n)]
    return xp.asarray(np.stack(rows), dtype=dtype)


def _output(logits, cfg):
    """The logits model.forward returns: scaled, soft-capped when cfg says so."""
    xp = array_module(logits)
    z = logits * cfg.logit_scale
    return z if cfg.logit_softcap is None else cfg.logit_softcap * xp.tanh(z / cfg.logit_softcap)


def _log_softmax(z):
    xp = array_module(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


class Decoder:
    """The KV caches of a batch of B sequences and the number of positions they hold.

    `feed(ids)` runs new tokens (B, n) at positions length..length+n−1 and returns their logits
    (B, n, V) and loop counts (B, n). The caches hold `capacity` positions (default cfg.context);
    `clear()` forgets them all. rng draws the initial states' seed when cfg.eval_state is
    "like-init" (see `state_seed`)."""

    def __init__(self, params, cfg, batch, n_loops=None, adaptive=None, epsilon=1e-3,
                 capacity=None, rng=None):
        if adaptive not in ADAPTIVE:
            raise ValueError(f"adaptive depth must be 'state', 'kl' or None, not {adaptive!r}.")
        if epsilon < 0 or (n_loops is not None and n_loops < 1):
            raise ValueError("epsilon must not be negative and the loop count must be at least 1.")
        self.p, self.cfg = params, cfg
        self.xp = xp = array_module(params["wte"])
        self.dtype = params["wte"].dtype
        self.n_loops = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
        self.adaptive = adaptive if cfg.looped else None  # the fixed-depth baseline has no loop
        self.epsilon = epsilon
        self.capacity = min(capacity or cfg.context, cfg.context)
        self.h0 = initial_states(cfg, 0, self.capacity, state_seed(cfg, rng), xp, self.dtype)
        self.length = 0
        self.kv = {}  # (layer name, loop step or None) -> keys, values (B, H_kv, capacity, hs)
        for name, width in model.layers(cfg):
            shape = (batch, cfg.kv_heads, self.capacity, width // cfg.n_head)
            for step in range(self.n_loops) if name.startswith("core.") else (None,):
                self.kv[name, step] = (xp.empty(shape, self.dtype), xp.empty(shape, self.dtype))

    def clear(self):
        self.length = 0

    def feed(self, ids):
        """Logits (B, n, V) and loop counts (B, n) of the new tokens ids (B, n)."""
        ids = np.asarray(to_host(ids), dtype=np.int64)
        if self.length + ids.shape[1] > self.capacity:
            raise ValueError(f"{self.length} + {ids.shape[1]} positions exceed the cache's capacity "
                             f"{self.capacity}: clear() it or make a larger Decoder.")
        if self.adaptive is None or ids.shape[1] == 1:
            return self._feed(ids)
        steps = [self._feed(ids[:, i:i + 1]) for i in range(ids.shape[1])]
        return (self.xp.concatenate([s[0] for s in steps], axis=1),
                np.concatenate([s[1] for s in steps], axis=1))

    def _feed(self, ids):
        p, cfg, xp = self.p, self.cfg, self.xp
        B, n = ids.shape
        ids = xp.asarray(ids)
        rope = {w: rotary.tables(n, w // cfg.n_head, cfg.rope_base, offset=self.length, xp=xp,
                                 dtype=self.dtype) for w in {cfg.d_model, cfg.d_h}}
        ve = {name: p[f"ve.{name}"][ids] for name in model.value_embedding_layers(cfg)}
        x = p["wte"][ids]  # (B, n, d)
        for i in range(cfg.n_prelude):
            x = self._block(f"prelude.{i}", None, x, rope[cfg.d_model], ve, None)
        if cfg.looped:
            e, _ = rmsnorm.forward(x, p["prelude_norm"])
            h0 = xp.broadcast_to(self.h0[self.length:self.length + n], (B, n, cfg.d_h))
            kind = cfg.injection
        else:  # plain transformer: one pass of the blocks on the prelude output
            e, h0, kind = x, xp.zeros_like(x), "add"
        u, _ = injection.input_forward(kind, p, e)  # B̄e, (B, n, d_h)
        logits, loops = self._loop(kind, h0, u, rope, ve)
        self.length += n
        return logits, np.broadcast_to(loops[:, None], (B, n))

    def _loop(self, kind, h, u, rope, ve):
        """h_t = R(Ā h_{t−1} + B̄ e) for up to T steps, each row until its exit rule holds; returns
        the logits (B, n, V) and the loop count of each row (B,)."""
        cfg, xp = self.cfg, self.xp
        B = h.shape[0]
        active = np.ones(B, dtype=bool)
        loops = np.zeros(B, dtype=np.int64)
        logits = None
        for t in range(self.n_loops):
            rows = np.flatnonzero(active)
            idx = None if len(rows) == B else xp.asarray(rows)
            x, _ = injection.state_forward(kind, self.p, _take(h, idx), _take(u, idx))
            for i in range(cfg.n_recurrent):
                x = self._block(f"core.{i}", t, x, rope[cfg.d_h], ve, idx)
            h_prev, h = _take(h, idx), _put(h, idx, x)
            loops[rows] += 1
            if self.adaptive is None:
                continue
            if self.adaptive == "state":  # x = h_t of the active rows, (N, 1, d_h)
                change = xp.sqrt(((x - h_prev) ** 2).sum(axis=(1, 2)) / (x * x).sum(axis=(1, 2)))
            else:
                new = self._coda(x, rope, ve, idx)  # (N, 1, V)
                if t == 0:
                    logits, change = new, xp.full(B, xp.inf)
                else:
                    lp, lq = _log_softmax(new), _log_softmax(_take(logits, idx))
                    change = xp.maximum((xp.exp(lp) * (lp - lq)).sum(axis=(1, 2)), 0)  # rounding
                    logits = _put(logits, idx, new)
            stop = rows[to_host(change < self.epsilon)]
            if len(stop):
                self._reuse_keys(stop, t)
                active[stop] = False
                if not active.any():
                    break
        if self.adaptive != "kl":
            logits = self._coda(h, rope, ve, None)
        return logits, loops

    def _coda(self, h, rope, ve, idx):
        """Logits (N, n, V) of the states h (N, n, d_h) of rows idx; writes their coda caches."""
        p, cfg = self.p, self.cfg
        x = h @ p["C"] if cfg.looped else h  # (N, n, d)
        for i in range(cfg.n_coda):
            x = self._block(f"coda.{i}", None, x, rope[cfg.d_model], ve, idx)
        x, _ = rmsnorm.forward(x, p["final_norm"])
        return _output(x @ (p["wte"].T if cfg.tie_embeddings else p["lm_head"]), cfg)

    def _reuse_keys(self, rows, t):
        """Rows that stopped after step t lend their step-t keys and values to the later steps."""
        rows, here = self.xp.asarray(rows), self.length
        for i in range(self.cfg.n_recurrent):
            k_t, v_t = self.kv[f"core.{i}", t]
            for s in range(t + 1, self.n_loops):
                k_s, v_s = self.kv[f"core.{i}", s]
                k_s[rows, :, here] = k_t[rows, :, here]
                v_s[rows, :, here] = v_t[rows, :, here]

    def _block(self, name, step, x, rope, ve, idx):
        """model.block_forward with cached attention, on the rows idx (None: all): x (N, n, w)."""
        p = self.p
        a, _ = rmsnorm.forward(x, p[f"{name}.norm1"])
        x = x + self._attend(name, step, a, rope, _take(ve[name], idx) if name in ve else None, idx)
        a, _ = rmsnorm.forward(x, p[f"{name}.norm2"])
        return x + mlp.forward(a, p[f"{name}.mlp.fc"], p[f"{name}.mlp.proj"])[0]

    def _attend(self, name, step, x, rope, ve, idx):
        """Attention of the new positions length..length+n−1 (x: (N, n, w)) over every cached one.
        q, k, v, the value-embedding gate, rotary and QK-norm as in ops/attention.py; the new keys
        and values go into the (name, step) cache first, so a position also sees itself."""
        p, cfg, xp = self.p, self.cfg, self.xp
        H, H_kv = cfg.n_head, cfg.kv_heads
        N, n, w = x.shape
        hs, group = w // H, H // H_kv
        start, end = self.length, self.length + n
        q = attention._heads(x @ p[f"{name}.attn.wq"], H, hs)  # (N, H, n, hs)
        k = attention._heads(x @ p[f"{name}.attn.wk"], H_kv, hs)  # (N, H_kv, n, hs)
        v = attention._heads(x @ p[f"{name}.attn.wv"], H_kv, hs)
        if ve is not None:
            w_gate = p[f"{name}.attn.ve_gate"]
            gate = 2.0 * injection.sigmoid(x[..., : w_gate.shape[0]] @ w_gate)  # (N, n, H_kv)
            v = v + gate.transpose(0, 2, 1)[..., None] * attention._heads(ve, H_kv, hs)
        q, _ = rmsnorm.forward(rotary.forward(q, *rope)[0])
        k, _ = rmsnorm.forward(rotary.forward(k, *rope)[0])
        keys, values = self.kv[name, step]  # (B, H_kv, capacity, hs)
        rows = slice(None) if idx is None else idx
        keys[rows, :, start:end] = k
        values[rows, :, start:end] = v
        keys, values = keys[rows, :, :end], values[rows, :, :end]  # (N, H_kv, L, hs)
        # query head j reads key/value head j // group: group the query heads under their KV head
        s = (q.reshape(N, H_kv, group, n, hs) @ keys[:, :, None].swapaxes(-1, -2)) * (1.0 / hs**0.5)
        future = xp.arange(end)[None, :] > xp.arange(start, end)[:, None]  # (n, L)
        s = xp.where(future, -xp.inf, s)  # (N, H_kv, group, n, L)
        s = xp.exp(s - s.max(axis=-1, keepdims=True))
        y = (s / s.sum(axis=-1, keepdims=True)) @ values[:, :, None]  # (N, H_kv, group, n, hs)
        return attention._merge(y.reshape(N, H, n, hs)) @ p[f"{name}.attn.wo"]


def _take(a, idx):
    return a if idx is None else a[idx]


def _put(a, idx, rows):
    """a with its rows idx replaced by `rows` (just `rows` when idx is None: they are all of a)."""
    if idx is None:
        return rows
    a = a.copy()
    a[idx] = rows
    return a


def generate(params, cfg, prompt, n_tokens, n_loops=None, temperature=1.0, top_k=None, top_p=None,
             rng=None, stop_id=None, cache=True, adaptive=None, epsilon=1e-3, return_loops=False,
             progress=False):
    """Continue each row of `prompt` (B, T0 ints) by up to n_tokens tokens, running the loop
    n_loops times (default μ_rec), or per token until the `adaptive` rule ("state" or "kl") holds
    with threshold epsilon, from the per-position initial states. cache=False is the reference: the
    whole window recomputed for every token, at fixed depth. Returns a list of B lists of new ids
    (each ends at stop_id, which is not included), and with return_loops also the loop count of
    each of those tokens (B lists). progress=True shows a bar on a terminal."""
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
                      rng=rng)
    else:
        h0 = initial_states(cfg, 0, min(cfg.context, ids.shape[1] + n_tokens), state_seed(cfg, rng),
                            xp, params["wte"].dtype)
    depth = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
    out, loops = [[] for _ in range(B)], [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for _ in tqdm(range(n_tokens), desc="generating", unit="tok", leave=False,
                  disable=None if progress else True):
        window = ids[:, -cfg.context:]
        if not cache:
            h0_window = xp.broadcast_to(h0[:window.shape[1]], window.shape + (cfg.d_h,))
            logits, _, _ = model.forward(params, cfg, xp.asarray(window), n_loops=n_loops,
                                         h0=h0_window)
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


def evaluate(params, cfg, batches, n_loops=None, adaptive=None, epsilon=1e-3):
    """Mean loss and mean loop count per token over (x, y) batches through the cached decoder
    (teacher forcing), at fixed depth n_loops (default μ_rec) or adaptive depth with at most
    n_loops steps; the per-position initial states of `initial_states`."""
    total, total_loops, count = 0.0, 0.0, 0
    for x, y in batches:
        dec = Decoder(params, cfg, len(x), n_loops, adaptive, epsilon, capacity=x.shape[1])
        logits, loops = dec.feed(x)
        loss, _ = cross_entropy.forward(logits, dec.xp.asarray(y))
        total += float(loss) * len(x)
        total_loops += loops.mean() * len(x)
        count += len(x)
    if count == 0:
        raise ValueError("no batches to evaluate.")
    return total / count, total_loops / count


def benchmark(params, cfg, n_tokens, loops, prompt_len=8, seed=0):
    """Greedy generation speed, cached against uncached: rows of (loops, uncached tokens/s,
    cached tokens/s), each run once after a short warm-up."""
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, prompt_len))
    rows = []
    for n in loops:
        rates = []
        for cache in (False, True):
            generate(params, cfg, prompt, 2, n_loops=n, temperature=0, cache=cache)
            t0 = time.perf_counter()
            generate(params, cfg, prompt, n_tokens, n_loops=n, temperature=0, cache=cache)
            backend.synchronize()
            rates.append(n_tokens / (time.perf_counter() - t0))
        rows.append((n, *rates))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Generation tokens/s, cached against uncached, on a "
                                             "randomly initialised preset (the weights do not matter).")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--loops", default="4,16")
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    args = ap.parse_args()
    backend.use_device(args.device)
    cfg = model.preset(args.preset)
    params = model.init_params(cfg)
    print(f"{args.preset}, {args.tokens} tokens, greedy, batch 1, {backend.device()}\n")
    print("| loops | uncached tokens/s | cached tokens/s | speed-up |\n|---|---|---|---|")
    for n, slow, fast in benchmark(params, cfg, args.tokens, [int(n) for n in args.loops.split(",")]):
        print(f"| {n} | {slow:.1f} | {fast:.1f} | {fast / slow:.1f}× |")
