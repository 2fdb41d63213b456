"""Differences between the Triton versions gpu-nn supports (3.6 on the GPU machine, 3.9 in
development), handled explicitly by version.

Only one is known to matter, and only for the interpreter (``TRITON_INTERPRET=1``); the compiled
path (``triton.compile`` / ``kernel[grid](...)``) needs nothing (every ``aot_specs()``
configuration compiles for sm_90 under both 3.6 and 3.9).

* Triton < 3.7 with NumPy >= 2.4: the interpreter turns a scalar kernel argument into Python
  ``int`` (``range(0, n, BLOCK)`` over a runtime ``n``, as in the conv, pool, dense, rnn and
  optim kernels) with ``int(handle.data)`` on a shape-``(1,)`` array. NumPy 2.4 made that a
  ``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars"; it had been
  deprecated since 1.25). Upstream fixed it with ``int(handle.data.squeeze())``
  (triton-lang/triton#9171), first released in 3.7.0 (3.6.0's ``interpreter.py`` lacks it,
  3.7.0's and 3.9.0's have it). :func:`apply` installs exactly that fix on the older versions.
* Triton < 3.9: the interpreter's ``tl.fma`` is ``x * y + z`` in the operands' precision, two
  roundings (3.6.0's, 3.7.0's and 3.8.0's ``InterpreterBuilder.create_fma``; 3.9.0's calls an
  exact C++ fma for float32 and float64). A compiled kernel's fma rounds once, and the optimizer
  kernels rely on it: centered RMSprop's ``v - ga^2`` with a gradient of 3e38 overflows ga^2 to
  inf when rounded alone, and the parameter turns NaN where torch's (and the GPU's) stays put.
  :func:`apply` replaces it, where :func:`needs_interpreter_fma_fix` finds the two roundings, by
  :func:`exact_fma`.
"""

from __future__ import annotations

import contextlib

import numpy as np


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def triton_version() -> tuple[int, int]:
    import triton

    return _version(triton.__version__)


def needs_interpreter_index_fix() -> bool:
    """True where the interpreter's ``tensor.__index__`` fails on NumPy >= 2.4 (triton < 3.7)."""
    import numpy as np

    return triton_version() < (3, 7) and _version(np.__version__) >= (2, 4)


def exact_fma(x, y, z):
    """``x * y + z`` rounded once, on NumPy arrays (broadcast), in ``z``'s dtype.

    float32: the product of two float32 values is exact in float64 (24 + 24 bits); their sum
    with ``z`` is taken in float64 rounded to odd (TwoSum gives the exact error; an inexact sum
    whose last bit is even moves one ulp towards it), and rounding a round-to-odd float64 to
    float32 is the correctly rounded result (53 >= 24 + 2 bits). Infinities and NaN follow the
    float64 sum. Other dtypes as Triton 3.9's interpreter takes them: product and sum in float64,
    then the dtype (float16 exact; float64 rounded twice, where no float128 is at hand)."""
    a, b, c = np.broadcast_arrays(np.asarray(x), np.asarray(y), np.asarray(z))
    dtype = np.asarray(z).dtype
    p = np.multiply(a, b, dtype=np.float64)
    s = np.add(p, c, dtype=np.float64)
    if dtype != np.float32:
        return s.astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        bb = s - p
        e = (p - (s - bb)) + (c - bb)
    even = (np.asarray(s).view(np.int64) & 1) == 0
    nudge = np.isfinite(s) & np.isfinite(e) & (e != 0) & even
    if nudge.any():
        s = np.where(nudge, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return np.asarray(s).astype(np.float32)


def needs_interpreter_fma_fix() -> bool:
    """True where the interpreter's fma rounds twice (Triton < 3.9, see the module docstring):
    probed on float32 operands whose exact result, 2^-24, is lost when x * y = 1 + 2^-11 + 2^-24
    is rounded to float32 before the sum."""
    from triton.runtime import interpreter

    import triton.language as tl

    def handle(v):
        return interpreter.TensorHandle(np.array([v], dtype=np.float32), tl.float32)

    x = handle(1 + 2.0 ** -12)
    got = interpreter.InterpreterBuilder.create_fma(None, x, x, handle(-(1 + 2.0 ** -11)))
    return float(np.asarray(got.data)[0]) != 2.0 ** -24


def _install_interpreter_fma_fix() -> None:
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        return interpreter.TensorHandle(exact_fma(x.data, y.data, z.data), z.dtype.scalar)

    interpreter.InterpreterBuilder.create_fma = create_fma


_applied = False


def _install_interpreter_index_fix() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Recorded in the same scope after the original's change, so the interpreter's
        # scope.restore() (last in, first out) undoes both.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def apply(interpret: bool) -> None:
    """Install the version-specific fixes listed in the module docstring (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    if interpret and needs_interpreter_index_fix():
        _install_interpreter_index_fix()
    if interpret and needs_interpreter_fma_fix():
        _install_interpreter_fma_fix()


@contextlib.contextmanager
def parallel_compile(workers: int):
    """Inside the block, ``kernel.warmup(...)`` calls only queue their compilation, on a pool of
    ``workers`` threads (ptxas runs as its own process, so they overlap), and leaving the block
    waits for every one and installs it (Triton >= 3.4's AsyncCompileMode; compile errors are
    left for the real launch to raise). Yields False, doing nothing, where Triton lacks that mode:
    the caller then leaves compilation to the first launches."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        yield False
        return
    # the executor must outlive the mode: the mode's exit waits for (and installs) every kernel
    with ThreadPoolExecutor(max(1, workers)) as pool, AsyncCompileMode(pool, ignore_errors=True):
        yield True
