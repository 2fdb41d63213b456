"""Division of 32-bit indices by a launch-wide divisor as a multiply-high, an add and a shift.

Granlund and Montgomery's method in the form torch's ``IntDivider`` uses: for a divisor
``1 <= d < 2^31``, ``s`` is the least shift with ``2^s >= d`` and ``m = floor(2^32 (2^s - d) / d)
+ 1`` (below 2^32); then for ``0 <= n < 2^31``, ``n // d == (umulhi(n, m) + n) >> s``, the sum
below 2^32 as ``umulhi(n, m) < n``. A GPU divides 32-bit integers in about twenty instructions;
this takes four. The pooling kernels unravel element indices with it (``cuda/pool_math.cuh``'s
``gn_fastdiv``, ``triton/pool.py``'s ``_div``); the launchers compute ``m`` and ``s`` here.
"""

from __future__ import annotations


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
