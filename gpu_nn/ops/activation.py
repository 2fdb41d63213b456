"""relu / sigmoid / tanh: checks, dispatch and ``torch.library`` registration.

``gpu_nn::activation(input, activation)`` and ``gpu_nn::activation_backward(grad_output,
output, activation)`` are the two custom ops; the backward takes the forward output, as
torch's own formulas do. Backends: reference, triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._errors import KernelInputError, refuse_internal_overlap, require_attribute
from ..check import CheckCase
from ..reference import activation as ref
from ._dispatch import (FLOAT_DTYPES, check_float, check_float_like_torch, check_tensor, empty, empty_like, from_numpy, on_device, routed,
                        same_dense_layout, to_numpy, triton_kernels)
from ._dispatch import _eager_ok as eager_ok
from ._dispatch import add_terms, batched_first, carries_tangent
from ._dispatch import device_guard
from ._dispatch import has_torch_function as _has_tf
from ._dispatch import torch_function as _tf

__all__ = ["relu", "relu_", "sigmoid", "tanh"]

ACTIVATIONS = ("relu", "sigmoid", "tanh")
BACKENDS = ("reference", "triton")


def _check(activation: str, t: Tensor) -> None:
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    check_float(activation, "input", t)


def _integral(t: Tensor) -> bool:
    """An integer tensor (bool included): torch's relu keeps its dtype, sigmoid / tanh compute in
    the default float dtype."""
    return not (t.is_floating_point() or t.is_complex())


def _laid_out_as(res: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference's result ``res`` in the layout ``torch.empty_like(like)`` has (NumPy keeps
    a dense input's order but may differ elsewhere, and the fake kernels promise that layout):
    ``res`` itself where it already has it (always for a contiguous ``like``)."""
    if like.is_contiguous() and res.is_contiguous():
        return res
    out = empty_like(like, dtype=dtype)
    if out.stride() == res.stride():
        return res
    return out.copy_(res)


def activation_forward(x: Tensor, activation: str) -> Tensor:
    """y = act(x), any shape; returns a tensor of x's shape and dtype laid out as
    ``torch.empty_like(x)`` (as torch's activations: a channels_last input gives a channels_last
    output). The kernel runs over x's memory block as a flat array where x is dense (any dim
    order); other inputs are first copied into that layout."""
    if activation == "relu" and _integral(x) and x.dtype is not torch.bool:
        # integer relu: exact max(x, 0) in x's dtype, which our float32 kernels are not; the
        # reference computes it (on any device, as it does float64 under auto), no gradient
        return _laid_out_as(from_numpy(ref.relu(to_numpy(x)), x.dtype, x.device), x, x.dtype)
    _check(activation, x)
    backend = _backend.resolve(activation, x.device, BACKENDS, dtype=x.dtype)
    if backend == "reference":
        return _laid_out_as(from_numpy(ref.FORWARD[activation](to_numpy(x)), x.dtype, x.device), x, x.dtype)
    _backend.check_interpreter_dtype(activation, backend, x)
    ktriton, kt = triton_kernels("activation")

    if x.is_contiguous():
        xc, y = x, empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        y = empty_like(x)
        xc = x if same_dense_layout(x, y) else torch.empty_like(y).copy_(x)
    kt.act_forward(xc, y, activation, ktriton.INTERPRET)
    return y


# torch's backward of each activation, (grad_output, output) -> grad_input: its operands' order
# decides the result's layout where theirs differ (threshold_backward's TensorIterator takes the
# output first, sigmoid's and tanh's the gradient)
_TORCH_BACKWARD = {
    "relu": lambda g, y: torch.ops.aten.threshold_backward(g, y, 0),
    "sigmoid": torch.ops.aten.sigmoid_backward,
    "tanh": torch.ops.aten.tanh_backward,
}
_BWD_STRIDES: dict = {}  # (activation, shape, grad strides, output strides) -> torch's result strides


def _backward_strides(activation: str, g: Tensor, y: Tensor) -> tuple:
    """The strides of torch's backward result for a gradient and an output laid out as ``g`` and
    ``y`` (TensorIterator's order of their dims, asked of torch on meta tensors once per layouts:
    the first operand's order, ties broken by the second's), for a pair whose layouts differ."""
    key = (activation, tuple(g.shape), g.stride(), y.stride())
    hit = _BWD_STRIDES.get(key)
    if hit is None:
        gm = torch.empty_strided(g.shape, g.stride(), dtype=torch.float32, device="meta")
        ym = torch.empty_strided(y.shape, y.stride(), dtype=torch.float32, device="meta")
        hit = _TORCH_BACKWARD[activation](gm, ym).stride()
        if len(_BWD_STRIDES) > 1024:
            _BWD_STRIDES.clear()
        _BWD_STRIDES[key] = hit
    return hit


