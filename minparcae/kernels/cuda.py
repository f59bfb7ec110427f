"""GPU kernels: Numba CUDA versions of the ops (see __init__.py for the contracts)."""

KERNELS = {}
