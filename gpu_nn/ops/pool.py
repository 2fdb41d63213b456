"""Max / avg / min pooling, 1d and 2d: checks, dispatch and ``torch.library`` registration.

The public functions mirror ``torch.nn.functional`` (``min_pool*`` take ``max_pool*``'s
arguments and equal ``-max_pool(-x)``, indices included). They validate arguments with torch's
wording, view every input as ``[N, C, H, W]`` (a 1d pooling is a 2d pooling of height 1, an
unbatched input gets N = 1) and call one of four custom ops:

* ``gpu_nn::max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, minimum)``
  -> ``(values, indices)``; ``minimum=True`` is min pooling.
* ``gpu_nn::max_pool_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation,
  channels_last=False)``
* ``gpu_nn::avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``
* ``gpu_nn::avg_pool_backward(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
  divisor_override, channels_last=False)``

Backends: reference, triton, cupy (CUDA C in ``kernels/cuda/pool.cu``). Layouts are torch's: a
channels_last input (4-D, channels_last and not also contiguous) gives channels_last values,
indices and input gradient (the backward ops' ``channels_last`` says the input was); every other
input contiguous ones. Every backend reads inputs of any layout in place; the Triton and the
CUDA C kernels write channels_last results directly (channels fastest across a warp; pool.cu's
POOL_CL), no buffer and copy.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as _TF
from torch import Tensor

from .. import _backend
from .._errors import KernelInputError, KernelInputIndexError, KernelInputTypeError, type_name
from ..check import CheckCase
from ..kernels import fastdiv
from ..reference import pool as ref
from ..reference._ufuncs import negative as negate
from ._dispatch import (FLOAT_DTYPES, check_float, check_float_like_torch, check_same_device, check_tensor, cuda_kernels, empty, from_numpy, is_int, memo, on_device, plain_arg, routed,
                        to_numpy, triton_kernels)
from ._dispatch import chooser as _chooser  # module-level name: tests replace it
# an input whose suggest_memory_format is channels_last (torch's test over its strides, size-1
# dims included, no density required): torch's pooling then returns channels_last values,
# indices and input gradient, as ours do
from ._dispatch import suggests_channels_last as _channels_last
from ._dispatch import _GRAD, batched_first, exact_zero_of, jvp_linear_in_first, merge_batch, split_batch, transform_active
from ._dispatch import has_torch_function as _has_tf
from ._dispatch import torch_function as _tf

__all__ = ["max_pool1d", "max_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
           "min_pool1d", "min_pool2d"]

BACKENDS = ("reference", "triton", "cupy")


# --- argument normalisation and checks (torch's wording) ------------------------------------
# Each check below is torch's own, in torch's order (ATen's max_pool2d_with_indices /
# avg_pool2d meta functions, pooling_output_shape_pad_lr, pool2d_shape_check, check_max_pool1d),
# so that an input with two faults reports the same one as torch.

_POSITION = {"kernel_size": 2, "stride": 3, "padding": 4, "dilation": 5}




def _int_list(op: str, arg: str, v) -> tuple[int, ...]:
    """torch's parser for a ``tuple of ints`` argument: an int is one value, a sequence must
    hold ints only; anything else (2.5, "22", (2.9, 2), True) is a TypeError, never coerced."""
    pos = f" (position {_POSITION[arg]})"
    if is_int(v):
        return (int(v),)
    if not isinstance(v, (tuple, list, torch.Size)):
        raise KernelInputTypeError(f"{op}(): argument '{arg}'{pos} must be tuple of ints, not {type_name(v)}")
    for i, e in enumerate(v):
        if not is_int(e):
            if i == 0:
                raise KernelInputTypeError(
                    f"{op}(): argument '{arg}'{pos} must be tuple of ints, but found element of type {type_name(e)} at pos 0"
                )
            raise KernelInputTypeError(
                f"{op}(): argument '{arg}' failed to unpack the object at pos {i + 1} with error "
                f'"type must be tuple of ints,but got {type_name(e)}"'
            )
    return tuple(int(e) for e in v)


def _check_flags(op: str, *flags) -> None:
    """torch's parser for ``bool`` arguments (``(name, value, position)`` each): a bool and nothing
    else (1, None, numpy.bool_ or a 0-d tensor is a TypeError, never coerced). torch's
    ``max_pool*`` wrappers always pass ceil_mode by position, so its message says it; torch's
    ``avg_pool*`` are the parser's own functions, which say a position only for an argument
    passed by position: position None words the usual keyword call."""
    for name, v, pos in flags:
        if type(v) is not bool:
            where = "" if pos is None else f" (position {pos})"
            raise KernelInputTypeError(f"{op}(): argument '{name}'{where} must be bool, not {type_name(v)}")


# Valid argument sets seen before, so that a layer called in a loop parses and checks its
# arguments once: parsed plain-int arguments, and (shape, parameters) pairs that passed the
# shape checks (which read nothing else). Only successes are stored; bounded.
_PARSED: dict = {}
_SHAPES_OK: set = set()
_MEMO_MAX = 4096


def _parse(op: str, kernel_size, stride, padding, dilation=1):
    """(k, s, p, d) as parsed tuples (any length); ``s`` is () for stride None, as torch.
    Plain ints (not bool, not int-like objects) are served from a cache."""
    if (type(kernel_size) is int and type(padding) is int and type(dilation) is int and (stride is None or type(stride) is int)
            and not torch.compiler.is_compiling()):
        return _memo((op, kernel_size, stride, padding, dilation), _parse_args, op, kernel_size, stride, padding,
                     dilation)
    return _parse_args(op, kernel_size, stride, padding, dilation)


def _memo(key, fn, *args):
    """``fn(*args)``, remembered under ``key`` in _PARSED (:func:`_dispatch.memo`)."""
    return memo(_PARSED, _MEMO_MAX, key, fn, *args)


def _public_memo(key, fn, *args):
    """``fn(*args)`` -- a public function's parse and checks of everything but the input's dtype
    (checked on every call, first, as torch does) --, remembered under ``key`` (the op, the
    input's shape and every argument) when the arguments are plain ints / bools and no trace is
    running; else run as it is. ``fn`` reads nothing but what ``key`` holds, and only results
    are remembered (a call that raises is never), so a hit skips exactly checks that passed."""
    if torch.compiler.is_compiling():
        return fn(*args)
    return _memo(key, fn, *args)


def _plain_call(kernel_size, stride, padding, dilation, *flags) -> bool:
    """Whether a public call's arguments may key :func:`_public_memo`: int / tuple-of-int
    geometry (stride also None), bool flags."""
    for f in flags:
        if type(f) is not bool:
            return False
    return (plain_arg(kernel_size) and plain_arg(padding) and plain_arg(dilation)
            and (stride is None or plain_arg(stride)))


def _parse_args(op: str, kernel_size, stride, padding, dilation=1):
    """(k, s, p, d) as parsed tuples (any length); ``s`` is () for stride None, as torch."""
    k = _int_list(op, "kernel_size", kernel_size)
    s = () if stride is None else _int_list(op, "stride", stride)
    return k, s, _int_list(op, "padding", padding), _int_list(op, "dilation", dilation)


_ARITY_2D = {
    "kernel_size": "kernel_size must either be a single int, or a tuple of two ints",
    "stride": "stride must either be omitted, a single int, or a tuple of two ints",
    "padding": "padding must either be a single int, or a tuple of two ints",
    "dilation": "dilation must be either a single int, or a tuple of two ints",
}


def _pair2d(op: str, k, s, p, d):
    """:func:`_pair2d_args`, served from a cache for argument tuples seen before (outside tracing)."""
    if torch.compiler.is_compiling():
        return _pair2d_args(op, k, s, p, d)
    return _memo(("pair2d", op, k, s, p, d), _pair2d_args, op, k, s, p, d)


def _pair2d_args(op: str, k, s, p, d):
    """max_pool2d / avg_pool2d meta functions: arity checks, then pairs (stride () = kernel);
    avg_pool2d checks each argument's range after its arity where torch does (_check_avg_range)."""
    for name, v in (("kernel_size", k), ("stride", s), ("padding", p), ("dilation", d)):
        if len(v) not in (1, 2) and not (name == "stride" and len(v) == 0):
            raise KernelInputError(f"{op}: {_ARITY_2D[name]}")
        if op == "avg_pool2d" and name != "dilation":
            _check_avg_range(name, v)
    two = lambda v: (v[0], v[0]) if len(v) == 1 else tuple(v)  # noqa: E731
    k = two(k)
    return k, (k if len(s) == 0 else two(s)), two(p), two(d)


def _avg_refusals() -> dict:
    """Which values of avg_pool2d's kernel_size, stride and padding the installed torch refuses
    as "integer out of range" in its meta function, each right after that argument's arity
    check and so before any shape check: torch 2.11 refuses kernel sizes < 1 and some strides
    there; 2.13 leaves every sign to pooling_output_shape and pool2d_shape_check (their own
    wording, which _check_2d_shape has). Found once by asking torch about 0 and -1 for each
    argument on a 1x1x1x1 tensor, so the wording follows whichever torch is installed."""
    x = torch.zeros(1, 1, 1, 1)
    refused = {}
    for name in ("kernel_size", "stride", "padding"):
        refused[name] = set()
        for v in (0, -1):
            kw = {"kernel_size": 1, "stride": 1, "padding": 0, name: v}
            try:
                torch.nn.functional.avg_pool2d(x, **kw)
            except RuntimeError as exc:
                if "integer out of range" in str(exc):
                    refused[name].add(v)
    return refused


# at import, outside any torch.compile trace: asked lazily, the first use may come while dynamo
# traces, and the probe's own avg_pool2d call would be traced with fake tensors
_AVG_REFUSED = _avg_refusals()


def _check_avg_range(name: str, v) -> None:
    """torch's up-front range check of one avg_pool2d argument (see _avg_refusals)."""
    bad = _AVG_REFUSED[name]
    if bad and any((e < 0 and -1 in bad) or (e == 0 and 0 in bad) for e in v):
        raise KernelInputError("integer out of range")


def _check1d(op: str, k, s, p, d=(1,)):
    """torch's check1d (max_pool1d_with_indices, avg_pool1d): one int each."""
    for name, v in (("kernel_size", k), ("stride", s), ("padding", p), ("dilation", d)):
        if len(v) != 1:
            raise KernelInputError(f"{op}() argument '{name}' should contain one int (got {len(v)})")


def _check_dim_range(op: str, input: Tensor):
    if input.dim() not in (2, 3):
        raise KernelInputError(
            f"Expected 2 to 3 dimensions, but got {input.dim()}-dimensional tensor for argument #1 'self' "
            f"(while checking arguments for {op})"
        )


def _check_input(op: str, input, theirs=None, *args) -> None:
    """A tensor in a dtype our kernels take; for another dtype torch's error where torch refuses
    it too (``theirs(input, *args)``: torch's pooling, max pooling's for min pooling), else ours."""
    check_tensor(op, "input", input, 1)
    if theirs is None:
        check_float(op, "input", input)
    elif input.dtype not in FLOAT_DTYPES:  # (tested first: no closure on the usual call)
        check_float_like_torch(op, "input", input, lambda: theirs(input, *args))


def _ctrunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds towards zero), which torch's bounds use."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _memo_ok(check, key_fn, *args) -> None:
    """Run ``check(*args)`` unless ``key`` passed it before (the checks read only what the key holds)."""
    if torch.compiler.is_compiling():  # traced: no global state (shapes may be symbolic)
        check(*args)
        return
    key = key_fn()
    if key in _SHAPES_OK:
        return
    check(*args)
    if len(_SHAPES_OK) >= _MEMO_MAX:
        _SHAPES_OK.clear()
    _SHAPES_OK.add(key)


