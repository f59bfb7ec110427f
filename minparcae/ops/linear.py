"""Linear map without bias, and the matrix products every op uses.

    y = x W              x: (..., n_in), W: (n_in, n_out), y: (..., n_out)

Backward, with G = dL/dy:

    dL/dx = G Wᵀ         dL/dW = Σ_rows xᵀ G   (all leading axes flattened into rows)

Matrices in minparcae are stored (in, out), so every layer is `x @ W`.
"""

from .. import kernels


def matmul(a, b):
    """a @ b for two matrices. On the CPU the kernels split it over threads (kernels/cpu.py)."""
    kernel = kernels.fast("matmul", a)
    return a @ b if kernel is None else kernel(a, b)


def rows_matmul(t, w):
    """t @ w for t of shape (..., n), as one (rows, n) × (n, m) product. NumPy's matmul makes one
    BLAS call per matrix of a stack, so (B, T, n) @ W would be B calls of T rows each: slower on
    one thread, and much slower on several, which BLAS wakes and waits for once per call."""
    return matmul(t.reshape(-1, t.shape[-1]), w).reshape(t.shape[:-1] + (w.shape[-1],))


def rows_t_matmul(x, g):
    """Σ_rows xᵀ g for x (..., n) and g (..., m): the (n, m) weight gradient of a layer."""
    return matmul(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))


def forward(x, w):
    return rows_matmul(x, w), (x, w)


def backward(dout, cache):
    x, w = cache
    return {"x": rows_matmul(dout, w.T), "w": rows_t_matmul(x, dout)}
