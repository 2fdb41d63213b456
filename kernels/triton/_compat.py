"""Differences between the Triton versions gpu-nn supports (3.6 on the GPU machine, 3.9 in
development), handled explicitly by version.

Those known to matter are all in the interpreter (``TRITON_INTERPRET=1``); the compiled
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
* Every version (3.6 to 3.9): the interpreter holds bfloat16 as its ``uint16`` bit patterns and
  computes on those as integers: ``tl.dot`` of two bfloat16 tiles multiplies the bit patterns,
  ``tl.maximum`` / ``tl.max`` / comparisons order negative values backwards, arithmetic and
  ``exp`` are meaningless, and a float32 -> bfloat16 cast truncates where the GPU (``cvt.rn``)
  rounds to nearest even. :func:`apply` makes the interpreter compute bfloat16 as the GPU does
  (:func:`_install_interpreter_bf16_fix`): values widened exactly to float32, the operation in
  float32 (a dot exactly, in float64, then rounded to float32, as a tensor-core dot with float32
  accumulation approximates), results rounded to nearest even; :func:`bf16_exact` says whether
  that is in place, and the backends refuse bfloat16 under an interpreter without it.
* Every version: the interpreter keeps one builder for the whole process (the program index
  ``tl.program_id`` reads, the grid) and patches ``triton.language`` for the length of a launch,
  so two threads launching at once raised (13 of 60 calls in an audit's two-thread run) or could
  read each other's program ids. :func:`apply` makes interpreted launches take turns
  (:func:`_install_interpreter_launch_lock`: one process-wide lock around
  ``GridExecutor.__call__``); a launch's own programs are untouched (tests/helpers.py
  ``concurrent_programs`` still runs them all at once).
* Every version (3.6 to 3.9): the interpreter runs ``triton.language.extra.libdevice``'s stubs,
  which return None; :func:`apply` computes the few functions the kernels call with NumPy
  (:func:`_install_interpreter_libdevice`).
* Every version (3.6 to 3.9): the interpreter patches ``triton.language`` (every builtin of
  ``tl``, ``tl.tensor``, ``tl.math``: ``inspect.getmembers`` of each, sorted) at every launch,
  and again at every call of a ``@triton.jit`` helper inside a kernel, though the launch's
  patch of the same modules stands until the launch ends (the helper's patch is never
  restored: it changes nothing). A recurrent kernel calls its cell helpers at every step: in
  ``test_persistent_forward_matches_reference[T4B1H33L1bilen-lstm]`` 4,200 helper calls under
  20 launches spent 8.4 s of 29.7 s of interpretation patching. :func:`apply` lets a helper
  call inside a launch whose patch covers the helper's language modules skip it
  (:func:`_install_interpreter_patch_once`), and reads each module's member names once
  instead of at every patch; what is patched, and when it is restored, is unchanged.
* Every version (3.6 to 3.9): the interpreter's options ask for integer-overflow checks
  (``sanitize_overflow``) with ``debug`` off, and its ``device_assert`` returns without
  looking when ``debug`` is off (as a compiled kernel's, where the check's code is then dead):
  every 32-bit integer ``+``, ``-`` and ``*`` (a kernel's index arithmetic) was also computed
  in int64, compared with both bounds and combined, and the result thrown away; 17 % of the
  interpretation of the persistent recurrent forward tests. :func:`apply` turns the checks off
  where ``debug`` is off (:func:`_install_interpreter_no_dead_overflow_checks`): no check
  that ran is lost.
* Every version (3.6 to 3.9): every interpreted operation makes a new ``block_type`` (its shape
  turned into triton.language's own tuple of constexpr types, and a name formatted from it) and
  a new ``tensor`` whose shape is another such tuple: 17 % and 14 % of the interpretation of
  tests/test_double_backward.py and test_dense.py. Neither is changed after it is made (code
  that reshapes copies the shape into a list first), so :func:`apply` keeps one block type per
  element type and shape of ints, and one shape tuple per block type for its tensors
  (:func:`_install_interpreter_type_memo`): those two files 128 s -> 97 s (-n 2). The same
  function keeps the answer of ``_get_np_dtype`` (the NumPy dtype holding a Triton type, asked
  at every splat, cast and load), which built a dict of 19 dtypes at each call (7 % of the
  persistent recurrent forward tests), per scalar type. The tensors of scalar types share one
  empty shape the same way (with the pointer blocks, which the memo cannot key, they sent 191 K
  of the 402 K tensors of the persistent recurrent forward tests through the full constructor). And
  it replaces ``TritonSemantic.broadcast_impl_value`` (the splat or broadcast of every binary
  operation's operands: a quarter of the persistent recurrent forward tests' time, in
  comparisons of triton.language's tuples of constexprs and block types made anew) by the same
  steps on the shapes as tuples of ints, with the block types from the memo; ranks that differ
  and shapes that do not broadcast go to the real function. Interleaved runs, ``-n 2``:
  test_dense + test_double_backward 86-92 s -> 80-83 s, a recurrent subset of test_rnn and
  test_dense 78-79 s -> 61-68 s.
"""