def _check_2d(input: Tensor, k, s, p, d, ceil_mode: bool, is_max: bool):
    _memo_ok(_check_2d_shape, lambda: ("2d", tuple(input.shape), k, s, p, d, ceil_mode, is_max),
             input, k, s, p, d, ceil_mode, is_max)


def _check_2d_shape(input: Tensor, k, s, p, d, ceil_mode: bool, is_max: bool):
    """torch's checks of a 2d pooling of ``input`` [N?, C, H, W] (pairs k, s, p, d), after the
    arity checks, in torch's order: the 3D/4D rank (max), the padding bounds of H then W
    (pooling_output_shape, before any shape check: a zero-size input with a bad padding
    reports the padding), then pool2d_shape_check."""
    shape = tuple(input.shape)
    if is_max and len(shape) not in (3, 4):
        raise KernelInputError("non-empty 3D or 4D (batch mode) tensor expected for input")
    if not is_max and len(shape) < 3:  # avg_pool2d reads input.size(-3) first
        n = max(len(shape), 1)
        raise KernelInputIndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got -3)")
    for kv, sv, pv, dv in zip(k, s, p, d):
        if sv == 0:
            raise KernelInputError("stride should not be zero")
        if pv < 0:
            raise KernelInputError(f"pad must be non-negative, but got pad: {pv}")
        if pv > _ctrunc_div((kv - 1) * dv + 1, 2):
            raise KernelInputError(
                f"pad should be at most half of effective kernel size, but got pad={pv}, kernel_size={kv} and dilation={dv}"
            )
    if min(k) <= 0:
        raise KernelInputError(f"kernel size should be greater than zero, but got kH: {k[0]} kW: {k[1]}")
    if min(s) <= 0:
        raise KernelInputError(f"stride should be greater than zero, but got dH: {s[0]} dW: {s[1]}")
    if min(d) <= 0:
        raise KernelInputError(f"dilation should be greater than zero, but got dilationH: {d[0]} dilationW: {d[1]}")
    if len(shape) not in (3, 4) or any(v == 0 for v in shape[-3:]):
        raise KernelInputError(
            f"Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:{list(shape)}"
        )
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise KernelInputError(
            f"pad should be smaller than or equal to half of kernel size, but got padW = {p[1]}, padH = {p[0]}, kW = {k[1]}, kH = {k[0]}"
        )
    C, H, W = shape[-3:]
    oh = ref.out_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    ow = ref.out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    if oh < 1 or ow < 1:
        raise KernelInputError(
            f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{oh}x{ow}). Output size is too small"
        )


def _check_max1d(op: str, input: Tensor, k, s, p, d, ceil_mode: bool):
    _memo_ok(_check_max1d_shape, lambda: ("1d", op, tuple(input.shape), k, s, p, d, ceil_mode), op, input, k, s, p, d, ceil_mode)


def _check_max1d_shape(op: str, input: Tensor, k, s, p, d, ceil_mode: bool):
    """torch's max_pool1d (no indices) checks: its own rank test, then check_max_pool1d."""
    shape = tuple(input.shape)
    if len(shape) not in (2, 3) or any(v == 0 for v in shape[-2:]):
        raise KernelInputError(
            f"{op}: Expected 2D or 3D (batch mode) tensor with optional 0 dim batch size for input, but got:{list(shape)}"
        )
    if len(k) != 1:
        raise KernelInputError(f"{op}() kernel_size must be an int, list of ints or tuple of ints of size 1 but got size {len(k)}")
    if len(s) > 1:
        raise KernelInputError(f"{op}() stride must be None, an int, list of ints, or tuple of ints of size 1 but got size {len(s)}")
    if len(p) != 1:
        raise KernelInputError(f"{op}() padding must be an int, list of ints, or tuple of ints of size 1 but got size {len(p)}")
    if len(d) != 1:
        raise KernelInputError(f"{op}() dilation must be an int, list of ints or tuple of ints of size 1 but got size {len(d)}")
    s = s or k
    if k[0] <= 0:
        raise KernelInputError(f"{op}() kernel_size must be greater than zero, but got {k[0]}")
    if s[0] <= 0:
        raise KernelInputError(f"{op}() stride must be greater than zero, but got {s[0]}")
    if p[0] < 0:
        raise KernelInputError(f"{op}() padding must be non-negative, but got {p[0]}")
    if p[0] > k[0] // 2:
        raise KernelInputError(f"{op}() padding should be at most half of kernel size, but got padding={p[0]} and kernel_size={k[0]}")
    if d[0] <= 0:
        raise KernelInputError(f"{op}() dilation must be greater than zero, but got {d[0]}")
    out = ref.out_size(shape[-1], k[0], s[0], p[0], d[0], ceil_mode)
    if out < 1:
        raise KernelInputError(f"{op}() Invalid computed output size: {out}")


