"""dense family: flatten, linear (+ fused activation), softmax, log_softmax, cross_entropy.

Public functions take ``torch.nn.functional``'s arguments and defaults; each normalises its
arguments, checks them (``KernelInputError`` with torch's wording, before any computation) and
calls a ``torch.library.custom_op`` in the ``gpu_nn`` namespace:

* ``gpu_nn::linear(input, weight, bias, activation)`` / ``gpu_nn::linear_backward``
* ``gpu_nn::softmax`` / ``gpu_nn::log_softmax`` ``(input, dim)`` and their ``*_backward(grad, output, dim)``
* ``gpu_nn::cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing)``
  returning ``(loss, lse)`` (``lse``: the statistics saved for the backward, flat: the [3, M]
  row statistics max, log-sum-exp of x - max (kept apart because their sum rounds to x's
  precision) and total weight, then for 'mean' the denominator), and
  ``gpu_nn::cross_entropy_backward`` returning ``(grad_input, grad_target)``.

``flatten`` is deliberately a plain ``reshape``, not a custom op: it moves no data whenever the
strides allow, and torch's ``flatten`` returns a *view* in that case. A custom op may not
return a view of its input, so wrapping it would force a copy on every call that torch avoids
and break code that writes through the flattened view. ``reshape`` is already autograd- and
``torch.compile``-aware, so there is nothing for a kernel to add. (``reference.dense.flatten``
is still there, as the oracle the tests compare with.)

Backends: reference (NumPy) and triton for linear, softmax, log_softmax and cross_entropy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as _TF
from torch import Tensor

from .. import _backend, _precision
from .._errors import (KernelInputError, KernelInputIndexError, KernelInputTypeError, cpp_type_name,
                       require_attribute, scalar_type_name, type_name)
from ..check import CheckCase
from ..reference import dense as ref
from ._dispatch import (FLOAT_DTYPES, autocast_inputs, check_float, check_float_like_torch, check_same_device, check_tensor, empty, float64_in_float32, from_numpy, is_int,
                        on_device, refuse_wrapping_count, require, routed, to_numpy, triton_kernels)
from ._dispatch import _eager_ok, add_terms, batched_first, merge_batch, torchs_own_error, wanted
from ._dispatch import has_torch_function as _has_tf
from ._dispatch import torch_function as _tf

__all__ = ["cross_entropy", "flatten", "linear", "log_softmax", "softmax"]

BACKENDS = ("reference", "triton")
ACTIVATIONS = (None, "relu", "sigmoid", "tanh")
REDUCTIONS = ("none", "mean", "sum")

def linear_dtype_message(x: Tensor, w: Tensor, b: Tensor | None) -> str | None:
    """torch's error for ``linear(x, w, b)`` of mismatched dtypes, or None: with a bias its
    addmm's (the bias against the weight first, then the input), without one its mm's. The
    recurrent cells' two linears raise it too."""
    if b is not None and b.dtype != w.dtype:
        return f"self and mat2 must have the same dtype, but got {scalar_type_name(b.dtype)} and {scalar_type_name(w.dtype)}"
    if b is not None and x.dtype != w.dtype:
        return f"mat1 and mat2 must have the same dtype, but got {scalar_type_name(x.dtype)} and {scalar_type_name(w.dtype)}"
    if b is None and x.dtype != w.dtype:
        return (f"expected m1 and m2 to have the same dtype, but got: {cpp_type_name(x.dtype)} != "
                f"{cpp_type_name(w.dtype)}")
    return None


def _wrap_dim(dim: int, ndim: int) -> int:
    """torch's maybe_wrap_dim: a 0-d tensor takes dims -1 and 0."""
    n = max(ndim, 1)
    if not -n <= dim <= n - 1:
        raise KernelInputIndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def _triton_modules():
    return triton_kernels("dense")


# =========================================================================== flatten


def _torchs_flatten_error(ndim: int, start_dim, end_dim, fallback: str) -> KernelInputError:
    """torch's own error for flatten's non-int dims, asked of torch on an empty tensor of the
    input's rank (its parser words it differently across versions: 2.13 'argument 'start_dim'
    (position 2) must be int', 2.11 'received an invalid combination of arguments'; a string
    may be taken as a dim name), with its type; ``fallback``: where torch takes them after all."""
    args = (start_dim,) if type(end_dim) is int and end_dim == -1 else (start_dim, end_dim)  # as the caller's, mostly
    return torchs_own_error(lambda: torch.flatten(torch.empty((0,) * ndim), *args), fallback)


