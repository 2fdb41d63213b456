"""conv1d / conv2d: argument normalisation, checks, dispatch and ``torch.library`` registration.

Public functions take ``torch.nn.functional.conv1d/conv2d``'s exact arguments, plus the fused
``activation=`` keyword (None, 'relu', 'sigmoid', 'tanh'), applied after the bias.

One custom-op pair serves both ranks (the rank is the weight's ``dim() - 2``):

* ``gpu_nn::conv_forward(input, weight, bias, stride, padding, dilation, groups, activation)``
  with a batched input (``[N, C, L]`` or ``[N, C, H, W]``) and ``padding`` per side
  (``[lo, hi]`` per spatial dimension, so ``'same'`` with an even kernel is exact);
* ``gpu_nn::conv_backward(grad_output, input, weight, output, ..., output_mask)`` returning
  ``(grad_input, grad_weight, grad_bias)``; a gradient not asked for in ``output_mask`` comes
  back as an empty tensor. ``output`` (the forward result) is only used, and only needed, with
  a fused activation.

Backends: reference (NumPy; float16/bfloat16 computed in float32), triton.

Memory format: as torch's own convolution (checked against torch on the CPU for every input x
weight layout in tests/test_conv.py), the output, the input gradient and the weight gradient are
all channels_last (NHWC; NLC for conv1d) when the weight's strides look channels_last, or for
conv2d the input's do (:func:`_memory_format`); otherwise contiguous. The Triton kernels address
every tensor through its strides, so either layout is read and written in place, without a
transpose pass (on a GPU the forward and the input gradient may measure, and then pick, a
variant that transposes NCHW operands to channels_last: ``kernels/triton/conv.py``, ``VIA_CL``);
the reference computes contiguous and lays the result out afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Optional

import torch
import torch.nn.functional as _TF
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _backend
from .._errors import KernelInputError, KernelInputTypeError, cpp_type_name, scalar_type_name, type_name
from .._precision import tf32 as _tf32
from ..check import CheckCase
from ..reference import conv as ref
from ._dispatch import (
    FLOAT_DTYPES, autocast_inputs, check_float, check_float_like_torch, check_same, check_tensor, empty, float64_in_float32, from_numpy, is_int, memo, on_device, plain_arg,
    all_of, any_of, require, routed, to_numpy, triton_kernels,
)
from ._dispatch import chooser as _chooser  # module-level name: tests replace it
from ._dispatch import dense_channels_last as _dense_channels_last
from ._dispatch import suggests_channels_last as _channels_last_like
from ._dispatch import has_torch_function as _has_tf
from ._dispatch import add_terms, batched_first, merge_batch, split_batch, stand_in, torchs_own_error, wanted
from ._dispatch import torch_function as _tf

__all__ = ["conv1d", "conv2d"]

BACKENDS = ("reference", "triton")
ACTIVATIONS = (None, "relu", "sigmoid", "tanh")


# ----------------------------------------------------------------------------- arguments

_OVERLOADS = (
    " * (Tensor input, Tensor weight, Tensor bias = None, tuple of ints stride = 1, tuple of ints padding = 0, "
    "tuple of ints dilation = 1, int groups = 1)\n"
    " * (Tensor input, Tensor weight, Tensor bias = None, tuple of ints stride = 1, str padding = \"valid\", "
    "tuple of ints dilation = 1, int groups = 1)\n"
)


def _bad_combination(nd: int, arg: str, v) -> KernelInputTypeError:
    """torch's argument-parser TypeError (worded as for a call passing ``arg`` by keyword)."""
    return KernelInputTypeError(
        f"conv{nd}d() received an invalid combination of arguments - got (Tensor, Tensor, {arg}={type_name(v)}), "
        f"but expected one of:\n{_OVERLOADS}"
    )




def _expand(name: str, v, nd: int, types_only: bool = False) -> list[int]:
    """An int or sequence of ints -> nd ints, as torch's parser and conv's arity check (a float,
    string, bool or None is torch's TypeError, never coerced). ``types_only``: the parser's
    part alone (run before conv's rank checks, as torch's parser runs before conv)."""
    if is_int(v):
        return [int(v)] * nd
    if not isinstance(v, (tuple, list, torch.Size)):
        raise _bad_combination(nd, name, v)
    for i, e in enumerate(v):
        if not is_int(e):
            if i == 0:
                raise _bad_combination(nd, name, v)
            raise KernelInputTypeError(
                f"conv{nd}d(): argument '{name}' failed to unpack the object at pos {i + 1} with error "
                f'"type must be tuple of ints,but got {type_name(e)}"'
            )
    v = [int(a) for a in v]
    if types_only:
        return v
    if len(v) == 1:
        return v * nd
    if len(v) != nd:
        raise KernelInputError(
            f"expected {name} to be a single integer value or a list of {nd} values to match the "
            f"convolution dimensions, but got {name}={v}"
        )
    return v


def _normalise(nd, weight, stride, padding, dilation):
    """(stride, per-side padding [lo, hi, ...], dilation) as int lists; torch's errors."""
    stride = _expand("stride", stride, nd)
    dilation = _expand("dilation", dilation, nd)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise KernelInputError(f"Invalid padding string: {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise KernelInputError("padding='same' is not supported for strided convolutions")
        if padding == "valid":
            pads = [0] * (2 * nd)
        else:
            pads = []
            for k, d in zip(weight.shape[2:], dilation):
                # int(): under torch.jit.trace a size is a 0-d tensor, and the op's padding an int list
                total = d * (int(k) - 1)
                pads += [total // 2, total - total // 2]  # torch puts the odd element on the high side
            if any(p < 0 for p in pads):  # negative dilation: torch fails here, before any dtype check
                raise KernelInputError("negative padding is not supported")
    else:
        pads = [p for p in _expand("padding", padding, nd) for _ in (0, 1)]
    return stride, pads, dilation


# the input dtypes whose CPU convolution torch implements, which it tells about a weight of another
# dtype with "expected scalar type" (its other dtypes meet "not implemented" first)
_CPU_CONV_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                              torch.int16, torch.int8, torch.uint8, torch.bool})


def _legacy_type(t: Tensor) -> str:
    if t.dtype in (torch.bool, torch.bfloat16, torch.complex64, torch.complex128):
        return f"{'CPU' if t.device.type == 'cpu' else 'CUDA'}{scalar_type_name(t.dtype)}Type"
    return t.type()


def _check_devices_and_bias(name: str, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Devices, then torch's first dtype check: the bias's against the input's (before any
    shape check; the weight's comes after them, in :func:`_check_weight_dtype`)."""
    for other, what in ((weight, "weight"), (bias, "bias")):
        if other is not None and other.device != input.device:
            raise KernelInputError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {other.device}! ({name}: input and {what})"
            )
    if bias is not None and bias.dtype != input.dtype:
        raise KernelInputError(
            f"Input type ({cpp_type_name(input.dtype)}) and bias type ({cpp_type_name(bias.dtype)}) "
            "should be the same"
        )


def _check_weight_dtype(name: str, input: Tensor, weight: Tensor, unbatched: bool) -> None:
    """torch's weight-dtype check (on the CPU a batched float32 input is told about MKLDNN, any
    other input gets "expected scalar type"), then our own limit: floating-point tensors (torch
    also convolves integer tensors on the CPU; gpu-nn does not)."""
    if weight.dtype != input.dtype:
        cpu = input.device.type == "cpu"
        mkldnn = cpu and input.dtype == torch.float32 and not unbatched
        if cpu and input.dtype in _CPU_CONV_DTYPES and not mkldnn:
            raise KernelInputError(f"expected scalar type {scalar_type_name(input.dtype)} but found "
                                   f"{scalar_type_name(weight.dtype)}")
        raise KernelInputError(
            f"Input type ({_legacy_type(input)}) and weight type ({_legacy_type(weight)}) should be the same"
            + (" or input should be a MKLDNN tensor and weight is a dense tensor" if mkldnn else "")
        )
    check_float(name, "input", input)