def activation_backward(grad_output: Tensor, output: Tensor, activation: str) -> Tensor:
    """dx = grad_output * act'(x), written through the forward output; laid out as torch's
    backward lays it out (``output``'s layout where the two share theirs, else TensorIterator's
    for its operands: relu's threshold_backward follows the output, sigmoid's and tanh's backward
    the gradient), the operands copied into that layout first where theirs differs."""
    _check(activation, grad_output)
    if grad_output.shape != output.shape:
        raise KernelInputError(f"{activation} backward: grad_output shape {tuple(grad_output.shape)} != output shape {tuple(output.shape)}")
    same = same_dense_layout(grad_output, output)
    backend = _backend.resolve(activation + "_backward", grad_output.device, BACKENDS, dtype=grad_output.dtype)
    if backend == "reference":
        res = from_numpy(ref.BACKWARD[activation](to_numpy(grad_output), to_numpy(output)), grad_output.dtype,
                         grad_output.device)
        if same:
            return _laid_out_as(res, output, grad_output.dtype)
        strides = _backward_strides(activation, grad_output, output)
        return res if res.stride() == strides else torch.empty_strided(
            res.shape, strides, dtype=res.dtype, device=res.device).copy_(res)
    _backend.check_interpreter_dtype(activation, backend, grad_output)
    ktriton, kt = triton_kernels("activation")

    g = grad_output
    y = output if output.dtype == g.dtype else output.to(g.dtype)
    if g.is_contiguous() and y.is_contiguous():
        dx = empty(g.shape, dtype=g.dtype, device=g.device)
    else:
        if same:
            dx = empty_like(output, dtype=g.dtype)
        else:
            dx = torch.empty_strided(g.shape, _backward_strides(activation, grad_output, output), dtype=g.dtype,
                                     device=g.device)
        if not same_dense_layout(y, dx):
            y = torch.empty_like(dx).copy_(y)
        if not same_dense_layout(g, dx):
            g = torch.empty_like(dx).copy_(g)
    kt.act_backward(g, y, dx, activation, ktriton.INTERPRET)
    return dx


@routed
@torch.library.custom_op("gpu_nn::activation", mutates_args=())
@on_device
def _activation_op(input: Tensor, activation: str) -> Tensor:
    return activation_forward(input, activation)


@_activation_op.register_fake
def _(input, activation):
    return torch.empty_like(input)


@routed
@torch.library.custom_op("gpu_nn::activation_backward", mutates_args=())
@on_device
def _activation_backward_op(grad_output: Tensor, output: Tensor, activation: str) -> Tensor:
    return activation_backward(grad_output, output, activation)


@_activation_backward_op.register_fake
def _(grad_output, output, activation):
    # torch's own backward on the fake operands: its result's layout (activation_backward's)
    return _TORCH_BACKWARD[activation](grad_output, output.to(grad_output.dtype))


def _setup_context(ctx, inputs, output):
    ctx.activation = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return _activation_backward_op(grad, out, ctx.activation), None


_activation_op.register_autograd(_backward, setup_context=_setup_context)


def activation_double_backward(activation: str, gg: Tensor, grad: Tensor, output: Tensor, need_output: bool = True):
    """Gradients of ``dx = grad * act'(output)`` (the backward written through the forward
    output) given ``gg``, the gradient flowing into ``dx``: ``(d grad, d output)``.

    d grad = gg * act'(output) is our activation backward again; d output is torch elementwise
    math: relu' is piecewise constant in the output (None: zero almost everywhere, as torch's
    threshold_backward), sigmoid' = y (1 - y) gives gg * grad * (1 - 2y), tanh' = 1 - y^2
    gives -2 gg * grad * y. ``need_output=False`` skips d output.
    """
    d_grad = _activation_backward_op(gg, output, activation)
    d_out = _second_derivative_term(activation, gg, grad, output) if need_output else None
    return d_grad, d_out


def _setup_backward_context(ctx, inputs, output):
    ctx.activation = inputs[2]
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward_backward(ctx, gg):
    grad, out = ctx.saved_tensors
    d_grad, d_out = activation_double_backward(ctx.activation, gg, grad, out, ctx.needs_input_grad[1])
    return (d_grad if ctx.needs_input_grad[0] else None), d_out, None


# double backward (create_graph=True): the backward op is differentiable too
_activation_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward_context)


def _second_derivative_term(activation: str, t_out: Tensor, grad: Tensor, output: Tensor):
    """The part of d(grad * act'(output)) that comes from the output, for an output tangent (or
    gradient) ``t_out``: None for relu (act' is piecewise constant), else torch elementwise math
    (activation_double_backward's d output)."""
    if activation == "sigmoid":
        return t_out * grad * (1 - 2 * output)
    if activation == "tanh":
        return -2 * t_out * grad * output
    return None


