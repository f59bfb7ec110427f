"""Solutions to the exercises of lesson 9. Write yours first: `python lessons/09_training.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np

WAIT, FORWARD, GRAD = 0, 1, 2


def sample_depths(rng, batch, mu_rec):
    """Exercise 1: a Poisson draw per sequence; a depth of 0 would skip the loop, so it becomes 1."""
    return np.maximum(1, rng.poisson(mu_rec, size=batch))


def loop_schedule(depths, mu_bwd):
    """Exercise 2: sequence b joins at step T − depth_b; its last min(depth_b, μ_bwd) steps keep
    their activations, and they all fall in the batch's last μ_bwd steps."""
    T = int(depths.max())
    t = np.arange(T)[None, :]
    start = T - depths[:, None]
    k = np.minimum(depths, mu_bwd)[:, None]
    return np.where(t < start, WAIT, np.where(t < T - k, FORWARD, GRAD))


def truncated_grads(a, b, e, h0, T, k):
    """Exercise 3: forward, keeping the states of the last k steps; then back through those steps
    only. At step t, h_t = a·h_{t−1} + b·e gives ∂h_t/∂a = h_{t−1}, ∂h_t/∂b = e and ∂h_t/∂h_{t−1}
    = a; the walk stops at h_{T−k}, which the frozen-state loss treats as a constant."""
    states = [h0]
    for _ in range(T):
        states.append(a * states[-1] + b * e)
    G, da, db = 1.0, 0.0, 0.0  # G = ∂L/∂h_t, from t = T
    for t in range(T, T - k, -1):
        da += G * states[t - 1]
        db += G * e
        G *= a
    return da, db