_CHECKED: set = set()  # argument facts that passed _check_all (bounded: cleared when full)
_CHECKED_MAX = 4096


def _meta(t):
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def _check(nd: int, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
           groups: int, activation, unbatched: bool = False) -> None:
    """:func:`_check_all`, skipped where the same facts passed before: the public function and
    the custom op (which opcheck and torch.compile call directly) both check, and a training
    loop repeats the same shapes. The key holds everything ``_check_all`` reads: each tensor's
    type, shape, dtype and device, and the other arguments; only passes are remembered, so bad
    input raises every time."""
    if torch.compiler.is_compiling() or type(input) is not Tensor and not isinstance(input, Tensor):
        _check_all(nd, input, weight, bias, stride, padding, dilation, groups, activation, unbatched)
        return
    try:
        key = (nd, _meta(input), _meta(weight) if isinstance(weight, Tensor) else weight,
               _meta(bias) if isinstance(bias, Tensor) else bias, tuple(stride), tuple(padding), tuple(dilation),
               groups, activation, unbatched)
        hit = key in _CHECKED
    except TypeError:  # something unhashable (a symbolic size): check in full
        _check_all(nd, input, weight, bias, stride, padding, dilation, groups, activation, unbatched)
        return
    if hit:
        return
    _check_all(nd, input, weight, bias, stride, padding, dilation, groups, activation, unbatched)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED.add(key)


def _check_all(nd: int, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
               groups: int, activation, unbatched: bool = False) -> None:
    """Every bad-input kind, with torch's wording, before any computation. ``input`` is batched."""
    name = f"conv{nd}d"
    for pos, (arg, t) in enumerate((("input", input), ("weight", weight), ("bias", bias)), 1):
        if not (arg == "bias" and t is None):
            check_tensor(name, arg, t, pos)
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"{name}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    # (the public functions expand their arguments to these lengths; a direct call of the custom
    # op with others was indexed past them or read in part)
    if len(stride) != nd or len(dilation) != nd or len(padding) != 2 * nd:
        raise KernelInputError(f"{name}: expected {nd} strides, {nd} dilations and {2 * nd} paddings (one per side), got "
                               f"{list(stride)}, {list(dilation)} and {list(padding)}")
    if weight.dim() != nd + 2:
        raise KernelInputError(
            f"{name}: expected weight to be {nd + 2}-dimensional [out_channels, in_channels/groups, kernel...], "
            f"but got weight of size {list(weight.shape)}"
        )
    if input.dim() != nd + 2:
        raise KernelInputError(
            f"Expected {nd + 1}D (unbatched) or {nd + 2}D (batched) input to {name}, but got input of size: {list(input.shape)}"
        )
    _check_devices_and_bias(name, input, weight, bias)
    if groups <= 0:
        raise KernelInputError("non-positive groups is not supported")
    if any(s <= 0 for s in stride):
        raise KernelInputError("non-positive stride is not supported")
    if any(p < 0 for p in padding):
        raise KernelInputError("negative padding is not supported")
    if any(d < 0 for d in dilation):
        raise KernelInputError("dilation should be greater than zero")
    if any(d == 0 for d in dilation):  # torch names the 2-d form it runs (conv1d: [1, d])
        raise KernelInputError(f"dilation should be greater than zero, but got {[1] * (2 - nd) + list(dilation)}")
    o = weight.shape[0]
    if o < groups or o % groups:
        # torch's two messages bracket the size differently: "at least" once, "divisible by" twice
        what, size = ("at least", list(weight.shape)) if o < groups else ("divisible by", [list(weight.shape)])
        raise KernelInputError(
            f"Given groups={groups}, expected weight to be {what} {groups} at dimension 0, but got weight of size "
            f"{size} instead"
        )
    c = input.shape[1]
    if c != weight.shape[1] * groups:
        raise KernelInputError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} to have "
            f"{weight.shape[1] * groups} channels, but got {c} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != o):
        raise KernelInputError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with {o} elements, "
            f"but got bias of size {list(bias.shape)} instead"
        )
    if any(k <= 0 for k in weight.shape[2:]):
        raise KernelInputError(f"{name}: expected a non-empty kernel, but got weight of size {list(weight.shape)}")
    padded = [input.shape[2 + i] + padding[2 * i] + padding[2 * i + 1] for i in range(nd)]
    kext = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(nd)]
    require(all_of(k <= p for k, p in zip(kext, padded)), lambda: (
        f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). Kernel size: "
        f"({' x '.join(map(str, kext))}). Kernel size can't be greater than actual input size"))
    nonempty = all_of(input.shape[2 + i] != 0 for i in range(nd))
    # torch runs no backend on an input empty in a spatial dim alone (padding let the kernel
    # fit): its message shows the batched 2-d form it runs (conv1d: [N, C, 1, L])
    shape = list(input.shape) if nd == 2 else [*input.shape[:2], 1, input.shape[2]]
    require(any_of((input.shape[0] == 0, c == 0, nonempty)), lambda: (
        f"Only zero batch or zero channel inputs are supported, but got input shape: {shape}"))
    _check_weight_dtype(name, input, weight, unbatched)