def _jvp(inputs, outputs, tangents):
    """Forward-mode AD of y = act(x): the tangent is act'(x) tx, our activation backward of tx."""
    tx = tangents[0]
    return (None if tx is None else _activation_backward_op(tx, outputs[0], inputs[1]),)


def _backward_jvp(inputs, outputs, tangents):
    """Forward-mode AD of dx = grad * act'(output) (its tangent for forward-over-reverse, e.g.
    torch.func.hessian): act'(output) t_grad, our backward again, plus the output's term."""
    grad, out, act = inputs
    t_grad, t_out = tangents[:2]
    res = None if t_grad is None else _activation_backward_op(t_grad, out, act)
    if t_out is not None:
        res = add_terms(res, _second_derivative_term(act, t_out.to(grad.dtype), grad, out.to(grad.dtype)))
    return (res,)


_activation_op.register_jvp(_jvp)
_activation_backward_op.register_jvp(_backward_jvp)


def _fold(apply, in_dims, args):
    """vmap of an activation: elementwise, so the batch is one call (the batch dim where it is)."""
    return apply(*args), in_dims[0]


def _backward_fold(apply, in_dims, args):
    """vmap of an activation backward: elementwise, the two operands' batch dims first."""
    g, y, act = args
    dg, dy = in_dims[:2]
    if dg == dy:
        return apply(g, y, act), dg
    first = g.movedim(dg, 0) if dg is not None else y.movedim(dy, 0)
    return apply(batched_first(g, dg, first), batched_first(y, dy, first), act), 0


_activation_op.register_vmap_fold(_fold)
_activation_backward_op.register_vmap_fold(_backward_fold)


_GET_META = getattr(torch._C._autograd, "_get_creation_meta", None)


def _refused_view(t: Tensor) -> bool:
    """A view (requiring grad, grad mode on) that torch's in-place check refuses: of a leaf that
    requires grad, or one whose creation autograd records as other than plain (torch's
    CreationMeta: a multi-output op's, one made under no_grad)."""
    base = t._base
    if base is not None and base.is_leaf and base.requires_grad:
        return True
    return _GET_META is not None and _GET_META(t) != torch._C._autograd.CreationMeta.DEFAULT


def _apply(input: Tensor, activation: str, inplace: bool = False) -> Tensor:
    # a TypeError, as torch's (relu_ for the in-place form, as torch.relu_ names itself)
    check_tensor(f"{activation}{'_' if inplace else ''}", "input", input, 1)
    if input.is_complex() or (input.is_floating_point() and input.dtype not in FLOAT_DTYPES):
        # torch's verdict: relu refuses complex tensors (NotImplementedError), sigmoid / tanh
        # compute them; a float8 tensor none of the three takes on a CPU
        check_float_like_torch(activation, "input", input, lambda: getattr(torch, activation)(input))
    if _integral(input):
        # as torch: relu keeps an integer dtype (and refuses bool), sigmoid and tanh of an integer
        # tensor are computed in the default float dtype
        if activation == "relu" and input.dtype is torch.bool:
            raise KernelInputError("Boolean inputs not supported for relu")
        if activation != "relu":
            input = input.to(torch.get_default_dtype())
    # (a dual tensor with a tangent takes the op and a copy back, whose tangents forward AD
    # carries: the in-place kernel and _ActivationInPlace have no forward-mode rule)
    if inplace and not torch.compiler.is_compiling() and eager_ok((input,)) and not carries_tangent(input):
        if torch.is_grad_enabled() and input.requires_grad:
            if not input.is_leaf:  # (a leaf goes on to copy_'s refusal, in torch's words)
                if input._is_view() and _refused_view(input):
                    # a view torch refuses to change in place (of a leaf that requires grad, of
                    # a multi-output op: unbind, split; made under no_grad): torch's own check
                    # raises its error here, before anything is written (mark_dirty raised it
                    # after the kernel had written)
                    input.mul_(1)
                refuse_internal_overlap(input)  # (after torch's autograd checks, as torch's order)
                return _ActivationInPlace.apply(input, activation)
        elif _in_place(input, activation):  # (takes only dense layouts: never an expanded input)
            return input
    if inplace and not torch.compiler.is_compiling() and not (input.is_leaf and input.requires_grad
                                                              and torch.is_grad_enabled()):
        # an expanded input (stride 0 over a dim of 2 or more): torch's in-place op refuses it
        # after its dtype and autograd checks (a leaf requiring grad: copy_'s refusal below), before
        # computing; ours computed it and then failed in the copy back (a plain RuntimeError)
        refuse_internal_overlap(input)
    # a dual tensor changed in place: the op on a copy, whose tangent (which the rule's backward
    # op saves, for a reverse pass over this forward one) the copy back leaves untouched
    out = _activation_op(input.clone() if inplace and carries_tangent(input) else input, activation)
    if inplace:
        return input.copy_(out)
    return out