def _check_params4(op: str, x: Tensor, k, s, p, d):
    """Launcher-level re-check: the custom ops can be called directly (torch.ops.gpu_nn.*)."""
    check_float(op, "input", x)
    if x.dim() != 4:
        raise KernelInputError(f"{op}: expected a 4D [N, C, H, W] tensor, got shape {list(x.shape)}")
    _check_geometry(op, k, s, p, d)


def _check_geometry(op: str, k, s, p, d):
    """The pooling geometry every op takes (the backward ops too, whose gradient the callers
    have checked): two entries each, positive window, stride and dilation, padding in [0, k/2]."""
    if len(k) != 2 or len(s) != 2 or len(p) != 2 or len(d) != 2:
        raise KernelInputError(f"{op}: kernel_size, stride, padding and dilation must have 2 entries each")
    if min(k) <= 0 or min(s) <= 0 or min(d) <= 0 or min(p) < 0 or p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise KernelInputError(f"{op}: invalid pooling parameters kernel_size={k} stride={s} padding={p} dilation={d}")


def _out_hw(H, W, k, s, p, d, ceil_mode):
    return ref.out_size(H, k[0], s[0], p[0], d[0], ceil_mode), ref.out_size(W, k[1], s[1], p[1], d[1], ceil_mode)


# --- launchers ------------------------------------------------------------------------------


def _max_fwd_geometry(op: str, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """The launcher's own checks of a max / min pooling (a custom op may be called directly):
    ``(k, s, p, d, output shape)``. Reads only x's shape and dtype and the arguments, so the
    launcher remembers what passed under those (:func:`_memo`)."""
    k, s, p, d = (tuple(map(int, a)) for a in (kernel_size, stride, padding, dilation))
    _check_params4(op, x, k, s, p, d)
    N, C, H, W = x.shape
    oh, ow = _out_hw(H, W, k, s, p, d, ceil_mode)
    if oh < 1 or ow < 1:
        raise KernelInputError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{oh}x{ow}). Output size is too small")
    return k, s, p, d, (N, C, oh, ow)


_C = torch._C
_CL = torch.channels_last
_CONTIG = torch.contiguous_format


def _laid_out(like: Tensor, shape, fmt: torch.memory_format, dtype=None) -> Tensor:
    """An uninitialised ``shape`` tensor on ``like``'s device in ``fmt`` with
    ``torch.empty(memory_format=)``'s strides, size-1 dims included, as torch's pooling and our
    kernels allocate their results: the fake kernels' results and the reference's copies too
    (``new_empty(...).contiguous(memory_format=)`` keeps NCHW strides for a result that is
    channels_last-contiguous already, (3, 1, 1, 1) for [2, 3, 1, 1] where torch's is (3, 1, 3, 3):
    a later layer's layout test reads them; a compile fuzz)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _as_format(t: Tensor, cl: bool) -> Tensor:
    """The reference's result ``t`` (contiguous) in channels_last where ``cl`` (:func:`_laid_out`)."""
    return _laid_out(t, t.shape, _CL).copy_(t) if cl else t


def max_pool_forward(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, minimum: bool,
                     need_indices: bool = True):
    """Max (or, with ``minimum``, min) pooling of ``x`` ``[N, C, H, W]`` (any strides).

    Returns ``(values [N, C, OH, OW], int64 indices ih * W + iw)``, both channels_last for a
    channels_last ``x`` (as torch's), else contiguous; see ``reference.pool`` for the exact
    semantics (torch's, NaN wins, ties keep the first position). ``need_indices`` False (nothing
    will read them: no gradient wanted, no ``return_indices``): the indices come back as an empty
    int64 tensor and the kernels write the values alone (torch's CUDA pooling writes both always;
    the indices are 8 bytes per output against 2-4 for the values).
    """
    op = "min_pool" if minimum else "max_pool"
    k, s, p, d, (N, C, oh, ow) = _memo(("max_fwd", x.shape, x.dtype, tuple(kernel_size), tuple(stride), tuple(padding),
                                        tuple(dilation), ceil_mode, minimum),
                                       _max_fwd_geometry, op, x, kernel_size, stride, padding, dilation, ceil_mode)
    backend = _backend.resolve(op, x.device, BACKENDS, dtype=x.dtype)
    if backend == "reference":
        xn = to_numpy(x)
        if minimum:
            xn = -xn
        vals, idx = ref._max2d(xn, k, s, p, d, ceil_mode, need_indices)
        if minimum:
            negate(vals, vals)
        dev, cl = x.device, _channels_last(x)
        vals = _as_format(from_numpy(vals, x.dtype, dev), cl)
        return vals, (_as_format(from_numpy(idx, torch.int64, dev), cl) if need_indices else _no_indices(dev))
    _backend.check_interpreter_dtype(op, backend, x)
    fmt = _CL if _channels_last(x) else _CONTIG
    out = empty((N, C, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = (torch.empty((N, C, oh, ow), dtype=torch.int64, device=x.device, memory_format=fmt) if need_indices
           else _no_indices(x.device))
    if out.numel() == 0:
        return out, idx
    kidx = idx if need_indices else None
    if backend == "triton":
        ktriton, kt = triton_kernels("pool")

        kt.max_pool2d_forward(x, out, kidx, k, s, p, d, minimum, ktriton.INTERPRET, choose=_chooser(x.device))
    else:  # the CUDA C kernels write either layout as it lies (POOL_CL)
        _cupy_max_forward(x, out, kidx, k, s, p, d, minimum, fmt is _CL)
    return out, idx


def _no_indices(device) -> Tensor:
    """The indices of a values-only max pooling: an empty int64 tensor."""
    return torch.empty((0,), dtype=torch.int64, device=device)


def _max_bwd_args(grad_output: Tensor, indices: Tensor, input_size, kernel_size, stride, padding, dilation):
    """max_pool_backward's checks: ``(k, s, p, d, input size)`` as int tuples. Reads only the
    shapes and dtypes of its tensors and the lists, so the launcher remembers what passed."""
    k, s, p, d = (tuple(map(int, a)) for a in (kernel_size, stride, padding, dilation))
    size = tuple(map(int, input_size))
    check_float("max_pool_backward", "grad_output", grad_output)
    if grad_output.shape != indices.shape or grad_output.dim() != 4 or len(size) != 4:
        raise KernelInputError(
            f"max_pool_backward: grad_output {list(grad_output.shape)} and indices {list(indices.shape)} must be the same 4D shape"
        )
    if indices.dtype != torch.int64:
        raise KernelInputError(f"max_pool_backward: expected int64 indices, got {indices.dtype}")
    check_same_device(grad_output, indices)
    if tuple(grad_output.shape[:2]) != size[:2]:
        # (the kernels gather each input plane's gradient from the same plane of grad_output)
        raise KernelInputError(f"max_pool_backward: grad_output shape {list(grad_output.shape)} does not match the batch "
                               f"and channels of input_size {list(size)}")
    # the forward's geometry checks, and grad_output the output of that geometry (with or without
    # ceil_mode, which the backward is not given): a stride of 0 divided by zero in the kernels
    _check_geometry("max_pool_backward", k, s, p, d)
    out = tuple(grad_output.shape[2:])
    if min(size) < 0 or out not in {_out_hw(size[2], size[3], k, s, p, d, cm) for cm in (False, True)}:
        raise KernelInputError(f"max_pool_backward: grad_output shape {list(grad_output.shape)} is not the output of "
                               f"input_size {list(size)} with kernel_size={list(k)} stride={list(s)} padding={list(p)} "
                               f"dilation={list(d)}")
    return k, s, p, d, size


def max_pool_backward(grad_output: Tensor, indices: Tensor, input_size, kernel_size, stride, padding, dilation,
                      channels_last: bool = False) -> Tensor:
    """d input ``[N, C, H, W]`` = sum of ``grad_output`` over the windows whose saved index
    points at that input position (the same for max and min pooling); channels_last where the
    input was (``channels_last``, as torch's), else contiguous."""
    k, s, p, d, size = _memo(("max_bwd", grad_output.shape, indices.shape, grad_output.dtype, indices.dtype,
                              grad_output.device, indices.device, tuple(input_size), tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)),
                             _max_bwd_args, grad_output, indices, input_size, kernel_size, stride, padding, dilation)
    backend = _backend.resolve("max_pool_backward", grad_output.device, BACKENDS, dtype=grad_output.dtype)
    if backend == "reference":
        gi = ref._max_backward2d(to_numpy(grad_output), to_numpy(indices), size)
        return _as_format(from_numpy(gi, grad_output.dtype, grad_output.device), channels_last)
    _backend.check_interpreter_dtype("max_pool_backward", backend, grad_output)
    fmt = _CL if channels_last else _CONTIG
    gi = empty(size, dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)
    if gi.numel() == 0:
        return gi
    if grad_output.numel() == 0:
        return gi.zero_()
    # both backends read the gradient and the indices dense in the input gradient's layout
    g, ix = grad_output.contiguous(memory_format=fmt), indices.contiguous(memory_format=fmt)
    if backend == "triton":
        ktriton, kt = triton_kernels("pool")

        kt.max_pool2d_backward(g, ix, gi, k, s, p, d, ktriton.INTERPRET, choose=_chooser(g.device))
    else:
        _cupy_max_backward(g, ix, gi, k, s, p, d, fmt is _CL)
    return gi


def _avg_fwd_geometry(x: Tensor, kernel_size, stride, padding, ceil_mode: bool, divisor_override):
    """The launcher's own checks of an average pooling (as :func:`_max_fwd_geometry`):
    ``(k, s, p, output shape)``."""
    k, s, p = (tuple(map(int, a)) for a in (kernel_size, stride, padding))
    _check_params4("avg_pool", x, k, s, p, (1, 1))
    if divisor_override is not None and divisor_override == 0:
        raise KernelInputError("divisor must be not zero")
    N, C, H, W = x.shape
    oh, ow = _out_hw(H, W, k, s, p, (1, 1), ceil_mode)
    if oh < 1 or ow < 1:
        raise KernelInputError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{oh}x{ow}). Output size is too small")
    return k, s, p, (N, C, oh, ow)


