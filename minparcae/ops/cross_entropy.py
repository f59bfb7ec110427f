"""Softmax cross-entropy over the vocabulary, mean over the targets that are not ignored.

With a logit scale s and an optional soft-cap c:

    z = s · logits,   z ← c · tanh(z / c)  (if c is set)
    ℓ_i = logsumexp(z_i) − z_i[y_i] = log Σ_v exp(z_iv − m_i) + m_i − z_i[y_i],   m_i = max_v z_iv
    L = (1/N) Σ_{i: y_i ≠ ignore} ℓ_i,     N = number of such targets

Subtracting the row maximum m_i keeps exp() in range for any logits (1e4 included).

Backward: the gradient of ℓ_i with respect to z_i is softmax(z_i) − onehot(y_i), then the chain
rule through the cap (1 − tanh²) and the scale:

    dL/dlogits_i = (1/N) · s · (1 − (z_i / c)²) ⊙ (softmax(z_i) − onehot(y_i))   (valid rows; 0 otherwise)

If every target is ignored the loss is defined as 0 with zero gradient (an empty mean).

`loss` is the evaluation: L alone. `forward` is training's: L and, in its cache, softmax − onehot
already divided by N, since the loss and the gradient need the same exponentials; the (N, V)
gradient is the size of the logits, so evaluation never makes it.
"""

from typing import NamedTuple

from ..backend import array_module

IGNORE_INDEX = -1


class Cache(NamedTuple):
    grad: object  # (softmax z − onehot y) / N on valid rows, 0 elsewhere: (N, V)
    z: object  # the capped logits (N, V) when there is a cap, else None
    shape: tuple  # the logits' shape
    scale: float
    softcap: object  # c, or None


def prepare(logits, targets, ignore_index=IGNORE_INDEX, scale=1.0, softcap=None):
    """z (N, V) from the logits, and per row the target (0 where ignored), whether it counts, and
    the number N of rows that count (at least 1)."""
    xp = array_module(logits)
    z = logits.reshape(-1, logits.shape[-1])  # (N, V)
    if scale != 1.0:  # a copy of the logits only when it changes them
        z = z * scale
    if softcap is not None:
        z = softcap * xp.tanh(z / softcap)
    y = targets.reshape(-1)
    valid = y != ignore_index
    return xp.ascontiguousarray(z), xp.where(valid, y, 0), valid, max(int(valid.sum()), 1)


def _logsumexp(z):
    xp = array_module(z)
    m = z.max(axis=-1, keepdims=True)
    return (xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)) + m)[:, 0]


def loss(logits, targets, ignore_index=IGNORE_INDEX, scale=1.0, softcap=None):
    """L as a Python float, without the gradient."""
    xp = array_module(logits)
    z, y, valid, n_valid = prepare(logits, targets, ignore_index, scale, softcap)
    rows = xp.where(valid, _logsumexp(z) - z[xp.arange(z.shape[0]), y], 0.0)
    return float(rows.sum() / n_valid)


def softmax_xent(z, targets, valid, n_valid):
    """Per-row losses valid·(logsumexp z − z[y]) and the gradient valid·(softmax z − onehot y)/n_valid
    of their mean, in one go: both need the same exponentials. z: (N, V); targets, valid: (N,)."""
    xp = array_module(z)
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    sum_e = e.sum(axis=-1, keepdims=True)
    lse = (xp.log(sum_e) + m)[:, 0]
    rows = xp.arange(z.shape[0])
    loss_rows = xp.where(valid, lse - z[rows, targets], 0.0)
    grad = e / sum_e
    grad[rows, targets] -= 1.0
    grad *= (valid / n_valid).astype(z.dtype)[:, None]
    return loss_rows, grad


def forward(logits, targets, ignore_index=IGNORE_INDEX, scale=1.0, softcap=None):
    """logits: (..., V) float; targets: (...) ints. Returns L as a Python float, and the cache."""
    z, y, valid, n_valid = prepare(logits, targets, ignore_index, scale, softcap)
    loss_rows, grad = softmax_xent(z, y, valid, n_valid)
    return finish(loss_rows, grad, z, n_valid, logits.shape, scale, softcap)


def finish(loss_rows, grad, z, n_valid, shape, scale, softcap):
    """The mean loss and the cache, from softmax_xent's results."""
    cache = Cache(grad, z if softcap is not None else None, shape, scale, softcap)
    return float(loss_rows.sum() / z.dtype.type(n_valid)), cache


def backward(dloss, cache):
    """The forward already holds softmax − onehot; this scales it (at dloss = scale = 1 with no cap
    it returns that array itself, which the caller must not modify)."""
    grad, z, shape, scale, softcap = cache
    factor = dloss * scale
    if softcap is not None:
        g = grad * (factor * (1.0 - (z / softcap) ** 2))
    elif factor != 1.0:
        g = grad * grad.dtype.type(factor)
    else:
        g = grad
    return {"logits": g.reshape(shape)}
