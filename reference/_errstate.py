"""NumPy's floating-point warnings off around the reference's entry points (NumPy only)."""

from __future__ import annotations

import numpy as np


def quiet(fn):
    """``fn`` run under ``np.errstate(divide=, over=, invalid="ignore")``: inf / NaN operands and
    results that overflow are data, and torch never warns about them (under
    ``warnings.simplefilter("error")`` a RuntimeWarning would raise mid-update and leave an
    optimizer's state half written). One errstate (about a microsecond) per public call, around
    the whole call, never per operation or per loop iteration."""
    def wrapped(*args, **kwargs):
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # torch does not warn
            return fn(*args, **kwargs)
    wrapped.__name__, wrapped.__qualname__, wrapped.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapped.__module__, wrapped.__wrapped__ = fn.__module__, fn
    return wrapped