def avg_pool_forward(x: Tensor, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
                     divisor_override: Optional[int]) -> Tensor:
    """Average pooling of ``x`` ``[N, C, H, W]`` (any strides) -> ``[N, C, OH, OW]``, channels_last
    for a channels_last ``x`` (as torch's), else contiguous."""
    k, s, p, (N, C, oh, ow) = _memo(("avg_fwd", x.shape, x.dtype, tuple(kernel_size), tuple(stride), tuple(padding),
                                     ceil_mode, divisor_override), _avg_fwd_geometry, x, kernel_size, stride, padding,
                                    ceil_mode, divisor_override)
    backend = _backend.resolve("avg_pool", x.device, BACKENDS, dtype=x.dtype)
    if backend == "reference":
        y = ref._avg2d(to_numpy(x), k, s, p, ceil_mode, count_include_pad, divisor_override)
        return _as_format(from_numpy(y, x.dtype, x.device), _channels_last(x))
    _backend.check_interpreter_dtype("avg_pool", backend, x)
    fmt = _CL if _channels_last(x) else _CONTIG
    out = empty((N, C, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    if backend == "triton":
        ktriton, kt = triton_kernels("pool")

        kt.avg_pool2d_forward(x, out, k, s, p, ceil_mode, count_include_pad, divisor_override or 0, ktriton.INTERPRET,
                              choose=_chooser(x.device))
    else:
        _cupy_avg_forward(x, out, k, s, p, count_include_pad, divisor_override or 0, fmt is _CL)
    return out


def _avg_bwd_args(grad_output: Tensor, input_size, kernel_size, stride, padding, ceil_mode: bool):
    """avg_pool_backward's checks: ``(k, s, p, input size)`` as int tuples (remembered as
    :func:`_max_bwd_args`)."""
    k, s, p = (tuple(map(int, a)) for a in (kernel_size, stride, padding))
    size = tuple(map(int, input_size))
    check_float("avg_pool_backward", "grad_output", grad_output)
    if grad_output.dim() != 4 or len(size) != 4:
        raise KernelInputError(f"avg_pool_backward: expected 4D grad_output and input_size, got {list(grad_output.shape)} and {list(size)}")
    # the forward's geometry checks (a stride of 0 divided by zero; a padding past half the window)
    _check_geometry("avg_pool_backward", k, s, p, (1, 1))
    if min(size) < 0:
        raise KernelInputError(f"avg_pool_backward: negative input_size {list(size)}")
    oh, ow = _out_hw(size[2], size[3], k, s, p, (1, 1), ceil_mode)
    if tuple(grad_output.shape) != (size[0], size[1], oh, ow):
        raise KernelInputError(f"avg_pool_backward: grad_output shape {list(grad_output.shape)} != output shape {[size[0], size[1], oh, ow]}")
    return k, s, p, size


def avg_pool_backward(grad_output: Tensor, input_size, kernel_size, stride, padding, ceil_mode: bool,
                      count_include_pad: bool, divisor_override: Optional[int], channels_last: bool = False) -> Tensor:
    """d input ``[N, C, H, W]``: each output's gradient / its divisor, summed over the windows
    that cover the input position (gathered per input element: no atomics); channels_last where
    the input was (``channels_last``, as torch's), else contiguous."""
    if divisor_override is not None and int(divisor_override) == 0:  # (the forward's check, torch's words)
        raise KernelInputError("divisor must be not zero")
    k, s, p, size = _memo(("avg_bwd", grad_output.shape, grad_output.dtype, tuple(input_size), tuple(kernel_size),
                           tuple(stride), tuple(padding), ceil_mode),
                          _avg_bwd_args, grad_output, input_size, kernel_size, stride, padding, ceil_mode)
    backend = _backend.resolve("avg_pool_backward", grad_output.device, BACKENDS, dtype=grad_output.dtype)
    if backend == "reference":
        gi = ref._avg_backward2d(to_numpy(grad_output), size, k, s, p, ceil_mode, count_include_pad, divisor_override)
        return _as_format(from_numpy(gi, grad_output.dtype, grad_output.device), channels_last)
    _backend.check_interpreter_dtype("avg_pool_backward", backend, grad_output)
    fmt = _CL if channels_last else _CONTIG
    gi = empty(size, dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)
    if gi.numel() == 0:
        return gi
    g = grad_output.contiguous(memory_format=fmt)  # dense in the input gradient's layout, both backends
    if backend == "triton":
        ktriton, kt = triton_kernels("pool")

        kt.avg_pool2d_backward(g, gi, k, s, p, count_include_pad, divisor_override or 0, ktriton.INTERPRET,
                               choose=_chooser(g.device))
    else:
        _cupy_avg_backward(g, gi, k, s, p, count_include_pad, divisor_override or 0, fmt is _CL)
    return gi


# --- CuPy (CUDA C) launches ----------------------------------------------------------------

_CUDA_THREADS = 256
_CUDA_TYPES = {torch.float32: "float", torch.float16: "gn_f16", torch.bfloat16: "gn_bf16", torch.float64: "double"}


# The kernels' index arithmetic is 32-bit where every tensor of a launch spans fewer elements
# than this (pool.cu's POOL_NARROW: an index plus the grid-stride loop's largest stride, under
# 2^29, stays below 2^31); int64 otherwise. Tests lower it to run the int64 kernels on small inputs.
_NARROW_SPAN = 2**30


def _narrow(*tensors) -> bool:
    """Whether every tensor's memory span (its element count when contiguous) is below _NARROW_SPAN."""
    for t in tensors:
        n = t.numel()
        if not t.is_contiguous() and n:
            n = max(n, 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())))
        if n >= _NARROW_SPAN:
            return False
    return True


