"""Ways around NumPy defects the reference meets (NumPy only)."""

from __future__ import annotations

import numpy as np


def negative(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``np.negative(a, out=out)`` (``out`` may be ``a``), right whatever the strides.

    NumPy 2.4 (2.4.6) negates wrongly when both ``a`` and ``out`` are strided: between elements 16
    bytes apart (float32, int32) or 64 bytes apart (float64, int64) it reads other elements, in
    place included. The reference's LSTM met it: its sigmoid negates each gate in place, and the
    output gate of a one-unit layer is a column of the [rows, 4] gate matrix, 16 bytes a row in
    float32, so every row but the first took another row's gate (values 1e-2 off torch's).
    Contiguous operands take NumPy's loop; others go through a contiguous temporary, whose
    negation and copy back are right."""
    if a.flags.c_contiguous and out.flags.c_contiguous:
        return np.negative(a, out=out)
    np.copyto(out, np.negative(np.ascontiguousarray(a)))
    return out
