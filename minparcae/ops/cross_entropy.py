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

from .. import kernels
from ..backend import array_module

IGNORE_INDEX = -1


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
    """logits: (..., V) float; targets: (...) ints. Returns the scalar mean loss (0-d array)."""
    xp = array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V)
    if scale != 1.0:  # a copy of the logits only when it changes them
        z = z * scale
    if softcap is not None:
        z = softcap * xp.tanh(z / softcap)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = xp.where(valid, y, 0)
    n_valid = max(int(valid.sum()), 1)  # an empty mean divides by 1
    kernel = kernels.fast("softmax_xent", z) or softmax_xent
    loss_rows, grad = kernel(xp.ascontiguousarray(z), y_safe, valid, n_valid)
    loss = loss_rows.sum() / z.dtype.type(n_valid)
    cache = (grad, z if softcap is not None else None, logits.shape, scale, softcap)
    return loss, cache


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
