"""Token embedding: a row lookup.

    y[b, t] = E[ids[b, t]]           ids: (B, T) ints, E: (V, d), y: (B, T, d)

Backward: each output row's gradient is added into the row it came from; a token that occurs
several times collects the sum (a scatter-add):

    dL/dE[v] = Σ_{(b,t): ids[b,t] = v} G[b, t]
"""

from typing import NamedTuple

from ..backend import array_module


class Cache(NamedTuple):
    ids: object  # (B, T) ints
    shape: tuple  # (V, d), the table's


def forward(ids, table):
    return table[ids], Cache(ids, table.shape)


def backward(dout, cache):
    ids, shape = cache
    xp = array_module(dout)
    dtable = xp.zeros(shape, dtype=dout.dtype)
    rows = ids.reshape(-1)
    grads = dout.reshape(-1, shape[1])
    if xp.__name__ == "numpy":
        xp.add.at(dtable, rows, grads)
    else:
        import cupyx
        cupyx.scatter_add(dtable, rows, grads)
    return {"table": dtable}