from __future__ import annotations

import contextlib

import numpy as np

installed: set[str] = set()  # the fixes apply() installed in this process: "index", "fma", "bf16", "launch_lock",
# "patch_once", "no_dead_overflow_checks", "type_memo"
replaced: dict = {}  # what a fix replaced, by name, where a test compares the two ("broadcast_impl_value")


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
    with ``z`` is taken in float64 rounded to odd (:func:`_add_round_to_odd`), and rounding a
    round-to-odd float64 to float32 is the correctly rounded result (53 >= 24 + 2 bits).
    Infinities and NaN follow the float64 sum. Other dtypes as Triton 3.9's interpreter takes them: product and sum in float64,
    then the dtype (float16 exact; float64 rounded twice, where no float128 is at hand)."""
    a, b, c = np.broadcast_arrays(np.asarray(x), np.asarray(y), np.asarray(z))
    dtype = np.asarray(z).dtype
    p = np.multiply(a, b, dtype=np.float64)
    if dtype != np.float32:
        return np.add(p, c, dtype=np.float64).astype(dtype)
    return _add_round_to_odd(p, c).astype(np.float32)


def _add_round_to_odd(p, c) -> np.ndarray:
    """``p + c`` in float64 rounded to odd (TwoSum gives the exact error; an inexact sum whose
    last bit is even moves one ulp towards it): rounded again to a format of at most 51
    significant bits, the correctly rounded sum. Infinities and NaN as the float64 sum."""
    s = np.add(p, c, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        bb = s - p
        e = (p - (s - bb)) + (c - bb)
    even = (np.asarray(s).view(np.int64) & 1) == 0
    nudge = np.isfinite(s) & np.isfinite(e) & (e != 0) & even
    if nudge.any():
        s = np.where(nudge, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return np.asarray(s)


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
    installed.add("fma")


# -- libdevice in the interpreter --------------------------------------------------------------

# the libdevice functions gpu-nn's kernels call (``triton.language.extra.libdevice``), as the
# interpreter computes them: in float64, rounded once to the argument's dtype (libdevice's own
# float32 functions are within 1-2 ulps of that)
INTERPRETED_LIBDEVICE = {"exp": np.exp, "tanh": np.tanh}


def _interpreted_libdevice(np_fn):
    def fn(arg0, _semantic=None, **_):
        from triton.language import core
        from triton.runtime import interpreter

        # what the compiled dispatch takes (fp32 / fp64 tensors): anything else is refused here
        # too (the interpreter holds bfloat16 as its bit patterns, which NumPy would take for numbers)
        if not isinstance(arg0, core.tensor) or arg0.dtype not in (core.float32, core.float64):
            raise ValueError(f"libdevice.{np_fn.__name__}: gpu-nn's kernels call it on float32 / float64 tensors "
                             f"only, got {getattr(arg0, 'dtype', type(arg0).__name__)}")
        handle = arg0.handle
        data = np.asarray(handle.data)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            out = np_fn(data.astype(np.float64)).astype(data.dtype)
        return core.tensor(interpreter.TensorHandle(out, handle.dtype.scalar), arg0.type)

    fn.__name__ = np_fn.__name__
    return fn


def _install_interpreter_libdevice() -> None:
    """Every version (3.6 to 3.9): ``triton.language.extra.libdevice``'s functions are stubs
    that Triton's code generator maps to the backend's (CUDA's ``__nv_expf``...); the
    interpreter runs the stubs themselves, which return None, so a kernel that calls libdevice
    (the activation kernel's exp and tanh, as torch's CUDA kernels compute them) could not run on
    a CPU machine. The functions of :data:`INTERPRETED_LIBDEVICE` are computed by NumPy on the
    interpreter's tensors; the code generator never reads these attributes (it maps the module
    by name to the backend's), so compiled kernels are untouched."""
    from triton.language.extra import libdevice

    for name, np_fn in INTERPRETED_LIBDEVICE.items():
        setattr(libdevice, name, _interpreted_libdevice(np_fn))
    installed.add("libdevice")


# -- bfloat16 in the interpreter ---------------------------------------------------------------


def bf16_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) to their float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """float64 to float32 rounded to odd: an inexact result whose last bit is even moves one ulp
    towards ``x``. Rounding that to bfloat16 (8 significant bits; 24 >= 8 + 2) is the correctly
    rounded bfloat16 of ``x``, where going through a nearest float32 could round twice."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
    inexact = np.isfinite(f) & (back != x)
    even = (f.view(np.uint32) & 1) == 0
    nudge = inexact & even
    if nudge.any():
        f = np.where(nudge, np.nextafter(f, np.where(x > back, np.float32(np.inf), np.float32(-np.inf))), f)
    return f


def float_to_bf16(values) -> np.ndarray:
    """Values of any real dtype to bfloat16 bit patterns, rounded to nearest even as the GPU's
    ``cvt.rn.bf16`` does (overflow to infinity, NaN kept quiet, subnormals kept)."""
    v = np.asarray(values)
    if v.dtype == np.float64:
        v = _round_to_odd_float32(v)
    elif v.dtype != np.float32:
        v = v.astype(np.float32)  # float16 and the integers a kernel converts are exact in float32
    b = v.view(np.uint32).astype(np.uint64)
    out = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(v)
    if nan.any():
        out = np.where(nan, ((b >> 16) | 0x40).astype(np.uint16), out)
    return out.reshape(v.shape)


def _install_interpreter_bf16_fix() -> None:
    from triton.runtime import interpreter

    import triton.language as tl

    B = interpreter.InterpreterBuilder
    TensorHandle = interpreter.TensorHandle
    bitwise = {np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.left_shift, np.right_shift}
    bf16 = tl.bfloat16

    def _is_bf16(handle) -> bool:  # on every interpreted operation: no import, no module lookup
        return getattr(handle.dtype, "scalar", handle.dtype) == bf16

    def values(h):
        return bf16_to_float32(h.data) if _is_bf16(h) else h.data

    cast_impl, fp_to_fp = B.cast_impl, B.create_fp_to_fp
    binary_op, unary_op, ternary_op = B.binary_op, B.unary_op, B.ternary_op
    create_fma, create_dot = B.create_fma, B.create_dot
    create_rsqrt, create_erf = B.create_rsqrt, B.create_erf

    def cast(self, src, dst_type):
        dst = dst_type.scalar
        if dst == bf16 and not _is_bf16(src):
            return TensorHandle(float_to_bf16(src.data), dst)
        if _is_bf16(src) and dst != bf16:
            return cast_impl(self, TensorHandle(bf16_to_float32(src.data), tl.float32), dst_type)
        return cast_impl(self, src, dst_type)

    def cast_fp_to_fp(self, src, dst_type, rounding_mode):
        fp8 = 8 in (src.dtype.scalar.primitive_bitwidth, dst_type.scalar.primitive_bitwidth)  # Triton's own, right
        if not fp8 and (_is_bf16(src) or dst_type.scalar == bf16):
            if rounding_mode is not None and rounding_mode != interpreter._ir.ROUNDING_MODE.RTNE:
                return fp_to_fp(self, src, dst_type, rounding_mode)
            return cast(self, src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def from_float32(out, dtype):
        """An operation's float32 result in bfloat16; a comparison's stays boolean (int1)."""
        if out.dtype.kind == "f":
            return TensorHandle(float_to_bf16(out), dtype)
        return TensorHandle(out, tl.int1)

    def binary(self, lhs, rhs, op):
        if (_is_bf16(lhs) or _is_bf16(rhs)) and op not in bitwise:
            return from_float32(np.asarray(op(values(lhs), values(rhs))), lhs.dtype.scalar)
        return binary_op(self, lhs, rhs, op)

    def unary(self, arg, op):
        if _is_bf16(arg):
            return from_float32(np.asarray(op(values(arg))), arg.dtype.scalar)
        return unary_op(self, arg, op)

    def ternary(self, lhs, rhs, other, op):
        if _is_bf16(other) and op is not np.where:  # where only moves bit patterns
            return from_float32(np.asarray(op(values(lhs), values(rhs), values(other))), other.dtype.scalar)
        return ternary_op(self, lhs, rhs, other, op)

    def fma(self, x, y, z):
        if _is_bf16(z):  # the product of two bfloat16 is exact in float64; the sum rounded to odd
            p = np.multiply(values(x), values(y), dtype=np.float64)
            return TensorHandle(float_to_bf16(_add_round_to_odd(p, values(z))), z.dtype.scalar)
        return create_fma(self, x, y, z)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if _is_bf16(a) or _is_bf16(b):
            exact = np.matmul(values(a).astype(np.float64), values(b).astype(np.float64))
            return TensorHandle(exact.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def widened(original):
        def method(self, arg):
            if _is_bf16(arg):
                out = original(self, TensorHandle(bf16_to_float32(arg.data), tl.float32))
                return TensorHandle(float_to_bf16(out.data), arg.dtype.scalar)
            return original(self, arg)

        return method

    B.cast_impl = cast
    B.create_fp_to_fp = cast_fp_to_fp
    B.binary_op = binary
    B.unary_op = unary
    B.ternary_op = ternary
    B.create_fma = fma
    B.create_dot = dot
    B.create_rsqrt = widened(create_rsqrt)
    B.create_erf = widened(create_erf)

    reduce_min_max, reduce_sum = interpreter.ReduceOps.min_max, interpreter.ReduceOps.sum

    def retyped(t, data, dtype):
        """``t`` holding ``data`` of element type ``dtype`` (its shape kept)."""
        return tl.core.tensor(TensorHandle(data, dtype), t.type.with_element_ty(dtype) if t.type.is_block() else dtype)

    def as_float32(t):
        return retyped(t, bf16_to_float32(t.handle.data), tl.float32)

    def back_to_bf16(t):
        return retyped(t, float_to_bf16(t.handle.data), bf16)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if x.dtype != bf16:
            return reduce_min_max(self, input, val_reduce_op, idx_reduce_op)
        out = reduce_min_max(self, as_float32(x), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:
            return out
        if idx_reduce_op is None:
            return back_to_bf16(out)
        return back_to_bf16(out[0]), out[1]

    def total(self, input):
        # a bfloat16 sum rounds every partial sum to bfloat16 on the GPU as well: combined one
        # element at a time through the (patched) additions, not in float32 and rounded once
        if input.dtype != bf16:
            return reduce_sum(self, input)
        return self.generic_reduce((input,))[0]

    interpreter.ReduceOps.min_max = min_max
    interpreter.ReduceOps.sum = total

    scan_sum, scan_prod = interpreter.ScanOps.cumsum, interpreter.ScanOps.cumprod

    def cumsum(self, input):
        return self.generic_scan((input,)) if input.dtype == bf16 else scan_sum(self, input)

    def cumprod(self, input):
        return self.generic_scan((input,)) if input.dtype == bf16 else scan_prod(self, input)

    interpreter.ScanOps.cumsum = cumsum
    interpreter.ScanOps.cumprod = cumprod
    installed.add("bf16")


def _bf16_probe() -> bool:
    """True where the interpreter computes bfloat16 as the GPU does: a float32 -> bfloat16 cast
    rounds to nearest even, a bfloat16 dot multiplies values, and -2 < 1."""
    from triton.runtime import interpreter

    import triton.language as tl

    B = interpreter.InterpreterBuilder

    def h(bits):
        return interpreter.TensorHandle(np.array(bits, dtype=np.uint16), tl.bfloat16)

    one_and_a_bit = interpreter.TensorHandle(np.array([1 + 2.0 ** -8 + 2.0 ** -20], np.float32), tl.float32)
    rounded = B.cast_impl(None, one_and_a_bit, tl.bfloat16).data  # nearest: 1 + 2^-7 (0x3F81)
    a = h([[0x4000]])  # 2.0
    d = interpreter.TensorHandle(np.zeros((1, 1), np.float32), tl.float32)
    product = B.create_dot(None, a, a, d, None, 0).data  # 4.0
    less = B.binary_op(None, h([0xC000]), h([0x3F80]), np.less).data  # -2 < 1
    return int(np.asarray(rounded).ravel()[0]) == 0x3F81 and float(np.asarray(product).ravel()[0]) == 4.0 and bool(np.asarray(less).ravel()[0])


_bf16_exact = False


def bf16_exact() -> bool:
    """Whether the interpreter in this process computes bfloat16 as the GPU does (see the
    module docstring); False also before :func:`apply` has run under the interpreter."""
    return _bf16_exact


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
    installed.add("index")


def _install_interpreter_launch_lock() -> None:
    import threading

    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None:
        return
    real, lock = executor.__call__, threading.RLock()

    def call(self, *args, **kwargs):
        with lock:
            return real(self, *args, **kwargs)

    executor.__call__ = call
    installed.add("launch_lock")


def _install_interpreter_patch_once() -> None:
    import inspect
    import threading

    from triton.runtime import interpreter

    need = ("_patch_lang", "_patch_builtin", "_patch_attr", "_LangPatchScope", "InterpretedFunction")
    if not all(hasattr(interpreter, n) for n in need):
        return
    tl = interpreter.tl
    real_patch_lang, patch_attr = interpreter._patch_lang, interpreter._patch_attr
    real_device_call = interpreter.InterpretedFunction.__call__
    names: dict = {}  # module or class -> its member names (what inspect.getmembers walks)
    langs: dict = {}  # a kernel or helper's function -> the language modules its globals hold
    patched: list = []  # the language modules (ids) each launch's standing patch covers, innermost last
    local = threading.local()  # .helper_depth: helper calls under way in this thread

    def patch_builtin(pkg, builder, scope):
        if pkg not in names:
            names[pkg] = [name for name, _ in inspect.getmembers(pkg)]
        for name in names[pkg]:
            member = getattr(pkg, name, None)
            if tl.core.is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    def langs_of(fn) -> frozenset:
        if fn not in langs:
            langs[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                  if inspect.ismodule(v) and v in (tl, tl.core))
        return langs[fn]

    def patch_lang(fn):
        mods = langs_of(fn)
        if getattr(local, "helper_depth", 0):  # a helper's call: the launch patched the language
            if patched and mods <= patched[-1]:
                return interpreter._LangPatchScope()
            # modules the launch left alone (tl.zeros, tl.sum, tl.cdiv: triton.language's own
            # helpers hold tl.core) patched as the interpreter does; it never restores this
            # patch, so it stands for the rest of the launch at least
            scope = real_patch_lang(fn)
            if patched:
                patched[-1] |= mods
            return scope
        scope = real_patch_lang(fn)  # a launch (or tests/helpers.py concurrent_programs' own)
        entry = set(mods)
        patched.append(entry)
        restore = scope.restore

        def restore_and_forget():
            try:
                restore()
            finally:
                patched[:] = [e for e in patched if e is not entry]
                # the instance attribute referred to this closure, which refers to the scope
                # through its bound restore: a cycle per launch, left to the collector
                del scope.restore

        scope.restore = restore_and_forget
        return scope

    def device_call(self, *args, **kwargs):
        local.helper_depth = getattr(local, "helper_depth", 0) + 1
        try:
            return real_device_call(self, *args, **kwargs)
        finally:
            local.helper_depth -= 1

    interpreter._patch_builtin = patch_builtin
    interpreter._patch_lang = patch_lang
    interpreter.InterpretedFunction.__call__ = device_call
    installed.add("patch_once")


def _install_interpreter_no_dead_overflow_checks() -> None:
    import dataclasses

    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or options.debug or not getattr(options, "sanitize_overflow", False):
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    installed.add("no_dead_overflow_checks")


def _install_interpreter_type_memo() -> None:
    import builtins

    from triton.runtime import interpreter

    core = interpreter.tl.core
    block, tensor = core.block_type, core.tensor
    if block.__new__ is not object.__new__ or "__init__" not in vars(block) or "__init__" not in vars(tensor):
        return
    real_block_init, real_tensor_init = block.__init__, tensor.__init__
    types: dict = {}  # (element type, shape) -> the block type made for it

    def key_of(element_ty, shape):
        values = getattr(shape, "values", shape)  # triton.language's tuple, a list or a tuple
        if not isinstance(values, (list, builtins.tuple)) or not all(type(v) is int for v in values):
            return None
        try:
            key = (element_ty, builtins.tuple(values))
            hash(key)
        except TypeError:
            return None
        return key

    def block_new(cls, element_ty=None, shape=None):
        if cls is block:
            key = key_of(element_ty, shape)
            if key is not None and key in types:
                return types[key]
        return object.__new__(cls)

    def block_init(self, element_ty, shape):
        if "_gpu_nn_key" in self.__dict__:  # the type kept for this key, made before
            return
        real_block_init(self, element_ty, shape)
        if type(self) is not block:  # (a subclass is not served)
            return
        dims = getattr(self.shape, "values", None)
        if isinstance(dims, list) and all(type(v) is int for v in dims):
            self._gpu_nn_dims = builtins.tuple(dims)  # its shape as ints, for broadcast_impl_value
        key = key_of(element_ty, shape)
        if key is not None:
            self._gpu_nn_key = key
            types.setdefault(key, self)

    scalar_types = (core.dtype, core.pointer_type)  # (their tensors' shape is () whatever the instance)
    scalar_kept: list = []  # (shape, numel) of the first scalar tensor: every scalar tensor's (kept
    # here, not on the dtypes: a tuple on tl.float32 made it fail copy.deepcopy and pickle)

    def tensor_init(self, handle, type):
        cls = type.__class__
        if cls is block:
            kept = type.__dict__.get("_gpu_nn_tensor_shape")
        elif cls in scalar_types:
            kept = scalar_kept[0] if scalar_kept else None
        else:
            kept = None
        if kept is None:
            real_tensor_init(self, handle, type)
            if cls is block and "_gpu_nn_key" in type.__dict__:
                type._gpu_nn_tensor_shape = (self.shape, self.numel)
            elif cls in scalar_types and not scalar_kept:
                scalar_kept.append((self.shape, self.numel))
            return
        self.handle = handle
        self.shape, self.numel = kept
        self.type = type
        self.dtype = type.scalar

    real_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    np_dtypes: dict = {}  # a scalar Triton type -> the NumPy dtype the interpreter holds it in

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, block) else tt_dtype
        try:
            return np_dtypes[scalar]
        except KeyError:
            np_dtypes[scalar] = out = real_np_dtype(scalar)  # (a block's dtype is its element's)
            return out
        except TypeError:  # an unhashable type: as the interpreter does
            return real_np_dtype(tt_dtype)

    semantic = getattr(interpreter, "TritonSemantic", None)
    real_broadcast = getattr(semantic, "broadcast_impl_value", None)
    ibuilder = getattr(interpreter, "interpreter_builder", None)
    # the semantic's tensor maker: make_tensor (3.9), its tensor class (3.6)
    make = (lambda sem, handle, ty: sem.make_tensor(handle, ty)) if hasattr(semantic, "make_tensor") else (
        lambda sem, handle, ty: sem.tensor(handle, ty))

    def ir_of(ty):
        # ty.to_ir(interpreter_builder): a block type of the element's to_ir (a Triton dtype) and
        # ty's shape, the same for every call (kept on the type; the interpreter's builder only)
        kept = ty.__dict__.get("_gpu_nn_ir")
        if kept is None:
            kept = ty._gpu_nn_ir = ty.to_ir(ibuilder)
        return kept

    def splat(self, block_ty, scalar):
        # the real function's make_shape_compatible(block, scalar): scalar splat to block_ty's
        # shape in its own element type, the block type found in the memo by its key (element
        # type, shape as ints)
        dims = block_ty.__dict__.get("_gpu_nn_dims")
        try:
            new = types.get((scalar.type.scalar, dims)) if dims is not None else None
        except TypeError:  # an unhashable element type (a pointer's): made as the real function does
            new = None
        if new is None:
            new = block_ty.with_element_ty(scalar.type.scalar)
        return make(self, self.builder.create_splat(ir_of(new), scalar.handle), new)

    def broadcast_impl_value(self, lhs, rhs):
        # what the real function does, on block shapes kept as tuples of ints where it compared
        # triton.language's tuples element by element and made each type anew; ranks that
        # differ, shapes that do not broadcast (its error) and other builders go to it
        lt, rt = lhs.type, rhs.type
        if lt is rt:  # one type: one shape, nothing to splat or broadcast
            return lhs, rhs
        lc, rc = lt.__class__, rt.__class__
        if lc is block and rc is block:
            ls, rs = lt.__dict__.get("_gpu_nn_dims"), rt.__dict__.get("_gpu_nn_dims")
            if ls is not None and rs is not None:
                if ls == rs:
                    return lhs, rhs
                if len(ls) == len(rs) and all(a == 1 or b == 1 or a == b for a, b in zip(ls, rs)):
                    ret = [b if a == 1 else a for a, b in zip(ls, rs)]
                    if list(ls) != ret:
                        lhs = make(self, self.builder.create_broadcast(lhs.handle, ret), block(lt.scalar, ret))
                    if list(rs) != ret:
                        rhs = make(self, self.builder.create_broadcast(rhs.handle, ret), block(rt.scalar, ret))
                    return lhs, rhs
        elif lc in scalar_types and rc in scalar_types:  # two scalars: returned as they are
            return lhs, rhs
        elif self.builder is ibuilder:
            if lc is block and rc in scalar_types:
                return lhs, splat(self, lt, rhs)
            if rc is block and lc in scalar_types:
                return splat(self, rt, lhs), rhs
        return real_broadcast(self, lhs, rhs)

    if real_np_dtype is not None:
        interpreter._get_np_dtype = get_np_dtype
    if real_broadcast is not None and ibuilder is not None:
        replaced["broadcast_impl_value"] = real_broadcast
        semantic.broadcast_impl_value = broadcast_impl_value
    block.__new__ = block_new
    block.__init__ = block_init
    tensor.__init__ = tensor_init
    installed.add("type_memo")


def apply(interpret: bool) -> None:
    """Install the version-specific fixes listed in the module docstring (idempotent)."""
    global _applied, _bf16_exact
    if _applied:
        return
    _applied = True
    if interpret and needs_interpreter_index_fix():
        _install_interpreter_index_fix()
    if interpret and needs_interpreter_fma_fix():
        _install_interpreter_fma_fix()
    if interpret:
        _install_interpreter_launch_lock()
        _install_interpreter_patch_once()
        _install_interpreter_no_dead_overflow_checks()
        _install_interpreter_type_memo()
        _install_interpreter_libdevice()
        if not _bf16_probe():
            _install_interpreter_bf16_fix()
        _bf16_exact = _bf16_probe()


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
