"""Text generation, with the loop count chosen at test time.

This is the plain version: for every new token the whole (cropped) sequence runs through the model
again. It is the reference that a cached generator must match.
"""

import numpy as np

from . import model
from .backend import array_module, to_host


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


def generate(params, cfg, prompt, n_tokens, n_loops=None, temperature=1.0, top_k=None, top_p=None,
             rng=None, stop_id=None):
    """Continue each row of `prompt` (B, T0 ints) by up to n_tokens tokens, running the loop
    n_loops times (default μ_rec) with the evaluation state. Returns a list of B lists of new ids
    (each ends at stop_id, which is not included)."""
    xp = array_module(params["wte"])
    rng = rng or np.random.default_rng(0)
    ids = np.array(prompt, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token per row.")
    out = [[] for _ in range(ids.shape[0])]
    done = np.zeros(ids.shape[0], dtype=bool)
    for _ in range(n_tokens):
        window = ids[:, -cfg.context:]
        logits, _, _ = model.forward(params, cfg, xp.asarray(window), n_loops=n_loops)
        nxt = sample_token(logits[:, -1], rng, temperature, top_k, top_p)
        for b, t in enumerate(nxt):
            if not done[b]:
                if stop_id is not None and t == stop_id:
                    done[b] = True
                else:
                    out[b].append(int(t))
        if done.all():
            break
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return out
