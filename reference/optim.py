"""NumPy reference for the optimizers and gradient clipping (NumPy only)."""
