"""minparcae: a small, from-scratch Parcae (stable looped transformer) with hand-written backward
passes, on NumPy (CPU) and CuPy (GPU)."""

__version__ = "0.1.0"