def _out_size(input_shape, weight_shape, stride, padding, dilation):
    nd = len(weight_shape) - 2
    return [
        (input_shape[2 + i] + padding[2 * i] + padding[2 * i + 1] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(nd)
    ]


def _ref_pads(padding):
    return tuple((padding[2 * i], padding[2 * i + 1]) for i in range(len(padding) // 2))


# ----------------------------------------------------------------------------- launchers

_NAMES = {1: ("conv1d", "conv1d_backward"), 2: ("conv2d", "conv2d_backward")}
_PLAIN_T = (Tensor, torch.nn.Parameter)  # tensor types whose facts a plan key holds in full
_PLANS: dict = {}  # launcher call facts -> checked, normalised geometry (bounded: cleared when full)
_PLANS_MAX = 4096


def _planned(n_tensors, key_fn, make, *args):
    """``make(*args)`` -- the checks of a launcher call and what follows from them alone --,
    remembered under ``key_fn()`` when the first ``n_tensors`` arguments (the tensor slots) are
    plain tensors or None and no trace runs; else run as it is. ``key_fn`` holds everything
    ``make`` reads (each tensor's shape, strides, dtype and device, the other arguments); only
    results are remembered (a call that raises is never), so a hit skips exactly checks that
    passed and work whose answer is known."""
    if torch.compiler.is_compiling():
        return make(*args)
    for i in range(n_tensors):
        t = args[i]
        if t is not None and type(t) not in _PLAIN_T:
            return make(*args)
    try:
        key = key_fn()
        hash(key)
    except TypeError:  # something unhashable (a symbolic size, a list where an int belongs): in full
        return make(*args)
    return memo(_PLANS, _PLANS_MAX, key, make, *args)


def _facts(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _geometry(nd, stride, padding, dilation):
    """(stride, per-side padding, dilation) of the 2-d kernels: conv1d's [N, C, L] runs as
    [N, C, 1, L] (unit stride and dilation, no padding on the added axis)."""
    if nd == 2:
        return list(stride), list(padding), list(dilation)
    return [1, *stride], [0, 0, *padding], [1, *dilation]


def _fwd_plan(input, weight, bias, stride, padding, dilation, groups, activation):
    """:func:`conv_forward`'s checks, then (rank, memory format, output shape, 2-d geometry, the
    reference's arguments, the launch's pixels for :func:`_check_pixels`)."""
    nd = weight.dim() - 2
    _check_all(nd, input, weight, bias, stride, padding, dilation, groups, activation)
    fmt = _memory_format(input, weight)
    oshape = (input.shape[0], weight.shape[0], *_out_size(input.shape, weight.shape, stride, padding, dilation))
    return (nd, fmt, oshape, *_geometry(nd, stride, padding, dilation), _ref_args(stride, padding, dilation),
            input.shape[0] * _pixels_per_sample(nd, input, padding),
            _launch_problem(f"conv{nd}d", input.shape[1], weight.shape, groups, False))


def _ref_args(stride, padding, dilation):
    """(stride, per-side padding, dilation) in the reference's form, as hashable tuples (the
    reference remembers its parse of those)."""
    return tuple(stride), _ref_pads(padding), tuple(dilation)


def conv_forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                 groups: int, activation: Optional[str]) -> Tensor:
    """out = act(conv(input, weight) + bias): ``input`` [N, C, *S], ``weight`` [O, C/groups, *K],
    ``padding`` per side. Returns a [N, O, *So] tensor of input's dtype in the memory format
    :func:`_memory_format` gives (torch's). The checks and the geometry are planned once per
    call facts (:func:`_planned`)."""
    nd, fmt, oshape, st4, pads4, dl4, rargs, pixels, problem = _planned(
        3,
        lambda: (_facts(input), _facts(weight), _facts(bias), tuple(stride), tuple(padding), tuple(dilation), groups,
                 activation),
        _fwd_plan, input, weight, bias, stride, padding, dilation, groups, activation)
    name = _NAMES[nd][0]
    backend = _backend.resolve(name, input.device, BACKENDS, dtype=input.dtype)
    if backend == "reference":
        f = ref.conv2d if nd == 2 else ref.conv1d
        out = f(to_numpy(input), to_numpy(weight), to_numpy(bias), *rargs, groups, activation)
        return _in_format(from_numpy(out, input.dtype, input.device), fmt)
    if input.dtype is torch.float64:  # a GPU backend named for float64: in float32 (README)
        return float64_in_float32(conv_forward, input, weight, bias, stride, padding, dilation, groups, activation)
    _backend.check_interpreter_dtype(name, backend, input, weight, bias)
    _check_pixels(name, pixels)
    if problem:
        raise KernelInputError(problem)
    ktriton, kt = triton_kernels("conv")
    dt, dev = input.dtype, input.device
    out = _alloc(oshape, fmt, lambda s: empty(s, dtype=dt, device=dev))
    # the epilogue reads the bias with unit stride: expanded or strided views (a double
    # backward passes expanded ones) are made dense first (a no-op for a contiguous bias)
    bias = None if bias is None else bias.contiguous()
    kt.conv_forward(_as4d(input), _as4d(weight), bias, _as4d(out), st4, pads4, dl4, groups, activation, _precision(dt),
                    ktriton.INTERPRET, choose=_chooser(dev))
    return out


def _bwd_plan(grad_output, input, weight, output, stride, padding, dilation, groups, activation, output_mask):
    """:func:`conv_backward`'s checks, then (rank, memory format, 2-d geometry, mask, the
    layout of the activation's gradient, the bias gradient's reduced dimensions, the reference's
    arguments, the launch's pixels for :func:`_check_pixels`)."""
    nd = weight.dim() - 2
    _check_all(nd, input, weight, None, stride, padding, dilation, groups, activation)
    check_same(f"conv{nd}d backward", input, grad_output, "grad_output")
    expect = [input.shape[0], weight.shape[0], *_out_size(input.shape, weight.shape, stride, padding, dilation)]
    if list(grad_output.shape) != expect:
        raise KernelInputError(f"conv{nd}d backward: grad_output of size {list(grad_output.shape)}, expected {expect}")
    if activation is not None and (output is None or output.shape != grad_output.shape):
        raise KernelInputError(f"conv{nd}d backward with activation={activation!r} needs the forward output")
    mask = tuple(bool(m) for m in output_mask)
    if len(mask) != 3:
        raise KernelInputError(f"conv{nd}d backward: output_mask has {len(mask)} entries, expected 3 (input, weight, bias)")
    # the activation's elementwise kernel walks flat memory: g, y and its result share one dense
    # layout (channels_last stays channels_last, no transpose pass). With an activation, the
    # forward output's: y is the forward's own result, in the layout of the input and weight that
    # the gradient kernels read next, so a grad_output in the other layout (an NCHW gradient
    # back from a flatten after a channels_last layer) or expanded (y.sum()) is copied into y's
    # once, where taking grad_output's layout copied y, and an expanded one twice (materialised,
    # then y), and left the input and weight gradients to mixed layouts
    lead = output if activation is not None and (output.is_contiguous() or _dense_channels_last(output)) else grad_output
    gfmt = torch.channels_last if _dense_channels_last(lead) else torch.contiguous_format
    return (nd, _memory_format(input, weight), *_geometry(nd, stride, padding, dilation), mask, gfmt,
            (0, *range(2, grad_output.dim())), _ref_args(stride, padding, dilation),
            input.shape[0] * _pixels_per_sample(nd, input, padding),
            _launch_problem(f"conv{nd}d", input.shape[1], weight.shape, groups, mask[1], mask[0]))


def conv_backward(grad_output: Tensor, input: Tensor, weight: Tensor, output: Optional[Tensor], stride, padding,
                  dilation, groups: int, activation: Optional[str], output_mask) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of :func:`conv_forward`; a gradient whose
    ``output_mask`` entry is False comes back empty. Checks and geometry planned as the forward's."""
    nd, fmt, st4, pads4, dl4, mask, gfmt, bias_dims, rargs, pixels, problem = _planned(
        4,
        lambda: (_facts(grad_output), _facts(input), _facts(weight), _facts(output), tuple(stride), tuple(padding),
                 tuple(dilation), groups, activation, tuple(output_mask)),
        _bwd_plan, grad_output, input, weight, output, stride, padding, dilation, groups, activation, output_mask)
    name = _NAMES[nd][0]
    backend = _backend.resolve(_NAMES[nd][1], input.device, BACKENDS, dtype=input.dtype)
    dt, dev = input.dtype, input.device
    if backend == "reference":
        f = ref.conv2d_backward if nd == 2 else ref.conv1d_backward
        gi, gw, gb = f(to_numpy(grad_output), to_numpy(input), to_numpy(weight), *rargs, groups, mask,
                       to_numpy(output) if activation is not None else None, activation)
        # a gradient not asked for is an empty placeholder of its own (see below)
        gi = _in_format(from_numpy(gi, dt, dev), fmt) if mask[0] else input.new_empty(0)
        gw = _in_format(from_numpy(gw, dt, dev), fmt) if mask[1] else input.new_empty(0)
        return gi, gw, (from_numpy(gb, dt, dev) if mask[2] else input.new_empty(0))
    if dt is torch.float64:  # a GPU backend named for float64: in float32 (README)
        return float64_in_float32(conv_backward, grad_output, input, weight, output, stride, padding, dilation, groups,
                                  activation, output_mask)
    _backend.check_interpreter_dtype(name, backend, input, weight, grad_output)
    _check_pixels(name, pixels)
    if problem:
        raise KernelInputError(problem)
    ktriton, kt = triton_kernels("conv")

    g = grad_output
    new = lambda s: empty(s, dtype=dt, device=dev)  # noqa: E731
    gb = None
    if activation is not None:
        dense = _dense_channels_last(g) if gfmt == torch.channels_last else g.is_contiguous()
        gc = g if dense else _alloc(g.shape, gfmt, new).copy_(g)
        yc = output.to(g.dtype)
        if yc.stride() != gc.stride():
            yc = _alloc(yc.shape, gfmt, lambda s: torch.empty(s, dtype=dt, device=dev)).copy_(yc)
        g = _alloc(gc.shape, gfmt, new)
        C = g.shape[1]
        rows = g.numel() // C if C else 0
        _, kd = triton_kernels("dense")
        if mask[2] and g.shape[0] and kd.act_colsum_fits(rows, C):
            # small: the activation's gradient and the bias gradient in one launch, over g as
            # [N, H*W, C] (NCHW) or [1, N*H*W, C] (channels_last)
            gb = empty((C,), dtype=dt, device=dev)
            if gfmt == torch.channels_last:
                kd.act_colsum_into(gc, yc, g, gb, activation, 1, rows, C, 0, C, 1)
            else:
                hw = rows // g.shape[0]
                kd.act_colsum_into(gc, yc, g, gb, activation, g.shape[0], hw, C, C * hw, 1, hw)
        else:
            _, ka = triton_kernels("activation")
            ka.act_backward(gc, yc, g, activation, ktriton.INTERPRET)
    g4 = _as4d(g)
    prec = _precision(dt)
    # a gradient not asked for is an empty placeholder of its own: a custom op may not return
    # the same tensor twice
    if mask[0]:
        gi = _alloc(input.shape, fmt, new)
        kt.conv_backward_data(g4, _as4d(weight), _as4d(gi), st4, pads4, dl4, groups, prec, ktriton.INTERPRET,
                              choose=_chooser(dev))
    else:
        gi = input.new_empty(0)
    if mask[1]:
        gw = _alloc(weight.shape, fmt, new)
        kt.conv_backward_weight(g4, _as4d(input), _as4d(gw), st4, pads4, dl4, groups, prec, ktriton.INTERPRET,
                                choose=_chooser(dev))
    else:
        gw = input.new_empty(0)
    if not mask[2]:
        gb = input.new_empty(0)
    elif gb is None:  # (else summed with the activation's gradient already)
        # one reduction in g's dtype, as torch's own bias gradient: half precision accumulates
        # in float32 inside it (a float32 sum and a cast were two launches)
        gb = g.sum(dim=bias_dims) if g.shape[0] else torch.zeros(weight.shape[0], dtype=dt, device=dev)
    return gi, gw, gb


def _memory_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of a convolution's results, by torch's rule: channels_last when the
    weight's strides suggest it (a conv1d weight [O, C, k] seen as [O, C, 1, k], as torch sees
    it) or, for conv2d, the input's do; else contiguous. (torch's CPU convolution ignores a
    conv1d input's layout; tests/test_conv.py checks the rule against torch for both ranks,
    every input x weight layout, and degenerate sizes where both formats coincide.)"""
    if _channels_last_like(_as4d(weight)) or (input.dim() == 4 and _channels_last_like(input)):
        return torch.channels_last
    return torch.contiguous_format


def _alloc(shape, fmt: torch.memory_format, new) -> Tensor:
    """A [N, C, *S] tensor laid out in ``fmt``: ``new(shape)`` itself, or for channels_last
    ``new([N, *S, C])`` seen through a permutation (C innermost; NLC for conv1d). Shapes of
    fewer than 3 dimensions are allocated as they are."""
    shape = tuple(shape)
    if fmt != torch.channels_last or len(shape) < 3:  # a bias gradient [O] has no layout
        return new(shape)
    nd = len(shape)
    return new((shape[0], *shape[2:], shape[1])).permute(0, nd - 1, *range(1, nd - 1))


def _in_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """A contiguous result (the reference's) laid out in ``fmt`` (one copy for channels_last)."""
    if fmt != torch.channels_last or t.dim() < 3:
        return t
    out = _alloc(t.shape, fmt, lambda s: t.new_empty(s))
    return out.copy_(t)


def _as4d(t: Tensor) -> Tensor:
    """conv1d tensors [N, C, L] as [N, C, 1, L] views (strides kept: no copy)."""
    return t if t.dim() == 4 else t.unsqueeze(2)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32: 'tf32' when torch allows TF32 for its own
    convolutions (``torch.backends.cudnn.allow_tf32``, on by default, or the per-operation
    ``torch.backends.cudnn.conv.fp32_precision``; :func:`gpu_nn._precision.tf32`; the matmul flag
    and ``torch.set_float32_matmul_precision`` are linear's, not conv's), else 'ieee'. Decided
    here, per call, and passed to the kernels as a constexpr. Meaningless under the interpreter,
    so 'ieee' there."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if _tf32(_PRODUCTS.op) and torch.cuda.is_available() else "ieee"


class _Products(threading.local):
    op = "conv"  # whose TF32 setting our convolutions' float32 products follow (per thread)


_PRODUCTS = _Products()


@contextlib.contextmanager
def products_as(op: str):
    """A block (this thread) in which our convolutions' float32 products follow ``op``'s TF32
    setting (``"matmul"``: linear layers computed as a grouped convolution under vmap) instead of
    the convolutions' own."""
    prev = _PRODUCTS.op
    _PRODUCTS.op = op
    try:
        yield
    finally:
        _PRODUCTS.op = prev


def _at_ctx_products(backward):
    """A backward run at the products setting its forward ran at (``ctx.products``, set by the
    setup): a linear layer's grouped convolution differentiated at matmul's precision too."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if ctx.products == "conv":
            return backward(ctx, *grads)
        with products_as(ctx.products):
            return backward(ctx, *grads)
    return run


# ----------------------------------------------------------------------------- custom ops

@routed
@torch.library.custom_op("gpu_nn::conv_forward", mutates_args=())
@on_device
def _conv_forward_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, activation: Optional[str]) -> Tensor:
    return conv_forward(input, weight, bias, stride, padding, dilation, groups, activation)


@_conv_forward_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, activation):
    osz = _out_size(input.shape, weight.shape, stride, padding, dilation)
    return _alloc((input.shape[0], weight.shape[0], *osz), _memory_format(input, weight), input.new_empty)


@routed
@torch.library.custom_op("gpu_nn::conv_backward", mutates_args=())
@on_device
def _conv_backward_op(grad_output: Tensor, input: Tensor, weight: Tensor, output: Optional[Tensor], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, activation: Optional[str],
                      output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return conv_backward(grad_output, input, weight, output, stride, padding, dilation, groups, activation, output_mask)


@_conv_backward_op.register_fake
def _(grad_output, input, weight, output, stride, padding, dilation, groups, activation, output_mask):
    fmt = _memory_format(input, weight)
    shapes = (input.shape, weight.shape, (weight.shape[0],))
    return tuple(_alloc(s, fmt, input.new_empty) if m else input.new_empty((0,)) for s, m in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, activation = inputs
    ctx.args = (stride, padding, dilation, groups, activation)
    ctx.has_bias = bias is not None
    ctx.products = _PRODUCTS.op  # (see products_as and _at_ctx_products)
    ctx.save_for_backward(input, weight, output if activation is not None else None)


@_at_ctx_products
def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    stride, padding, dilation, groups, activation = ctx.args
    needs = wanted(ctx)  # (what this backward call uses: not an input gradient nobody asked for)
    mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    if not any(mask):
        return None, None, None, None, None, None, None, None
    gi, gw, gb = _conv_backward_op(grad, input, weight, output, stride, padding, dilation, groups, activation, mask)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None)


_conv_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    grad_output, input, weight, output_, stride, padding, dilation, groups, activation, output_mask = inputs
    ctx.args = (stride, padding, dilation, groups, activation)
    ctx.mask = [bool(m) for m in output_mask]
    ctx.products = _PRODUCTS.op
    ctx.save_for_backward(grad_output, input, weight, output_)


@_at_ctx_products
def _backward_backward(ctx, ggi, ggw, ggb):
    """Double backward of conv_backward, in terms of our conv ops.

    With gz = grad_output through the activation, the backward is linear in each of its
    arguments: gi = conv^T_x(gz; w), gw = conv^T_w(x; gz), gb = sum gz. So, given the
    gradients (ggi, ggw, ggb) flowing into (gi, gw, gb):
      d gz = conv(ggi, w) + conv(x, ggw) + ggb      (adjoints of the transposed convolutions)
      d w  = grad_weight of conv(ggi, w) at gz       (from gi)
      d x  = grad_input of conv(x, ggw) at gz        (from gw)
    and d grad_output / d output follow from gz = act_backward(grad_output, output).
    """
    from .activation import _activation_backward_op, activation_double_backward

    g, x, w, y = ctx.saved_tensors
    stride, padding, dilation, groups, activation = ctx.args
    mi, mw, mb = ctx.mask
    need_g, need_x, need_w, need_y = ctx.needs_input_grad[:4]
    gz = g if activation is None else _activation_backward_op(g, y, activation)
    d_x = d_w = d_g = d_y = None
    if need_x and mw:
        d_x = _conv_backward_op(gz, x, ggw, None, stride, padding, dilation, groups, None, [True, False, False])[0]
    if need_w and mi:
        d_w = _conv_backward_op(gz, ggi, w, None, stride, padding, dilation, groups, None, [False, True, False])[1]
    if need_g or need_y:
        d_gz = None
        if mi:
            d_gz = _conv_forward_op(ggi, w, None, stride, padding, dilation, groups, None)
        if mw:
            t = _conv_forward_op(x, ggw, None, stride, padding, dilation, groups, None)
            d_gz = t if d_gz is None else d_gz + t
        if mb:
            t = ggb.reshape(1, -1, *([1] * (g.dim() - 2))).expand(g.shape)
            d_gz = t if d_gz is None else d_gz + t
        if d_gz is None:
            d_gz = torch.zeros_like(g)
        if activation is None:
            d_g = d_gz
        else:
            d_g, d_y = activation_double_backward(activation, d_gz, g, y, need_y)
    return d_g, d_x, d_w, d_y, None, None, None, None, None, None


# double backward (create_graph=True): the backward op is differentiable too
_conv_backward_op.register_autograd(_backward_backward, setup_context=_bwd_setup_context)


def _jvp(inputs, outputs, tangents):
    """Forward-mode AD of y = act(conv(x, w) + b), each term our conv: tz = conv(tx, w, tb) +
    conv(x, tw), ty = act'(y) tz (our activation backward)."""
    from .activation import _activation_backward_op

    x, w, b, stride, padding, dilation, groups, act = inputs
    tx, tw, tb = tangents[:3]
    tz = None
    if tx is not None:
        tz = _conv_forward_op(tx, w, tb, stride, padding, dilation, groups, None)
    if tw is not None:
        tz = add_terms(tz, _conv_forward_op(x, tw, None if tz is not None else tb, stride, padding, dilation, groups, None))
    if tz is None:
        if tb is None:
            return (None,)
        tz = tb.reshape(1, -1, *([1] * (x.dim() - 2))).expand(outputs[0].shape).contiguous()
    return (tz if act is None else _activation_backward_op(tz, outputs[0], act),)


def _backward_jvp(inputs, outputs, tangents):
    """Forward-mode AD of conv_backward (forward over reverse: torch.func.hessian), its terms as
    the double backward's: with gz = act_backward(grad, output), gi = conv^T_x(gz; w), gw =
    conv^T_w(x; gz), gb = sum gz, each linear in each argument: tgi = conv^T_x(tgz; w) +
    conv^T_x(gz; tw), tgw = conv^T_w(x; tgz) + conv^T_w(tx; gz), tgb = sum tgz; tgz the
    activation backward's own tangent. A result not asked for (an empty placeholder) has none."""
    from .activation import _activation_backward_op, _backward_jvp as act_backward_jvp

    g, x, w, y, stride, padding, dilation, groups, act, mask = inputs
    tg, tx, tw, ty = tangents[:4]
    mi, mw, mb = (bool(m) for m in mask)
    gz = g if act is None else _activation_backward_op(g, y, act)
    tgz = tg if act is None else (None if tg is None and ty is None else act_backward_jvp((g, y, act), (gz,), (tg, ty, None))[0])
    geo = (stride, padding, dilation, groups, None)
    tgi = tgw = tgb = None
    if mi:
        if tgz is not None:
            tgi = _conv_backward_op(tgz, x, w, None, *geo, [True, False, False])[0]
        if tw is not None:
            tgi = add_terms(tgi, _conv_backward_op(gz, x, tw, None, *geo, [True, False, False])[0])
    if mw:
        if tgz is not None:
            tgw = _conv_backward_op(tgz, x, w, None, *geo, [False, True, False])[1]
        if tx is not None:
            tgw = add_terms(tgw, _conv_backward_op(gz, tx, w, None, *geo, [False, True, False])[1])
    if mb and tgz is not None:
        tgb = tgz.sum([d for d in range(tgz.dim()) if d != 1])
    return tgi, tgw, tgb


def _fold(apply, in_dims, args):
    """vmap of a convolution whose weight and bias are not batched: the batch folds into the
    input's own batch dim, one call; a batched weight (an ensemble of models, torch.func's
    ``stack_module_state``): :func:`_ensemble_forward`; else None (the loop)."""
    x, w, b = args[:3]
    dx, dw, db = in_dims[:3]
    if dw is not None:
        return _ensemble_forward(apply, x, w, b, dx, dw, db, *args[3:])
    if dx is None or db is not None or x.dim() != w.dim() + 1:
        return None
    return split_batch(apply(merge_batch(x, dx), w, b, *args[3:]), x.shape[dx]), 0


def _ensemble_weights(w, dw):
    """B weights batched at ``dw`` as ``(w [B, O, ...], one weight [B O, ...])``: each element's
    output channels (a linear's rows) a run of the stacked weight's."""
    w = w.movedim(dw, 0)
    return w, w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])


