"""NumPy reference for the pool family (NumPy only)."""
