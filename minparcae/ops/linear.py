"""Linear map without bias.

    y = x W              x: (..., n_in), W: (n_in, n_out), y: (..., n_out)

Backward, with G = dL/dy:

    dL/dx = G Wᵀ         dL/dW = Σ_rows xᵀ G   (all leading axes flattened into rows)

Matrices in minparcae are stored (in, out), so every layer is `x @ W`. Matrix products are not
written here: they go to BLAS (NumPy) or cuBLAS (CuPy).
"""

from typing import NamedTuple


class Cache(NamedTuple):
    x: object  # (..., n_in)
    w: object  # (n_in, n_out)


def rows_matmul(t, w):
    """t @ w for t of shape (..., n), as one (rows, n) × (n, m) product. NumPy's matmul makes one
    BLAS call per matrix of a stack, so (B, T, n) @ W would be B calls of T rows each: slower on
    one thread, and much slower on several, which BLAS wakes and waits for once per call."""
    return (t.reshape(-1, t.shape[-1]) @ w).reshape(t.shape[:-1] + (w.shape[-1],))


def rows_t_matmul(x, g):
    """Σ_rows xᵀ g for x (..., n) and g (..., m): the (n, m) weight gradient of a layer."""
    return x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])


def forward(x, w):
    return rows_matmul(x, w), Cache(x, w)


def backward(dout, cache):
    x, w = cache
    return {"x": rows_matmul(dout, w.T), "w": rows_t_matmul(x, dout)}