# Windows of up to this many taps get a module of their own (pool.cu's POOL_FIXED: the window
# compiled in, its tap loops unrolled into predicated loads); larger ones take the kernels whose
# window is a run-time argument. One module per (dtype, index width, layout, window): NVRTC takes
# about 0.3 s per module (2-core CPU), CuPy keeps each on disk for the next process.
_FIXED_TAPS = 64


def cuda_defines(dtype: torch.dtype, narrow: bool, cl: bool = False, window=None, unit_w: bool = False) -> dict:
    """pool.cu's compile-time parameters for a launch: ``window`` None, or (KH, KW, SH, SW, DH, DW,
    MIN) compiled in (POOL_FIXED); ``unit_w``: the forward's input has unit column stride,
    compiled in (POOL_XW1). Also what ``gpu-nn sass --cuda`` compiles."""
    if dtype not in _CUDA_TYPES:
        raise KernelInputError(f"pool (cupy): unsupported dtype {dtype}")
    defines = {"POOL_T": _CUDA_TYPES[dtype], "POOL_THREADS": _CUDA_THREADS, "POOL_NARROW": int(narrow),
               "POOL_CL": int(cl)}
    if unit_w:
        defines["POOL_XW1"] = 1
    if window is not None:
        defines["POOL_FIXED"] = 1
        defines.update(zip(("POOL_KH", "POOL_KW", "POOL_SH", "POOL_SW", "POOL_DH", "POOL_DW", "POOL_MIN"), window))
    return defines


_MODULES: dict = {}  # (dtype, narrow, cl, window, unit_w, device index) -> module


def _load_module(dtype, narrow, cl, window, unit_w, index):
    return cuda_kernels().load("pool", cuda_defines(dtype, narrow, cl, window, unit_w), index)


def _cuda_module(dtype: torch.dtype, device: torch.device, narrow: bool, cl: bool = False, window=None,
                 unit_w: bool = False):
    """The module for a launch (see :func:`cuda_defines`), looked up by the launch's facts (no
    defines dict built and sorted per call once it is loaded)."""
    key = (dtype, narrow, cl, window, unit_w, device.index or 0)
    return memo(_MODULES, 1024, key, _load_module, *key)


def _divisors(narrow: bool, C: int, R: int, Q: int) -> tuple:
    """The kernels' last six arguments: m and s for C, R and Q (the sizes an element index is
    unravelled by) where the indices are 32-bit, zeros where they are not (unused there)."""
    return fastdiv.launch_args((C, R, Q), False) if narrow else (np.uint32(0),) * 6


def _window(k, s, d=(1, 1), minimum=False):
    """The window a module is compiled for (see _FIXED_TAPS), or None: the run-time kernels."""
    return (*k, *s, *d, int(minimum)) if k[0] * k[1] <= _FIXED_TAPS else None


def _unit_w(x) -> bool:
    """Whether the forward's input x can be read with a column stride of 1 (pool.cu's POOL_XW1):
    its columns are contiguous, or it has one column (whose offset is 0 whatever the stride)."""
    return x.stride(3) == 1 or x.shape[3] == 1


# A launch's grid stops at what the GPU holds at once (the occupancy API's blocks per SM for the
# kernel, times the SMs): a larger problem loops in the kernels' grid-stride loops, so that each
# thread's set-up (its share of the kernel's prologue: reading the arguments, the divisors; about
# 50 of the 190 sm_90 instructions a 3x3 max pooling output costs with one output per thread) is
# paid once for many outputs, and no block waits for a second wave with its full share.
_GRID_CAPS: dict = {}  # (module id, kernel) -> blocks; modules live as long as the process


def _resident_blocks(mod, kernel: str, index: int) -> int:
    """Blocks of ``kernel`` (of 256 threads) all SMs of device ``index`` hold at once."""
    import cupy
    from cupy_backends.cuda.api import driver

    fn = cuda_kernels().function(mod, kernel)
    with cupy.cuda.Device(index):
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, _CUDA_THREADS, 0)
    return max(1, per_sm) * torch.cuda.get_device_properties(index).multi_processor_count


def _grid_cap(mod, kernel: str, device: torch.device) -> int:
    if device.type != "cuda":
        return 65535 * 32
    return memo(_GRID_CAPS, 1024, (id(mod), kernel), _resident_blocks, mod, kernel, device.index or 0)


def _cuda_launch(kernel: str, n: int, args, device: torch.device, narrow: bool, cl: bool, window=None,
                 unit_w=None):
    """``cl``: the outputs (and a backward's gradient and indices) in channels_last order;
    ``window``: see :func:`_window`; ``unit_w``: see :func:`_unit_w` (None for a backward, which
    reads no x: it then loads the module a forward of its layout most likely loaded, contiguous
    NCHW inputs having unit column stride and channels_last ones not)."""
    kcuda = cuda_kernels()

    mod = _cuda_module(args[0].dtype, device, narrow, cl, window, (not cl) if unit_w is None else unit_w)
    blocks = min((n + _CUDA_THREADS - 1) // _CUDA_THREADS, _grid_cap(mod, kernel, device))
    kcuda.launch(mod, kernel, (blocks,), (_CUDA_THREADS,), args, device=device.index or 0)


def _i64(*vals):
    return tuple(np.int64(v) for v in vals)


# The launches below take their outputs (and a backward's gradient and indices) dense: contiguous,
# or with ``cl`` in channels_last order (pool.cu's POOL_CL); the forward's input with any strides.


def _cupy_max_forward(x, out, idx, k, s, p, d, minimum, cl=False):
    """``idx`` None: the values only (a null pointer: the kernel skips the index stores)."""
    N, C, H, W = x.shape
    _, _, oh, ow = out.shape
    narrow = _narrow(x, out)
    args = (x, out, np.uint64(0) if idx is None else idx, *_i64(N * C * oh * ow, C, H, W, oh, ow, *x.stride()),
            *(np.int32(v) for v in (*k, *s, *p, *d)), np.int32(1 if minimum else 0), *_divisors(narrow, C, oh, ow))
    _cuda_launch("pool_max_fwd", out.numel(), args, x.device, narrow, cl, _window(k, s, d, minimum), _unit_w(x))


def _cupy_max_backward(g, ix, gi, k, s, p, d, cl=False):
    N, C, H, W = gi.shape
    _, _, oh, ow = g.shape
    narrow = _narrow(g, gi)
    args = (g, ix, gi, *_i64(gi.numel(), C, H, W, oh, ow), *(np.int32(v) for v in (*k, *s, *p, *d)),
            *_divisors(narrow, C, H, W))
    _cuda_launch("pool_max_bwd", gi.numel(), args, g.device, narrow, cl, _window(k, s, d))


def _cupy_avg_forward(x, out, k, s, p, count_include_pad, divisor, cl=False):
    N, C, H, W = x.shape
    _, _, oh, ow = out.shape
    narrow = _narrow(x, out)
    args = (x, out, *_i64(out.numel(), C, H, W, oh, ow, *x.stride()), *(np.int32(v) for v in (*k, *s, *p)),
            np.int32(int(count_include_pad)), np.int32(divisor), *_divisors(narrow, C, oh, ow))
    _cuda_launch("pool_avg_fwd", out.numel(), args, x.device, narrow, cl, _window(k, s), _unit_w(x))


def _cupy_avg_backward(g, gi, k, s, p, count_include_pad, divisor, cl=False):
    N, C, H, W = gi.shape
    _, _, oh, ow = g.shape
    narrow = _narrow(g, gi)
    args = (g, gi, *_i64(gi.numel(), C, H, W, oh, ow), *(np.int32(v) for v in (*k, *s, *p)),
            np.int32(int(count_include_pad)), np.int32(divisor), *_divisors(narrow, C, H, W))
    _cuda_launch("pool_avg_bwd", gi.numel(), args, g.device, narrow, cl, _window(k, s))


# --- custom ops -----------------------------------------------------------------------------


@routed
@torch.library.custom_op("gpu_nn::max_pool", mutates_args=())
@on_device
def _max_pool_op(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 ceil_mode: bool, minimum: bool, need_indices: bool = True) -> tuple[Tensor, Tensor]:
    return max_pool_forward(input, kernel_size, stride, padding, dilation, ceil_mode, minimum, need_indices)


@_max_pool_op.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, minimum, need_indices=True):
    N, C, H, W = input.shape
    oh, ow = _out_hw(H, W, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = _CL if _channels_last(input) else _CONTIG
    idx = (_laid_out(input, (N, C, oh, ow), fmt, torch.int64) if need_indices
           else input.new_empty((0,), dtype=torch.int64))
    return _laid_out(input, (N, C, oh, ow), fmt), idx


@routed
@torch.library.custom_op("gpu_nn::max_pool_backward", mutates_args=())
@on_device
def _max_pool_backward_op(grad_output: Tensor, indices: Tensor, input_size: list[int], kernel_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int], channels_last: bool = False) -> Tensor:
    return max_pool_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation, channels_last)


