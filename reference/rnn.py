"""NumPy reference for the rnn family (NumPy only)."""
