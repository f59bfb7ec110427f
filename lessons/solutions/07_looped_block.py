"""Solutions to the exercises of lesson 7. Write yours first: `python lessons/07_looped_block.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

from minparcae import model
from minparcae.ops import REFERENCE, injection


def run_loop(pf, cfg, e, h0, T, rope):
    """Exercise 1: B̄e does not change between steps, so it is made once; each step applies the
    state map and the same blocks."""
    u, _ = injection.input_forward(cfg.injection, pf, e)
    h = h0
    for _ in range(T):
        x, _ = injection.state_forward(cfg.injection, pf, h, u)
        for i in range(cfg.n_recurrent):
            x, _ = model.block_forward(pf, f"core.{i}", x, rope, cfg, REFERENCE)
        h = x
    return h


def train_flops_per_token(cfg, forward_flops):
    """Exercise 2: forward(T) = outside + T·step. Training runs the outside once forward and once
    backward (3 × its forward), μ_rec steps forward and μ_bwd of them backward (2 × forward each)."""
    step = forward_flops(2) - forward_flops(1)
    outside = forward_flops(1) - step
    return 3 * outside + step * cfg.mean_recurrence + 2 * step * cfg.backprop_depth
