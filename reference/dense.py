"""NumPy reference for the dense family (NumPy only)."""