_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _in_place(x: Tensor, activation: str, bump: bool = True) -> bool:
    """``activation`` applied to ``x`` in its own memory by the Triton kernel, where the kernel
    takes ``x`` as it is (contiguous or channels_last, float32 / half): one pass where the
    out-of-place result copied back into ``x`` was two, and no temporary. The caller has made
    sure nothing but plain eager autograd sees the call. Bumps ``x``'s version once (``bump``;
    an autograd Function's ``mark_dirty`` does it itself), as torch's ``relu_``: a graph that
    saved ``x`` then refuses its backward. False where it did nothing (the caller computes out
    of place and copies)."""
    if (x.dtype not in _HALF_OR_FLOAT or (x.is_inference() and not torch.is_inference_mode_enabled())
            or not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))):
        # (a dense block in either layout is one flat array to the kernel; an inference tensor
        # outside inference mode goes on to copy_'s refusal, as torch's relu_ refuses it)
        return False
    if _backend.resolve(activation, x.device, BACKENDS, dtype=x.dtype) != "triton":
        return False
    _check(activation, x)
    _backend.check_interpreter_dtype(activation, "triton", x)
    ktriton, kt = triton_kernels("activation")
    with device_guard(x.device):
        kt.act_forward(x, x, activation, ktriton.INTERPRET)
    if bump:
        torch.autograd.graph.increment_version(x)
    return True


def _in_place_forward(x: Tensor, activation: str) -> Tensor:
    """x changed in place without a version bump (``mark_dirty`` gives the one torch's relu_
    gives): the kernel over x's memory, else the result copied in through ``x.data``, a view
    with its own version counter."""
    if not _in_place(x, activation, bump=False):
        with device_guard(x.device):
            x.data.copy_(activation_forward(x, activation))
    return x


def _in_place_setup(ctx, inputs, output):
    ctx.mark_dirty(inputs[0])
    _setup_context(ctx, inputs, output)  # the out-of-place op's: the activation, the output saved


class _ActivationInPlace(torch.autograd.Function):
    """``relu(x, inplace=True)`` where autograd records it (a training ``ReLU(inplace=True)``,
    every one of a converted torchvision ResNet): ``x`` changed in place and marked dirty, the
    node saving the output (``x`` itself) for the backward, as torch's ``relu_`` and its
    ``threshold_backward``; the backward is the out-of-place op's. The out-of-place op and
    ``x.copy_(out)`` it replaces cost a copy forward and, backward, ``copy_``'s zero gradient for
    the overwritten ``x`` and its addition to the real one: three memory passes more than
    torch's. Plain eager calls only (``_apply``); a trace or mode keeps the custom op and the
    copy."""

    forward = staticmethod(_in_place_forward)
    setup_context, backward = map(staticmethod, _backend.autograd_pair(_in_place_setup, _backward))


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """max(input, 0), NaN kept; as ``torch.nn.functional.relu``."""
    if _has_tf(input, inplace):
        return _tf(relu, input, inplace)
    return _apply(input, "relu", inplace)


def relu_(input: Tensor) -> Tensor:
    """max(input, 0) written into ``input``; as ``torch.nn.functional.relu_``."""
    if _has_tf(input):
        return _tf(relu_, input)
    return _apply(input, "relu", True)


def sigmoid(input: Tensor) -> Tensor:
    """1 / (1 + exp(-input)); as ``torch.nn.functional.sigmoid`` (which calls ``input.sigmoid()``:
    a list is an AttributeError there, a TypeError in ``torch.sigmoid`` and ``nn.Sigmoid``)."""
    if _has_tf(input):
        return _tf(sigmoid, input)
    require_attribute(input, "sigmoid")
    return _apply(input, "sigmoid")


def tanh(input: Tensor) -> Tensor:
    """tanh(input); as ``torch.nn.functional.tanh`` (``input.tanh()``: see :func:`sigmoid`)."""
    if _has_tf(input):
        return _tf(tanh, input)
    require_attribute(input, "tanh")
    return _apply(input, "tanh")


def _make(shape):
    def make(rng):
        x = torch.from_numpy(rng.standard_normal(shape) * 3).requires_grad_()
        return (x,), {}

    return make


CHECK_CASES = [
    CheckCase(op=name, make=_make((3, 5, 17)), fn=fn, backends=BACKENDS)
    for name, fn in (("relu", relu), ("sigmoid", sigmoid), ("tanh", tanh))
]