@_max_pool_backward_op.register_fake
def _(grad_output, indices, input_size, kernel_size, stride, padding, dilation, channels_last=False):
    return _laid_out(grad_output, tuple(input_size), _CL if channels_last else _CONTIG)


def _max_setup(ctx, inputs, output):
    x, k, s, p, d, _, _, _ = inputs
    ctx.params = (list(x.shape), k, s, p, d, _channels_last(x))
    ctx.save_for_backward(output[1], x)  # x: as torch's max pooling saves it (see _depends_on)
    ctx.mark_non_differentiable(output[1])
    # no zero-filled gradient for the int64 indices, which nothing reads (one fill kernel a
    # backward otherwise); the backward then sees None for an output nothing flowed into
    ctx.set_materialize_grads(False)


def _max_backward(ctx, grad, _grad_indices):
    if grad is None:  # not materialised (see _max_setup): an undefined gradient gives an undefined one
        return None, None, None, None, None, None, None, None
    idx, x = ctx.saved_tensors
    if idx.dim() != 4:
        raise KernelInputError("max_pool backward: the forward ran with need_indices=False (no indices were kept); "
                               "call it with need_indices=True where a gradient is wanted")
    return _depends_on(_max_pool_backward_op(grad, idx, *ctx.params), x), None, None, None, None, None, None, None


_max_pool_op.register_autograd(_max_backward, setup_context=_max_setup)


def _max_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_backward_backward(ctx, ggi):
    """Double backward: max_pool_backward scatters grad_output to the saved (non-differentiable)
    indices, so its adjoint gathers ``ggi`` at the same indices (max and min pooling alike)."""
    (idx,) = ctx.saved_tensors
    N, C, OH, OW = idx.shape  # planes named, not -1: a reshape cannot infer them in an empty batch
    d_g = ggi.reshape(N, C, ggi.shape[2] * ggi.shape[3]).gather(2, idx.reshape(N, C, OH * OW)).reshape(idx.shape)
    return d_g, None, None, None, None, None, None, None


# double backward (create_graph=True): the backward op is differentiable too
_max_pool_backward_op.register_autograd(_max_backward_backward, setup_context=_max_bwd_setup)


