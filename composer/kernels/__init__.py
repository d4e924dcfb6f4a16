"""Experts kernels: the torch reference, Triton, grouped_mm; and the float64 oracle."""
