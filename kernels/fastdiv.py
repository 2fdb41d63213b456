"""Division of 32-bit indices by a launch-wide divisor as a multiply-high, an add and a shift.

Granlund and Montgomery's method in the form torch's ``IntDivider`` uses: for a divisor
``1 <= d < 2^31``, ``s`` is the least shift with ``2^s >= d`` and ``m = floor(2^32 (2^s - d) / d)
+ 1`` (below 2^32); then for ``0 <= n < 2^31``, ``n // d == (umulhi(n, m) + n) >> s``, the sum
below 2^32 as ``umulhi(n, m) < n``. A GPU divides 32-bit integers in about twenty instructions;
this takes four. The pooling kernels unravel element indices with it (``cuda/pool_math.cuh``'s
``gn_fastdiv``, ``triton/pool.py``'s ``_div``); the launchers take ``m`` and ``s`` from
:func:`launch_args` (cached per tuple of sizes).
"""

from __future__ import annotations

import functools

import numpy as np


def magic(d: int) -> tuple:
    """``(m, s)`` for the divisor ``d`` (1 <= d < 2^31): m an unsigned 32-bit value."""
    d = int(d)
    if not 1 <= d < 2**31:
        raise ValueError(f"fastdiv divisor {d} outside [1, 2^31)")
    s = (d - 1).bit_length()
    return ((1 << 32) * ((1 << s) - d)) // d + 1, s


def magic_i32(d: int) -> tuple:
    """:func:`magic` with m as the int32 of its bit pattern (Triton takes Python ints below 2^31
    as i32 arguments; the kernel reinterprets them as unsigned)."""
    m, s = magic(d)
    return (m - (1 << 32) if m >= 1 << 31 else m), s


@functools.lru_cache(maxsize=256)
def launch_args(sizes: tuple, signed: bool) -> tuple:
    """The pooling kernels' divisor arguments for ``sizes``: m and s of each in order (a size of
    0 taken as 1: an empty launch divides nothing), as Triton takes them where ``signed`` (Python
    ints, m as its int32 bit pattern: :func:`magic_i32`) or as CUDA C's ``unsigned int``
    parameters otherwise (``np.uint32``, CuPy passing a NumPy scalar in its own width)."""
    if signed:
        return tuple(v for d in sizes for v in magic_i32(max(int(d), 1)))
    return tuple(np.uint32(v) for d in sizes for v in magic(max(int(d), 1)))
