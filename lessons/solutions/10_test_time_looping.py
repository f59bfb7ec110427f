"""Solutions to the exercises of lesson 10. Write yours first: `python
lessons/10_test_time_looping.py --exercise N` grades the function in the lesson, `--exercise N
--solution` grades the one here."""

import math


def three_point_fit(T, L):
    """Exercise 1: L₁ − L₂ = Z e^(−zt)(1 − q) and L₂ − L₃ = q (L₁ − L₂) with q = e^(−zs): the ratio
    of the differences gives z, the first difference then Z, and the first point L∞."""
    s = float(T[1] - T[0])
    q = (L[1] - L[2]) / (L[0] - L[1])
    z = -math.log(q) / s
    Z = (L[0] - L[1]) / (math.exp(-z * T[0]) * (1 - q))
    return L[0] - Z * math.exp(-z * T[0]), Z, z


def best_loop_count(L_inf, Z, z, price):
    """Exercise 2: going from T to T + 1 changes the total by price − Z e^(−zT)(1 − e^(−z)), which
    grows with T: loop on while it is negative, i.e. stop at the first T where the gain of one more
    loop, Z e^(−zT)(1 − e^(−z)), is at most the price."""
    gain = Z * -math.expm1(-z)  # the gain of the step from T = 0 to 1
    return max(1, math.ceil(math.log(gain / price) / z))
