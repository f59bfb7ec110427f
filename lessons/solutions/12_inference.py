"""Solutions to the exercises of lesson 12. Write yours first: `python lessons/12_inference.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)  # every exponent ≤ 0: nothing overflows
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def step_kl(logits_prev, logits):
    """Exercise 1: in log space, where e^z is never formed for a large z."""
    lp, lq = _log_softmax(logits), _log_softmax(logits_prev)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def exit_loop_counts(logits, eps):
    """Exercise 2: a token stops after the first step t ≥ 2 whose KL to step t − 1 is below eps;
    one that never gets there runs all T_max steps."""
    T_max, N = logits.shape[:2]
    loops = np.full(N, T_max)
    running = np.ones(N, dtype=bool)
    for t in range(2, T_max + 1):
        stop = running & (step_kl(logits[t - 2], logits[t - 1]) < eps)
        loops[stop] = t
        running &= ~stop
    return loops


def loops_that_fit(cfg, budget_bytes, batch, context):
    """Exercise 3: the bytes grow linearly in T (lesson 12, section 1), so solve for T and round
    down: the fixed part is the prelude and coda slots, each step adds n_r slots of d_h."""
    outside = (cfg.n_prelude + cfg.n_coda) * cfg.kv_heads * (cfg.d_model // cfg.n_head)
    per_position = budget_bytes // (batch * context)  # whole bytes: a position costs whole bytes
    return max(0, (per_position // (4 * 2) - outside) // (cfg.n_recurrent * cfg.d_h))
