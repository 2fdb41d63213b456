"""Helpers shared by every op family: tensor <-> NumPy for the reference backend, and
common input checks with torch's wording."""

from __future__ import annotations

import contextlib
import functools
import inspect

import numpy as np
import torch
import torch.autograd.forward_ad as _fwad

from .. import _backend, _tuning
from ..kernels import env_switch, memo  # noqa: F401  (the ops' memo: ops.pool, ops.conv import it from here)
from .._errors import KernelInputError, KernelInputIndexError, KernelInputNotImplementedError, KernelInputTypeError, type_name

_NUMPY_NATIVE = (torch.float32, torch.float64)
_VIEWABLE = (torch.float32, torch.float64, torch.int64)  # read by the reference as they are
_POISON = env_switch("GPU_NN_POISON") is True
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A NumPy view of ``t`` for the reference backend.

    float32/float64 CPU tensors are shared without a copy (strides kept: non-contiguous
    inputs stay views); float16/bfloat16 are widened to float32; CUDA tensors are copied
    to the host. Integer tensors (targets, indices) keep their dtype.
    """
    if t is None:
        return None
    if t.is_cpu and t.dtype in _VIEWABLE:  # the reference's usual case: a view (detached, no copy)
        return t.numpy(force=True)
    t = t.detach()
    if t.is_floating_point() and t.dtype not in _NUMPY_NATIVE:
        t = t.float()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``dtype`` on ``device`` holding ``a`` (a fresh array the reference made).

    Never returns memory shared with an op's input: custom ops must not alias inputs, so a
    view (``a.base`` set: it could be an input seen through ``to_numpy``) is copied.
    """
    a = np.asarray(a)
    if not a.size:  # NumPy gives an empty array zero strides, torch's empty results are contiguous
        return torch.empty(a.shape, dtype=dtype, device=device)
    f = a.flags  # once: each .flags makes a flags object
    if not f.writeable or not (f.c_contiguous or f.f_contiguous) or a.base is not None:
        a = np.array(a, copy=True)
    t = torch.from_numpy(a)
    # the reference's usual case, a fresh CPU array of the wanted dtype, returned as it is; the
    # device's type only (each t.device makes a torch.device, and a CPU device has no index)
    if t.dtype == dtype and (device.type if type(device) is torch.device else torch.device(device).type) == "cpu":
        return t
    return t.to(device=device, dtype=dtype)


_KERNELS: dict = {}


def triton_kernels(family: str):
    """``(gpu_nn.kernels.triton, gpu_nn.kernels.triton.<family>)``, imported on first use only
    (Triton may be missing where the reference runs) and then served from a dict: no import
    statement on the call path. Safe across threads: the import lock serialises the first
    import, and every thread stores the same module objects."""
    try:
        return _KERNELS[family]
    except KeyError:
        import importlib

        pkg = importlib.import_module("gpu_nn.kernels.triton")
        # launchers reach gpu_nn._tuning through this hook (kernels never import gpu_nn)
        importlib.import_module("gpu_nn.kernels.triton._tune").install(importlib.import_module("gpu_nn._tuning").choose)
        mods = _KERNELS[family] = (pkg, importlib.import_module(f"gpu_nn.kernels.triton.{family}"))
        return mods


def chooser(device: torch.device):
    """The measuring configuration chooser handed to the kernel launchers (conv, pooling), or None
    where the heuristic serves (CPU and the interpreter, GPU_NN_TUNE=0). During a CUDA graph
    capture the chooser serves a choice already measured and otherwise the heuristic, as for
    linear."""
    if device.type != "cuda" or not _tuning.applies(device):  # the type first: no call on a CPU
        return None
    return functools.partial(_tuning.choose, device=device)


def cuda_kernels():
    """``gpu_nn.kernels.cuda`` (the CuPy loader), imported on first use, then cached."""
    try:
        return _KERNELS["cuda"]
    except KeyError:
        import importlib

        mod = _KERNELS["cuda"] = importlib.import_module("gpu_nn.kernels.cuda")
        return mod


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float16/bfloat16 widen to float32."""
    return dtype if dtype in _NUMPY_NATIVE else torch.float32


def is_int(v) -> bool:
    """What torch's argument parser takes as an int: Python / NumPy ints and integer 0-d
    tensors; not bool, float or str."""
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer, torch.SymInt)):
        return True
    return (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and not v.is_complex()
            and v.dtype != torch.bool)


def refuse_wrapping_count(op: str, n: int, window: tuple, what: str, takers: str) -> None:
    """Refuse (KernelInputError), for a Triton launch, a count ``n`` inside ``window`` = (lo, hi):
    a length a kernel walks with a 32-bit counter, stepping by up to a tile, which wraps past
    2^31 - 1 when ``n`` is within a tile of it (an int32 argument; from 2^31 the argument is int64
    and the loop works). ``what``: the count as the message names it; ``takers``: the backends
    that take it instead."""
    lo, hi = window
    if lo <= n < hi:
        raise KernelInputError(f"{op}: {what} would wrap the Triton kernels' 32-bit loop over it (counts in "
                               f"[{lo}, {hi}) are refused there); the {takers} backend takes it")


def require(ok, message) -> None:
    """``KernelInputError(message())`` unless the size condition ``ok`` holds. Plain ints give a
    bool; torch.compile's symbolic sizes a SymBool, decided (with a guard) where the sizes have
    hints, and otherwise, an unbacked size (``mark_unbacked``, a data-dependent one), left to a
    runtime assertion of the traced program (``torch._check``, without our words: Dynamo takes no
    message that reads a variable, and torch 2.11's none from outside the compiled region), as
    torch's own checks are, since no guard can be had there (an audit: such a conv or cross
    entropy failed to compile)."""
    if ok is True:  # the usual answer, at once (a SymBool is never the object True)
        return
    if isinstance(ok, torch.Tensor):  # under torch.jit.trace a size is a 0-d tensor: its value
        ok = bool(ok)
    if type(ok) is bool and not torch.compiler.is_compiling():  # (dynamo shows a SymBool as a bool)
        if ok:
            return
        raise KernelInputError(message())
    if not _guard_or(True)(ok):
        raise KernelInputError(message())
    torch._check(ok)


def all_of(conds):
    """The conjunction of size conditions without asking any of them for a Python bool: plain
    bools give a bool, SymBools (torch.compile) a SymBool for :func:`require`; a 0-d tensor
    (a size under torch.jit.trace) is read as its value first (a traced ``&`` of a tensor and a
    bool is an op TorchScript lacks)."""
    out = True
    for c in conds:
        out = out & (bool(c) if isinstance(c, torch.Tensor) else c)
    return out


def any_of(conds):
    """The disjunction, as :func:`all_of`."""
    out = False
    for c in conds:
        out = out | (bool(c) if isinstance(c, torch.Tensor) else c)
    return out


def _guard_or(default: bool):
    """torch's ``guard_or_true`` / ``guard_or_false`` (a size condition decided with a guard where
    it can be, else ``default``); before torch 2.8, which lacks them, ``bool`` (a guard: an
    unbacked size fails to compile there, as it did)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true
    except ImportError:  # pragma: no cover - torch < 2.8
        return bool
    return guard_or_true if default else guard_or_false


def maybe_empty(t) -> bool:
    """Whether ``t`` has no element, as a bool: False where an unbacked symbolic size leaves it
    open (the caller then takes the path of a tensor with elements, which is right for one)."""
    n = t.numel()
    if type(n) is int and not torch.compiler.is_compiling():
        return n == 0
    return _guard_or(False)(n == 0)