def _ensemble_bias(b, db, B: int):
    """The bias of B stacked convolutions as one convolution's ``[B O]``: a batched bias in
    its element order, a shared one repeated, None kept."""
    if b is None:
        return None
    return b.movedim(db, 0).reshape(-1) if db is not None else b.repeat(B)


def _channels(t, d, B: int):
    """An input of B convolutions side by side in the channels, ``[N, B C, ...]`` (each element's
    channels a run of its groups): ``t`` batched at ``d``, or (``d`` None) shared, repeated."""
    t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(B, *t.shape)
    return t.transpose(0, 1).reshape(t.shape[1], B * t.shape[2], *t.shape[3:])


def _ensemble_forward(apply, x, w, b, dx, dw, db, stride, padding, dilation, groups, act):
    """vmap of a convolution whose weight is batched (B models, one weight each: an ensemble,
    torch.func's ``stack_module_state``): one call. A shared input and one group: the B weights
    stacked along the output channels (``[B O, C, ...]``, the input read once); otherwise one
    convolution of ``groups * B`` groups over the elements' inputs side by side in the channels.
    The result's channels are the elements' in turn, ``[N, B, O, ...]``: the batch at dim 1.
    None (the loop) for an unbatched input (``[C, ...]``, no N) or where the Triton kernels
    could not launch the grouped problem."""
    B, nd = w.shape[dw], w.dim() - 3
    if x.dim() - (dx is not None) != nd + 2:
        return None
    w, wcat = _ensemble_weights(w, dw)
    bias = _ensemble_bias(b, db, B)
    stacked = dx is None and groups == 1
    if _launch_problem("conv_forward", (1 if stacked else B) * groups * w.shape[2], wcat.shape,
                       1 if stacked else groups * B, False) is not None:
        return None
    if stacked:
        y = apply(x, wcat, bias, stride, padding, dilation, 1, act)
    else:
        y = apply(_channels(x, dx, B), wcat, bias, stride, padding, dilation, groups * B, act)
    return y.unflatten(1, (B, w.shape[1])), 1