def flatten(input: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """torch.flatten: merge dims ``start_dim..end_dim`` into one; a 0-d input gives [1].

    A view of ``input`` when its strides allow, else a copy (exactly torch's rule, through
    ``reshape``; see the module docstring for why this is not a custom op).
    """
    if _has_tf(input, start_dim, end_dim):
        return _tf(flatten, input, start_dim, end_dim)
    check_tensor("flatten", "input", input, 1)
    for name, pos, v in (("start_dim", 2, start_dim), ("end_dim", 3, end_dim)):
        if not is_int(v):
            raise _torchs_flatten_error(input.dim(), start_dim, end_dim,
                                        f"flatten(): argument '{name}' (position {pos}) must be int, not {type_name(v)}")
    s, e = _wrap_dim(int(start_dim), input.dim()), _wrap_dim(int(end_dim), input.dim())
    if s > e:
        raise KernelInputError("flatten() has invalid args: start_dim cannot come after end_dim")
    if input.dim() == 0:
        return input.reshape(1)
    if s == e:  # nothing to merge (a 1-D input too): torch returns the input itself, not a view
        return input
    shape = input.shape
    return input.reshape(*shape[:s], math.prod(shape[s:e + 1]), *shape[e + 1:])


# =========================================================================== linear


def _tf32_allowed() -> bool:
    """Whether float32 linear may use TF32: as torch's cuBLAS decides it (``torch.backends.cuda.
    matmul.allow_tf32``, ``torch.set_float32_matmul_precision``, or the per-operation
    ``torch.backends.cuda.matmul.fp32_precision``; :func:`gpu_nn._precision.tf32`)."""
    return _precision.tf32("matmul")


def _check_linear_op(op: str, x, w, b, activation) -> None:
    """The linear ops' own checks (the public ``linear`` has made its arguments so already; a
    direct call of ``torch.ops.gpu_nn.linear`` / ``linear_backward`` is refused here): the
    kernels take M and K from ``x``, O from ``w``, and read the bias by unit, so a weight, bias
    or input of another size was read (and a gradient written) past its end."""
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not (isinstance(x, Tensor) and isinstance(w, Tensor)) or x.dim() < 1 or w.dim() != 2:
        got = [t.dim() if isinstance(t, Tensor) else type_name(t) for t in (x, w)]
        raise KernelInputError(f"{op}: expected an input of at least 1 dimension and a 2-D weight, got {got[0]}-D and "
                               f"{got[1]}-D")
    check_float(op, "input", x)
    O, K = w.shape
    if x.shape[-1] != K:
        raise KernelInputError(f"mat1 and mat2 shapes cannot be multiplied ({math.prod(x.shape[:-1])}x{x.shape[-1]} "
                               f"and {K}x{O})")
    if b is not None and tuple(b.shape) != (O,):
        raise KernelInputError(f"{op}: bias of shape {list(b.shape)}, expected [{O}]")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise KernelInputError(linear_dtype_message(x, w, b) or f"{op}: input, weight and bias must have one dtype")
    check_same_device(x, w, b)


def linear_forward(x: Tensor, w: Tensor, b: Tensor | None, activation: str | None) -> Tensor:
    """y = act(x @ w^T + b); x [..., K], w [O, K], b [O] or None; y [..., O] in x's dtype."""
    _check_linear_op("linear", x, w, b, activation)
    O, K = w.shape
    backend = _backend.resolve("linear", x.device, BACKENDS, dtype=x.dtype)
    if backend == "reference":
        y = ref.linear(to_numpy(x), to_numpy(w), to_numpy(b), activation)
        return from_numpy(y, x.dtype, x.device)
    if x.dtype is torch.float64:  # a GPU backend named for float64: in float32 (README)
        return float64_in_float32(linear_forward, x, w, b, activation)
    _backend.check_interpreter_dtype("linear", backend, x, w, b)
    ktriton, kd = _triton_modules()
    flat = x.dim() == 2  # the usual case: no view in, none out
    M = x.shape[0] if flat else math.prod(x.shape[:-1])  # not -1: undefined for a zero-size dim (K = 0)
    x2 = x if flat else x.reshape(M, K)
    # the result is allocated in its own shape and the kernel writes a 2-d view of it: the op
    # returns the base tensor, never a view (autograd forbids in-place changes to a view made
    # inside a custom Function, e.g. F.linear(h, w).relu_() on a 3-d h)
    y = empty((*x.shape[:-1], O), dtype=x.dtype, device=x.device)
    # the epilogue reads the bias with unit stride: an expanded or strided view (a double
    # backward passes expanded ones) is made dense first (a no-op for a contiguous bias)
    b = None if b is None else b.contiguous()
    kd.matmul(x2, w.t(), y if flat else y.view(M, O), bias=b, activation=activation, allow_tf32=_tf32_allowed(),
              interpret=ktriton.INTERPRET)
    return y


def linear_backward(grad: Tensor, x: Tensor, w: Tensor, out: Tensor | None, activation: str | None, has_bias: bool,
                    need_input: bool = True, need_weight: bool = True):
    """(dx [..., K], dw [O, K], db [O] or [0] without bias). dY' = dY through the activation
    (written through the forward output), dx = dY' @ w, dw = dY'^T @ x, db = sum_rows dY'. A
    gradient not needed (``need_input`` / ``need_weight`` False: a first layer's input, a frozen
    weight) is not computed: an empty [0] placeholder, as torch's mm backward skips it."""
    _check_linear_op("linear_backward", x, w, None, activation)
    O, K = w.shape
    if activation is not None and out is None:
        raise KernelInputError("linear backward: a fused activation needs the forward output")
    want = (*x.shape[:-1], O)
    for name, t in (("grad", grad), ("output", out)):
        if t is not None and tuple(t.shape) != want:
            raise KernelInputError(f"linear backward: {name} of shape {list(t.shape)}, expected {list(want)} (the "
                                   "forward's output)")
        check_same_device(x, t)
    check_float("linear_backward", "grad", grad)
    backend = _backend.resolve("linear_backward", grad.device, BACKENDS, dtype=grad.dtype)
    if backend == "reference":
        dx, dw, db = ref.linear_backward(to_numpy(grad), to_numpy(x), to_numpy(w), to_numpy(out), activation, has_bias,
                                         need_input, need_weight)
        dev = grad.device
        db_t = from_numpy(db, w.dtype, dev) if has_bias else torch.zeros(0, dtype=w.dtype, device=dev)
        dx_t = from_numpy(dx, x.dtype, dev) if need_input else torch.zeros(0, dtype=x.dtype, device=dev)
        dw_t = from_numpy(dw, w.dtype, dev) if need_weight else torch.zeros(0, dtype=w.dtype, device=dev)
        return dx_t, dw_t, db_t
    if grad.dtype is torch.float64:  # a GPU backend named for float64: in float32 (README)
        return float64_in_float32(linear_backward, grad, x, w, out, activation, has_bias, need_input, need_weight)
    _backend.check_interpreter_dtype("linear_backward", backend, grad, x, w)
    ktriton, kd = _triton_modules()
    flat = x.dim() == 2 and grad.dim() == 2  # the usual case: no views
    M = x.shape[0] if flat else math.prod(x.shape[:-1])
    g2 = grad if flat else grad.reshape(M, O)
    db = empty((O,), dtype=w.dtype, device=w.device) if has_bias else torch.zeros(0, dtype=w.dtype, device=w.device)
    if activation is not None:
        y2 = (out if out.dim() == 2 else out.reshape(M, O)).contiguous()
        if has_bias:  # the activation's gradient and the bias gradient together (small M: one launch)
            g2 = kd.act_colsum(g2.contiguous(), y2, activation, db, ktriton.INTERPRET)
        else:
            g2 = kd.act_grad(g2.contiguous(), y2, activation, ktriton.INTERPRET)
    elif has_bias:
        kd.colsum(g2, db, interpret=ktriton.INTERPRET)
    tf32 = _tf32_allowed()
    if need_input:
        dx = empty(x.shape, dtype=x.dtype, device=x.device)  # its own shape, not a view (as the forward's)
        kd.matmul(g2, w, dx if flat else dx.view(M, K), allow_tf32=tf32, interpret=ktriton.INTERPRET)
    else:
        dx = torch.zeros(0, dtype=x.dtype, device=x.device)
    if need_weight:
        dw = empty((O, K), dtype=w.dtype, device=w.device)
        kd.matmul(g2.t(), x if flat else x.reshape(M, K), dw, allow_tf32=tf32, interpret=ktriton.INTERPRET)
    else:
        dw = torch.zeros(0, dtype=w.dtype, device=w.device)
    return dx, dw, db


@routed
@torch.library.custom_op("gpu_nn::linear", mutates_args=())
@on_device
def _linear_op(input: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    return linear_forward(input, weight, bias, activation)


@_linear_op.register_fake
def _(input, weight, bias, activation):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@routed
@torch.library.custom_op("gpu_nn::linear_backward", mutates_args=())
@on_device
def _linear_backward_op(grad: Tensor, input: Tensor, weight: Tensor, output: Tensor | None, activation: str | None,
                        has_bias: bool, need_input: bool = True, need_weight: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return linear_backward(grad, input, weight, output, activation, has_bias, need_input, need_weight)


@_linear_backward_op.register_fake
def _(grad, input, weight, output, activation, has_bias, need_input=True, need_weight=True):
    return (input.new_empty(input.shape if need_input else (0,)), weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if has_bias else (0,)))


def _linear_setup(ctx, inputs, output):
    x, w, b, activation = inputs
    ctx.activation = activation
    ctx.has_bias = b is not None
    # as torch's mm / addmm: the input is kept only for the weight's gradient and the weight only
    # for the input's (a frozen layer keeps no activation alive, and an in-place change of what
    # is not kept is no error); the backward gets zeros of the same shape in their place
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.absent = (None if need_w else (x.shape, x.dtype), None if need_x else (w.shape, w.dtype))
    ctx.save_for_backward(x if need_w else None, w if need_x else None, output if activation is not None else None)


_ZEROS: dict = {}  # (dtype, device) -> a 0-d zero, made once: a backward allocates nothing for it


def _stand_in(t: Tensor | None, absent, device) -> Tensor:
    """``t``, or where it was not kept zeros of its (shape, dtype): a broadcast scalar, no memory
    of its size and no allocation per call (the backward reads a stand-in for its shape alone;
    nothing writes to an op's input)."""
    if t is not None:
        return t
    shape, dtype = absent
    # kept only from plain eager calls (the eager route's own test): under a trace (fake tensors,
    # make_fx, torch.compile's backward) a zero is that trace's own, and a kept real one would
    # enter it as a stray input; one made in inference mode is an inference tensor, which a
    # later create_graph backward (in any thread) could not save
    plain = _eager_ok(()) and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
    zero = _ZEROS.get((dtype, device)) if plain else None
    if zero is None:
        zero = torch.zeros((), dtype=dtype, device=device)
        # nor from inside a CUDA graph capture (a block of the graph's pool)
        if plain and type(zero) is torch.Tensor and not (zero.is_cuda and torch.cuda.is_current_stream_capturing()):
            _ZEROS[(dtype, device)] = zero
    return zero.expand(shape)


def _linear_backward(ctx, grad):
    x, w, out = ctx.saved_tensors
    x, w = _stand_in(x, ctx.absent[0], grad.device), _stand_in(w, ctx.absent[1], grad.device)
    need_x, need_w, need_b = wanted(ctx)[:3]  # (what this backward call uses)
    need_b = ctx.has_bias and need_b
    if not (need_x or need_w or need_b):
        return None, None, None, None
    dx, dw, db = _linear_backward_op(grad, x, w, out, ctx.activation, need_b, need_x, need_w)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_bwd_setup(ctx, inputs, output):
    grad, x, w, out, activation, has_bias, *needs = inputs
    ctx.activation = activation
    ctx.has_bias = has_bias
    ctx.computed = (True, True) if not needs else tuple(needs)  # dx, dw (else empty placeholders)
    ctx.save_for_backward(grad, x, w, out)


def _linear_backward_backward(ctx, ggx, ggw, ggb):
    """Double backward of linear_backward, as our linear op (every term is a matmul).

    With gz = grad through the activation ([M, O] rows), dx = gz w, dw = gz^T x, db = sum gz;
    given the gradients (ggx, ggw, ggb) flowing into them:
      d gz = ggx w^T + x ggw^T + ggb = linear(ggx, w, ggb) + linear(x, ggw)
      d w  = gz^T ggx = linear(gz^T, ggx^T),   d x = gz ggw = linear(gz, ggw^T)
    and d grad / d output follow from gz = act_backward(grad, output).
    """
    from .activation import _activation_backward_op, activation_double_backward

    g, x, w, out = ctx.saved_tensors
    act = ctx.activation
    need_g, need_x, need_w, need_out = ctx.needs_input_grad[:4]
    O, K = w.shape
    M = math.prod(x.shape[:-1])  # rows named, not -1: a reshape cannot infer them where O or K is 0
    # a result not computed (an empty placeholder) passes nothing back: as a zero gradient
    ggx = ggx.reshape(x.shape) if ctx.computed[0] else torch.zeros_like(x)
    ggw = ggw if ctx.computed[1] else torch.zeros_like(w)
    g2, ggx2 = g.reshape(M, O), ggx.reshape(M, K)
    gz2 = g2 if act is None else _activation_backward_op(g2, out.reshape(M, O), act)
    d_x = _linear_op(gz2, ggw.t(), None, None).reshape(x.shape) if need_x else None
    d_w = _linear_op(gz2.t(), ggx2.t(), None, None) if need_w else None
    d_g = d_out = None
    if need_g or need_out:
        # a result not computed adds no term: its factor (x or w) may be a stand-in (_linear_setup)
        if ctx.computed[0]:
            d_gz = _linear_op(ggx2, w, ggb if ctx.has_bias else None, None)
        else:
            d_gz = (ggb if ctx.has_bias else g2.new_zeros(())).expand(M, O)
        if ctx.computed[1]:
            d_gz = d_gz + _linear_op(x.reshape(M, K), ggw, None, None)
        if act is None:
            d_g = d_gz
        else:
            d_g, d_out = activation_double_backward(act, d_gz, g2, out.reshape(M, O), need_out)
            d_out = None if d_out is None else d_out.reshape(out.shape)
        d_g = d_g.reshape(g.shape)
    return d_g, d_x, d_w, d_out, None, None, None, None


# double backward (create_graph=True): the backward op is differentiable too
_linear_backward_op.register_autograd(_linear_backward_backward, setup_context=_linear_bwd_setup)


def _matrix_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise NotImplementedError("gpu_nn::linear: forward-mode AD (dual tensors, torch.func.jvp / jacfwd / hessian) "
                                  "takes a 2-d weight")


def _linear_jvp(inputs, outputs, tangents):
    """Forward-mode AD of y = act(x w^T + b), each term our linear op: tz = tx w^T + x tw^T + tb,
    ty = act'(y) tz (our activation backward)."""
    from .activation import _activation_backward_op

    x, w, b, act = inputs
    tx, tw, tb = tangents[:3]
    _matrix_weight(w)
    tz = None
    if tx is not None:
        tz = _linear_op(tx, w, tb, None)
    if tw is not None:
        tz = add_terms(tz, _linear_op(x, tw, None if tz is not None else tb, None))
    if tz is None:
        if tb is None:
            return (None,)
        tz = tb.expand(outputs[0].shape).contiguous()
    return (tz if act is None else _activation_backward_op(tz, outputs[0], act),)


def _linear_backward_jvp(inputs, outputs, tangents):
    """Forward-mode AD of linear_backward (forward-over-reverse: torch.func.hessian), its
    terms as the double backward's: with gz = act_backward(grad, output), dx = gz w, dw = gz^T x,
    db = sum gz, the tangents are tdx = tgz w + gz tw, tdw = tgz^T x + gz^T tx, tdb = sum tgz,
    tgz our activation backward's own tangent. A result not computed (an empty placeholder) has
    none."""
    from .activation import _activation_backward_op, _backward_jvp

    g, x, w, out, act, has_bias, *needs = inputs
    need_x, need_w = (True, True) if not needs else needs
    tg, tx, tw, tout = tangents[:4]
    _matrix_weight(w)
    O, K = w.shape
    M = math.prod(x.shape[:-1])
    g2 = g.reshape(M, O)
    gz2 = g2 if act is None else _activation_backward_op(g2, out.reshape(M, O), act)
    tgz2 = None
    if tg is not None or (act is not None and tout is not None):
        tg2 = None if tg is None else tg.reshape(M, O)
        if act is None:
            tgz2 = tg2
        else:
            tgz2 = _backward_jvp((g2, out.reshape(M, O), act), (gz2,),
                                 (tg2, None if tout is None else tout.reshape(M, O), None))[0]
    x2 = x.reshape(M, K)
    tdx = tdw = tdb = None
    if need_x:
        tdx = add_terms(None if tgz2 is None else _linear_op(tgz2, w.t(), None, None),
                  None if tw is None else _linear_op(gz2, tw.t(), None, None))
        tdx = None if tdx is None else tdx.reshape(x.shape)
    if need_w:
        tdw = add_terms(None if tgz2 is None else _linear_op(tgz2.t(), x2.t(), None, None),
                  None if tx is None else _linear_op(gz2.t(), tx.reshape(M, K).t(), None, None))
    if has_bias and tgz2 is not None:
        tdb = tgz2.sum(0)
    return tdx, tdw, tdb


_linear_op.register_jvp(_linear_jvp)
_linear_backward_op.register_jvp(_linear_backward_jvp)


def _linear_fold(apply, in_dims, args):
    """vmap of linear with its weight and bias not batched (hessians and jacobians in the input):
    the batch folds into the rows, one call; a batched weight (an ensemble):
    :func:`_ensemble_linear`; else None (the loop)."""
    x, w, b, act = args
    dx, dw, db = in_dims[:3]
    if dw is not None:
        return _ensemble_linear(apply, x, w, b, act, dx, dw, db)
    if dx is None or db is not None or w.dim() != 2:
        return None
    return apply(x.movedim(dx, 0), w, b, act), 0


def _rows(t: Tensor, d) -> tuple:
    """``(rows, M)`` of ``[B, rows.., F]`` batched at ``d``: an element's row dims and their count."""
    rows = t.movedim(d, 0).shape[1:-1]
    return rows, math.prod(rows)


def _rows_side_by_side(t: Tensor, d, B: int, M: int) -> Tensor:
    """``[B, rows.., F]`` batched at ``d`` (or, ``d`` None, shared: repeated) as ``[M, B F]``,
    each row's B elements side by side."""
    t = t.movedim(d, -2) if d is not None else t.unsqueeze(-2).expand(*t.shape[:-1], B, t.shape[-1])
    return t.reshape(M, B * t.shape[-1])


def _as_groups(t: Tensor, d, B: int, M: int) -> Tensor:
    """``[B, rows.., F]`` batched at ``d`` (or, ``d`` None, shared: repeated) as the input of a
    kernel-size-1 conv1d of B groups, ``[1, B F, M]``: one image of length M (the rows), each
    element's features its group's channels (one product per group in the reference, where
    images of one pixel would make one per row)."""
    t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(B, *t.shape)
    return t.reshape(B, M, t.shape[-1]).transpose(1, 2).reshape(1, B * t.shape[-1], M)


def _from_groups(t: Tensor, B: int, rows) -> Tensor:
    """:func:`_as_groups`' layout back, ``[1, B F, M]`` -> ``[B, rows.., F]`` (a view)."""
    return t.reshape(B, -1, t.shape[-1]).transpose(1, 2).reshape(B, *rows, t.shape[1] // B)


def _ensemble_linear(apply, x, w, b, act, dx, dw, db):
    """vmap of linear with a batched weight (B models, one weight each: an ensemble through
    torch.func's ``stack_module_state``): one call. A shared input: the B weights stacked as one
    ``[B O, K]`` weight (each output feature its own weight row, the input read once; the result
    ``[rows.., B, O]``); a batched one: a kernel-size-1 conv1d of B groups over the rows
    (:func:`_as_groups`; the products at matmul's float32 precision, not conv's; the result
    ``[B, rows.., O]``). None (the loop) where the Triton kernels could not launch that."""
    from .conv import _conv_forward_op, _ensemble_bias, _ensemble_weights

    if w.dim() != 3:
        return None
    w, wcat = _ensemble_weights(w, dw)
    B, O, K = w.shape
    bias = _ensemble_bias(b, db, B)
    if dx is None:
        y = apply(x, wcat, bias, act)
        return y.unflatten(-1, (B, O)), y.dim() - 1
    rows, M = _rows(x, dx)
    if M == 0 or O == 0 or not _grouped_rows_launch("conv_forward", B, O, K, M, False, False):
        return None
    with _matmul_precision():
        y = _conv_forward_op(_as_groups(x, dx, B, M), wcat.unsqueeze(-1), bias, [1], [0, 0], [1], B, act)
    return _from_groups(y, B, rows), 0


def _grouped_rows_launch(name: str, B: int, O: int, K: int, M: int, wgrad: bool, dgrad: bool) -> bool:
    """Whether the Triton kernels launch the kernel-size-1 conv1d of B groups over M rows that
    stands for B linear layers (its groups on the grid, its rows within a convolution's pixel
    bound)."""
    from .conv import PIXELS_MAX, _launch_problem

    return M <= PIXELS_MAX and _launch_problem(name, B * K, (B * O, K, 1), B, wgrad, dgrad) is None


def _matmul_precision():
    """A block in which our convolutions' float32 products follow matmul's TF32 setting (a
    linear layer's), not the convolutions' (conv.products_as)."""
    from .conv import products_as

    return products_as("matmul")


def _linear_backward_fold(apply, in_dims, args):
    """vmap of linear_backward with the weight not batched: where only the input's gradient is
    computed (a jacobian or hessian in the input), dx = gz w row by row, the batch folded into
    the rows, one call; per-sample weight and bias gradients (torch.func's vmap(grad(...)), as
    differentially private training takes them): :func:`_per_sample_linear_backward`; a shared
    input and no input gradient wanted (an ensemble's first layer, whatever its weight):
    :func:`_stacked_linear_backward`; a batched weight otherwise: :func:`_ensemble_linear_backward`;
    else None (the loop)."""
    g, x, w, out, act, has_bias, *needs = args
    need_x, need_w = (True, True) if not needs else needs
    dg, dx, dw, dout = in_dims[:4]
    if dg is None or w.dim() - (dw is not None) != 2:
        return None
    if dx is None and not need_x:
        return _stacked_linear_backward(apply, g, x, w, out, act, has_bias, need_w, dg, dout)
    if dw is not None:
        return _ensemble_linear_backward(apply, g, x, w, out, act, has_bias, need_x, need_w, dg, dx, dw, dout)
    first = g.movedim(dg, 0)  # (x read for its shape alone: dx's)
    if need_w or has_bias:
        return _per_sample_linear_backward(first, batched_first(x, dx, first), w,
                                           None if out is None else batched_first(out, dout, first), act, has_bias,
                                           need_x, need_w)
    res = apply(first, batched_first(x, dx, first), w, None if out is None else batched_first(out, dout, first), act,
                has_bias, *needs)
    return res, (0 if need_x else None, None, None)


def _stacked_linear_backward(apply, g, x, w, out, act, has_bias, need_w, dg, dout):
    """vmap of linear_backward with a shared input, a batched gradient and no input gradient
    wanted (an ensemble's first layer on one minibatch, or a jacobian in the weight): the B
    elements' weight and bias gradients as those of ONE linear layer of B O outputs, each row's
    B gradients side by side (``[M, B O]``), the input read once; one call of our backward. The
    weight, batched or not, is read for its shape alone (linear's stand-in, which is all the
    forward keeps of it when the input needs no gradient). None (the loop) for no rows or no
    outputs."""
    B, O, K = g.shape[dg], g.shape[-1], x.shape[-1]
    _, M = _rows(g, dg)
    if M == 0 or O == 0:
        return None
    _, gw, gb = apply(_rows_side_by_side(g, dg, B, M), x.reshape(M, K), w.new_zeros(()).expand(B * O, K),
                      None if out is None else _rows_side_by_side(out, dout, B, M), act, has_bias, False, need_w)
    return ((x.new_zeros(0), gw.reshape(B, O, K).to(w.dtype) if need_w else w.new_zeros(0),
             gb.reshape(B, O).to(w.dtype) if has_bias else w.new_zeros(0)),
            (None, 0 if need_w else None, 0 if has_bias else None))


def _ensemble_linear_backward(apply, g, x, w, out, act, has_bias, need_x, need_w, dg, dx, dw, dout):
    """vmap of linear_backward with a batched weight and a batched input or an input gradient
    wanted (an ensemble's training step past its first layer), the forward's
    :func:`_ensemble_linear` in reverse: one backward of the B-group conv1d (at matmul's float32
    precision). None (the loop) where the Triton kernels could not launch it."""
    from .conv import _conv_backward_op, _ensemble_weights

    w, wcat = _ensemble_weights(w, dw)
    B, O, K = w.shape
    rows, M = _rows(g, dg)
    if M == 0 or O == 0 or not _grouped_rows_launch("conv_backward", B, O, K, M, need_w, need_x):
        return None
    # the input is read for its shape alone where no weight gradient is wanted (it may be
    # linear's stand-in then: zeros of no memory)
    xs = _as_groups(x, dx, B, M) if need_w else x.new_zeros(()).expand(1, B * K, M)
    with _matmul_precision():
        gx, gw, gb = _conv_backward_op(_as_groups(g, dg, B, M), xs, wcat.unsqueeze(-1),
                                       None if out is None else _as_groups(out, dout, B, M), [1], [0, 0], [1], B, act,
                                       [need_x, need_w, has_bias])
    gx = _from_groups(gx, B, rows) if need_x else x.new_zeros(0)
    gw = gw.reshape(B, O, K).to(w.dtype) if need_w else w.new_zeros(0)
    gb = gb.reshape(B, O).to(w.dtype) if has_bias else w.new_zeros(0)
    return (gx, gw, gb), (0 if need_x else None, 0 if need_w else None, 0 if has_bias else None)


def _per_sample_linear_backward(g, x, w, out, act, has_bias, need_x, need_w):
    """linear_backward of B elements ([B, rows.., O] gradients, the batch first) with per-sample
    weight and bias gradients: gz = the activation's backward (our op), dx = gz w (our linear,
    one call for every row), each element's bias gradient the sum of its rows' gz. Each
    element's weight gradient gz_b^T x_b: with one row each the outer product gz_b x_b^T (one
    broadcast multiply for the batch); with several, the weight gradient of a kernel-size-1
    conv1d with one group per element (conv's per-sample fold: one call; None, the loop, where
    the Triton kernels could not launch its groups)."""
    from .activation import _activation_backward_op

    B, (O, K) = g.shape[0], w.shape
    M = math.prod(g.shape[1:-1])
    gz = g.reshape(B * M, O)
    if act is not None:
        gz = _activation_backward_op(gz, out.reshape(B * M, O), act)
    dw = w.new_zeros(0)
    if need_w and M == 1:
        dw = gz.unsqueeze(2) * x.reshape(B, 1, K)
    elif need_w and M == 0:
        dw = w.new_zeros((B, O, K))
    elif need_w:
        from .conv import PIXELS_MAX, _conv_backward_op, _per_sample_backward

        if O == 0 or M > PIXELS_MAX:  # (no output channels: the grouped convolution has no groups to run)
            return None

        def cols(t):  # [B M, F] -> [B, 1, F, M]: an element a one-image batch of length M
            return t.reshape(B, M, -1).transpose(1, 2).unsqueeze(1)

        with _matmul_precision():  # (linear's products, at matmul's float32 precision)
            done = _per_sample_backward(_conv_backward_op, cols(gz), cols(x.reshape(B * M, K)), w.unsqueeze(2), None,
                                        [1], [0, 0], [1], 1, None, [False, True, False])
        if done is None:
            return None
        dw = done[0][1].reshape(B, O, K)
    dx = _linear_op(gz, w.t(), None, None).reshape(x.shape) if need_x else x.new_zeros(0)
    db = gz.reshape(B, M, O).sum(1) if has_bias else w.new_zeros(0)
    return (dx, dw.to(w.dtype), db.to(w.dtype)), (0 if need_x else None, 0 if need_w else None, 0 if has_bias else None)


_linear_op.register_vmap_fold(_linear_fold)
_linear_backward_op.register_vmap_fold(_linear_backward_fold)


def _vector_weight_checks(input, weight) -> None:
    """A 1-D weight without a bias: torch's matmul takes a dot product (1-D input) or a
    matrix-vector product, each with its own checks in its own order and words, which differ
    between torch versions (2.11's mv says "expected scalar type", 2.13's "addmv input
    tensors"): where the sizes or dtypes are wrong, torch's own linear on stand-ins of the
    arguments' shapes and dtypes (zeros broadcast: nothing allocated, nothing computed before
    its checks) gives the error; ours where it has none (only bad input pays)."""
    K, Kw = input.shape[-1], weight.shape[0]
    if K == Kw and input.dtype == weight.dtype:
        return
    x0 = torch.zeros((), dtype=input.dtype, device="cpu").expand(input.shape)
    w0 = torch.zeros((), dtype=weight.dtype, device="cpu").expand(weight.shape)
    raise torchs_own_error(lambda: _TF.linear(x0, w0), f"linear: a 1-D weight of {Kw} elements ({weight.dtype}) "
                            f"for an input of {K} features ({input.dtype})")


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None) -> Tensor:
    """torch.nn.functional.linear: ``act(input @ weight^T + bias)``.

    input [..., K] (at least 1-d), weight [O, K] (or [K], giving an output without the last
    dim, as torch), bias [O] (or anything broadcastable to it: [] or [1]) or None.
    ``activation`` (ours only; default None) fuses relu / sigmoid / tanh into the epilogue.
    """
    if _has_tf(input, weight, bias, activation):
        return _tf(linear, input, weight, bias, activation=activation)
    check_tensor("linear", "input", input, 1)
    check_tensor("linear", "weight", weight, 2)
    if bias is not None:
        check_tensor("linear", "bias", bias, 3)
    input, weight, bias = autocast_inputs("lower", input, weight, bias)
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input.dim() == 0 or weight.dim() == 0:
        raise KernelInputError(
            f"both arguments to linear need to be at least 1D, but they are {input.dim()}D and {weight.dim()}D"
        )
    if weight.dim() > 2:
        raise KernelInputError(f"t() expects a tensor with <= 2 dimensions, but self is {weight.dim()}D")
    check_same_device(input, weight, bias)
    if weight.dim() == 1 and bias is None:
        _vector_weight_checks(input, weight)
    if weight.dtype != input.dtype:  # torch's words (an integer input too)
        if bias is None and weight.dim() == 2 and input.shape[-1] != weight.shape[1]:
            # torch's matmul (no bias) finds the shapes wrong before the dtypes
            raise KernelInputError(f"mat1 and mat2 shapes cannot be multiplied ({math.prod(input.shape[:-1])}x"
                                   f"{input.shape[-1]} and {weight.shape[1]}x{weight.shape[0]})")
        raise KernelInputError(linear_dtype_message(input, weight, bias))
    if bias is not None and bias.dtype != input.dtype and weight.dim() == 2 and input.dtype in FLOAT_DTYPES:
        # torch's addmm finds the bias's dtype wrong before the shapes
        raise KernelInputError(
            f"self and mat2 must have the same dtype, but got {scalar_type_name(bias.dtype)} and {scalar_type_name(input.dtype)}")
    # an integer, bool or complex input and weight: torch's verdict (its addmm may find the bias's
    # dtype wrong first, or the dtype not implemented), else ours
    if input.dtype not in FLOAT_DTYPES:  # (tested first: no closure on the usual call)
        check_float_like_torch("linear", "input", input, lambda: _TF.linear(input, weight, bias))
    vec_w = weight.dim() == 1
    w = weight.unsqueeze(0) if vec_w else weight
    O, K = w.shape
    if input.shape[-1] != K:
        rows = math.prod(input.shape[:-1])
        raise KernelInputError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and {K}x{O})")
    if bias is not None:
        if bias.dtype != input.dtype:
            raise KernelInputError(
                f"self and mat2 must have the same dtype, but got {scalar_type_name(bias.dtype)} and {scalar_type_name(input.dtype)}"
            )
        if vec_w:
            # a 1-D weight with a bias: torch's verdict depends on its internal path (a contiguous
            # input fails in addmm, "mat2 must be a matrix", its transposed copy succeeds); ours is
            # the [1, K] weight's result, squeezed, which is what torch returns whenever it succeeds
            if bias.shape != (1,):
                if bias.numel() != 1 or bias.dim() > 1:
                    raise KernelInputError(
                        f"The expanded size of the tensor (1) must match the existing size "
                        f"({bias.shape[-1] if bias.dim() else 1}) at non-singleton dimension {max(input.dim() - 1, 0)}.  "
                        f"Target sizes: [{math.prod(input.shape[:-1])}, 1].  Tensor sizes: {list(bias.shape)}"
                    )
                bias = bias.reshape(1)
        elif bias.shape != (O,):
            return _linear_general_bias(input, w, bias, activation)
    y = _linear_op(input, w, bias, activation)
    return y.squeeze(-1) if vec_w else y


def _linear_general_bias(input: Tensor, w: Tensor, bias: Tensor, activation) -> Tensor:
    """torch's linear (2-D weight) with a bias other than [O], by torch's own rule:

    * a 2-D input, or a contiguous input with a bias that is 1-D once squeezed (contiguous),
      is torch's ``addmm(bias, input.flatten(0, -2), weight.t())``: the bias must expand to
      [rows, O];
    * anything else is ``matmul(input, weight.t()).add_(bias)``: the bias must broadcast to
      the output's shape without growing it.

    The product is our kernel; a bias that is [O], [1] or [] after those checks goes into its
    epilogue, any other is added (broadcast) to the product afterwards by torch's own add, whose
    autograd sums the bias gradient over the broadcast dims, and the activation follows.
    """
    O = w.shape[0]
    lead = input.shape[:-1]
    rows = math.prod(lead)
    out_shape = (*lead, O)
    fusable = (bias.dim() == 1 or bias.squeeze().dim() == 1) and bias.is_contiguous()
    addmm = input.dim() == 2 or (fusable and input.is_contiguous())
    if addmm:
        try:
            bias.expand(rows, O)
        except RuntimeError as e:  # torch's own message ("The expanded size of the tensor ...")
            raise KernelInputError(str(e)) from None
        if bias.numel() == 1:
            return _linear_op(input, w, bias.reshape(1).expand(O), activation)
    else:
        a, b = list(out_shape), list(bias.shape)
        for i in range(1, min(len(a), len(b)) + 1):  # torch's infer_size: last dim first
            if a[-i] != b[-i] and b[-i] != 1 and a[-i] != 1:
                raise KernelInputError(
                    f"The size of tensor a ({a[-i]}) must match the size of tensor b ({b[-i]}) at non-singleton "
                    f"dimension {max(len(a), len(b)) - i}"
                )
        full = list(torch.broadcast_shapes(out_shape, bias.shape))
        if full != list(out_shape):
            raise KernelInputError(f"output with shape {list(out_shape)} doesn't match the broadcast shape {full}")
    y = _linear_op(input, w, None, None).reshape(out_shape)
    y = (y.reshape(rows, O) + bias).reshape(out_shape) if addmm else y + bias
    if activation is not None:
        from .activation import _activation_op

        y = _activation_op(y, activation)
    return y


# =========================================================================== softmax / log_softmax


# The Triton softmax and cross-entropy kernels walk a row (the softmax dim, the classes) in tiles
# of up to 4096 with an int32 counter when its length is an int32 argument: a length within a tile
# of 2^31 - 1 steps the counter past it, where it wraps negative and the loop never ends (a
# length of 2^31 or more is an int64 argument, and works). Those lengths are refused on Triton,
# the window taken wide (2^16) so that any tile size stays inside it.
ROW_LENGTH_WRAP = (2**31 - 2**16, 2**31)
# The per-row cross-entropy kernels run a program per row on grid x and find the rows' count
# there (its [3, M] statistics): at most this many rows.
CE_ROWS_MAX = 2**31 - 1


def _check_row_length(op: str, n: int) -> None:
    """Refuse, on Triton, a softmax / cross-entropy row length in ROW_LENGTH_WRAP (callers test
    ``n >= ROW_LENGTH_WRAP[0]`` first: the common case costs one comparison)."""
    refuse_wrapping_count(op, n, ROW_LENGTH_WRAP, f"a dimension of {n}", "reference")


def _mid_shape(t: Tensor, dim: int):
    """``(outer, C, inner)`` of a contiguous ``t`` seen as [outer, C, inner] around ``dim`` (C its
    size), for the middle-dim softmax kernels; None where ``t`` is not contiguous or has no dims."""
    if t.dim() == 0 or not t.is_contiguous():
        return None
    d = dim % t.dim()
    inner = math.prod(t.shape[d + 1:])
    return math.prod(t.shape[:d]), t.shape[d], inner


def _check_softmax_op(name: str, t: Tensor, dim: int, what: str = "input") -> None:
    """The softmax ops' own checks (the public functions make their arguments so; a direct call
    of ``torch.ops.gpu_nn.softmax`` and the rest is refused here): a floating-point tensor (the
    Triton kernels computed an integer one in its dtype, where torch's kernel is "not
    implemented") and a dim in range (a 0-d tensor's: -1 or 0), torch's words."""
    check_float(name, what, t)
    n = max(t.dim(), 1)
    if not -n <= dim < n:
        raise KernelInputIndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")


def _softmax_forward(x: Tensor, dim: int, log: bool) -> Tensor:
    """softmax / log_softmax of x over ``dim`` (any shape); result in x's dtype."""
    name = "log_softmax" if log else "softmax"
    _check_softmax_op(name, x, dim)
    backend = _backend.resolve(name, x.device, BACKENDS, dtype=x.dtype)
    if backend == "reference":
        fn = ref.log_softmax if log else ref.softmax
        # contiguous as torch's softmax and our fake kernel (NumPy keeps a channels_last input's order)
        return from_numpy(fn(to_numpy(x), dim), x.dtype, x.device).contiguous()
    _backend.check_interpreter_dtype(name, backend, x)
    if x.dim() and x.shape[dim] >= ROW_LENGTH_WRAP[0]:
        _check_row_length(name, x.shape[dim])
    if x.numel() == 0:  # an empty softmax dim has no [-1, 0] row layout
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    ktriton, kd = _triton_modules()
    shape = x.shape
    if dim == x.dim() - 1 and x.is_contiguous():  # rows already in place: no view, no copy
        y = empty(shape, dtype=x.dtype, device=x.device)
        kd.softmax_fwd_rows(x, y, x.numel() // shape[-1], shape[-1], log, ktriton.INTERPRET)
        return y
    mid = _mid_shape(x, dim)
    if mid is not None and kd.mid_ok(*mid):  # another dim of a contiguous tensor: in place, strided
        y = empty(shape, dtype=x.dtype, device=x.device)
        kd.softmax_fwd_mid(x, y, *mid, log, ktriton.INTERPRET)
        return y
    if x.dim() == 0:
        x = x.reshape(1)
    xl = x.movedim(dim, -1)
    x2 = xl.reshape(-1, xl.shape[-1]).contiguous()
    y2 = empty(x2.shape, dtype=x.dtype, device=x.device)
    kd.softmax_fwd(x2, y2, log, ktriton.INTERPRET)
    return y2.reshape(xl.shape).movedim(-1, dim).contiguous().reshape(shape)


def _softmax_backward(grad: Tensor, out: Tensor, dim: int, log: bool) -> Tensor:
    """softmax: y * (g - sum(g y)); log_softmax: g - exp(y) sum(g); over ``dim``."""
    name = ("log_softmax" if log else "softmax") + "_backward"
    if grad.shape != out.shape:
        raise KernelInputError(f"{name}: grad_output shape {tuple(grad.shape)} != output shape {tuple(out.shape)}")
    _check_softmax_op(name, grad, dim, "grad_output")
    check_float(name, "output", out)
    check_same_device(grad, out)
    backend = _backend.resolve(name, grad.device, BACKENDS, dtype=grad.dtype)
    if backend == "reference":
        fn = ref.log_softmax_backward if log else ref.softmax_backward
        return from_numpy(fn(to_numpy(grad), to_numpy(out), dim), grad.dtype, grad.device).contiguous()
    _backend.check_interpreter_dtype(name, backend, grad, out)
    if grad.dim() and grad.shape[dim] >= ROW_LENGTH_WRAP[0]:
        _check_row_length(name, grad.shape[dim])
    if grad.numel() == 0:
        return torch.empty_like(grad, memory_format=torch.contiguous_format)
    ktriton, kd = _triton_modules()
    shape = grad.shape
    if out.dtype != grad.dtype:
        out = out.to(grad.dtype)
    if dim == grad.dim() - 1 and grad.is_contiguous() and out.is_contiguous():  # rows in place
        dx = empty(shape, dtype=grad.dtype, device=grad.device)
        kd.softmax_bwd_rows(grad, out, dx, grad.numel() // shape[-1], shape[-1], log, ktriton.INTERPRET)
        return dx
    mid = _mid_shape(grad, dim) if out.is_contiguous() else None
    if mid is not None and kd.mid_ok(*mid):
        dx = empty(shape, dtype=grad.dtype, device=grad.device)
        kd.softmax_bwd_mid(grad, out, dx, *mid, log, ktriton.INTERPRET)
        return dx
    if grad.dim() == 0:
        grad, out = grad.reshape(1), out.reshape(1)
    gl, yl = grad.movedim(dim, -1), out.movedim(dim, -1)
    g2 = gl.reshape(-1, gl.shape[-1]).contiguous()
    y2 = yl.reshape(-1, yl.shape[-1]).contiguous()
    dx2 = empty(g2.shape, dtype=grad.dtype, device=grad.device)
    kd.softmax_bwd(g2, y2, dx2, log, ktriton.INTERPRET)
    return dx2.reshape(gl.shape).movedim(-1, dim).contiguous().reshape(shape)


def _register_softmax(log: bool):
    name = "log_softmax" if log else "softmax"

    @routed
    @torch.library.custom_op(f"gpu_nn::{name}", mutates_args=())
    @on_device
    def fwd(input: Tensor, dim: int) -> Tensor:
        return _softmax_forward(input, dim, log)

    @fwd.register_fake
    def _(input, dim):
        return input.new_empty(input.shape)

    @routed
    @torch.library.custom_op(f"gpu_nn::{name}_backward", mutates_args=())
    @on_device
    def bwd(grad: Tensor, output: Tensor, dim: int) -> Tensor:
        return _softmax_backward(grad, output, dim, log)

    @bwd.register_fake
    def _(grad, output, dim):
        return grad.new_empty(grad.shape)

    def setup(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return bwd(grad, out, ctx.dim), None

    fwd.register_autograd(backward, setup_context=setup)

    def bwd_setup(ctx, inputs, output):
        ctx.dim = inputs[2]
        ctx.save_for_backward(inputs[0], inputs[1])

    def backward_backward(ctx, gg):
        """Double backward. softmax: dx = y (g - sum(g y)) is self-adjoint in g, so d g is the
        softmax backward of gg again; d y = gg (g - sum(g y)) - g sum(gg y).
        log_softmax: dx = g - exp(y) sum(g), so d g = gg - sum(gg exp(y)) and
        d y = -gg exp(y) sum(g). Sums over ``dim``, kept for broadcasting."""
        g, y = ctx.saved_tensors
        dim = ctx.dim
        d_g = d_y = None
        if log:
            p = y.exp()
            if ctx.needs_input_grad[0]:
                d_g = gg - (gg * p).sum(dim, keepdim=True)
            if ctx.needs_input_grad[1]:
                d_y = -gg * p * g.sum(dim, keepdim=True)
        else:
            if ctx.needs_input_grad[0]:
                d_g = bwd(gg, y, dim)
            if ctx.needs_input_grad[1]:
                d_y = gg * (g - (g * y).sum(dim, keepdim=True)) - g * (gg * y).sum(dim, keepdim=True)
        return d_g, d_y, None

    # double backward (create_graph=True): the backward op is differentiable too
    bwd.register_autograd(backward_backward, setup_context=bwd_setup)

    def jvp(inputs, outputs, tangents):
        """Forward-mode AD. softmax: ty = y (t - sum(t y)), our softmax backward of t;
        log_softmax: ty = t - sum(t exp(y)) (torch elementwise math, as the double backward's)."""
        t, dim = tangents[0], inputs[1]
        if t is None:
            return (None,)
        y = outputs[0]
        return (t - (t * y.exp()).sum(dim, keepdim=True) if log else bwd(t, y, dim),)

    def bwd_jvp(inputs, outputs, tangents):
        """Forward-mode AD of the backward (forward over reverse: hessians). softmax: dx = y (g -
        sum(g y)), so tdx = bwd(tg, y) + ty (g - sum(g y)) - y sum(g ty); log_softmax: dx = g -
        exp(y) sum(g), so tdx = bwd(tg, y) - exp(y) ty sum(g)."""
        g, y, dim = inputs
        tg, ty = tangents[:2]
        res = None if tg is None else bwd(tg, y, dim)
        if ty is not None:
            if log:
                term = -(y.exp() * ty * g.sum(dim, keepdim=True))
            else:
                term = ty * (g - (g * y).sum(dim, keepdim=True)) - y * (g * ty).sum(dim, keepdim=True)
            res = add_terms(res, term)
        return (res,)

    def shifted(dim: int) -> int:  # a dim of one element, in the batch with its dim first
        return dim + 1 if dim >= 0 else dim

    def fold(apply, in_dims, args):
        """vmap: the batch dim first, the softmax's dim past it; one call. A 0-d element (its
        softmax over itself: 1) keeps the loop: the batch would be the only dim to take."""
        x, dim = args
        if x.dim() < 2:
            return None
        return apply(x.movedim(in_dims[0], 0), shifted(dim)), 0

    def bwd_fold(apply, in_dims, args):
        g, y, dim = args
        dg, dy = in_dims[:2]
        first = g.movedim(dg, 0) if dg is not None else y.movedim(dy, 0)
        if first.dim() < 2:
            return None
        return apply(batched_first(g, dg, first), batched_first(y, dy, first), shifted(dim)), 0

    fwd.register_jvp(jvp)
    bwd.register_jvp(bwd_jvp)
    fwd.register_vmap_fold(fold)
    bwd.register_vmap_fold(bwd_fold)
    return fwd, bwd


_softmax_op, _softmax_backward_op = _register_softmax(False)
_log_softmax_op, _log_softmax_backward_op = _register_softmax(True)


def _get_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    # torch.nn.functional._get_softmax_dim, with its warning
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1




# Python types torch's parser takes as a dtype (dtype=float is torch.float64)
_PY_DTYPES = {float: torch.float64, int: torch.int64, bool: torch.bool, complex: torch.complex128}


def _torchs_error(name: str, ndim: int, dim, dtype, fallback: str) -> KernelInputError:
    """torch's own error for a bad ``dim`` / ``dtype``, from the torch installed: its argument
    parser words it differently across versions (2.11: "softmax() received an invalid
    combination of arguments - got (float), ..."; 2.13: "softmax(): argument 'dim' (position 1)
    must be int, not float"), and before 2.13 a string dim is a RuntimeError of the named-dim
    overload, not a TypeError. So torch is asked, with the call torch.nn.functional makes
    (``input.softmax(dim)``, or ``input.softmax(dim, dtype=dtype)``) on an empty tensor of the
    input's rank (a named-dim lookup's message names the dims), and its message is raised with
    its type. ``fallback``: a TypeError's message, where torch takes the arguments after all."""
    args = (0 if dim is None else dim,)  # F resolves dim=None to an int before that call
    kwargs = {} if dtype is None else {"dtype": dtype}
    return torchs_own_error(lambda: getattr(torch.empty((0,) * ndim), name)(*args, **kwargs), fallback)


def _softmax_public(name, op, input, dim, _stacklevel, dtype):
    require_attribute(input, name)  # F.softmax calls input.softmax(dim): Python's AttributeError
    check_tensor(name, "input", input, 1)  # (an object with such a method: torch.softmax's words)
    if dim is not None and not is_int(dim):
        raise _torchs_error(name, input.dim(), dim, dtype,
                            f"{name}(): argument 'dim' (position 1) must be int, not {type_name(dim)}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        if not isinstance(dtype, type) or dtype not in _PY_DTYPES:  # (a list is not hashable)
            raise _torchs_error(name, input.dim(), dim, dtype,
                                f"{name}(): argument 'dtype' must be torch.dtype, not {type_name(dtype)}")
        dtype = _PY_DTYPES[dtype]
    if dtype is None:
        (input,) = autocast_inputs("fp32", input, cpu="none")
    if dim is None:
        dim = _get_softmax_dim(name, input.dim(), _stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    wrapped = _wrap_dim(int(dim), input.dim())
    # torch's verdict on a dtype we do not take (its kernel's name depends on the dim and device)
    if input.dtype not in FLOAT_DTYPES:
        check_float_like_torch(name, "input", input, lambda: getattr(input, name)(wrapped))
    return op(input, wrapped)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    """torch.nn.functional.softmax: exp(x - max) / sum(exp(x - max)) over ``dim``.

    Any shape; ``dim=None`` picks torch's implicit dim with its deprecation warning; ``dtype``
    casts the input first. float16/bfloat16 are computed in float32.
    """
    if _has_tf(input, dim, _stacklevel, dtype):
        return _tf(softmax, input, dim, _stacklevel, dtype)
    return _softmax_public("softmax", _softmax_op, input, dim, _stacklevel, dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    """torch.nn.functional.log_softmax: x - logsumexp(x) over ``dim`` (as :func:`softmax`)."""
    if _has_tf(input, dim, _stacklevel, dtype):
        return _tf(log_softmax, input, dim, _stacklevel, dtype)
    return _softmax_public("log_softmax", _log_softmax_op, input, dim, _stacklevel, dtype)


# =========================================================================== cross_entropy


def _ce_rows(input: Tensor) -> tuple[int, int]:
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    M = input.numel() // C if C else math.prod(input.shape[:1] + input.shape[2:])
    return M, C


def _ce_2d(input: Tensor, target: Tensor, prob: bool):
    """[M, C] logits (contiguous, class dim last) and [M] / [M, C] targets."""
    if input.dim() == 2:  # the usual call: already [M, C] (movedim / reshape are views, each a few us)
        x2, t2 = input, target
    elif input.dim() == 1:
        x2, t2 = input.reshape(1, -1), target.reshape(1, -1) if prob else target.reshape(1)
    else:
        C = input.shape[1]
        x2 = input.movedim(1, -1).reshape(-1, C)
        t2 = target.movedim(1, -1).reshape(-1, C) if prob else target.reshape(-1)
    return x2.contiguous(), t2.contiguous()


def _ce_mid(input: Tensor, kd):
    """``(outer, C, inner)`` where the Triton route runs a cross entropy over [N, C, d...] logits
    on the middle-dim kernels (the input contiguous, :func:`kernels.triton.dense.ce_mid_ok`),
    reading the logits and writing their gradient as they lie; None for the rows after a
    transpose (2-d and 1-d inputs, other layouts: a channels_last input's rows already lie
    contiguous)."""
    mid = _mid_shape(input, 1) if input.dim() >= 3 else None  # None too where not contiguous
    return mid if mid is not None and kd.ce_mid_ok(*mid) else None


def _ce_mid_operands(input: Tensor, target: Tensor, prob: bool):
    """The middle-dim kernels' operands: the logits as they are, and the targets in the same
    order (indices [N, d...] flattened to the rows' order, probabilities in the logits' layout)."""
    return input, (target.contiguous() if prob else target.reshape(-1).contiguous())


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved row statistics keep float64 for float64 inputs (gradient checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_size(M: int, reduction: str) -> int:
    """Length of the saved statistics ``stats``: [3, M] row statistics (max, log-sum-exp of
    x - max, the row's total weight W), flattened, and for 'mean' one more entry, the
    denominator (see kernels/triton/dense.py ``_ce_fwd_kernel`` / ``_ce_reduce_kernel``): what
    the backward needs, so that it launches one kernel and no reduction."""
    return 3 * M + int(reduction == "mean")  # int: a bool added to a symbolic M breaks torch 2.11's shape algebra


def _indices_in_range(t: np.ndarray, C: int) -> bool:
    """Every class index of the non-empty array ``t`` in [0, C): two NumPy reductions (anything
    else, ignore_index entries and errors, is :func:`_check_target_range`'s to judge)."""
    return bool(np.minimum.reduce(t, None) >= 0 and np.maximum.reduce(t, None) < C)


def _check_target_range(target: Tensor, ignore_index: int, C: int, kernels=None) -> None:
    """Out-of-range class indices would make a kernel read outside its row: refuse them here,
    in the launcher (inside the custom op, so that torch.compile never traces this
    data-dependent test), before any kernel of the op runs. Costs, on a GPU, one small
    kernel (``kernels``: ``_triton_modules()``, given when the op runs on Triton) and one copy
    to the host of its per-program answers; on a CPU two NumPy reductions."""
    if target.numel() == 0:
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        # a CUDA graph being captured forbids the host sync below; the Triton kernels guard the
        # range themselves (an out-of-range row gives NaN, never a read outside its row)
        return
    if target.device.type == "cpu" and not target.requires_grad and target.dtype in (torch.int64, torch.int32):
        if _indices_in_range(target.numpy(), C):  # the five torch ops below cost 4x more on a tiny target
            return
    if kernels is not None and target.dtype == torch.int64:
        ktriton, kd = kernels
        t1 = target.reshape(-1).contiguous()
        bad = kd.first_bad_target(kd.ce_check_targets(t1, C, ignore_index, ktriton.INTERPRET).tolist(), t1.shape[0])
        if bad is not None:
            raise KernelInputIndexError(f"Target {bad} is out of bounds.")
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        raise KernelInputIndexError(f"Target {int(target[bad].reshape(-1)[0])} is out of bounds.")


def _check_ce_op(op: str, input, target, weight, reduction) -> None:
    """The cross-entropy ops' own checks of what their kernels index by (the public
    ``cross_entropy`` has checked in torch's words already; a direct call of
    ``torch.ops.gpu_nn.cross_entropy`` / ``cross_entropy_backward`` is refused here): M rows of
    C classes from the input, a target of those M rows (class indices of int64 / uint8, or
    probabilities of the input's shape), a weight of C entries, a known reduction. A short target
    or weight was read past its end."""
    if reduction not in REDUCTIONS:
        raise KernelInputError(f"{reduction} is not a valid value for reduction")
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)) or input.dim() < 1:
        raise KernelInputError(f"{op}: input must have at least one dimension (the classes)")
    check_float(op, "input", input)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise KernelInputError(f"{op}: a probability target must have the input's shape {list(input.shape)}, got "
                                   f"{list(target.shape)}")
    else:
        want = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
        if tuple(target.shape) != want:
            raise KernelInputError(f"{op}: class-index target of shape {list(target.shape)}, expected {list(want)}")
        if target.dtype not in (torch.int64, torch.uint8):
            raise KernelInputError(f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}")
    if weight is not None and weight.numel() != C:
        raise KernelInputError(f"weight tensor should be defined either for all {C} classes or no classes but got "
                               f"weight tensor of shape: {list(weight.shape)}")
    check_same_device(input, target, weight)


def cross_entropy_forward(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
                          label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(loss, stats): the loss as torch's cross_entropy, and the statistics the backward reuses
    instead of a second reduction (:func:`_stats_size`; float32, float64 for float64 input;
    M = input.numel() / C). The Triton route launches the per-row kernel and, for 'sum' /
    'mean', one finishing reduction; the reference fills only the [2, M] max / log-sum-exp rows
    that its backward reads (the rest 0)."""
    _check_ce_op("cross_entropy", input, target, weight, reduction)
    M, C = _ce_rows(input)
    prob = target.is_floating_point()
    backend = _backend.resolve("cross_entropy", input.device, BACKENDS, dtype=input.dtype)
    if backend == "reference":
        xn, tn, wn = to_numpy(input), to_numpy(target), to_numpy(weight)
        # checked on the array the reference reads (a CUDA target's host copy too)
        if not prob and tn.size and not _indices_in_range(tn, C):
            _check_target_range(target, ignore_index, C)
        loss, lse = ref.cross_entropy_forward(xn, tn, wn, ignore_index, reduction, label_smoothing)
        stats = np.zeros(_stats_size(M, reduction), lse.dtype)
        stats[: 2 * M] = lse.reshape(-1)
        return from_numpy(loss, input.dtype, input.device), from_numpy(stats, _lse_dtype(input.dtype), input.device)
    _backend.check_interpreter_dtype("cross_entropy", backend, input, target if prob else None, weight)
    _check_row_length("cross_entropy", C)
    ktriton, kd = _triton_modules()
    mid = _ce_mid(input, kd)
    if mid is None and M > CE_ROWS_MAX:  # (the middle-dim kernels index their rows in int64)
        raise KernelInputError(f"cross_entropy: {M} rows are past the {CE_ROWS_MAX} that the Triton kernels launch "
                               f"(a program each); the reference backend takes them")
    if not prob:
        _check_target_range(target, ignore_index, C, (ktriton, kd))
    x2, t2 = _ce_2d(input, target, prob) if mid is None else _ce_mid_operands(input, target, prob)
    stats = empty((_stats_size(M, reduction),), dtype=_lse_dtype(input.dtype), device=input.device)
    w = None if weight is None else weight.contiguous()

    def rows(loss):  # the per-row kernel: on the rows as they lie, or on the rows of [N, d...]
        if mid is None:
            kd.ce_fwd(x2, t2, w, loss, stats, prob, ignore_index, label_smoothing, ktriton.INTERPRET)
        else:
            kd.ce_fwd_mid(x2, t2, w, loss, stats, *mid, prob, ignore_index, label_smoothing, ktriton.INTERPRET)

    if reduction == "none":  # the kernel writes the losses in the input's dtype, in the loss's shape
        # allocated in that shape and written through a flat view: the op returns the base tensor,
        # never a view (a view made inside a custom Function cannot be changed in place)
        loss = empty(ref.ce_loss_shape(tuple(input.shape), tuple(target.shape), prob), dtype=input.dtype,
                     device=input.device)
        rows(loss.view(M))
        return loss, stats
    loss_rows = empty((M,), dtype=torch.float32, device=input.device)
    rows(loss_rows)
    loss = empty((), dtype=input.dtype, device=input.device)
    kd.ce_reduce(loss_rows, t2, w, loss, stats, reduction == "mean", prob, ignore_index, C, label_smoothing,
                 ktriton.INTERPRET)
    return loss, stats


def cross_entropy_backward(grad: Tensor, input: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor,
                           reduction: str, ignore_index: int, label_smoothing: float,
                           target_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_input [input's shape], grad_target [input's shape] for probability targets when
    ``target_grad``, else [0]); ``lse``: the forward's statistics (:func:`_stats_size`); see
    :func:`reference.dense.cross_entropy_backward`. The Triton route is one kernel launch,
    reading ``grad`` (0-d, or the loss's shape for 'none', any float dtype) as it is."""
    _check_ce_op("cross_entropy_backward", input, target, weight, reduction)
    M, C = _ce_rows(input)
    prob = target.is_floating_point()
    # the kernel reads the statistics of M rows (and 'mean''s denominator after them) and one
    # gradient per row ('none') or one in all
    check_same_device(input, grad, lse)
    if not isinstance(lse, Tensor) or lse.numel() != _stats_size(M, reduction):
        raise KernelInputError(f"cross_entropy_backward: the forward's statistics have {_stats_size(M, reduction)} "
                               f"elements for {M} rows and reduction {reduction!r}, got "
                               f"{lse.numel() if isinstance(lse, Tensor) else type_name(lse)}")
    check_float("cross_entropy_backward", "grad", grad)
    if grad.numel() != (M if reduction == "none" else 1) or (reduction != "none" and grad.dim() != 0):
        raise KernelInputError(f"cross_entropy_backward: grad of shape {list(grad.shape)}, expected the loss's "
                               f"({'one per row' if reduction == 'none' else 'a 0-d tensor'})")
    want_dt = prob and target_grad
    backend = _backend.resolve("cross_entropy_backward", input.device, BACKENDS, dtype=input.dtype)
    args = (ignore_index, reduction, label_smoothing)
    if backend == "reference":
        gn, xn, tn, wn, ln = to_numpy(grad), to_numpy(input), to_numpy(target), to_numpy(weight), to_numpy(lse)
        ln = ln[: 2 * M]
        dx = from_numpy(ref.cross_entropy_backward(gn, xn, tn, wn, *args, lse=ln), input.dtype, input.device)
        if want_dt:
            dt = from_numpy(ref.cross_entropy_target_backward(gn, xn, tn, wn, *args, lse=ln), target.dtype, target.device)
        else:
            dt = input.new_zeros(0)
        return dx, dt
    _backend.check_interpreter_dtype("cross_entropy_backward", backend, grad, input, weight)
    ktriton, kd = _triton_modules()
    # [M] with one stride: a view whenever the layout allows (an expanded grad included), 0-d as is
    g = grad.reshape(M) if reduction == "none" else grad
    w = None if weight is None else weight.contiguous()
    mid = _ce_mid(input, kd)
    if mid is not None:  # [N, C, d...] as it lies: dx (and dt) written in the input's layout, no transposes
        x2, t2 = _ce_mid_operands(input, target, prob)
        dx = empty(input.shape, dtype=input.dtype, device=input.device)
        dt = empty(input.shape, dtype=target.dtype, device=target.device) if want_dt else input.new_empty(0)
        kd.ce_bwd_mid(x2, t2, w, lse.contiguous(), g, reduction == "mean", dx, dt if want_dt else None, *mid, prob,
                      ignore_index, label_smoothing, ktriton.INTERPRET)
        return dx, dt
    x2, t2 = _ce_2d(input, target, prob)
    dx2 = empty((M, C), dtype=input.dtype, device=input.device)
    dt2 = empty((M, C), dtype=target.dtype, device=target.device) if want_dt else None
    kd.ce_bwd(x2, t2, w, lse.contiguous(), g, reduction == "mean", dx2, dt2, prob, ignore_index, label_smoothing,
              ktriton.INTERPRET)
    dx = _ce_unflatten(dx2, input)
    dt = _ce_unflatten(dt2, input) if want_dt else input.new_empty(0)
    return dx, dt


def _ce_unflatten(t2: Tensor, input: Tensor) -> Tensor:
    if input.dim() == 2:
        return t2
    if input.dim() == 1:
        return t2.reshape(input.shape)
    lead = (input.shape[0], *input.shape[2:])
    return t2.reshape(*lead, input.shape[1]).movedim(-1, 1).contiguous()


@routed
@torch.library.custom_op("gpu_nn::cross_entropy", mutates_args=())
@on_device
def _cross_entropy_op(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
                      label_smoothing: float) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing)


@_cross_entropy_op.register_fake
def _(input, target, weight, reduction, ignore_index, label_smoothing):
    prob = target.is_floating_point()
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    lead = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    shape = ref.ce_loss_shape(tuple(input.shape), tuple(target.shape), prob) if reduction == "none" else ()
    M = math.prod(lead) if lead else 1
    del C
    return input.new_empty(shape), input.new_empty((_stats_size(M, reduction),), dtype=_lse_dtype(input.dtype))


@routed
@torch.library.custom_op("gpu_nn::cross_entropy_backward", mutates_args=())
@on_device
def _cross_entropy_backward_op(grad: Tensor, input: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor,
                               reduction: str, ignore_index: int, label_smoothing: float,
                               target_grad: bool) -> tuple[Tensor, Tensor]:
    return cross_entropy_backward(grad, input, target, weight, lse, reduction, ignore_index, label_smoothing, target_grad)


@_cross_entropy_backward_op.register_fake
def _(grad, input, target, weight, lse, reduction, ignore_index, label_smoothing, target_grad):
    want_dt = target.is_floating_point() and target_grad
    return input.new_empty(input.shape), (target.new_empty(target.shape) if want_dt else input.new_empty((0,)))


def _ce_setup(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing = inputs
    ctx.args = (reduction, ignore_index, label_smoothing)
    ctx.prob = target.is_floating_point()
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the statistics, which nothing reads
    ctx.save_for_backward(input, target, weight, output[1])


def _ce_backward(ctx, grad, _grad_lse):
    if grad is None:  # not materialised (see _ce_setup): an undefined gradient gives undefined ones
        return None, None, None, None, None, None
    input, target, weight, lse = ctx.saved_tensors
    want_dt = ctx.prob and ctx.needs_input_grad[1]
    dx, dt = _cross_entropy_backward_op(grad, input, target, weight, lse, *ctx.args, want_dt)
    return dx, (dt if want_dt else None), None, None, None, None


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def _ce_no_class(input: Tensor, target: Tensor, prob: bool, reduction: str, ignore_index: int, cdim: int) -> Tensor:
    """cross_entropy over an empty class dim (C = 0), torch's values: probability targets -0 per
    row ('none'), -0 ('sum'), NaN ('mean', 0 / 0); class indices, every one ignored (any other
    is out of range), +0, +0 and NaN. Differentiable in the input (an empty gradient)."""
    if not prob:
        _check_target_range(target, ignore_index, 0)
    # sums of nothing: +0, in the autograd graph; torch negates them for probability targets
    total = input.sum(cdim) if reduction == "none" else input.sum()
    if prob:
        total = -total
    return total / 0.0 if reduction == "mean" else total


def _ce_compose(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
                label_smoothing: float) -> Tensor:
    """torch's cross_entropy as a differentiable composition of our log_softmax and torch
    elementwise math and reductions (the formula of reference.dense.cross_entropy_forward):
    class targets: (1 - eps) w[t] (-logp[t]) + eps / C sum_c w_c (-logp_c), 0 where t is
    ignored, 'mean' dividing both terms by sum w[t]; probability targets: -sum_c w_c t'_c logp_c
    with t' = (1 - eps) t + eps / C, 'mean' dividing by the number of rows."""
    cdim = 0 if input.dim() == 1 else 1
    C = input.shape[cdim]
    logp = _log_softmax_op(input, cdim)
    wshape = [1] * input.dim()
    wshape[cdim] = C
    wlogp = logp if weight is None else logp * weight.reshape(wshape)
    eps = label_smoothing
    if target.is_floating_point():
        t = target * (1 - eps) + eps / C if eps > 0 else target
        rows = -(wlogp * t).sum(cdim)
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / (input.numel() // C if C else 0)
    valid = target != ignore_index
    tt = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    wt = valid.to(input.dtype) if weight is None else weight[tt] * valid
    nll = -logp.gather(cdim, tt.unsqueeze(cdim)).squeeze(cdim) * wt
    smooth = -wlogp.sum(cdim) * valid if eps > 0 else None
    if reduction == "none":
        return nll if smooth is None else (1 - eps) * nll + eps / C * smooth
    if reduction == "mean":
        # torch divides by sum w[t] and gives each ignored row no gradient at all: the scale
        # applied per row, zero on ignored ones, so that a batch whose every target is ignored
        # (loss 0 / 0) has zero derivatives of every order as torch's, not 0 * inf = NaN
        scale = torch.where(valid, 1 / wt.sum(), torch.zeros((), dtype=input.dtype, device=input.device))
        nll, smooth = nll * scale, (None if smooth is None else smooth * scale)
    nll, smooth = nll.sum(), (None if smooth is None else smooth.sum())
    out = nll if smooth is None else (1 - eps) * nll + eps / C * smooth
    if reduction == "mean":  # every target ignored: torch's 0 / 0, a constant
        out = torch.where(valid.any(), out, torch.full((), math.nan, dtype=out.dtype, device=out.device))
    return out


def _ce_bwd_setup(ctx, inputs, output):
    grad, input, target, weight, lse, reduction, ignore_index, label_smoothing, target_grad = inputs
    ctx.args = (reduction, ignore_index, label_smoothing)
    ctx.want_dt = target.is_floating_point() and target_grad
    ctx.save_for_backward(grad, input, target, weight)


def _ce_backward_backward(ctx, ggx, ggt):
    """Double backward of cross_entropy_backward by recomputation (see ops/_autograd.py): the
    saved logsumexp depends on the input too, which the composition of :func:`_ce_compose`
    (through our log_softmax and its double backward) accounts for."""
    from ._autograd import recompute_double_backward

    grad, input, target, weight = ctx.saved_tensors
    wrt = [0, 1] if ctx.want_dt else [0]
    up = [ggx, ggt] if ctx.want_dt else [ggx]
    (d_grad,), (d_x, d_t) = recompute_double_backward(
        lambda x, t: (_ce_compose(x, t, weight, *ctx.args),), [input, target], wrt, [grad], up)
    if not target.is_floating_point():
        d_t = None
    return d_grad, d_x, d_t, None, None, None, None, None, None


# double backward (create_graph=True): the backward op is differentiable too
_cross_entropy_backward_op.register_autograd(_ce_backward_backward, setup_context=_ce_bwd_setup)


def _ce_mean_denominator(target: Tensor, w: Tensor | None, ignore_index: int, elements: int | None = None,
                         dtype: torch.dtype | None = None) -> Tensor:
    """Class targets' 'mean' denominator for the weights ``w`` (None: 1 each): the sum of w[t]
    over the rows whose target is not ignored, 0-d; or, ``elements`` given, one per element
    ([elements], the target's rows split evenly). In ``dtype``, by default float32 at least (a
    float16 sum of 65536 weights of 1 is inf), float64 for float64 weights."""
    if dtype is None:
        dtype = torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32
    valid = (target != ignore_index).reshape(elements or 1, -1)
    t = torch.where(valid, target.reshape(valid.shape), torch.zeros((), dtype=target.dtype, device=target.device))
    d = (valid.to(dtype) if w is None else w.to(dtype)[t] * valid).sum(1)
    return d if elements is not None else d[0]


def _ce_weight_tangent(x, target, weight, tw, loss, reduction, ignore_index, smoothing, g=None, dx=None,
                       target_grad=False):
    """The tangent along the class weights' tangent ``tw`` of the loss (``g`` None), or of the
    backward's results (dx = B(g), and the target's gradient where ``target_grad``). The loss is
    linear in the weights except for class targets' 'mean', N(w) / W(w) (N the 'sum' loss, W the
    denominator), whose tangent is (N(tw) - loss W(tw)) / W(w); likewise B's, (B_sum(g; tw) - dx
    W(tw)) / W(w). Each linear term is our op run with ``tw`` as the weights (with its own
    statistics: they hold the weights' totals)."""
    ratio = reduction == "mean" and not target.is_floating_point()
    red = "sum" if ratio else reduction
    if x.numel() == 0:  # no rows: no dependence on the weights (torch's 'mean' of nothing is a NaN constant)
        tl = torch.zeros_like(loss) if g is None else torch.zeros_like(dx)
        return tl if g is None else (tl, None)
    tl, stats = _cross_entropy_op(x, target, tw, red, ignore_index, smoothing)
    if g is not None:
        tl, tdt = _cross_entropy_backward_op(g, x, target, tw, stats, red, ignore_index, smoothing, target_grad)
    if ratio:
        # (W(w) = 0: every target ignored; the backward's dx is 0 there, whatever the weights)
        den = _ce_mean_denominator(target, weight, ignore_index)
        tl = torch.where(den == 0, torch.zeros((), dtype=tl.dtype, device=tl.device),
                         (tl - (loss if g is None else dx) * _ce_mean_denominator(target, tw, ignore_index)) / den
                         ).to(tl.dtype)
    return tl if g is None else (tl, tdt)


def _ce_jvp(inputs, outputs, tangents):
    """Forward-mode AD of cross_entropy. The loss is a scalar function of each row (or of the
    whole input, reduced), so its tangent is the gradient's inner product with the input's
    tangent: our backward with an upstream gradient of ones, times tx, summed over the class dim
    ('none': one per row) or over everything. Probability targets: the loss is linear in the
    target (the target gradient's inner product likewise). The class weights' term: see
    :func:`_ce_weight_tangent` (torch drops the nll term's one for class targets, its nll_loss
    having no weight derivative; this is the derivative). 'mean' with every target ignored:
    torch's NaN (0 / 0) as the tangent too."""
    x, target, weight, reduction, ignore_index, smoothing = inputs
    tx, tt, tw = tangents[:3]
    loss, stats = outputs
    prob = target.is_floating_point()
    want_dt = prob and tt is not None
    res = None
    if tx is not None or want_dt:
        dx, dt = _cross_entropy_backward_op(torch.ones_like(loss), x, target, weight, stats, reduction,
                                            ignore_index, smoothing, want_dt)
        cdim = 0 if x.dim() == 1 else 1
        red = (lambda p: p.sum(cdim)) if reduction == "none" else (lambda p: p.sum())  # noqa: E731
        res = add_terms(None if tx is None else red(dx * tx), red(dt * tt) if want_dt else None)
    if tw is not None:
        res = add_terms(res, _ce_weight_tangent(x, target, weight, tw, loss, reduction, ignore_index, smoothing))
    if res is not None and reduction == "mean" and not prob:
        res = torch.where(loss.isnan(), loss, res)
    return res, None


def _ce_backward_jvp(inputs, outputs, tangents):
    """Forward-mode AD of cross_entropy_backward (forward over reverse: hessians, Hessian-vector
    products jvp(grad(loss))). The backward B(g, x, t) = g dL/d(x, t) is linear in g (its tangent
    is B(tg, x, t)); its tangent along (tx, tt) is the second derivative g d2L/d(x, t)2 . (tx, tt),
    which the double backward's recomputation gives with (tx, tt) as the gradients flowing into
    B's results (the Hessian is symmetric), the saved statistics' dependence on x included; the
    weights' term as :func:`_ce_weight_tangent`'s."""
    from ._autograd import recompute_double_backward

    g, x, target, weight, stats, reduction, ignore_index, smoothing, target_grad = inputs
    tg, tx, tt, tw = tangents[:4]
    prob = target.is_floating_point()
    want_dt = prob and target_grad
    args = (reduction, ignore_index, smoothing)
    tdx = tdt = None
    if tg is not None:
        tdx, tdt = _cross_entropy_backward_op(tg, x, target, weight, stats, *args, target_grad)
    if tw is not None:
        wx, wt = _ce_weight_tangent(x, target, weight, tw, None, *args, g=g, dx=outputs[0], target_grad=want_dt)
        tdx, tdt = add_terms(tdx, wx), (add_terms(tdt, wt) if want_dt else tdt)
    tt = tt if prob else None
    if tx is not None or tt is not None:
        wrt, up = ([0, 1], [tx, tt]) if prob else ([0], [tx])
        _, (sx, st) = recompute_double_backward(
            lambda u, v: (_ce_compose(u, v, weight, *args),), [x, target], wrt, [g], up)
        tdx = add_terms(tdx, sx)
        if want_dt:
            tdt = add_terms(tdt, st)
    return tdx, (tdt if want_dt else None)


_cross_entropy_op.register_jvp(_ce_jvp)
_cross_entropy_backward_op.register_jvp(_ce_backward_jvp)


def _ce_merged(x: Tensor, target: Tensor, dx, dt):
    """For the vmap folds: (B, M, the merged input and target, an element's input shape). An
    element's M rows all go into one input: [C] elements (a 0-d target each) stack into a [B, C]
    batch, [N, C, d...] ones merge into [B N, C, d...]; an unbatched one is expanded."""
    first = x.movedim(dx, 0) if dx is not None else target.movedim(dt, 0)
    one = first if dx is not None else x.unsqueeze(0).expand(first.shape[0], *x.shape)
    B, shape = one.shape[0], tuple(one.shape[1:])
    M = _ce_rows(one[0])[0]
    if len(shape) == 1:
        return B, M, one, batched_first(target, dt, one), shape
    return B, M, merge_batch(one, 0), merge_batch(target, dt, one), shape


def _ce_fold_denominators(target: Tensor, weight: Tensor | None, B: int, M: int, ignore_index: int,
                          smoothing: float, dtype: torch.dtype) -> Tensor:
    """Each element's 'mean' denominator, [B], in ``dtype`` (the statistics': float32, float64
    for float64 input): the number of its rows (probability targets), or
    :func:`_ce_mean_denominator` per element, NaN where that is 0 with label smoothing (torch
    averages the nll and smoothing terms apart, and the nll term is 0 / 0); as the kernels."""
    if target.is_floating_point():
        return torch.full((B,), float(M), dtype=dtype, device=target.device)
    d = _ce_mean_denominator(target, weight, ignore_index, B, dtype) if M else \
        torch.zeros(B, dtype=dtype, device=target.device)
    return torch.where(d == 0, math.nan, d) if smoothing > 0 else d


def _ce_fold(apply, in_dims, args):
    """vmap of cross_entropy (per-sample losses and, with its backward's fold, per-sample
    gradients: vmap(grad(...))) as one call over every element's rows with reduction 'none',
    each element's 'sum' / 'mean' then a sum over its rows in the statistics' dtype (float32,
    float64 for float64 input; and a division by its denominator), as the kernels reduce; the statistics laid out as each element's own call
    lays them out. A batched weight keeps the loop."""
    x, target, weight, reduction, ignore_index, smoothing = args
    dx, dt, dw = in_dims[:3]
    if dw is not None:
        return None
    B, M, xm, tm, shape = _ce_merged(x, target, dx, dt)
    loss, stats = apply(xm, tm, weight, "none", ignore_index, smoothing)
    stats = stats.reshape(3, B, M).transpose(0, 1).reshape(B, 3 * M)
    if reduction == "none":
        return (loss.reshape(B, shape[0], *shape[2:]) if len(shape) > 1 else loss, stats), (0, 0)
    total = loss.to(_lse_dtype(loss.dtype)).reshape(B, M).sum(1)
    if reduction == "mean":
        den = _ce_fold_denominators(tm, weight, B, M, ignore_index, smoothing, stats.dtype)
        stats = torch.cat([stats, den.unsqueeze(1)], 1)
        if target.is_floating_point():
            total = total / den
        else:
            # an element whose every target is ignored: torch's NaN (0 / 0) as a constant, with a
            # zero gradient, as the op's (a division by its 0 would send 1 / 0 into the backward)
            some = (tm != ignore_index).reshape(B, M).any(1)
            one = torch.ones((), dtype=den.dtype, device=den.device)
            total = torch.where(some, total / torch.where(some, den, one), torch.full((), math.nan, dtype=den.dtype,
                                                                                      device=den.device))
    return (total.to(x.dtype), stats), (0, 0)


def _ce_backward_fold(apply, in_dims, args):
    """vmap of cross_entropy_backward (per-sample gradients, jacobians of per-row losses): one
    call with reduction 'none' over every element's rows, each row's upstream gradient its
    element's (divided by the element's denominator for 'mean', in the statistics' dtype, as
    the kernels divide), the statistics gathered back into one call's layout. A batched weight keeps the
    loop."""
    g, x, target, weight, stats, reduction, ignore_index, smoothing, target_grad = args
    dg, dx, dt, dw, ds = in_dims[:5]
    if dw is not None:
        return None
    if dx is None and dt is None:  # (only g or the statistics batched: the input's rows expanded)
        batched, d = (g, dg) if dg is not None else (stats, ds)
        x, dx = x.unsqueeze(0).expand(batched.shape[d], *x.shape), 0
    B, M, xm, tm, shape = _ce_merged(x, target, dx, dt)
    like = x.new_empty((B, 0))
    st = batched_first(stats, ds, like)[:, : 3 * M].reshape(B, 3, M).transpose(0, 1).reshape(3 * B * M)
    gb = batched_first(g, dg, like)
    rows = (B * shape[0], *shape[2:]) if len(shape) > 1 else (B,)  # the merged call's loss shape
    if reduction == "none":
        gm = gb.reshape(rows)
    elif reduction == "sum":
        gm = gb.unsqueeze(1).expand(B, M).reshape(rows)
    else:
        den = _ce_fold_denominators(tm, weight, B, M, ignore_index, smoothing, stats.dtype)
        if target.is_floating_point():
            gm = (gb.to(den.dtype) / den).unsqueeze(1).expand(B, M).reshape(rows)
        else:
            # an ignored row's upstream gradient 0, and an element whose every target is ignored
            # divided by 1, not 0: the kernels give such rows 0 either way, but an inf would reach
            # the second derivatives (0 * inf: NaN where torch has 0; a fuzz's find)
            valid = (tm != ignore_index).reshape(B, M)
            gb = gb.to(den.dtype) / torch.where(valid.any(1), den, torch.ones((), dtype=den.dtype, device=den.device))
            gm = torch.where(valid, gb.unsqueeze(1), torch.zeros((), dtype=gb.dtype, device=gb.device)).reshape(rows)
    dxm, dtm = apply(gm, xm, tm, weight, st.contiguous(), "none", ignore_index, smoothing, target_grad)
    want_dt = target.is_floating_point() and target_grad
    return (dxm.reshape(B, *shape), dtm.reshape(B, *shape) if want_dt else dtm), (0, 0 if want_dt else None)


_cross_entropy_op.register_vmap_fold(_ce_fold)
_cross_entropy_backward_op.register_vmap_fold(_ce_backward_fold)


def _refuse_weight_grad(input, weight) -> None:
    """torch's nll_loss has no gradient for its weight and says so where its autograd kernel is
    entered (nll_loss_forward for an input of rank <= 2, nll_loss2d_forward for the others,
    reshaped to 4-D), before that kernel's own checks of the target and the weight (grad mode
    on; under no_grad it computes)."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        name = "nll_loss_forward" if input.dim() <= 2 else "nll_loss2d_forward"
        raise KernelInputError(f"The function '{name}' is not differentiable with respect to argument 'weight'. "
                               "This input cannot have requires_grad True.")


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    check_tensor("cross_entropy_loss", "input", input, 1)
    check_tensor("cross_entropy_loss", "target", target, 2)
    if reduction not in REDUCTIONS:
        raise KernelInputError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:  # torch checks only this bound; values <= 0 (and NaN) mean no smoothing
        # (C++'s default double output: six significant digits, 2.0 as "2")
        raise KernelInputError(f"label_smoothing must be between 0.0 and 1.0. Got: {float(label_smoothing):g}")
    # an integer, bool or complex input: torch's verdict (a NotImplementedError of its
    # log_softmax kernel, or first its probability-target check), else ours
    if input.dtype not in FLOAT_DTYPES:
        check_float_like_torch("cross_entropy", "input", input, lambda: _TF.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing))
    check_same_device(input, target)
    prob = input.shape == target.shape
    if input.dim() == 0:
        raise KernelInputError("Expected floating point type for target with class probabilities, got "
                               f"{scalar_type_name(target.dtype)}" if not target.is_floating_point() else
                               "cross_entropy: input must have at least one dimension (the classes)")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None:
        check_tensor("cross_entropy_loss", "weight", weight, 3)
        check_same_device(input, weight)
    if prob:
        if not target.is_floating_point():
            raise KernelInputError(
                f"Expected floating point type for target with class probabilities, got {scalar_type_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise KernelInputError("ignore_index is not supported for floating point target")
        # probability targets go through elementwise products that type-promote (as torch's: an
        # integer weight too)
        if weight is not None and (weight.dim() != 1 or weight.shape[0] != C):
            raise KernelInputError(f"cross_entropy: weight tensor should be defined either for all {C} classes or "
                                   f"no classes but got weight tensor of shape: {list(weight.shape)}")
        return True
    if input.dim() == 1:
        _refuse_weight_grad(input, weight)
        if target.dim() != 0:
            raise KernelInputError("0D target tensor expected for an unbatched [C] input (gpu_nn does not accept the "
                                   "[1]-shaped target that torch's forward alone tolerates)")
    else:
        # torch's nll_loss_nd: the batch sizes first (a 0-d target's: 0), then a 2-D input goes to
        # nll_loss, a 4-D one to nll_loss2d (its target rank, then its sizes), any other rank to
        # the reshaped path (the target size first); the weight's gradient refused on entering
        # either (_refuse_weight_grad)
        batch = target.shape[0] if target.dim() else 0
        require(batch == input.shape[0],
                  lambda: f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({batch}).")
        if input.dim() not in (2, 4) and tuple(target.shape[1:]) != tuple(input.shape[2:]):
            raise KernelInputError(f"Expected target size {[input.shape[0], *input.shape[2:]]}, got {list(target.shape)}")
        _refuse_weight_grad(input, weight)
        if input.dim() == 2:
            if target.dim() != 1:
                raise KernelInputError("0D or 1D target tensor expected, multi-target not supported")
        elif input.dim() == 4:
            if target.dim() != 3:
                raise KernelInputError(
                    f"only batches of spatial targets supported (3D tensors) but got targets of dimension: {target.dim()}")
            if tuple(target.shape[1:]) != tuple(input.shape[2:]):
                if weight is not None and weight.numel() != C:  # nll_loss2d checks the weight first
                    raise KernelInputError("weight tensor should be defined either for all or no classes")
                raise KernelInputError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise KernelInputError(f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}")
    if weight is not None:
        # class indices go through nll_loss (ranks 1, 2), whose weight must be [C] and of the
        # input's dtype, or nll_loss2d (every other rank, reshaped to 4-D), whose weight may be any
        # shape of C elements; checked where torch checks them: after the batch and target checks,
        # the size before the dtype
        if input.dim() <= 2 and (weight.dim() != 1 or weight.shape[0] != C):
            raise KernelInputError(f"weight tensor should be defined either for all {C} classes or no classes but got "
                                   f"weight tensor of shape: {list(weight.shape)}")
        if input.dim() > 2 and weight.numel() != C:
            raise KernelInputError("weight tensor should be defined either for all or no classes")
        if weight.dtype != input.dtype:
            raise KernelInputError(f"expected scalar type {scalar_type_name(input.dtype)} but found {scalar_type_name(weight.dtype)}")
    # torch's nll_loss2d path (rank >= 3) takes Long only, checked after its early return for
    # an empty reduced target
    if target.dtype == torch.uint8 and input.dim() >= 3 and (target.numel() > 0 or reduction == "none"):
        raise KernelInputError("expected scalar type Long but found Byte")
    return False


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                  ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """torch.nn.functional.cross_entropy: log_softmax over the class dim, then the weighted
    negative log-likelihood with optional label smoothing.

    input [N, C, d1, ...] or unbatched [C]; target class indices [N, d1, ...] / [] (int64 or
    uint8, ``ignore_index`` entries contribute nothing) or class probabilities of input's shape
    (any float dtype; input, target and weight are then computed in their promoted dtype, the
    result's as torch's, though torch takes log_softmax in the input's dtype before promoting:
    ours is the more exact where the target is wider); weight [C]. 'mean' divides by the sum of the weights of
    the non-ignored targets (class indices) or by N * d1 * ... (probabilities), as torch. The
    legacy ``size_average`` / ``reduce`` arguments map to ``reduction`` with torch's warning.
    Not supported: torch's tolerance of a [1]-shaped target for a [C] input.
    """
    if _has_tf(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
        return _tf(cross_entropy, input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    elif reduction == "elementwise_mean":  # torch's deprecated alias, with its warning
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=2)
        reduction = "mean"
    # torch's parser: ignore_index an int, label_smoothing a number (an int is fine), never coerced
    if not is_int(ignore_index):
        raise KernelInputTypeError(
            f"cross_entropy_loss(): argument 'ignore_index' (position 5) must be int, not {type_name(ignore_index)}"
        )
    if isinstance(label_smoothing, (str, bytes)) or not isinstance(label_smoothing, (int, float, np.integer, np.floating, Tensor)):
        raise KernelInputTypeError(
            f"cross_entropy_loss(): argument 'label_smoothing' (position 6) must be float, not {type_name(label_smoothing)}"
        )
    if isinstance(input, Tensor):
        input, weight = autocast_inputs("fp32", input, weight)
    prob = _check_cross_entropy(input, target, weight, ignore_index, reduction, float(label_smoothing))
    if weight is not None and weight.dim() != 1 and not prob:
        weight = weight.reshape(-1)  # nll_loss2d's weight: any shape of C elements (checked)
    label_smoothing = float(label_smoothing) if float(label_smoothing) > 0.0 else 0.0  # as torch
    if prob:
        # torch computes -(log_softmax(input) * smoothed target * weight) in the promoted dtype
        # (asked only where the dtypes differ: promote_types is an aten call of its own)
        dt = input.dtype if target.dtype == input.dtype else torch.promote_types(input.dtype, target.dtype)
        if weight is not None and weight.dtype != dt:
            dt = torch.promote_types(dt, weight.dtype)
        input, target = input.to(dt), target.to(dt)
        weight = None if weight is None else weight.to(dt)
    cdim = 0 if input.dim() == 1 else 1
    if input.shape[cdim] == 0:
        return _ce_no_class(input, target, prob, reduction, int(ignore_index), cdim)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # a weight to learn (probability targets; class indices refused it: _refuse_weight_grad):
        # torch differentiates its composite loss, so do we, through our log_softmax and torch's
        # elementwise math
        return _ce_compose(input, target, weight, reduction, int(ignore_index), float(label_smoothing))
    if not prob and target.dtype != torch.int64:
        target = target.long()
    loss, _ = _cross_entropy_op(input, target, weight, reduction, int(ignore_index), float(label_smoothing))
    return loss


# =========================================================================== gpu-nn check cases


def _t(rng, *shape, scale=1.0, grad=True):
    return torch.from_numpy(rng.standard_normal(shape) * scale).requires_grad_(grad)


def _make_linear(act, bias=True):
    def make(rng):
        args = (_t(rng, 3, 5, 37), _t(rng, 19, 37, scale=0.2), _t(rng, 19) if bias else None)
        return args, {"activation": act}

    return make


def _make_softmax(shape, dim):
    def make(rng):
        return (_t(rng, *shape, scale=3.0),), {"dim": dim}

    return make


def _make_ce(prob=False, weight=False, smoothing=0.0, reduction="mean", kdim=False, shape=None):
    """A check case's inputs: logits of ``shape`` (default [7, 29, 3] with ``kdim``, else
    [13, 29]), class indices (every fourth one the ignored class 2) or probabilities."""
    shape = shape or ((7, 29, 3) if kdim else (13, 29))

    def make(rng):
        x = _t(rng, *shape, scale=2.0)
        if prob:
            t = torch.from_numpy(rng.random(shape))
            t = (t / t.sum(1, keepdim=True)).requires_grad_()
        else:
            t = torch.from_numpy(rng.integers(0, shape[1], (shape[0], *shape[2:])))
            t.view(-1)[::4] = 2  # class 2 is ignored below
        kw = {"reduction": reduction, "label_smoothing": smoothing}
        if not prob:
            kw["ignore_index"] = 2
        # weight goes positionally: the check runner converts positional args to the dtype under test
        w = torch.from_numpy(rng.random(shape[1]) + 0.5) if weight else None
        return (x, t, w), kw

    return make


CHECK_CASES = [
    CheckCase(op="flatten", make=lambda rng: ((_t(rng, 3, 4, 5, 2),), {"start_dim": 1, "end_dim": 2}), fn=flatten,
              backends=BACKENDS),
    *[CheckCase(op="linear" + (f"+{a}" if a else ""), make=_make_linear(a), fn=linear, backends=BACKENDS, tol_scale=2.0)
      for a in ACTIVATIONS],
    CheckCase(op="linear (no bias)", make=_make_linear(None, bias=False), fn=linear, backends=BACKENDS, tol_scale=2.0),
    CheckCase(op="softmax", make=_make_softmax((5, 7, 301), -1), fn=softmax, backends=BACKENDS),
    CheckCase(op="softmax dim=1", make=_make_softmax((5, 33, 7), 1), fn=softmax, backends=BACKENDS),
    CheckCase(op="log_softmax", make=_make_softmax((5, 7, 301), -1), fn=log_softmax, backends=BACKENDS),
    CheckCase(op="cross_entropy", make=_make_ce(), fn=cross_entropy, backends=BACKENDS),
    CheckCase(op="cross_entropy weight+smoothing", make=_make_ce(weight=True, smoothing=0.1), fn=cross_entropy,
              backends=BACKENDS),
    CheckCase(op="cross_entropy none k-dim", make=_make_ce(reduction="none", kdim=True, weight=True), fn=cross_entropy,
              backends=BACKENDS),
    CheckCase(op="cross_entropy prob", make=_make_ce(prob=True, weight=True, smoothing=0.2), fn=cross_entropy,
              backends=BACKENDS),
    # [N, C, H, W] logits as a segmentation loss has them: 45 positions per class, the Triton
    # route's middle-dim kernels (no transpose), in every dtype a GPU runs
    CheckCase(op="cross_entropy dim 1 map", make=_make_ce(weight=True, smoothing=0.1, shape=(3, 7, 5, 9)),
              fn=cross_entropy, backends=BACKENDS),
]
