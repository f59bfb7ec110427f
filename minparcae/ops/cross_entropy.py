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
"""

from ..backend import array_module

IGNORE_INDEX = -1


def forward(logits, targets, ignore_index=IGNORE_INDEX, scale=1.0, softcap=None):
    """logits: (..., V) float; targets: (...) ints. Returns the scalar mean loss (0-d array)."""
    xp = array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V) * scale  # (N, V)
    if softcap is not None:
        z = softcap * xp.tanh(z / softcap)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = xp.where(valid, y, 0)
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    sum_e = e.sum(axis=-1, keepdims=True)
    lse = (xp.log(sum_e) + m)[:, 0]
    z_y = xp.take_along_axis(z, y_safe[:, None], axis=-1)[:, 0]
    n_valid = xp.maximum(valid.sum(), 1).astype(z.dtype)  # an empty mean divides by 1
    loss = xp.where(valid, lse - z_y, 0.0).sum() / n_valid
    probs = e / sum_e
    cache = (probs, z, y_safe, valid, n_valid, logits.shape, scale, softcap)
    return loss, cache


def backward(dloss, cache):
    probs, z, y_safe, valid, n_valid, shape, scale, softcap = cache
    xp = array_module(probs)
    g = probs.copy()
    g[xp.arange(g.shape[0]), y_safe] -= 1.0
    g *= (valid * (dloss / n_valid))[:, None]
    if softcap is not None:
        g *= 1.0 - (z / softcap) ** 2
    return {"logits": (g * scale).reshape(shape)}