def check_tensor(op: str, name: str, t, position: int | None = None) -> None:
    """torch's argument-parser TypeError where ``t`` is not a tensor ("relu(): argument 'input'
    (position 1) must be Tensor, not numpy.ndarray")."""
    if not isinstance(t, torch.Tensor):
        pos = f" (position {position})" if position else ""
        raise KernelInputTypeError(f"{op}(): argument '{name}'{pos} must be Tensor, not {type_name(t)}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.dtype not in FLOAT_DTYPES:
        raise KernelInputError(not_float_message(op, name, t.dtype))


def not_float_message(op: str, name: str, dtype: torch.dtype) -> str:
    """Our refusal of a dtype the kernels do not take (a float8 one is floating-point too)."""
    return f"{op}: expected {name} to be a floating-point tensor (float16, bfloat16, float32 or float64), but got {dtype}"


def check_float_like_torch(op: str, name: str, t: torch.Tensor, theirs) -> None:
    """:func:`check_float` for a public function, where torch's verdict decides the error: for a
    dtype our kernels do not take (integers, bool, complex, float8), ``theirs()`` -- torch's own function
    on the caller's arguments -- is asked, and where torch refuses the dtype too its error is
    raised with its type and words ("\"max_pool2d\" not implemented for 'Bool'", a
    NotImplementedError; they name its kernels, which differ by device and dim); where torch
    computes it, ours (a KernelInputError). Only bad input pays for the question."""
    if t.dtype in FLOAT_DTYPES:
        return
    try:
        with torch.no_grad():
            theirs()
    except NotImplementedError as exc:
        raise KernelInputNotImplementedError(str(exc)) from None
    except TypeError as exc:
        raise KernelInputTypeError(str(exc)) from None
    except IndexError as exc:
        raise KernelInputIndexError(str(exc)) from None
    except (RuntimeError, ValueError) as exc:
        raise KernelInputError(str(exc)) from None
    raise KernelInputError(not_float_message(op, name, t.dtype))


def check_same_device(first: torch.Tensor, *others) -> None:
    """torch's refusal of tensors on two devices, in its words (None entries skipped): also an
    op's own check, where a kernel handed another device's pointer would fault."""
    for t in others:
        if t is not None and t.device != first.device:
            raise KernelInputError(
                f"Expected all tensors to be on the same device, but found at least two devices, {first.device} and {t.device}!")


def check_same(op: str, input: torch.Tensor, other: torch.Tensor | None, other_name: str) -> None:
    """dtype and device of ``other`` must match ``input`` (torch's wording)."""
    if other is None:
        return
    if other.device != input.device:
        raise KernelInputError(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"{input.device} and {other.device}! ({op}: input and {other_name})"
        )
    if other.dtype != input.dtype:
        raise KernelInputError(
            f"Input type ({input.dtype}) and {other_name} type ({other.dtype}) should be the same ({op})"
        )


def empty(shape, *, dtype: torch.dtype, device, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Allocate a kernel output (``memory_format``: torch's, contiguous by default).

    With ``GPU_NN_POISON=1`` (the test suite sets it) the buffer is filled with NaN, so an
    element that a kernel forgets to write shows up as NaN instead of as stale memory that
    happens to be right.
    """
    if shape and memory_format is torch.contiguous_format:
        # the sizes as separate arguments: torch's parser takes that overload in about half the
        # time of a size tuple (1.1 against 2.2 us a call on the CPU machine; an allocation is
        # 6.3 us of host time on the H200's host), a 0-d shape needs the tuple
        return _poisoned(torch.empty(*shape, dtype=dtype, device=device))
    return _poisoned(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`empty` laid out as ``torch.empty_like(t)`` (torch's preserve_format: ``t``'s own
    strides where ``t`` is dense, e.g. channels_last; else dense in ``t``'s stride order), the
    layout torch's elementwise ops give their result."""
    return _poisoned(torch.empty_like(t, dtype=dtype))


def float64_in_float32(fn, *args):
    """``fn(*args)`` with every float64 tensor of ``args`` given as float32 and every tensor it
    returns (one, or a tuple) made float64 again: a GPU backend requested by name runs float64
    in float32 (README; ``auto`` sends float64 to the reference), for the ops whose kernels take
    float32 / float16 / bfloat16 only (the matmul and convolution kernels). Memory formats kept."""
    def f32(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype is torch.float64 else a

    out = fn(*(f32(a) for a in args))
    if isinstance(out, tuple):
        return tuple(o.double() for o in out)
    return out.double()


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    """``out``, NaN-filled under ``GPU_NN_POISON=1`` where it is floating point (see :func:`empty`)."""
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def dense_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` ([N, C, *S]) is a dense NHWC / NLC tensor and not also a contiguous one: the
    layout torch keeps for convolution and pooling results (and their input gradients)."""
    return not t.is_contiguous() and t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def suggests_channels_last(t: torch.Tensor) -> bool:
    """torch's ``suggest_memory_format(t) == channels_last`` for a 4-d strided tensor (c10's
    is_channels_last_strides_2d): strides non-decreasing in the order C, W, H, N, each at least
    the extent of the previous one, ambiguous cases (zero C stride, N111-like) NCHW: the layout
    torch's convolutions and poolings give their results and input gradients. Inline here:
    torch._prims_common's version costs ~45 us a call, this ~2 us."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    lo = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lo:
            return False
        if d == 0 and lo == strides[1]:
            return False
        lo = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) are dense with the same strides (dims of size 1
    aside), so that element i of one's memory block is element i of the other's: an elementwise
    kernel may then run over both as flat arrays, whatever the dim order (channels_last too)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    expected = 1
    for size, sa, sb in sorted((z for z in zip(a.shape, a.stride(), b.stride()) if z[0] != 1), key=lambda z: z[1]):
        if sa != expected or sb != expected:
            return False
        expected *= size
    return True


# whether any autocast region is active, on any device: one C call, cheaper than finding the
# first tensor's device and asking about it (torch >= 2.4); not used while dynamo traces, which
# knows torch.is_autocast_enabled but need not know this binding
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(device_type: str) -> bool:
    """Whether an autocast region is open for ``device_type``: torch's autocast knows cpu and
    cuda here, and raises ("unknown device type for autocast") for another (meta)."""
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


def autocast_inputs(policy: str, *tensors, cpu: str | None = None, state=None):
    """Apply torch's autocast rule to an op's inputs, as torch's own ops get it.

    ``policy="lower"`` (conv, linear, recurrent layers): floating inputs run in the autocast
    dtype; ``policy="fp32"`` (softmax, log_softmax, cross_entropy): they run in float32.
    ``cpu``, where torch's CPU autocast treats the op otherwise than its CUDA autocast (its
    lists differ), is the policy in a CPU region: ``"none"`` (softmax, log_softmax: not in
    them, so they run in the input's dtype) or ``"promote"`` (GRU, LSTMCell, GRUCell: not
    autocast themselves, but their inner matmuls are, so torch's result comes out in the
    autocast dtype promoted with the dtype of the state the cell's arithmetic combines the
    gates with: ``state``, the GRU's h or the LSTM's c where the caller has one, else the
    input's, whose dtype the caller's zeros take; float32 for a float32 state). Outside an
    autocast region the inputs come back unchanged.
    """
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return tensors  # the usual case: no region at all (traced, torch's own query is kept)
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    dev = first.device.type
    if not autocast_on(dev):
        return tensors
    if dev == "cpu" and cpu is not None:
        policy = cpu
    if policy == "none":
        return tensors
    if policy == "fp32":
        dtype = torch.float32
    else:
        dtype = torch.get_autocast_dtype(dev)
        base = state if isinstance(state, torch.Tensor) and state.is_floating_point() else first
        if policy == "promote" and base.is_floating_point() and first.dtype != torch.float64:
            # (a float64 input is not cast, and torch's inner matmuls cast the float32 weights to
            # the autocast dtype: a mismatch torch refuses, and so does the op after this cast)
            dtype = torch.promote_types(dtype, base.dtype)
    # float64 is never cast (torch's autocast leaves double tensors alone, for every policy)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
        and t.dtype != torch.float64 else t
        for t in tensors
    )


# ----------------------------------------------------------------------------- eager route

EAGER = env_switch("GPU_NN_EAGER") is not False  # 0: every call through the custom op (tests compare)

try:  # what torch's own custom ops use for list[Tensor] arguments (torch >= 2.4)
    from torch._library.autograd import supports_tensorlist as _supports_tensorlist
except ImportError:  # pragma: no cover - older torch: such ops keep the custom-op route
    _supports_tensorlist = None


def _tensor_seq(a):
    """For an argument or result: its length when it is a list or tuple of tensors only (an
    empty list too: torch's pytree spreads it), None when it holds no tensor (a leaf, passed
    as it is), False when it mixes tensors with other things (only the pytree route takes it)."""
    if type(a) is not list and type(a) is not tuple:
        return None
    n = sum(isinstance(e, torch.Tensor) for e in a)
    if n == len(a) and (n or type(a) is list):
        return n
    return False if n else None


def _flatten(items):
    """(flat tuple, spec) of ``items``: each a leaf (spec None) or a list / tuple of tensors
    spread (spec ``(type, n)``); None where something mixes tensors with other things."""
    flat, spec = [], []
    for a in items:
        n = _tensor_seq(a)
        if n is False:
            return None, None
        if n is None:
            flat.append(a)
            spec.append(None)
        else:
            flat.extend(a)
            spec.append((type(a), n))
    return flat, tuple(spec)


def _unflatten(flat, spec):
    out, i = [], 0
    for s in spec:
        if s is None:
            out.append(flat[i])
            i += 1
        else:
            kind, n = s
            out.append(kind(flat[i:i + n]))
            i += n
    return out


def wanted(ctx, needs=None) -> tuple:
    """``ctx.needs_input_grad`` narrowed to the inputs the running backward will use. A Function's
    ``needs_input_grad`` is fixed at the forward, so ``backward(inputs=[w])`` or
    ``autograd.grad(loss, [w])`` through an input that requires grad had its gradient computed for
    nobody (conv and linear: a whole input-gradient kernel; torch's own nodes ask the engine per
    call, as this does). An input whose node the engine will not run is not wanted; where the
    engine cannot say (a leaf under ``autograd.grad``, no engine running, a compiled backward),
    ``needs_input_grad`` stands, as it does for an op whose arguments include tensor lists (its
    entries there are lists: no edge lines up).

    The engine answers a question about a leaf that ``autograd.grad`` asked for with an exception
    (13 us here): an op whose inputs are all leaves is not asked about (one op on its parameters
    and a leaf input: ``autograd.grad`` of it asks for all of them, as the overhead bench does),
    and once a leaf's question raised, no other leaf is asked about in that backward.

    ``needs``: the inputs' flags flat, in place of ``ctx.needs_input_grad`` (an op with tensor-list
    arguments, whose entries for a list are a list: flattened, they line up with the edges)."""
    needs = ctx.needs_input_grad if needs is None else needs
    fns = getattr(ctx, "next_functions", None)
    if fns is None or _will_execute is None or _is_compiling():
        return needs
    # the edges of the inputs that require grad, in order (next_functions lists the tensor
    # inputs only, None for those that do not require grad)
    live = [fn for fn, _ in fns if fn is not None]
    if len(live) != needs.count(True):
        return needs
    leaves = [type(fn) is _LEAF for fn in live]
    if all(leaves):
        return needs
    out = list(needs)
    task = _task_id()
    i = 0
    for k, need in enumerate(needs):
        if need:
            fn, leaf = live[i], leaves[i]
            i += 1
            if leaf and _RAISED[0] == task:
                continue
            try:
                out[k] = _will_execute(fn)
            except (RuntimeError, TypeError):  # (a leaf autograd.grad asked for; no backward running)
                _RAISED[0] = task
    return out


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # (private: absent, needs_input_grad)
_task_id = torch._C._current_graph_task_id
_LEAF = torch._C._functions.AccumulateGrad
_RAISED = [None]  # the backward (graph task id) in which a leaf's question raised
_is_compiling = torch.compiler.is_compiling


class _NeedsView:
    """What a spread Function's backward gets for ``ctx``: the ctx itself for everything but
    ``needs_input_grad``, which is the unspread one. The ctx is never changed: several threads
    may run backward over one graph at once (``retain_graph=True``, as torch allows), and a
    ctx whose ``needs_input_grad`` one backward swapped and put back was read half-swapped by
    the other (IndexError, and a graph left broken when the wrong value went back last).

    A plain instance dictionary, not ``__slots__``: compiled autograd traces this backward with
    Dynamo, which did not find the slot and asked ``__getattr__`` for ``_ctx``, which asked for
    ``_ctx`` again (RecursionError); ``_ctx`` itself is never forwarded."""

    def __init__(self, ctx, needs):
        self._ctx, self.needs_input_grad = ctx, needs

    def __getattr__(self, name):
        if name == "_ctx":
            raise AttributeError(name)
        return getattr(self._ctx, name)


class _ListMeta:
    """How a call's list arguments and results were spread one level deep into a Function's own
    inputs and outputs (the spread inputs end with this object): :meth:`inputs` and
    :meth:`spread_result` on the Function's side, :meth:`gathered` on the caller's."""

    __slots__ = ("input_spec", "output_spec", "is_tuple")

    def __init__(self, input_spec):
        self.input_spec, self.output_spec, self.is_tuple = input_spec, None, None

    def inputs(self, flat) -> list:
        """The op's arguments from the spread inputs (this object last among them)."""
        return _unflatten(flat[:-1], self.input_spec)

    def spread_result(self, result) -> tuple:
        """The op's result spread into the Function's outputs, its structure noted here."""
        self.is_tuple = type(result) is tuple
        flat, self.output_spec = _flatten(result if self.is_tuple else (result,))
        if flat is None:
            raise RuntimeError("gpu_nn: a custom op returned a list mixing tensors with other values")
        return tuple(flat)

    def gathered(self, flat):
        """The Function's outputs back in the op's result structure."""
        result = _unflatten(flat, self.output_spec)
        return tuple(result) if self.is_tuple else result[0]


def _spread_backward(ctx, grads, orig_backward):
    """The backward of a Function whose list arguments and results were spread (``ctx._gn_meta``
    the spread's :class:`_ListMeta`): ``orig_backward`` (the op's own) on the unspread gradients
    and a view of ``ctx`` with the unspread ``needs_input_grad``; its gradients spread back, with
    None for the spec argument."""
    meta = ctx._gn_meta
    grads = _unflatten(grads, meta.output_spec)
    needs = tuple(_unflatten(ctx.needs_input_grad[:-1], meta.input_spec))
    grad_inputs = orig_backward(_NeedsView(ctx, needs), *grads)
    if type(grad_inputs) is not tuple:
        grad_inputs = (grad_inputs,)
    if len(grad_inputs) != len(meta.input_spec):
        raise RuntimeError("Expected the return from backward to be of the same structure as the inputs")
    flat = []
    for g, s in zip(grad_inputs, meta.input_spec):
        if s is None:
            flat.append(g)
        elif g is None:
            flat.extend([None] * s[1])
        elif type(g) in (list, tuple) and len(g) == s[1]:
            flat.extend(g)
        else:
            raise RuntimeError(f"Expected the return from backward to be of the same structure as the inputs: "
                               f"a list of {s[1]} gradients, got {type(g).__name__}")
    return (*flat, None)


def _lean_tensorlist(cls, fallback):
    """``torch._library.autograd.supports_tensorlist`` for our ops' argument shapes, without
    its pytree walks (a fwd+bwd with a 16-tensor list: 250-307 -> 168-176 us of host time on a
    2-core CPU): list[Tensor]
    arguments and results are spread into the Function's own inputs and outputs one level
    deep, as the pytree route does for these shapes; a call whose arguments mix tensors with
    other things in one list or tuple takes ``fallback`` (torch's own wrapper of the same
    Function). tests/test_hotpath.py compares both with the custom op."""
    orig_forward, orig_backward, orig_apply = cls.forward, cls.backward, cls.apply

    def forward(ctx, *args):
        meta = ctx._gn_meta = args[-1]
        return meta.spread_result(orig_forward(ctx, *meta.inputs(args)))

    def backward(ctx, *grads):
        return _spread_backward(ctx, grads, orig_backward)

    def apply(*args):
        flat, spec = _flatten(args)
        if flat is None:
            return fallback.apply(*args)
        meta = _ListMeta(spec)
        return meta.gathered(orig_apply(*flat, meta))

    cls.forward = staticmethod(forward)
    cls.backward = staticmethod(backward)
    cls.apply = staticmethod(apply)
    return cls


_C = torch._C
_PLAIN = (torch.Tensor, torch.nn.Parameter)


_SCALARS = (int, float, bool, str, type(None))
_SETTLED = frozenset((*_PLAIN, *_SCALARS))  # one hashed look-up per argument, not two tuple scans


def _plain(args) -> bool:
    """No tensor subclass (fake, functional, DTensor, ...) among the arguments. Plain tensors
    and Python scalars are settled by their exact type, without an isinstance chain: this runs
    on every eager call, and an op's argument lists are mostly ints."""
    for a in args:
        t = type(a)
        if t in _SETTLED:
            continue
        if t is list or t is tuple:  # int lists (kernel sizes, strides): no call per list
            for e in a:
                if type(e) in _SETTLED:
                    continue
                if isinstance(e, torch.Tensor) or (isinstance(e, (list, tuple)) and not _plain(e)):
                    return False
            continue
        if isinstance(a, torch.Tensor):
            return False
        if isinstance(a, (list, tuple)) and not _plain(a):
            return False
    return True


def _eager_ok(args) -> bool:
    """True when nothing but plain eager autograd would see the call: no jit trace, no
    dispatch or torch-function mode (fake tensors, functionalisation, op counters,
    set_default_device), no functorch transform, no tensor subclass."""
    return (
        _C._len_torch_dispatch_stack() == 0
        and not _C._is_torch_function_mode_enabled()
        and not _C._are_functorch_transforms_active()
        and _C._get_tracing_state() is None
        and _plain(args)
    )


def _any_tracked(args, kwargs) -> bool:
    """Whether a torch.func transform tracks a gradient through any tensor argument (the
    entries of a list argument included: a wrapped tensor that requires grad): a call with none
    (a layer before the part that is differentiated, its zero state made inside the transform)
    runs as the transform's other ops do, with no gradient of its own to give."""
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            # every level of wrapping (grad of grad: the outer level's tracking is under the inner's)
            while isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t):
                if t.requires_grad:
                    return True
                t = _functorch.get_unwrapped(t)
    return False


_SAVED = object()  # a jvp rule's input that was a tensor (saved for the forward pass)


class Routed:
    """A ``torch.library.custom_op`` with an eager route around its dispatcher machinery.

    The custom op stays the contract: ``torch.compile``, fake tensors, ``opcheck``, jit
    tracing, functorch and any dispatch mode get it unchanged. A plain eager call (every
    argument given positionally, see :func:`_eager_ok`) instead runs the op's own Python
    function directly when no gradient is wanted, and through a ``torch.autograd.Function``
    built from the *same* ``setup_context`` / ``backward`` pair when one is -- what torch's
    custom op builds internally, minus the dispatcher round trips (about half the host cost
    per call, shared/DESIGN.md section 6). ``tests/test_hotpath.py`` checks that both routes
    give the same values, gradients, errors and autograd graph for every op.

    Everything else (``register_fake``, ``_opoverload``, ...) is the custom op's own;
    ``register_autograd`` also records the pair for the eager route, both wrapped by
    :func:`gpu_nn._backend.autograd_pair` so that a backward runs on the backend its forward
    ran on, in whatever thread autograd runs it.
    """

    def __init__(self, op):
        self._op = op
        self._overload = op._opoverload
        # the eager route checks the device inline (__call__); on_device's wrapper, which the
        # custom op's own kernel keeps, is one more Python frame (a third of a microsecond)
        self._impl = getattr(op._init_fn, "__wrapped__", op._init_fn)
        schema = self._overload._schema
        self._nargs = len(schema.arguments)
        self._tensorlist = any(isinstance(a.type, torch.ListType) and "Tensor" in str(a.type) for a in schema.arguments)
        self._function = None
        self._c_apply = None
        self._func_function = self._func_spread = None
        self._pair = None
        self._jvp = None
        self._fold = None
        self.__doc__ = getattr(op, "__doc__", None)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_op", "_overload", "_impl", "_function", "_c_apply", "_func_function",
                                             "_func_spread", "_pair", "_jvp", "_fold"):
            raise AttributeError(name)  # copy/pickle probe instances before __init__: no recursion
        return getattr(self._op, name)

    def register_jvp(self, jvp):
        """Forward-mode AD for this op (torch.autograd.forward_ad dual tensors, torch.func.jvp /
        jacfwd / hessian): ``jvp(inputs, outputs, tangents)`` gives the tangent of each output
        (``outputs`` a tuple, the tangents a tuple of the same length, None for a zero one),
        ``tangents`` one per input, None where an input has none. A call with a tangent runs
        through :meth:`_functorch_function` (the op's backward pair, a loop for vmap, and this),
        on both the dual-tensor and the torch.func route; the op itself stays without a forward
        formula of its own (torch's custom ops take none). Ops without one refuse tangents."""
        self._jvp = jvp
        self._func_function = None

    def register_vmap_fold(self, fold):
        """A vmap rule that runs the whole batch in one call where the op allows it (an
        elementwise op; a linear whose weight is not batched: the batch folds into its rows):
        ``fold(apply, in_dims, args)`` returns ``(out, out_dims)``, calling ``apply`` (the op's
        torch.func Function) once, or None for the loop over the batch (the default rule)."""
        self._fold = fold
        self._func_function = None

    def _takes_tangents(self, args, kwargs) -> bool:
        """Whether a call with tangents runs through the op's jvp rule (it has one, and the
        call is positional, as the torch.func Function takes it)."""
        return self._jvp is not None and not kwargs and len(args) == self._nargs and self._pair is not None

    def register_autograd(self, backward, /, *, setup_context=None):
        setup, bwd = _backend.autograd_pair(setup_context or (lambda ctx, inputs, output: None), backward)
        self._op.register_autograd(bwd, setup_context=setup)
        self._pair = (setup, bwd)
        self._func_function = self._func_spread = None
        impl = self._impl

        def forward(ctx, *args):
            # what torch's generated Function for a custom op does: setup_context inside forward
            try:
                out = impl(*args)
            except (NotImplementedError, RuntimeError):
                if not _any_legacy_batched(args):
                    raise
                # legacy-batched inputs that require grad: a vectorized jacobian taken with
                # create_graph (of another, or hessian(create_graph=True, vectorize=True)). Run
                # through the batched fallback here its results came out wrong (a nested
                # jacobian of a GRU off by 0.09, of conv2d by 10): refused instead
                raise NotImplementedError(
                    f"{self._op._name}: batched gradients with create_graph=True (a vectorized jacobian "
                    "of a vectorized jacobian, hessian(create_graph=True, vectorize=True)) through gpu-nn's "
                    "ops are not supported; use vectorize=False for the outer one, or torch.func") from None
            setup(ctx, args, out)
            return out

        def make():
            return type(f"Eager_{self._op._name}", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(bwd),
            })

        fn = make()
        if self._tensorlist:
            fn = _lean_tensorlist(fn, _supports_tensorlist(make())) if _supports_tensorlist is not None else None
            # vmap without grad (torch.func's route below takes no tensor list): the custom op's
            # own batching rule, the same loop over the batch
            overload = self._overload
            self._op.register_vmap(lambda info, in_dims, *args: _looped(overload, info.batch_size, in_dims, args))
        self._function = fn
        # the eager route's apply: autograd.Function's C apply itself. torch's Python classmethod
        # around it binds default arguments for a Function with setup_context (ours has none),
        # routes functorch transforms (_eager_ok has ruled them out) and unwraps tensors a finished
        # transform left wrapped ("dead wrappers", done here for the tensor arguments): about 1.5
        # of 10.5 us a forward on the CPU machine. Tensor-list ops keep their wrapper's apply.
        self._c_apply = None if fn is None or self._tensorlist else super(torch.autograd.Function, fn).apply

    def __call__(self, *args, **kwargs):
        try:
            # a forward-AD dual level is open (one module global read otherwise); under a torch.func
            # transform (jvp opens a dual level too) the interpreter check below decides instead:
            # unpack_dual has no batching rule, so it cannot look at a vmap-wrapped tensor
            if _fwad._current_level >= 0 and not _C._are_functorch_transforms_active():
                if not self._takes_tangents(args, kwargs):
                    _refuse_tangents(self._overload._schema.name, args, kwargs, _has_tangent)
                elif any(isinstance(a, torch.Tensor) and _has_tangent(a) for a in args):
                    return self._functorch_function().apply(*args)
            if torch.compiler.is_compiling() or kwargs or len(args) != self._nargs or not EAGER or not _eager_ok(args):
                if _C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
                    keys = _transform_kinds()  # (not compiling: the whole stack)
                    jvp_ok = self._takes_tangents(args, kwargs)
                    if _JVP in keys and not (jvp_ok and keys.count(_JVP) == 1):
                        # (two jvp levels: an autograd.Function's jvp rule reads its saved tensors without
                        # the outer level's tangent, so jvp of jvp / jacfwd of jacfwd come out wrong,
                        # torch's own Functions alike: refused)
                        _refuse_tangents(self._overload._schema.name, args, kwargs, _functorch.is_functorch_wrapped_tensor,
                                         nested=jvp_ok)
                    elif (_GRAD in keys or _VMAP in keys or _JVP in keys) and _FUNCTIONALIZE not in keys:
                        if self._tensorlist:
                            if _GRAD in keys and _any_tracked(args, kwargs):
                                # autograd.Function tracks no tensor inside a list argument (the
                                # weights): the lists spread into its own inputs
                                if not kwargs and len(args) == self._nargs and self._pair is not None:
                                    return self._functorch_list_apply(args)
                                raise NotImplementedError(
                                    f"{self._overload._schema.name}: under torch.func's grad / vjp / jacrev an op with "
                                    "list arguments is called with its arguments positionally (as gpu-nn's functions "
                                    "and modules call it)")
                        elif not kwargs and len(args) == self._nargs and self._pair is not None:
                            return self._functorch_function().apply(*args)
                elif _fwad._current_level >= 0 and _C._are_functorch_transforms_active():
                    # torch.compile of a forward-mode transform (a dual level open under a transform
                    # while tracing): traced, the custom op would get zero tangents without a word (it
                    # has no forward formula of its own); outside the compiler its jvp rule runs
                    # (dynamo falls back to eager for the transform; jacfwd / hessian it refuses)
                    return _outside_compiler()(self, args, kwargs)
                return self._overload(*args, **kwargs)
            t = args[0]
            if isinstance(t, torch.Tensor) and not t.is_cpu:
                if t.is_meta:  # shapes only (a model built on device="meta"): the op's fake kernel
                    return self._overload(*args)
                if t.is_cuda and t.get_device() != _get_device():  # on_device's guard
                    with torch.cuda.device(t.get_device()):
                        return self._eager(args)
            return self._eager(args)
        except KernelInputError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            # (the error path only: nothing on the hot path) a tensor our kernels cannot read
            # failed somewhere below with NumPy's, the dispatcher's or a subclass's words
            _refuse_layouts(self._overload._schema.name, args, exc)
            raise

    def _functorch_list_apply(self, args):
        """:meth:`_functorch_function` for an op with list arguments (the recurrent sequence
        ops' weights): each list spread into the Function's own inputs, as the eager route's
        :func:`_lean_tensorlist` spreads them, so that torch.func tracks every weight; the
        results gathered back into the op's structure."""
        flat, spec = _flatten(args)
        if flat is None:
            raise NotImplementedError(f"{self._overload._schema.name}: a list argument mixing tensors with other "
                                      "values under torch.func's grad")
        meta = _ListMeta(spec)
        return meta.gathered((self._func_spread or self._spread_functorch_function(*self._pair)).apply(*flat, meta))

    def _functorch_function(self):
        """The op as an ``autograd.Function`` that torch.func's reverse-mode transforms (grad,
        vjp, jacrev, and vmap over them: per-sample gradients) accept, which the custom op's own
        generated Function is not (its setup_context runs inside forward): the same
        ``setup_context`` / ``backward`` pair, a separate ``setup_context``, and a ``vmap`` rule
        that runs the op once per batch element (our kernels take no batch dimension of vmap's)."""
        fn = self._func_function
        if fn is not None:
            return fn
        setup, bwd = self._pair
        # the custom op itself, not its Python function: a dispatch mode or tracer under the
        # transform (make_fx, FakeTensorMode, FlopCounterMode) sees the op and its arguments
        # (the function would read fake or traced tensors as constants); on_device's guard is
        # the custom op's kernel's
        overload = self._overload

        fold = self._fold

        def vmap(info, in_dims, *args):
            if fold is not None and info.batch_size:
                done = fold(cls.apply, in_dims, args)
                if done is not None:
                    return done
            return _looped(cls.apply, info.batch_size, in_dims, args, overload)

        body = {
            "forward": staticmethod(lambda *args: overload(*args)),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(bwd),
            "vmap": staticmethod(vmap),
        }
        jvp_rule = self._jvp
        if jvp_rule is not None:
            def setup_fwd(ctx, inputs, output):
                setup(ctx, inputs, output)
                # what the jvp rule reads: the inputs (their tensors saved for the forward pass,
                # the rest kept as they are) and the outputs
                outs = output if isinstance(output, tuple) else (output,)
                # outputs the setup marked non-differentiable (cross_entropy's statistics) take no
                # tangent, not even a zero one
                nd = {id(t) for t in getattr(ctx, "non_differentiable", None) or ()}
                ctx._gn_jvp = (tuple(_SAVED if isinstance(a, torch.Tensor) else a for a in inputs),
                               isinstance(output, tuple), len(outs), tuple(id(o) in nd for o in outs))
                ctx.save_for_forward(*(a for a in inputs if isinstance(a, torch.Tensor)), *outs)

            def jvp(ctx, *tangents):
                if any(isinstance(t, torch.Tensor) and _functorch.is_legacy_batchedtensor(t) for t in tangents):
                    # torch.autograd.functional's vectorized forward-mode jacobian (its legacy vmap)
                    raise NotImplementedError(
                        f"{self._op._name}: torch.autograd.functional's forward-mode strategy with vectorize=True "
                        "(jacobian(strategy='forward-mode'), hessian(outer_jacobian_strategy='forward-mode')) is not "
                        "supported by gpu-nn's ops; use torch.func.jacfwd / torch.func.hessian, or the reverse-mode "
                        "strategy")
                kept, is_tuple, n_out, plain = ctx._gn_jvp
                saved = list(ctx.saved_tensors)
                outs = tuple(saved[len(saved) - n_out:])
                it = iter(saved[:len(saved) - n_out])
                inputs = tuple(next(it) if k is _SAVED else k for k in kept)
                res = jvp_rule(inputs, outs, tangents)
                # a zero tangent (None from the rule) as a tensor: autograd.Function's jvp gives one per
                # output (none for an integer one: max pooling's indices)
                res = tuple(torch.zeros_like(o) if r is None and o.is_floating_point() and not p else r
                            for r, o, p in zip(res, outs, plain))
                return res if is_tuple else res[0]

            body["setup_context"] = staticmethod(setup_fwd)
            body["jvp"] = staticmethod(jvp)
        cls = type(f"Func_{self._op._name}", (torch.autograd.Function,), body)
        self._func_function = cls
        return cls

    def _spread_functorch_function(self, setup, bwd):
        """The transforms' Function of a list op, its lists spread (see
        :meth:`_functorch_list_apply`; the last input is the spread's :class:`_ListMeta`)."""
        overload = self._overload

        def forward(*flat):
            meta = flat[-1]
            return meta.spread_result(overload(*meta.inputs(flat)))

        def setup_context(ctx, inputs, output):
            meta = ctx._gn_meta = inputs[-1]
            setup(ctx, tuple(meta.inputs(inputs)), meta.gathered(output))

        def backward(ctx, *grads):
            return _spread_backward(ctx, grads, bwd)

        def vmap(info, in_dims, *args):  # (forward itself runs the op on meta tensors for an empty batch)
            return _looped(cls.apply, info.batch_size, in_dims, args, forward)

        cls = type(f"Func_{self._op._name}_spread", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward), "vmap": staticmethod(vmap)})
        self._func_spread = cls
        return cls

    def _eager(self, args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            if self._function is None:  # no formula (yet): the custom op says so at backward time
                return self._overload(*args)
            c_apply = self._c_apply
            if c_apply is None:
                return self._function.apply(*args)
            return c_apply(*_unwrapped(args))
        try:
            return self._impl(*args)
        except (NotImplementedError, RuntimeError) as exc:
            # checked only on these errors, the hot path pays nothing. A tensor a finished
            # torch.func transform left wrapped has no storage of its own ("Cannot access storage of
            # TensorWrapper", a NotImplementedError): unwrapped, as torch's ops and the custom op's
            # dispatch see it (a review audit)
            if isinstance(exc, NotImplementedError) and any(
                    type(a) in _PLAIN and _functorch.is_functorch_wrapped_tensor(a) for a in args):
                return self._impl(*_unwrapped(args))
            if not _any_legacy_batched(args):
                raise
            return self._legacy(args)

    def _legacy(self, args):
        """The op on tensors batched by torch's legacy vmap (autograd.grad(is_grads_batched=True),
        which autograd.functional's jacobian / hessian(vectorize=True) use), which have no storage
        for a kernel to read (the reference's NumPy view raises RuntimeError, Triton's launch
        NotImplementedError): the op's dispatcher entry, whose batched fallback runs it once per
        batch element; for an op with tensor lists, which that fallback refuses (the recurrent
        layers' weights), the same loop of ours."""
        if not self._tensorlist:
            return self._overload(*args)
        out = _legacy_looped(self, args)
        if out is None:
            raise NotImplementedError(
                f"{self._overload._schema.name}: nested batched gradients (autograd.grad(is_grads_batched=True) "
                "inside another) through gpu-nn's recurrent sequence layers are not supported; use "
                "vectorize=False, or torch.func.vmap") from None
        return out


def _unreadable(t) -> str | None:
    """What makes ``t`` a tensor no kernel of ours reads (None for a dense strided tensor): a
    sparse or other non-strided layout, a nested tensor (jagged or strided), a MaskedTensor."""
    if t.is_nested:
        return "a nested tensor"
    if t.layout is not torch.strided:
        return f"a {str(t.layout).replace('torch.', '')} tensor"
    if type(t).__name__ == "MaskedTensor":
        return "a MaskedTensor"
    return None


def _refuse_layouts(op: str, args, exc) -> None:
    """A KernelInputError naming the argument of ``args`` (lists searched too) that our kernels
    cannot take (:func:`_unreadable`), raised from ``exc``, the error it caused; nothing where
    none is such an argument."""
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                what = _unreadable(t)
                if what is not None:
                    raise KernelInputError(
                        f"{op}: gpu-nn's kernels take dense (strided) tensors, got {what}; torch's own "
                        "op takes it where torch has one for it (or convert it with .to_dense())") from exc


def _legacy_batched(t) -> bool:
    """Whether ``t`` is a tensor batched by torch's legacy vmap (``torch._vmap_internals``)."""
    return _functorch.is_legacy_batchedtensor(t)


def _any_legacy_batched(args) -> bool:
    """Whether a tensor of ``args``, or of a tensor list among them, is legacy-batched."""
    return _first_legacy_batched(args) is not None


class _Nested(Exception):
    pass


def _first_legacy_batched(args):
    """The first legacy-batched tensor of ``args`` (tensor lists searched too), or None."""
    for a in args:
        if isinstance(a, (list, tuple)):
            t = _first_legacy_batched(a)
            if t is not None:
                return t
        elif type(a) in _PLAIN and _legacy_batched(a):
            return a
    return None


def _legacy_level(args):
    """The legacy vmap level a batched tensor of ``args`` is batched at, read off the tensor: the
    one level whose removal leaves it unbatched (None if none does: batched at two levels). Not
    the thread's vmap nesting depth, which the autograd engine's device threads (a CUDA
    backward) do not carry: there it reads 0 while the tensors stay batched at level 1. Levels
    count from 1; removing another one than the tensor's leaves it batched (an expanded view)."""
    t = _first_legacy_batched(args)
    for level in range(1, 65):
        if not _legacy_batched(torch._remove_batch_dim(t, level, 1, 0)):
            return level
    return None


def _legacy_looped(op, args):
    """What torch's batched fallback does for an op without tensor lists, for one with them (the
    recurrent sequence ops, whose weights travel in a list): the tensors batched by the innermost
    legacy vmap (``autograd.grad(is_grads_batched=True)``: torch.autograd.functional's jacobian /
    hessian with ``vectorize=True``) taken apart along their batch dimension, the op called once per
    element (``op`` itself: differentiable, as hessian needs), each result stacked and batched
    again at that level. None where a tensor is batched at an outer level too (nested batching)."""
    level = _legacy_level(args)
    if level is None:
        return None
    sizes = set()

    def physical(a):
        if isinstance(a, (list, tuple)):
            return [physical(e) for e in a]
        if isinstance(a, torch.Tensor) and _legacy_batched(a):
            p = torch._remove_batch_dim(a, level, 1, 0)  # (batch size 1 only expands an unbatched one)
            if _legacy_batched(p):
                raise _Nested
            sizes.add(p.shape[0])
            return (p,)  # a batched one, marked
        return a

    def element(a, i):
        if isinstance(a, list):
            return [element(e, i) for e in a]
        return a[0][i] if isinstance(a, tuple) else a

    try:
        phys = [physical(a) for a in args]
    except _Nested:
        return None
    if len(sizes) != 1 or 0 in sizes:
        return None
    results = [op(*(element(a, i) for a in phys)) for i in range(sizes.pop())]

    def batched(rs):
        first = rs[0]
        if isinstance(first, (list, tuple)):
            return type(first)(batched([r[k] for r in rs]) for k in range(len(first)))
        if first is None:
            return None
        return torch._add_batch_dim(torch.stack(rs), 0, level)

    return batched(results)


def _unwrapped(args) -> list:
    """``args`` with each tensor that a finished torch.func transform left wrapped (a "dead
    wrapper") unwrapped, as torch's ``Function.apply`` does (tensor arguments are plain here:
    ``_eager_ok``)."""
    return [_unwrap_if_dead(a) if type(a) in _PLAIN else a for a in args]


def _looped(fn, batch_size, in_dims, args, overload=None):
    """A vmap rule: ``fn`` (the op) once per element of the batch, the results stacked along a
    new first dimension. ``in_dims`` follows ``args``: an int or None per argument, a list of
    them for a tensor-list argument. An empty batch runs no element: the results' per-element
    shapes and dtypes come from the op's fake kernel on meta tensors (``overload``: the op)."""
    def pick(a, d, i):
        if d is None:
            return a
        if isinstance(a, torch.Tensor):
            return a.select(d, i)
        return [pick(e, de, i) for e, de in zip(a, d)]

    def meta(a, d):
        if isinstance(a, (list, tuple)):
            return [meta(e, de) for e, de in zip(a, d if isinstance(d, (list, tuple)) else [d] * len(a))]
        if not isinstance(a, torch.Tensor):
            return a
        shape = list(a.shape)
        if d is not None:
            del shape[d]
        return torch.empty(shape, dtype=a.dtype, device="meta")

    if batch_size == 0:
        device = next(t.device for t in _tensors(args))
        outs = (overload or fn)(*(meta(a, d) for a, d in zip(args, in_dims)))
        tup = isinstance(outs, (tuple, list))
        stacked = [torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in (outs if tup else (outs,))]
        # the (empty) results depend on the inputs, as a computed result would: autograd reaches
        # them (a zero gradient of the inputs' shapes) where a gradient is wanted
        zero = exact_zero_of(_tensors(args))
        if zero is not None:
            stacked = [o + zero.to(o.dtype) if o.is_floating_point() else o for o in stacked]
    else:
        per = [fn(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(batch_size)]
        tup = isinstance(per[0], (tuple, list))
        stacked = [torch.stack([o[j] for o in per]) for j in range(len(per[0]))] if tup else [torch.stack(per)]
    if tup:
        return tuple(stacked), (0,) * len(stacked)
    return stacked[0], 0


def exact_zero_of(tensors):
    """A 0-d zero that depends on each tensor of ``tensors`` that wants a gradient, for a result to
    carry a graph to them with a zero derivative (as torch's own ops do where a result does not
    depend on an input's values), or None where grad mode is off or no tensor wants one. Each
    tensor's empty slice summed: an exact zero whatever the tensor holds (inf * 0 would be NaN)."""
    if not _C.is_grad_enabled():
        return None
    parts = [t.reshape(-1)[:0].sum() for t in tensors if t.requires_grad]
    return sum(parts[1:], parts[0]) if parts else None


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


_get_device = getattr(torch._C, "_cuda_getDevice", None)  # the current CUDA device, no lazy-init check
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_functorch = torch._C._functorch
_JVP = _functorch.TransformType.Jvp
_GRAD = _functorch.TransformType.Grad
_VMAP = _functorch.TransformType.Vmap
_FUNCTIONALIZE = _functorch.TransformType.Functionalize


def _has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dual tensor with a tangent at the open forward-AD level. A tensor
    batched by torch's legacy vmap (a jvp rule's tangent under torch.autograd.functional's
    vectorized forward-mode jacobian) is none: unpack_dual has no batching rule for it, and the
    op then takes its legacy-batched route."""
    if _functorch.is_legacy_batchedtensor(t):
        return False
    return _fwad.unpack_dual(t).tangent is not None


@functools.cache
def _outside_compiler():
    """``call(op, args, kwargs)`` under ``torch.compiler.disable``, made on first use (the
    decorator imports dynamo)."""
    return torch.compiler.disable(lambda op, args, kwargs: op(*args, **kwargs))


def tangents_in_play(tensors) -> bool:
    """Whether forward-mode AD reaches a call: a torch.func jvp transform is active (jvp,
    jacfwd, hessian), or a forward-AD dual level is open and one of ``tensors`` carries a
    tangent. For ops without a jvp rule of their own whose public function then runs a
    differentiable composition of ops that have one (the recurrent layers)."""
    if _C._are_functorch_transforms_active():
        # (a dual level open under a transform: vmap of a dual tensor, whose batched tensors
        # unpack_dual cannot look into; the composition is right either way)
        return _fwad._current_level >= 0 or _JVP in _transform_kinds()
    return _fwad._current_level >= 0 and any(isinstance(t, torch.Tensor) and _has_tangent(t) for t in tensors)


def _transform_kinds() -> tuple:
    """The kinds of the active torch.func transforms (``_VMAP``, ``_GRAD``, ``_JVP``), outermost
    first. Under torch.compile the innermost alone: Dynamo traces neither get_interpreter_stack()
    nor a C interpreter's key() (compile(vmap(...)) of a recurrent layer broke its graph, and
    failed with fullgraph=True), but it traces the innermost as pyfunctorch's interpreter."""
    if torch.compiler.is_compiling():
        from torch._functorch.pyfunctorch import coerce_cinterpreter

        return (coerce_cinterpreter(_functorch.peek_interpreter_stack()).key(),)
    return tuple(i.key() for i in _functorch.get_interpreter_stack())


def transform_active(key) -> bool:
    """Whether a torch.func transform of kind ``key`` (``_VMAP``, ``_GRAD``: grad / vjp / jacrev,
    ``_JVP``) is active (one C call where none is; under torch.compile, the innermost one's kind:
    :func:`_transform_kinds`)."""
    return _C._are_functorch_transforms_active() and key in _transform_kinds()


def vmap_active() -> bool:
    """Whether a torch.func vmap transform is active."""
    return transform_active(_VMAP)


def batched_first(t: torch.Tensor, d, like: torch.Tensor | None = None) -> torch.Tensor:
    """For a vmap fold rule: ``t`` with its batch dim ``d`` first, or (``d`` None: not batched)
    expanded to ``like``'s batch (``like`` has its batch dim first)."""
    if d is not None:
        return t.movedim(d, 0)
    return t.unsqueeze(0).expand(like.shape[0], *t.shape)


def merge_batch(t: torch.Tensor, d, like: torch.Tensor | None = None) -> torch.Tensor:
    """For a vmap fold rule: :func:`batched_first`'s tensor with the vmap batch merged into the
    tensor's own batch (first) dim, [B, N, ...] -> [B * N, ...]; :func:`split_batch` undoes it."""
    t = batched_first(t, d, like)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def split_batch(t: torch.Tensor, B: int) -> torch.Tensor:
    """A merged result's vmap batch split off again, [B * N, ...] -> [B, N, ...]."""
    return t.reshape(B, t.shape[0] // B, *t.shape[1:])


def add_terms(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two tangent terms of a jvp rule, either of which may be None (zero)."""
    return b if a is None else a if b is None else a + b


def jvp_linear_in_first(op):
    """The jvp rule of an op linear in its first argument alone (pooling, a pooling backward):
    the op again, on that argument's tangent."""
    def rule(inputs, outputs, tangents):
        return (None if tangents[0] is None else op(tangents[0], *inputs[1:]),)
    return rule


def carries_tangent(t: torch.Tensor) -> bool:
    """A dual tensor with a tangent (a forward-AD level open): one the in-place fast paths,
    which have no forward-mode rule, leave to the op."""
    return _fwad._current_level >= 0 and isinstance(t, torch.Tensor) and _has_tangent(t)


def _refuse_tangents(name: str, args, kwargs, carries, nested: bool = False) -> None:
    """Forward-mode AD where an op has no formula for it (register_jvp: linear, convolution,
    pooling, the activations, softmax / log_softmax and cross_entropy have one; torch's custom ops with
    register_autograd have none, and give zero or missing tangents without a word): raise where an
    argument carries a tangent (``carries``: a dual tensor of torch.autograd.forward_ad, or a
    tensor a torch.func transform wrapped while a jvp transform is active) rather than return a
    wrong derivative. Under jvp the test is conservative: a tensor only an inner vmap / grad
    wrapped (no tangent of its own) is refused too, an error where the answer might have been
    right. ``nested``: the op has a formula, but
    two jvp levels are active (forward over forward)."""
    for a in (*args, *kwargs.values()):
        for t in (a if type(a) in (list, tuple) else (a,)):
            if isinstance(t, torch.Tensor) and carries(t):
                if nested:
                    raise NotImplementedError(
                        f"{name}: forward-mode AD over forward-mode AD (torch.func.jvp of jvp, jacfwd of jacfwd) "
                        "is not supported by gpu-nn's ops (an autograd.Function's jvp rule loses the outer "
                        "tangent); torch.func.hessian, jacfwd(jacrev(...)) and jacrev(jacfwd(...)) work")
                raise NotImplementedError(
                    f"{name}: forward-mode AD (torch.autograd.forward_ad dual tensors, torch.func.jvp / jacfwd / "
                    "hessian) is not supported by this gpu-nn op, which has reverse-mode derivatives only "
                    "(torch.autograd.grad / backward); linear, convolution, pooling, relu / sigmoid / tanh, softmax / "
                    "log_softmax and cross_entropy have it, and the recurrent layers' public functions and modules "
                    "take it through a composition of those")


def on_device(fn):
    """Decorator, innermost under ``@torch.library.custom_op``: ``fn`` runs with the current CUDA
    device set to its first tensor argument's (every op's first argument is a tensor), as
    torch's own CUDA ops run under a device guard. Triton's launches (and our tuning's events)
    go to the *current* device and its stream, so a tensor on ``cuda:1`` with ``cuda:0``
    current would otherwise be handed to a kernel on the wrong device. Costs one attribute test
    for a CPU tensor, and a device comparison for a CUDA one; the block is entered only where
    the devices differ. The signature is ``fn``'s with its annotations evaluated (the custom op
    infers its schema from it, in ``fn``'s module, not this one)."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(t, torch.Tensor) and t.is_cuda:
            with _index_guard(t.get_device()):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    run.__signature__ = sig
    return run


_NO_GUARD = contextlib.nullcontext()


def _index_guard(index: int):
    """A block with CUDA device ``index`` current where another is, else a no-op block."""
    return torch.cuda.device(index) if index != _get_device() else _NO_GUARD


def device_guard(device):
    """:func:`on_device`'s guard for a ``torch.device`` (the optimizers and clipping, which are not
    custom ops): a CUDA device with an index made current, else a no-op block."""
    if device.type == "cuda" and device.index is not None:
        return _index_guard(device.index)
    return _NO_GUARD


# whether an argument (or a torch-function mode) asks for __torch_function__: torch's C test
has_torch_function = torch.overrides.has_torch_function_variadic


def torch_function(public, *args, **kwargs):
    """The call ``public(*args, **kwargs)`` of one of our public functions, given to an argument's
    ``__torch_function__`` as torch's own functional ops give theirs (``handle_torch_function``):
    torch.fx's Proxy, while ``torch.fx.symbolic_trace`` traces a model of our layers (our modules
    are not leaves of its tracer), records one call of the function instead of running its
    argument checks on a Proxy. Each public function starts with ``if has_torch_function(<its
    arguments>): return torch_function(<itself>, <its arguments>)``: one C test for plain tensors
    (a list argument, an LSTM state or weight list, is tested as a list: its first tensor argument
    decides)."""
    return torch.overrides.handle_torch_function(public, (*args, *kwargs.values()), *args, **kwargs)


def routed(op) -> Routed:
    """Decorator, outermost over ``@torch.library.custom_op``: see :class:`Routed`."""
    return Routed(op)


def plain_arg(v, strings: bool = False) -> bool:
    """An int (not bool, not an int-like object), a tuple of them, or (``strings``) a string: a
    value a memo key holds as it is, whose parse cannot depend on anything but its value."""
    if type(v) is int or (strings and type(v) is str):
        return True
    if type(v) is not tuple:
        return False
    for e in v:
        if type(e) is not int:
            return False
    return True


def torchs_own_error(call, fallback: str, fallback_type=KernelInputTypeError) -> KernelInputError:
    """The error ``call()`` (torch's own call on stand-ins: empty or expanded tensors) raises, as
    ours of the same type: TypeError, IndexError or another RuntimeError; a ``fallback_type`` of
    ``fallback`` where torch takes the arguments after all."""
    try:
        call()
    except TypeError as exc:
        return KernelInputTypeError(str(exc))
    except IndexError as exc:
        return KernelInputIndexError(str(exc))
    except RuntimeError as exc:
        return KernelInputError(str(exc))
    return fallback_type(fallback)


def stand_in(t):
    """A tensor of ``t``'s shape, dtype and device holding one element, expanded (None stays
    None): what torch's own op is given (:func:`torchs_own_error`) to say which error it raises
    for these arguments without computing anything of size (its verdict agreed with the real
    tensors' in every layout tried: contiguous, channels_last, strided, requiring a gradient)."""
    return None if t is None else torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
