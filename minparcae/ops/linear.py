"""Linear map without bias.

    y = x W              x: (..., n_in), W: (n_in, n_out), y: (..., n_out)

Backward, with G = dL/dy:

    dL/dx = G Wᵀ         dL/dW = Σ_rows xᵀ G   (all leading axes flattened into rows)

Matrices in minparcae are stored (in, out), so every layer is `x @ W`.
"""


def forward(x, w):
    return x @ w, (x, w)


def backward(dout, cache):
    x, w = cache
    dx = dout @ w.T
    dw = x.reshape(-1, x.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])  # (n_in, n_out)
    return {"x": dx, "w": dw}
