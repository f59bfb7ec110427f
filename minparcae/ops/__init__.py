"""The readable reference: one op per file, each `forward(...) -> (out, cache)` and
`backward(dout, cache) -> dict of gradients`, written against the array module of its inputs
(NumPy or CuPy), with the math in its docstring, the shapes in comments and the cache a named
tuple. Nothing here is tuned for speed.

The model takes its ops as one `Ops` tuple. `REFERENCE` is these modules, and what the model runs
unless it is given another set; `minparcae.kernels.select` gives the set for a device, in which
fast paths replace whole ops (a replacement has the op's functions, signatures and results).
"""

from typing import NamedTuple

from . import attention, cross_entropy, embedding, injection, linear, mlp, qk_norm, rmsnorm


class Ops(NamedTuple):
    attention: object  # causal softmax(q kᵀ · scale) v, with an optional KV cache
    cross_entropy: object
    embedding: object
    injection: object
    linear: object
    mlp: object
    qk_norm: object  # RMSNorm(RoPE(·)) of the query and key heads
    rmsnorm: object


REFERENCE = Ops(attention=attention, cross_entropy=cross_entropy, embedding=embedding,
                injection=injection, linear=linear, mlp=mlp, qk_norm=qk_norm, rmsnorm=rmsnorm)
