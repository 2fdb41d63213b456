"""NumPy reference for the conv family (NumPy only)."""
