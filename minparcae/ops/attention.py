"""Causal scaled dot-product attention, the core of a self-attention layer (model.py builds the layer
around it: the q, k, v projections, rotary and QK-norm, the value gate, the output projection).
The reference version: it materialises the score matrix.

For H query heads and H_kv key/value heads of size hs (H_kv divides H; query head h reads key/value
head h // (H / H_kv)), n queries at positions start..start+n−1 against L keys at positions 0..L−1:

    S = q kᵀ · scale,  S_ij = −∞ for keys after the query (j > start + i)     (N, H, n, L)
    P = softmax(S)  (over j),   Y = P v                                        (N, H, n, hs)

Backward, with G = dL/dY (training: start = 0, L = n):

    dP = G vᵀ,  dv = Pᵀ G
    dS = P ⊙ (dP − rowsum(dP ⊙ P))                                             softmax backward
    dq = dS k · scale,  dk = dSᵀ q · scale
    grouped heads: dk, dv of a key/value head sum over the query heads that read it

Decoding passes `kv`, a `KVSlot`: the keys and values of the positions already seen, for the whole
batch. The forward writes the new positions' k, v into it (rows `kv.rows` of the batch, positions
start..start+n−1) and attends over positions 0..start+n−1; a query then also sees itself. Decoding
runs no backward.

A sliding window: position p is kept at index p mod capacity, so once start + n passes the
capacity the newest positions overwrite the oldest and a query attends to the last `capacity`
positions (itself included), wherever they sit in the buffer. Softmax attention does not depend on
the order of the keys, and rotary keys carry their positions in themselves, so no reordering is
needed. One query at a time may pass the capacity (a chunk would overwrite keys its own earlier
queries still need); model.KVCache enforces it.
"""

from typing import NamedTuple

from ..backend import array_module


class Cache(NamedTuple):
    q: object  # (N, H, n, hs)
    k: object  # (N, H_kv, L, hs)
    v: object
    p: object  # P, (N, H_kv, H / H_kv, n, L)
    scale: float


class KVSlot(NamedTuple):
    keys: object  # (B, H_kv, capacity, hs), every row of the batch
    values: object
    start: int  # position of the first new query
    rows: object  # the rows of the batch being run (an index array), or None for all


def forward(q, k, v, scale, kv=None):
    """q: (N, H, n, hs); k, v: (N, H_kv, n, hs). Returns Y (N, H, n, hs) and the cache."""
    xp = array_module(q)
    N, H, n, hs = q.shape
    H_kv = k.shape[1]
    start = 0
    if kv is not None:
        start, capacity = kv.start, kv.keys.shape[2]
        rows = slice(None) if kv.rows is None else kv.rows
        at = start % capacity if start + n > capacity else start  # sliding: n == 1
        kv.keys[rows, :, at:at + n] = k
        kv.values[rows, :, at:at + n] = v
        end = min(start + n, capacity)
        k, v = kv.keys[rows, :, :end], kv.values[rows, :, :end]  # (N, H_kv, L, hs)
    L = k.shape[2]
    qg = q.reshape(N, H_kv, H // H_kv, n, hs)  # the query heads under the key/value head they read
    s = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale  # (N, H_kv, group, n, L)
    if n > 1:  # a single query sees every key it is given: nothing to mask (and decoding saves ~18 µs)
        future = xp.arange(L)[None, :] > xp.arange(start, start + n)[:, None]  # (n, L); none when sliding
        s = xp.where(future, -xp.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    y = (p @ v[:, :, None]).reshape(N, H, n, hs)
    return y, Cache(q, k, v, p, scale)


def backward(dy, cache):
    q, k, v, p, scale = cache
    N, H, n, hs = q.shape
    H_kv = k.shape[1]
    dyg = dy.reshape(N, H_kv, H // H_kv, n, hs)
    dp = dyg @ v[:, :, None].swapaxes(-1, -2)  # (N, H_kv, group, n, L)
    dv = (p.swapaxes(-1, -2) @ dyg).sum(axis=2)  # (N, H_kv, L, hs)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    dq = (ds @ k[:, :, None]).reshape(N, H, n, hs)
    dk = (ds.swapaxes(-1, -2) @ q.reshape(N, H_kv, H // H_kv, n, hs)).sum(axis=2)
    return {"q": dq, "k": dk, "v": dv}