def _backward_fold(apply, in_dims, args):
    """vmap of conv_backward with the weight not batched: where only the input's gradient is
    computed (a jacobian or hessian in the input), the batch folds into the batch dim, one call;
    per-sample weight and bias gradients (vmap(grad(...)) of a CNN): :func:`_per_sample_backward`;
    a batched weight and gradient (an ensemble): :func:`_ensemble_backward`; else None (the loop)."""
    g, x, w, y = args[:4]
    dg, dx, dw, dy = in_dims[:4]
    mask = [bool(m) for m in args[9]]
    if dg is None or g.dim() - 1 != w.dim() - (dw is not None):
        return None
    if dx is None and not mask[0] and args[7] == 1:
        return _stacked_backward(apply, g, x, w, y, dg, dw, dy, *args[4:9], mask)
    if dw is not None:
        return _ensemble_backward(apply, g, x, w, y, dg, dx, dw, dy, *args[4:9], mask)
    first = batched_first(g, dg)
    if mask != [True, False, False]:
        return _per_sample_backward(apply, first, batched_first(x, dx, first), w,
                                    None if y is None else batched_first(y, dy, first), *args[4:])
    folded = (merge_batch(g, dg), merge_batch(x, dx, first), w, None if y is None else merge_batch(y, dy, first))
    gi, gw, gb = apply(*folded, *args[4:])
    return (split_batch(gi, first.shape[0]), gw, gb), (0, None, None)


