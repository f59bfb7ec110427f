"""CPU kernels: Numba `njit` versions of the hot elementwise and row-wise paths (see __init__.py
for the contracts)."""

KERNELS = {}
