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
"""

from __future__ import annotations

import contextlib


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
