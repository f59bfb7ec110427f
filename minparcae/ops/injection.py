"""How the loop state h and the injected input e are mixed before each pass of the recurrent block.

The looped model iterates h_t = R(Ā h_{t−1} + B̄ e). Everything before R is "the injection", and its
linear part decides whether the loop is a stable dynamical system. Three kinds share one interface:

  diagonal (Parcae)   Ā = exp(Δ·A) with A = −exp(A_log), Δ = softplus(dt_bias)   (zero-order hold)
                      B̄ = Δ·B                                                       (Euler)
                      x = Ā ⊙ h + Δ ⊙ (e B)
                      Ā is diagonal with entries exp(−Δ·exp(A_log)) ∈ (0, 1) for every parameter
                      value, so the spectral radius ρ(Ā) < 1 by construction.
  linear  (baseline)  x = [h; e] W = h W_h + e W_e         ρ(W_h) is unconstrained: it can exceed 1.
  add     (baseline)  x = h + e                            Ā = I: ρ = 1, marginally stable.

e is fixed for the whole loop, so the part that only depends on e (u = B̄e, e W_e or e) is computed
once per forward by `input_forward` and its backward runs once, on the gradient summed over the
loop steps (`input_backward`). Each loop step only runs `state_forward`: x = Ā h + u.

Backward of the diagonal kind, with a = exp(A_log), G = dL/dx (summed over batch and positions):
    dh = G ⊙ Ā
    dĀ = Σ G ⊙ h,   dΔ|_Ā = −dĀ ⊙ Ā ⊙ a,   dA_log = −dĀ ⊙ Ā ⊙ Δ ⊙ a
    with U = dL/du:  dB = eᵀ (U ⊙ Δ),  de = (U ⊙ Δ) Bᵀ,  dΔ|_B̄ = Σ U ⊙ (e B)
    ddt_bias = dΔ ⊙ σ(dt_bias)                 (softplus' = sigmoid)
Matrices are stored (in, out): B is (d, d_h), W is (d_h + d, d_h) with the h rows first.
"""

from typing import NamedTuple

import numpy as np

from ..backend import array_module, to_host
from .linear import rows_matmul, rows_t_matmul

KINDS = ("diagonal", "linear", "add")


class InputCache(NamedTuple):
    kind: str
    e: object = None  # (B, T, d), the loop's input (diagonal and linear)
    eB: object = None  # e B (diagonal)
    delta: object = None  # Δ (diagonal)


class StateCache(NamedTuple):
    kind: str
    h: object = None  # (N, T, d_h), the state entering the step (diagonal and linear)
    A_bar: object = None  # Ā (diagonal), and the Δ and a = exp(A_log) it was made from
    delta: object = None
    a: object = None


def softplus(x):
    xp = array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(x):
    xp = array_module(x)
    z = xp.exp(-xp.abs(x))  # never overflows
    return xp.where(x >= 0, 1 / (1 + z), z / (1 + z))


def diagonal_decay(A_log, dt_bias):
    """Ā = exp(−softplus(dt_bias)·exp(A_log)), with the rate Δ·a it is the exponential of."""
    xp = array_module(A_log)
    delta, a = softplus(dt_bias), xp.exp(A_log)
    return xp.exp(-delta * a), delta, a


def spectral_radius(kind, p):
    """ρ of the injection's linear state map (computed on the host; a diagnostic, not a hot path)."""
    if kind == "diagonal":
        return float(to_host(diagonal_decay(p["inject.A_log"], p["inject.dt_bias"])[0]).max())
    if kind == "linear":
        W = to_host(p["inject.W"]).astype(np.float64)
        return float(np.abs(np.linalg.eigvals(W[: W.shape[1]])).max())
    return 1.0


def input_forward(kind, p, e):
    """u, the part of the injection that depends only on e: (B, T, d) -> (B, T, d_h)."""
    if kind == "diagonal":
        delta = softplus(p["inject.dt_bias"])
        eB = rows_matmul(e, p["inject.B"])
        return delta * eB, InputCache(kind, e, eB, delta)
    if kind == "linear":
        W = p["inject.W"]
        return rows_matmul(e, W[W.shape[1]:]), InputCache(kind, e)
    return e, InputCache(kind)


def input_backward(du, cache, p):
    """Gradients of u's inputs: e and the injection parameters u depends on."""
    kind, e, eB, delta = cache
    if kind == "diagonal":
        g = du * delta  # (B, T, d_h)
        d_delta = (du * eB).reshape(-1, eB.shape[-1]).sum(axis=0)
        return {"e": rows_matmul(g, p["inject.B"].T),
                "inject.B": rows_t_matmul(e, g),
                "inject.dt_bias": d_delta * sigmoid(p["inject.dt_bias"])}
    if kind == "linear":
        W = p["inject.W"]
        d_h = W.shape[1]
        xp = array_module(W)
        dW = xp.zeros_like(W)
        dW[d_h:] = rows_t_matmul(e, du)
        return {"e": rows_matmul(du, W[d_h:].T), "inject.W": dW}
    return {"e": du}


def state_forward(kind, p, h, u):
    """x = Ā h + u, the input of one pass of the recurrent block: h, u (N, T, d_h) -> (N, T, d_h)."""
    if kind == "diagonal":
        A_bar, delta, a = diagonal_decay(p["inject.A_log"], p["inject.dt_bias"])
        return A_bar * h + u, StateCache(kind, h, A_bar, delta, a)
    if kind == "linear":
        W = p["inject.W"]
        return rows_matmul(h, W[: W.shape[1]]) + u, StateCache(kind, h)
    return h + u, StateCache(kind)


def state_backward(dx, cache, p):
    """dL/dh, dL/du (= dx) and the gradients of the state map's parameters."""
    kind, h, A_bar, delta, a = cache
    if kind == "diagonal":
        dh, dA_bar = dx * A_bar, (dx * h).reshape(-1, h.shape[-1]).sum(axis=0)  # (d_h,)
        g = dA_bar * A_bar
        return {"h": dh, "u": dx, "inject.A_log": -g * delta * a,
                "inject.dt_bias": -g * a * sigmoid(p["inject.dt_bias"])}
    if kind == "linear":
        W = p["inject.W"]
        d_h = W.shape[1]
        xp = array_module(W)
        dW = xp.zeros_like(W)
        dW[:d_h] = rows_t_matmul(h, dx)
        return {"h": rows_matmul(dx, W[:d_h].T), "u": dx, "inject.W": dW}
    return {"h": dx, "u": dx}