def _stacked_backward(apply, g, x, w, y, dg, dw, dy, stride, padding, dilation, groups, act, mask):
    """vmap of conv_backward with a shared input, a batched gradient, one group and no input
    gradient wanted (an ensemble's first layer on one minibatch, or a jacobian in the weight):
    the B elements' weight and bias gradients as those of ONE convolution of B O output
    channels, each element's gradients side by side in the channels, the input read once; one
    call. The weight, batched or not, is read for its shape alone (a placeholder of no memory).
    None (the loop) where the Triton kernels could not launch it."""
    B, O = g.shape[dg], g.movedim(dg, 0).shape[2]
    wshape = (B * O, *(w.movedim(dw, 0).shape[2:] if dw is not None else w.shape[1:]))
    if _launch_problem("conv_backward", x.shape[1], wshape, 1, mask[1]) is not None:
        return None
    _, gw, gb = apply(_channels(g, dg, B), x, w.new_zeros(()).expand(wshape), None if y is None else _channels(y, dy, B),
                      stride, padding, dilation, 1, act, mask)
    return ((x.new_empty(0), gw.unflatten(0, (B, O)) if mask[1] else gw, gb.unflatten(0, (B, O)) if mask[2] else gb),
            (None, 0 if mask[1] else None, 0 if mask[2] else None))


