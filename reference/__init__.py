"""gpu-nn's NumPy reference: the oracle for every test and the CPU fallback.

NumPy only: this package imports neither torch, triton nor cupy, and nothing of gpu-nn
but itself. Functions mirror the public signatures on NumPy arrays and have explicit
``*_backward`` functions.
"""