@routed
@torch.library.custom_op("gpu_nn::avg_pool", mutates_args=())
@on_device
def _avg_pool_op(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                 count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    return avg_pool_forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@_avg_pool_op.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    N, C, H, W = input.shape
    oh, ow = _out_hw(H, W, kernel_size, stride, padding, (1, 1), ceil_mode)
    return _laid_out(input, (N, C, oh, ow), _CL if _channels_last(input) else _CONTIG)


@routed
@torch.library.custom_op("gpu_nn::avg_pool_backward", mutates_args=())
@on_device
def _avg_pool_backward_op(grad_output: Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                          padding: list[int], ceil_mode: bool, count_include_pad: bool,
                          divisor_override: Optional[int], channels_last: bool = False) -> Tensor:
    return avg_pool_backward(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
                             divisor_override, channels_last)


@_avg_pool_backward_op.register_fake
def _(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
      channels_last=False):
    return _laid_out(grad_output, tuple(input_size), _CL if channels_last else _CONTIG)


def _avg_setup(ctx, inputs, output):
    x, k, s, p, cm, cip, dov = inputs
    ctx.params = (list(x.shape), k, s, p, cm, cip, dov, _channels_last(x))
    ctx.save_for_backward(x)  # as torch's average pooling saves it (see _depends_on)


def _avg_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _depends_on(_avg_pool_backward_op(grad, *ctx.params), x), None, None, None, None, None, None


def _depends_on(gx: Tensor, x: Tensor) -> Tensor:
    """The input gradient ``gx``, made to depend on the input ``x`` (with a zero derivative) where
    a graph is built (create_graph=True): torch's pooling backward is differentiable in its input
    (a zero derivative), so a gradient penalty through a pooling can be differentiated again with
    respect to the input, whether the upstream gradient is a constant
    (``grad(pool(x).sum(), x, create_graph=True)``: ours gave a tensor without a graph) or carries
    a graph of its own (a gradient through ``grad(y, x, v)`` with ``v`` requiring one: ours said x
    was not used in the graph where torch's derivative is zero). Not under torch.func's grad /
    vjp (every backward there builds a graph: per-sample gradients, ensembles), whose
    differentiation gives an input it does not reach a zero gradient of its own: the zero added
    there cost a reduction and a whole read and write of the input gradient in every pooling
    backward. (A view made by an autograd.Function instead would refuse an in-place change of
    the returned gradient, which torch's allows.)"""
    if not _C.is_grad_enabled() or transform_active(_GRAD):
        return gx
    zero = exact_zero_of((x,))
    return gx if zero is None else gx + zero.to(gx.dtype)


_avg_pool_op.register_autograd(_avg_backward, setup_context=_avg_setup)


def _avg_bwd_setup(ctx, inputs, output):
    _, size, k, s, p, cm, cip, dov, _ = inputs
    ctx.params = (k, s, p, cm, cip, dov)


def _avg_backward_backward(ctx, ggi):
    """Double backward: avg_pool_backward is the transpose of the (linear) average pooling,
    so its adjoint is our average pooling of ``ggi`` with the same arguments."""
    return _avg_pool_op(ggi, *ctx.params), None, None, None, None, None, None, None, None


# double backward (create_graph=True): the backward op is differentiable too
_avg_pool_backward_op.register_autograd(_avg_backward_backward, setup_context=_avg_bwd_setup)


# forward-mode AD (register_jvp) and vmap folds: max / min pooling's tangent is the input's
# tangent gathered at the indices (what its double backward gathers), its backward's a scatter of
# the gradient's tangent (the backward op again); average pooling and its backward are linear


def _gathered(t: Tensor, idx: Tensor) -> Tensor:
    N, C, OH, OW = idx.shape
    return t.reshape(N, C, t.shape[2] * t.shape[3]).gather(2, idx.reshape(N, C, OH * OW)).reshape(idx.shape)


def _max_jvp(inputs, outputs, tangents):
    vals, idx = outputs
    if tangents[0] is None:
        return None, None
    if idx.dim() != 4:  # (the forward kept none: _need_indices asks for them under forward AD)
        raise NotImplementedError("gpu_nn::max_pool: forward-mode AD needs the indices (need_indices=True)")
    return _gathered(tangents[0], idx), None


def _max_fold(apply, in_dims, args):
    x = args[0]
    if in_dims[0] is None or x.dim() != 5:
        return None
    B = x.shape[in_dims[0]]
    vals, idx = apply(merge_batch(x, in_dims[0]), *args[1:])
    return (split_batch(vals, B), split_batch(idx, B) if idx.dim() == 4 else idx), (0, 0 if idx.dim() == 4 else None)


def _max_backward_fold(apply, in_dims, args):
    g, idx, size = args[:3]
    if in_dims[0] is None or g.dim() != 5:
        return None
    first = batched_first(g, in_dims[0])
    B = first.shape[0]
    # (indices not batched: the forward's, under a jacfwd over the gradient's directions)
    gi = apply(merge_batch(g, in_dims[0]), merge_batch(idx, in_dims[1], first), [B * size[0], *size[1:]], *args[3:])
    return split_batch(gi, B), 0


def _avg_fold(apply, in_dims, args):
    x = args[0]
    if in_dims[0] is None or x.dim() != 5:
        return None
    B = x.shape[in_dims[0]]
    return split_batch(apply(merge_batch(x, in_dims[0]), *args[1:]), B), 0


def _avg_backward_fold(apply, in_dims, args):
    g, size = args[:2]
    if in_dims[0] is None or g.dim() != 5:
        return None
    B = g.shape[in_dims[0]]
    return split_batch(apply(merge_batch(g, in_dims[0]), [B * size[0], *size[1:]], *args[2:]), B), 0


_max_pool_op.register_jvp(_max_jvp)
_max_pool_backward_op.register_jvp(jvp_linear_in_first(_max_pool_backward_op))
_avg_pool_op.register_jvp(jvp_linear_in_first(_avg_pool_op))
_avg_pool_backward_op.register_jvp(jvp_linear_in_first(_avg_pool_backward_op))
_max_pool_op.register_vmap_fold(_max_fold)
_max_pool_backward_op.register_vmap_fold(_max_backward_fold)
_avg_pool_op.register_vmap_fold(_avg_fold)
_avg_pool_backward_op.register_vmap_fold(_avg_backward_fold)


# --- public functions -----------------------------------------------------------------------


def _max2d_args(op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """max_pool2d's parse and checks: the custom op's (k, s, p, d, ceil_mode), pairs as tuples."""
    name = op + ("_with_indices" if return_indices else "")
    parsed = _parse(name, kernel_size, stride, padding, dilation)
    _check_flags(name, ("ceil_mode", ceil_mode, 6))
    k, s, p, d = _pair2d(op, *parsed)
    _check_2d(input, k, s, p, d, ceil_mode, is_max=True)
    return k, s, p, d, ceil_mode


def _max2d_public(op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, minimum):
    _check_input(op, input, _TF.max_pool2d, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    args = (op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if _plain_call(kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        k, s, p, d, cm = _public_memo(("public", op, input.shape, kernel_size, stride, padding, dilation, ceil_mode, return_indices),
                                      _max2d_args, *args)
    else:
        k, s, p, d, cm = _max2d_args(*args)
    batched = input.dim() == 4
    out, idx = _max_pool_op(input if batched else _unbatched(input), list(k), list(s), list(p), list(d), cm, minimum,
                            _need_indices(input, return_indices))
    if not return_indices:
        return out if batched else out.squeeze(0)
    return (out, idx) if batched else (out.squeeze(0), idx.squeeze(0))


def _max1d_args(op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """max_pool1d's parse and checks (max_pool1d_with_indices' with ``return_indices``): the
    custom op's 2d (k, s, p, d, ceil_mode) of the [N, C, 1, L] view, as tuples."""
    name = op + ("_with_indices" if return_indices else "")
    k, s, p, d = _parse(name, kernel_size, stride, padding, dilation)
    _check_flags(name, ("ceil_mode", ceil_mode, 6))
    if return_indices:
        # torch's max_pool1d_with_indices: rank range, one int each, then max_pool2d_with_indices
        # of the [N?, C, 1, L] view (its messages)
        _check_dim_range(op, input)
        s = s or k
        _check1d(op, k, s, p, d)
        _check_2d(input.unsqueeze(-2), (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0]), ceil_mode, is_max=True)
    else:
        _check_max1d(op, input, k, s, p, d, ceil_mode)
        s = s or k
    return (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0]), ceil_mode


def _unbatched(input):
    """An unbatched input (``[C, H, W]``, or ``[C, 1, L]`` for 1d pooling) as a batch of one:
    contiguous where that batch would look channels_last, since torch's unbatched pooling
    returns contiguous values, indices and input gradient whatever the input's layout
    (channels_last is a 4-d layout; the copy's backward passes the contiguous gradient on)."""
    x4 = input.unsqueeze(0)
    return input.contiguous().unsqueeze(0) if _channels_last(x4) else x4


def _as_4d(input):
    """A 1d pooling input ``[N, C, L]`` or ``[C, L]`` as ``[N, C, 1, L]`` (N = 1 unbatched, see
    :func:`_unbatched`): one view where the input is contiguous (the result is viewed back to
    the input's shape)."""
    shape = input.shape
    if input.is_contiguous():
        return input.view(shape[0] if input.dim() == 3 else 1, shape[-2], 1, shape[-1])
    return input.unsqueeze(-2) if input.dim() == 3 else _unbatched(input.unsqueeze(-2))


def _max1d_public(op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, minimum):
    _check_input(op, input, _TF.max_pool1d, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    args = (op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if _plain_call(kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        k, s, p, d, cm = _public_memo(("public", op, input.shape, kernel_size, stride, padding, dilation, ceil_mode,
                                       return_indices), _max1d_args, *args)
    else:
        k, s, p, d, cm = _max1d_args(*args)
    shape = input.shape
    x4 = _as_4d(input)
    out, idx = _max_pool_op(x4, list(k), list(s), list(p), list(d), cm, minimum, _need_indices(input, return_indices))
    oshape = (*shape[:-1], out.shape[-1])
    if return_indices:
        return out.view(oshape), idx.view(oshape)
    out = out.view(oshape)
    if input.is_cpu and not out.is_contiguous() and not _torch_pools_with_indices(input):
        # torch's max_pool1d on a CPU tensor that needs no gradient runs its own 1d kernel, whose
        # values are contiguous whatever the input's layout (with_indices, which it runs
        # elsewhere and we run always, keeps a (N, L, C)-ordered input's order)
        out = out.contiguous()
    return out


def _torch_pools_with_indices(input: Tensor) -> bool:
    """Whether torch's max_pool1d runs its with-indices form on this CPU input (whose result keeps
    the input's order), as its condition reads: a gradient wanted, a forward gradient (a tangent
    at level 0: fwAD.make_dual, torch.func.jvp) or a tensor-subclass-like input (functorch's
    wrappers under vmap / grad)."""
    if _C.is_grad_enabled() and input.requires_grad:
        return True
    if _C._are_functorch_transforms_active():
        return True
    return (torch.autograd.forward_ad._current_level >= 0
            and torch._VF._unpack_dual(input, level=0)[1] is not None)


def _need_indices(input: Tensor, return_indices: bool) -> bool:
    """Whether anything will read a max pooling's indices: the caller (return_indices), or a
    backward (grad mode on and the input requiring a gradient, or a functorch transform, whose
    wrapped tensors autograd differentiates whatever requires_grad says). Under torch.compile and
    torch.jit.trace the indices are always made: the graph they record serves later calls in any
    grad mode (a trace bakes the flag in as a constant, and its check run, without grad, would
    otherwise record another graph)."""
    return (return_indices or torch.compiler.is_compiling() or _C._get_tracing_state() is not None
            or _C._are_functorch_transforms_active() or (_C.is_grad_enabled() and input.requires_grad)
            or torch.autograd.forward_ad._current_level >= 0)  # (a dual level: the tangent's gather)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2d max pooling of ``[N, C, H, W]`` or ``[C, H, W]``; as ``torch.nn.functional.max_pool2d``.

    ``return_indices`` adds int64 flat indices into each ``H x W`` plane. NaN propagates.
    """
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(max_pool2d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _max2d_public("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, False)


def min_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2d min pooling: ``-max_pool2d(-input)`` (indices included); max_pool2d's arguments."""
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(min_pool2d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _max2d_public("min_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, True)


def max_pool1d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """1d max pooling of ``[N, C, L]`` or ``[C, L]``; as ``torch.nn.functional.max_pool1d``
    (with ``return_indices`` torch checks as max_pool1d_with_indices does, and so do we)."""
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(max_pool1d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _max1d_public("max_pool1d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, False)


# torch.nn.functional's names for a max pooling that returns its indices: our max_pool with
# return_indices=True, no op of their own (``gpu-nn check`` checks the op they call)
ALIASES = {"max_pool1d_with_indices": "max_pool1d", "max_pool2d_with_indices": "max_pool2d"}


def max_pool2d_with_indices(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """max_pool2d's ``(output, indices)`` whatever ``return_indices`` says; as
    ``torch.nn.functional.max_pool2d_with_indices``."""
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(max_pool2d_with_indices, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, True)


def max_pool1d_with_indices(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """max_pool1d's ``(output, indices)`` whatever ``return_indices`` says; as
    ``torch.nn.functional.max_pool1d_with_indices``."""
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(max_pool1d_with_indices, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, True)


def min_pool1d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """1d min pooling: ``-max_pool1d(-input)`` (indices included); max_pool1d's arguments."""
    if _has_tf(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _tf(min_pool1d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _max1d_public("min_pool1d", input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, True)


def _divisor(op: str, divisor_override):
    if divisor_override is None:
        return None
    if not is_int(divisor_override):
        raise KernelInputTypeError(f"{op}(): argument 'divisor_override' must be int, not {type_name(divisor_override)}")
    if int(divisor_override) == 0:
        raise KernelInputError("divisor must be not zero")
    return int(divisor_override)


def _avg2d_args(op, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """avg_pool2d's parse and checks: the custom op's (k, s, p, ceil_mode, count_include_pad,
    divisor_override), pairs as tuples."""
    k, s, p, _ = _parse(op, kernel_size, stride, padding)
    _check_flags(op, ("ceil_mode", ceil_mode, None), ("count_include_pad", count_include_pad, None))
    k, s, p, d = _pair2d(op, k, s, p, (1,))
    dov = _divisor(op, divisor_override)  # torch checks it before any shape
    _check_2d(input, k, s, p, d, ceil_mode, is_max=False)
    return k, s, p, ceil_mode, count_include_pad, dov


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """2d average pooling of ``[N, C, H, W]`` or ``[C, H, W]``; as ``torch.nn.functional.avg_pool2d``."""
    if _has_tf(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return _tf(avg_pool2d, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    op = "avg_pool2d"
    _check_input(op, input, _TF.avg_pool2d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    args = (op, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    if _plain_call(kernel_size, stride, padding, 1, ceil_mode, count_include_pad) and (
            divisor_override is None or type(divisor_override) is int):
        k, s, p, cm, cip, dov = _public_memo(("public",) + args[:1] + (input.shape,) + args[2:], _avg2d_args, *args)
    else:
        k, s, p, cm, cip, dov = _avg2d_args(*args)
    batched = input.dim() == 4
    out = _avg_pool_op(input if batched else _unbatched(input), list(k), list(s), list(p), cm, cip, dov)
    return out if batched else out.squeeze(0)


def _avg1d_args(op, input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """avg_pool1d's parse and checks: the custom op's 2d (k, s, p, ceil_mode, count_include_pad)
    of the [N, C, 1, L] view, as tuples."""
    k, s, p, _ = _parse(op, kernel_size, stride, padding)
    _check_flags(op, ("ceil_mode", ceil_mode, None), ("count_include_pad", count_include_pad, None))
    s = s or k
    _check_dim_range(op, input)
    _check1d(op, k, s, p)
    x3 = input.unsqueeze(-2)  # [N?, C, 1, L]: torch runs avg_pool1d as avg_pool2d of height 1
    k2, s2, p2 = (1, k[0]), (1, s[0]), (0, p[0])
    for name, v in (("kernel_size", k2), ("stride", s2), ("padding", p2)):
        _check_avg_range(name, v)
    _check_2d(x3, k2, s2, p2, (1, 1), ceil_mode, is_max=False)
    return k2, s2, p2, ceil_mode, count_include_pad


def avg_pool1d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """1d average pooling of ``[N, C, L]`` or ``[C, L]``; as ``torch.nn.functional.avg_pool1d``
    (no divisor_override, as torch)."""
    if _has_tf(input, kernel_size, stride, padding, ceil_mode, count_include_pad):
        return _tf(avg_pool1d, input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    op = "avg_pool1d"
    _check_input(op, input, _TF.avg_pool1d, kernel_size, stride, padding, ceil_mode, count_include_pad)
    args = (op, input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    if _plain_call(kernel_size, stride, padding, 1, ceil_mode, count_include_pad):
        k, s, p, cm, cip = _public_memo(("public",) + args[:1] + (input.shape,) + args[2:], _avg1d_args, *args)
    else:
        k, s, p, cm, cip = _avg1d_args(*args)
    shape = input.shape
    x4 = _as_4d(input)
    out = _avg_pool_op(x4, list(k), list(s), list(p), cm, cip, None)
    return out.view(*shape[:-1], out.shape[-1])


# --- gpu-nn check cases ---------------------------------------------------------------------


def _make(shape, scale=1.0):
    def make(rng):
        x = torch.from_numpy(rng.standard_normal(shape) * scale).requires_grad_()
        return (x,), {}

    return make


def _bind(fn, *args, **kwargs):
    def call(x):
        return fn(x, *args, **kwargs)

    call.__name__ = fn.__name__
    return call


CHECK_CASES = [
    CheckCase(op="max_pool2d", make=_make((2, 3, 17, 13)), fn=_bind(max_pool2d, 3, 2, 1)),
    CheckCase(op="max_pool2d", make=_make((2, 3, 17, 13)), fn=_bind(max_pool2d, (2, 3), (1, 2), (1, 1), (2, 1), True)),
    CheckCase(op="min_pool2d", make=_make((2, 3, 17, 13)), fn=_bind(min_pool2d, 3, 2, 1, 1, True)),
    CheckCase(op="max_pool1d", make=_make((3, 5, 31)), fn=_bind(max_pool1d, 4, 3, 2, 2, True)),
    CheckCase(op="min_pool1d", make=_make((3, 5, 31)), fn=_bind(min_pool1d, 3, 2, 1)),
    CheckCase(op="avg_pool2d", make=_make((2, 3, 17, 13)), fn=_bind(avg_pool2d, 3, 2, 1, True, False)),
    CheckCase(op="avg_pool2d", make=_make((2, 3, 17, 13)), fn=_bind(avg_pool2d, (3, 2), 1, (1, 0), False, True, 5)),
    CheckCase(op="avg_pool1d", make=_make((3, 5, 31)), fn=_bind(avg_pool1d, 5, 2, 2, True, True)),
]
for _c in CHECK_CASES:
    _c.backends = BACKENDS