def _ensemble_backward(apply, g, x, w, y, dg, dx, dw, dy, stride, padding, dilation, groups, act, mask):
    """vmap of conv_backward with a batched weight and a batched input or an input gradient
    wanted (an ensemble's training step past its first layer), the forward's
    :func:`_ensemble_forward` in reverse: one call of B times the groups over the elements'
    gradients, inputs and outputs side by side in the channels (the input only a shape, of no
    memory, where no weight gradient is wanted). None (the loop) where the Triton kernels could
    not launch it."""
    B = w.shape[dw]
    w, wcat = _ensemble_weights(w, dw)
    mi, mw, mb = mask
    c = B * groups * w.shape[2]
    if _launch_problem("conv_backward", c, wcat.shape, groups * B, mw, mi) is not None:
        return None
    gs = _channels(g, dg, B)
    xshape = x.movedim(dx, 0).shape[1:] if dx is not None else x.shape  # an element's [N, C, ...]
    xs = _channels(x, dx, B) if mw else x.new_zeros(()).expand(xshape[0], c, *xshape[2:])
    gi, gw, gb = apply(gs, xs, wcat, None if y is None else _channels(y, dy, B), stride, padding, dilation, groups * B,
                       act, mask)
    return ((gi.unflatten(1, (B, gi.shape[1] // B)) if mi else gi, gw.unflatten(0, (B, w.shape[1])) if mw else gw,
             gb.unflatten(0, (B, w.shape[1])) if mb else gb), (1 if mi else None, 0 if mw else None, 0 if mb else None))


def _per_sample_backward(apply, g, x, w, y, stride, padding, dilation, groups, act, mask):
    """conv_backward of B elements ([B, N, C, ...], the batch first) with per-sample weight and
    bias gradients: those as ONE grouped convolution's weight and bias gradients, each element's
    channels B groups' worth of a [N, B C, ...] input, so that each group's gradients are one
    element's, summed over its N images (its weight only a shape there: a placeholder of no
    memory, not the weight repeated B times); the input gradient, where asked, the merged batch's
    one call, as the input-only fold's. None (the loop) where the Triton kernels could not
    launch the grouped problem (B groups past the grid's limit)."""
    from .activation import _activation_backward_op

    B, N = g.shape[:2]
    mi, mw, mb = (bool(m) for m in mask)
    wshape = (B * w.shape[0], *w.shape[1:])
    if _launch_problem("conv_backward", B * x.shape[2], wshape, groups * B, mw) is not None:
        return None
    gz = g if act is None else _activation_backward_op(g, y, act)  # (once for both calls)

    def channels(t):  # [B, N, C, ...] -> [N, B C, ...]
        return t.transpose(0, 1).reshape(N, B * t.shape[2], *t.shape[3:])

    _, gw, gb = apply(channels(gz), channels(x), w.new_empty(()).expand(wshape), None, stride, padding, dilation,
                      groups * B, None, [False, mw, mb])
    gi = x.new_zeros(0)
    if mi:
        gi = split_batch(apply(merge_batch(gz, 0), merge_batch(x, 0), w, None, stride, padding, dilation, groups, None,
                               [True, False, False])[0], B)
    gw = gw.reshape(B, *w.shape) if mw else gw
    gb = gb.reshape(B, w.shape[0]) if mb else gb
    return (gi, gw, gb), (0 if mi else None, 0 if mw else None, 0 if mb else None)


_conv_forward_op.register_jvp(_jvp)
_conv_backward_op.register_jvp(_backward_jvp)
_conv_forward_op.register_vmap_fold(_fold)
_conv_backward_op.register_vmap_fold(_backward_fold)


# ----------------------------------------------------------------------------- public API

def _wrong_weight_rank(nd, input, weight, stride, padding, dilation):
    """torch's errors for a weight that is not [O, C/groups, *K] of rank nd + 2, in its order:
    fewer than 3 dims; then each parameter must have 1 or weight.dim() - 2 entries (an int was
    already repeated nd times by the parser); then the input rank must equal the weight's."""
    if weight.dim() < 3:
        raise KernelInputError("weight should have at least three dimensions")
    wd = weight.dim() - 2
    # output_padding: the transposed-conv parameter that torch's convolution also expands (nd zeros)
    # ('same' / 'valid' padding takes torch's string-padding path, which tests the input rank first)
    params = () if isinstance(padding, str) else (("stride", stride), ("padding", padding), ("dilation", dilation),
                                                  ("output_padding", [0] * nd))
    for arg, v in params:
        v = [int(v)] * nd if is_int(v) else [int(a) for a in v]
        if len(v) not in (1, wd):
            raise KernelInputError(
                f"expected {arg} to be a single integer value or a list of {wd} values to match the "
                f"convolution dimensions, but got {arg}={v}"
            )
    x = input if input.dim() == nd + 2 else input.unsqueeze(0)
    sep = "" if isinstance(padding, str) else " "  # torch's two paths print it differently
    raise KernelInputError(
        f"Expected {weight.dim()}-dimensional input for {weight.dim()}-dimensional weight{sep}{list(weight.shape)}, but got "
        f"{x.dim()}-dimensional input of size {list(x.shape)} instead"
    )


_PUBLIC: dict = {}  # public call facts -> normalised arguments (bounded: cleared when full)


def _conv(nd, input, weight, bias, stride, padding, dilation, groups, activation):
    """The public function: parse, autocast, checks (:func:`_conv_args`), the custom op. The
    parse and checks are remembered per call facts (each tensor's shape, dtype and device, the
    other arguments) for plain arguments outside tracing; only passes are remembered, so bad
    input raises every time, and a hit skips exactly checks that passed."""
    if (type(input) in _PLAIN_T and type(weight) in _PLAIN_T and (bias is None or type(bias) in _PLAIN_T)
            and type(groups) is int and (activation is None or type(activation) is str)
            and plain_arg(stride, True) and plain_arg(padding, True) and plain_arg(dilation, True)
            and not torch.compiler.is_compiling()):
        # autocast first (dtypes only; a no-op outside a region): the key holds the dtypes the checks see
        input, weight, bias = autocast_inputs("lower", input, weight, bias)
        key = (nd, input.shape, input.dtype, input.device, weight.shape, weight.dtype, weight.device,
               None if bias is None else (bias.shape, bias.dtype, bias.device), stride, padding, dilation, groups,
               activation)
        stride, pads, dilation, groups, unbatched, per = memo(
            _PUBLIC, _CHECKED_MAX, key,
            lambda: _conv_args(nd, input, weight, bias, stride, padding, dilation, groups, activation)[3:])
        fits = (1 if unbatched else input.shape[0]) * per <= PIXELS_MAX
    else:
        input, weight, bias, stride, pads, dilation, groups, unbatched, per = _conv_args(
            nd, input, weight, bias, stride, padding, dilation, groups, activation)
        # symbolic sizes (torch.compile, export): split only where the sizes say so without a guard
        # (one on a dynamic batch would bound its range); a launch past the bound is refused.
        # Under torch.jit.trace the sizes are 0-d tensors: their values decide, as every check's
        big = (1 if unbatched else input.shape[0]) * per > PIXELS_MAX
        fits = not (bool(big) if isinstance(big, Tensor) else statically_known_true(big))
    x = input.unsqueeze(0) if unbatched else input
    if fits:
        out = _conv_forward_op(x, weight, bias, stride, pads, dilation, groups, activation)
    else:
        out = _conv_in_chunks(nd, x, weight, bias, stride, pads, dilation, groups, activation, per)
    return out.squeeze(0) if unbatched else out


# The Triton kernels number a launch's pixels (batch x output positions; batch x input positions
# for the input gradient) in int32, and their offsets from that number in int64: a batch whose
# pixels pass PIXELS_MAX runs as chunks of samples that fit, one sample whose pixels do not is
# refused (the reference backend indexes in int64: no limit there). An audit's find: past 2^31 the
# pixel index wrapped negative and passed the masks (an illegal address on a GPU). The bound is
# half the int32 range: the kernels' own sums over pixel numbers (a weight-gradient split's end,
# m_lo + CHUNK, a loop's m0 + BLOCK) stay in range for any launch within it (a review's find: at
# 2^31 - 1 the last split's end wrapped and dropped its pixels from dW).
PIXELS_MAX = 2**30


def _pixels_per_sample(nd, x, pads):
    """A bound on one sample's pixels in any launch of the call: its padded input's positions,
    which the input's and the output's never pass (padding is never negative: _check_all)."""
    per = 1
    for i in range(nd):
        per = per * (x.shape[2 + i] + pads[2 * i] + pads[2 * i + 1])
    return per


def _check_pixels(name: str, pixels) -> None:
    """A Triton launch's refusal of more pixels than it indexes (PIXELS_MAX): what the public
    functions' chunks never reach, and a compiled graph with a dynamic batch can."""
    if pixels > PIXELS_MAX:
        raise KernelInputError(f"{name}: {pixels} (padded) positions in one launch, past the {PIXELS_MAX} gpu-nn's "
                               "kernels index; split the batch (or one sample spatially)")


# Limits of the Triton launches other than pixels: the groups ride grid z (CUDA: at most 65535;
# the depthwise kernels put their output channels on grid y instead, in blocks of DW_BLOCK_C), the
# weight gradient's taps grid y (65535 too), and the kernels number a weight's elements per output
# channel (channels x taps) in int32, stepping loops over them by up to a tile: past these a launch
# failed ("invalid argument") or put the weight gradient's partial sums out of place.
GRID_YZ_MAX = 65535
DW_BLOCK_C = 32  # kernels/triton/conv.py DW_CONFIG's BLOCK_C on a GPU
WEIGHT_ROW_MAX = 2**30
# The forward's output channels and the input gradient's input channels ride grid y in blocks of
# at least 16 (every tile of kernels/triton/conv.py, tests/test_conv.py holds them to it): output
# channels per group past GRID_YZ_MAX blocks of 16 are refused, input channels past it where an
# input gradient is wanted (the forward's input channels only lengthen its K loop; the weight
# gradient slices its input channels itself; a depthwise conv has its own bound above)
CHANNELS_MAX = GRID_YZ_MAX * 16


def _launch_problem(name: str, c: int, wshape, groups: int, wgrad: bool, dgrad: bool = False) -> str | None:
    """What a Triton launch of this convolution cannot take, as the refusal's message, or None
    (part of the memoized plans: computed once per call facts). ``wgrad`` / ``dgrad``: a weight /
    input gradient is wanted."""
    taps = math.prod(wshape[2:])
    row = wshape[1] * taps
    depthwise = wshape[1] == 1 and groups == c
    if depthwise:  # output channels in blocks on grid y
        over = -(-wshape[0] // DW_BLOCK_C) > GRID_YZ_MAX
        what, limit = f"{wshape[0]} depthwise channels", GRID_YZ_MAX * DW_BLOCK_C
    else:
        over = groups > GRID_YZ_MAX
        what, limit = f"{groups} groups", GRID_YZ_MAX
    if not over:
        og = wshape[0] // groups
        if row > WEIGHT_ROW_MAX:
            what, limit = f"{row} weight elements per output channel", WEIGHT_ROW_MAX
        elif not depthwise and og > CHANNELS_MAX:
            what, limit = f"{og} output channels per group", CHANNELS_MAX
        elif not depthwise and dgrad and wshape[1] > CHANNELS_MAX:
            what, limit = f"{wshape[1]} input channels per group (input gradient)", CHANNELS_MAX
        elif wgrad and taps > GRID_YZ_MAX:
            what, limit = f"{taps} kernel taps (weight gradient)", GRID_YZ_MAX
        else:
            return None
    return f"{name}: {what} are past the {limit} that gpu-nn's Triton kernels launch or index; the reference backend takes it"


def _conv_in_chunks(nd, x, weight, bias, stride, pads, dilation, groups, activation, per):
    """The convolution of a batch whose pixels pass PIXELS_MAX: on the Triton backend, chunks of
    the samples that fit, concatenated (autograd sums their weight and bias gradients); one
    sample past it refused there. The reference runs the batch whole."""
    if _backend.resolve(_NAMES[nd][0], x.device, BACKENDS, dtype=x.dtype) == "reference":
        return _conv_forward_op(x, weight, bias, stride, pads, dilation, groups, activation)
    if per > PIXELS_MAX:
        raise KernelInputError(
            f"conv{nd}d: one sample has {per} (padded) positions, past the {PIXELS_MAX} that gpu-nn's kernels "
            "index; split the input spatially, or run it on the reference backend")
    return torch.cat([_conv_forward_op(xc, weight, bias, stride, pads, dilation, groups, activation)
                      for xc in x.split(PIXELS_MAX // per)], 0)


def _conv_args(nd, input, weight, bias, stride, padding, dilation, groups, activation):
    """Every check of a public call, in torch's order, and the normalised arguments: (input,
    weight, bias after autocast, stride, per-side padding, dilation, groups, unbatched, a
    sample's pixels (:func:`_pixels_per_sample`))."""
    name = f"conv{nd}d"
    # torch's argument parser first (TypeErrors), then conv's own checks
    check_tensor(name, "input", input, 1)
    check_tensor(name, "weight", weight, 2)
    if bias is not None and not isinstance(bias, Tensor):
        raise _bad_combination(nd, "bias", bias)
    for arg, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if not (arg == "padding" and isinstance(v, str)):
            _expand(arg, v, nd, types_only=True)
    if not is_int(groups):
        raise _bad_combination(nd, "groups", groups)
    groups = int(groups)
    if input.dim() not in (nd + 1, nd + 2):
        raise KernelInputError(
            f"Expected {nd + 1}D (unbatched) or {nd + 2}D (batched) input to {name}, but got input of size: {list(input.shape)}"
        )
    if weight.dim() != nd + 2:
        _wrong_weight_rank(nd, input, weight, stride, padding, dilation)
    input, weight, bias = autocast_inputs("lower", input, weight, bias)
    if input.dtype not in FLOAT_DTYPES:  # torch's verdict on the dtype (its error, or ours where it computes)
        theirs = _TF.conv1d if nd == 1 else _TF.conv2d
        check_float_like_torch(name, "input", input, lambda: theirs(input, weight, bias, stride, padding, dilation, groups))
    given = stride, padding, dilation
    try:
        stride, pads, dilation = _normalise(nd, weight, stride, padding, dilation)
        unbatched = input.dim() == nd + 1
        x = input.unsqueeze(0) if unbatched else input
        _check(nd, x, weight, bias, stride, pads, dilation, groups, activation, unbatched)
    except KernelInputError as ours:
        if activation not in ACTIVATIONS:  # ours alone: torch's conv has no activation
            raise
        raise _torchs_verdict(nd, input, weight, bias, *given, groups, ours) from None
    return (input, weight, bias, stride, pads, dilation, groups, unbatched,
            _pixels_per_sample(nd, x, pads))


def _torchs_verdict(nd, input, weight, bias, stride, padding, dilation, groups, ours: KernelInputError):
    """The error torch's own conv raises for these arguments, on stand-ins of the tensors
    (``_dispatch.stand_in``: it refuses before computing anything), as ours; ``ours`` where
    torch takes them. Where several arguments are wrong torch's order of checks, and some of its words,
    depend on the kernel it picks (its oneDNN path, which a batched float32 CPU input takes on a
    machine with more than one thread, checks padding before stride and the channel count before
    dilation, and says 'non-positive dilation is not supported'), so torch is asked rather than
    copied; called only once our checks have refused the call. Where torch's answer is oneDNN's
    failure to build its kernel (an empty kernel, batched float32), ours, which names the weight."""
    theirs = _TF.conv1d if nd == 1 else _TF.conv2d
    verdict = torchs_own_error(
        lambda: theirs(stand_in(input), stand_in(weight), stand_in(bias), stride, padding, dilation, groups),
        str(ours), type(ours))
    # oneDNN's own failure on an empty kernel names no argument: ours does
    return ours if str(verdict).startswith("could not create a primitive descriptor") else verdict


def conv1d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups=1,
           *, activation: Optional[str] = None) -> Tensor:
    """As ``torch.nn.functional.conv1d``: ``input`` [N, C, L] or [C, L], ``weight`` [O, C/groups, k],
    ``bias`` [O] -> [N, O, Lo]; ``padding`` int, 1-tuple, 'same' (stride 1 only) or 'valid'.
    ``activation`` (None, 'relu', 'sigmoid', 'tanh') is fused after the bias."""
    if _has_tf(input, weight, bias, stride, padding, dilation, groups, activation):
        return _tf(conv1d, input, weight, bias, stride, padding, dilation, groups, activation=activation)
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, activation)


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups=1,
           *, activation: Optional[str] = None) -> Tensor:
    """As ``torch.nn.functional.conv2d``: ``input`` [N, C, H, W] or [C, H, W], ``weight``
    [O, C/groups, kh, kw], ``bias`` [O] -> [N, O, Ho, Wo]; ``padding`` int, pair, 'same' (stride 1
    only; the odd element of an even kernel's padding goes right/bottom, as torch) or 'valid'.
    ``activation`` (None, 'relu', 'sigmoid', 'tanh') is fused after the bias."""
    if _has_tf(input, weight, bias, stride, padding, dilation, groups, activation):
        return _tf(conv2d, input, weight, bias, stride, padding, dilation, groups, activation=activation)
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, activation)


# ----------------------------------------------------------------------------- gpu-nn check

def _make(nd, n, c, spatial, o, k, groups, bias, channels_last=(False, False), **kw):
    """``channels_last``: (input, weight) laid out in torch.channels_last (conv2d)."""
    def make(rng):
        x = torch.from_numpy(rng.standard_normal((n, c, *spatial)))
        w = torch.from_numpy(rng.standard_normal((o, c // groups, *k)) / (c // groups * int(torch.tensor(k).prod())) ** 0.5)
        x = (x.contiguous(memory_format=torch.channels_last) if channels_last[0] else x).requires_grad_()
        w = (w.contiguous(memory_format=torch.channels_last) if channels_last[1] else w).requires_grad_()
        b = torch.from_numpy(rng.standard_normal(o)).requires_grad_() if bias else None
        return (x, w, b), dict(groups=groups, **kw)

    return make


CHECK_CASES = [
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 2, 5, (11, 9), 7, (3, 3), 1, True, padding=1)),
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 3, 6, (13, 10), 4, (2, 5), 2, True, stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 2, 6, (9, 9), 6, (3, 3), 6, False, padding="same", dilation=2)),
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 2, 7, (12, 11), 5, (4, 4), 1, True, padding="same", activation="relu")),
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 1, 9, (10, 7), 3, (1, 1), 1, True, stride=3, activation="sigmoid")),
    # channels_last, 16 -> 32 channels NHWC throughout (the layout the large NHWC tiles are
    # measured for on a GPU; tests/test_conv.py covers the mixed layouts)
    CheckCase(op="conv2d", fn=conv2d, make=_make(2, 1, 16, (6, 5), 32, (3, 3), 1, True, (True, True), padding=1,
                                                 activation="relu")),
    CheckCase(op="conv1d", fn=conv1d, make=_make(1, 3, 5, (29,), 7, (5,), 1, True, padding=2, activation="tanh")),
    CheckCase(op="conv1d", fn=conv1d, make=_make(1, 2, 6, (31,), 6, (3,), 6, True, stride=2, dilation=3)),
    CheckCase(op="conv1d", fn=conv1d, make=_make(1, 2, 4, (17,), 6, (4,), 2, False, padding="same")),
]
