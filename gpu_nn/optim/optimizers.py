"""``gpu_nn.optim.SGD``, ``Adagrad``, ``Adadelta``, ``RMSprop``, ``Adam``, ``AdamW``.

Subclasses of ``torch.optim.Optimizer`` with torch's constructor arguments, defaults,
validation messages, ``param_groups`` keys and state keys, so a ``state_dict()`` of ours loads
into torch's optimizer and torch's into ours, and learning-rate schedulers work unchanged.

What differs from torch:

* The step runs our kernels: the group's parameters are split by (device, dtype) and each
  part goes to the backend that ``gpu_nn._backend.resolve`` picks (CPU: the NumPy reference
  on views of the tensors, in place; CUDA: one multi-tensor Triton launch per part, or the
  CuPy kernels for Adam/AdamW/RMSprop).
* A step over the same tensors as the step before (the same parameters, gradients of the same
  layout wherever they lie, the same state tensors; see ``_Plan``) skips the
  per-parameter checks, state look-ups and launch-table builds and launches at once: the host
  cost of a training loop's step is a fixed, small part of the kernel's time.
* float16/bfloat16 parameters keep float32 optimizer state (torch keeps it in the parameter's
  dtype), through ``state_dict()`` / ``load_state_dict()`` too (torch's load would cast it to the
  parameter's dtype), so a resumed run goes on exactly as the uninterrupted one; a state loaded in
  another dtype (torch's optimizer's) is widened on the next step. A loaded state tensor of
  another shape than its parameter raises torch's error at the step.
* On CUDA, ``state["step"]`` lives on the parameter's device (as torch's fused/capturable
  path keeps it), so a step never synchronises with the host. A learning rate given as a
  1-element float32 tensor on the parameters' device is read by the kernels on the device when
  they run (triton and cupy backends; the triton backend under the interpreter on the CPU too),
  as torch's capturable / fused optimizers read it: no host read, capturable into a CUDA graph,
  and a scheduler that changes the tensor in place (``lr.fill_``) changes the next step and
  every replay. Any other tensor lr (another dtype or device, or the reference backend) is read
  on the host at every step (a CUDA tensor synchronises); inside a CUDA graph capture such a
  tensor raises ``KernelInputError``. A float lr is captured as torch captures one (replays
  use that value). Adam's / AdamW's betas given as tensors stay tensors in ``param_groups`` (as
  torch keeps them) and are read on the host at every step (a change in place takes effect);
  inside a capture they raise ``KernelInputError``.
* ``foreach``, ``fused`` and ``capturable`` are accepted and stored (our step is always one
  fused multi-tensor kernel per part); ``differentiable=True`` raises ValueError. Sparse
  gradients raise RuntimeError; complex parameters are not supported.
* Integer and bool parameters raise the error torch's step raises first (RuntimeError or
  NotImplementedError, torch's message), before any state is created; integer learning rates,
  with which torch's SGD would step an integer parameter, are not supported. A gradient of another shape or dtype than its parameter (set
  through ``.data``) raises where torch raises, with torch's message; where torch broadcasts
  or promotes it, it is broadcast to the parameter's shape and rounded to its dtype first
  (torch computes such a step in the promoted dtype and keeps SGD's momentum buffer in the
  gradient's shape and dtype).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _backend
from .._errors import (KernelInputError, KernelInputTypeError, cpp_type_name, refuse_in_place_write,
                       refuse_inference_write, scalar_type_name, type_name)
from . import _dispatch
from ._triton import capturing as _capturing

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"]


def _lr_value(lr):
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    return lr


def _lr_arg(lr):
    """The group's lr for a step (every ``_hp`` takes it from here): a float, or the tensor itself
    (``_dispatch.run_parts`` passes it to kernels that read it on the device, and gives everything
    else its value)."""
    return lr if type(lr) is float or isinstance(lr, Tensor) else float(lr)


def _real(group, key):
    """A numeric hyperparameter of ``group`` for a step: a number as it is, a (1-element) tensor
    as its value (torch's steps take a 0-d tensor momentum, eps, weight decay...; the reference's
    NumPy could not, and the kernels take their scalars by value); anything else (a string, None,
    a list set on the group after construction) a TypeError before the step makes any state,
    where it reached NumPy's or the kernels' own error (an audit's find; torch's step fails with a
    TypeError of its arithmetic's wording, which differs per optimizer)."""
    v = group[key]
    if type(v) is float or type(v) is int:
        return v
    if isinstance(v, Tensor):
        return float(v)
    if isinstance(v, numbers.Real):
        return v
    raise KernelInputTypeError(f"optimizer hyperparameter '{key}' must be a number, not {type_name(v)}")


def _refuse_captured_tensor_lr(kind: str, groups) -> None:
    """A tensor lr that the step would read on the host (``_dispatch.reads_lr_on_device`` says no
    for a part of the group) inside a CUDA graph capture: refused, before the step does anything
    (no state made, no kernel recorded). Reading a CUDA tensor on the host is not permitted while
    capturing, and whatever were read would be fixed into the graph while a scheduler changing
    the tensor expects replays to follow it. A 1-element float32 tensor on the parameters' device
    with a GPU backend is read by the kernels on the device and captured as torch's capturable
    optimizers capture it; a float lr is captured as torch captures one (replays use that value).
    Outside a capture this costs one ``isinstance`` per group (and a capture test per group with
    a tensor lr)."""
    for group in groups:
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            continue
        params = group["params"]
        if not params or not _capturing(params[0].device):
            continue
        for device, dtype in {(p.device, p.dtype): None for p in params}:
            # a host read is refused where the part is captured or the tensor lives on a capturing device
            if not (_capturing(device) or _capturing(lr.device)):
                continue
            if _dispatch.reads_lr_on_device(kind, lr, device, dtype):
                continue
            raise KernelInputError(
                f"gpu_nn.optim: this tensor lr cannot be captured into a CUDA graph: the step would read it on "
                f"the host (not permitted while capturing, and replays could not follow the tensor). The "
                f"kernels read a tensor lr on the device when it has 1 element of float32 on the parameters' "
                f"device and the backend is triton or cupy; got {lr.numel()} element(s) of {lr.dtype} on "
                f"{lr.device} for {dtype} parameters on {device} (backend "
                f"{_backend.resolve(f'optim.{kind}', device, _dispatch.BACKENDS[kind], dtype=dtype)}). "
                f"Pass such a tensor (lr.to(param.device, torch.float32)) or a float lr"
            )


# the hyperparameters a step reads on the host (:func:`_real`; betas apart): only these, since a
# group holds others a step never reads (a scheduler's initial_lr, a tensor where lr is one)
_READ_ON_HOST = ("momentum", "dampening", "weight_decay", "lr_decay", "eps", "rho", "alpha")


def _refuse_captured_tensor_scalars(groups) -> None:
    """Tensor hyperparameters but lr that the step reads on the host (betas, momentum, eps,
    weight decay, ...: :func:`_real`); inside a CUDA graph capture that read is not permitted
    (CUDA's own error, which also invalidates the capture) and replays could not follow the
    tensors: refused before the step does anything, as a tensor lr read on the host is
    (:func:`_refuse_captured_tensor_lr`). Outside a capture this costs a look-up per such key of a
    group (0.5 us for Adam's group here)."""
    for group in groups:
        tensors = None
        for key in _READ_ON_HOST:
            v = group.get(key)
            if isinstance(v, Tensor):
                tensors = tensors or {}
                tensors[key] = [v]
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas):
            tensors = tensors or {}
            tensors["betas"] = [b for b in betas if isinstance(b, Tensor)]
        if tensors is None or not group["params"]:
            continue
        capturing = _capturing(group["params"][0].device)
        for key, ts in tensors.items():
            if capturing or any(_capturing(t.device) for t in ts):
                what = "tensor betas" if key == "betas" else f"a tensor {key}"
                raise KernelInputError(
                    f"gpu_nn.optim: {what} cannot be captured into a CUDA graph: the step reads it on the "
                    f"host (not permitted while capturing, and replays could not follow the tensor); pass a "
                    f"float {key}")


def _flag_refusals(name: str, defaults: dict) -> None:
    """The fused / foreach / differentiable refusals, in torch's order (after its parameter
    checks): fused with differentiable, then fused with foreach, as torch's constructors raise
    them; then differentiable alone, which torch takes and we refuse (our step runs outside
    autograd)."""
    if defaults.get("fused"):
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if defaults.get("differentiable"):
        raise ValueError(
            f"gpu_nn.optim.{name} does not support differentiable=True (its step runs fused kernels "
            f"outside autograd); use torch.optim.{name} for a differentiable optimizer step"
        )


def _step_of(opt) -> None:
    opt._gpu_nn_step()


# the optimizers' step (but the closure), opaque to torch.compile once an optimizer exists
# (_opaque_to_compiler): Dynamo traced the step's Python planning with graph breaks at every host
# read (is_conj, data pointers, float()): 6 frames and 19 breaks for an Adam step, which compiled
# ran 1.4x slower than eager, and through the reference's NumPy code, which its NumPy emulation
# partly refused (RMSprop centered's np.copyto(..., where=)) and rounded otherwise. Opaque, a
# compiled step is the eager step behind one graph break: our step is one fused launch eagerly
# already. The closure (the user's forward and backward) stays outside, compiled as torch's.
_opaque_step = _step_of


def _opaque_to_compiler() -> None:
    """Wrap :func:`_step_of` in ``torch.compiler.disable`` (once; the optimizers' constructor and
    unpickling call it): made on first use, not at import, since the wrapper imports torch._dynamo
    and with it Triton, which ``import gpu_nn`` must not (torch's own Optimizer constructor
    imports it)."""
    global _opaque_step
    if _opaque_step is _step_of:
        _opaque_step = torch.compiler.disable(_step_of)


class _NotImplementedInput(KernelInputError, NotImplementedError):
    """Where torch raises NotImplementedError ("... not implemented for 'Long'")."""


_ALPHA_MSG = "For integral input tensors, argument alpha must not be a floating point number."
_NEG_BOOL_MSG = ("Negation, the `-` operator, on a bool tensor is not supported. If you are trying to invert a "
                 "mask, use the `~` or `logical_not()` operator instead.")


def _infer_size(a, b):
    """torch's broadcast of shapes ``a`` and ``b`` (at::infer_size): scanned from the last
    dimension, the first incompatible one raises torch's message."""
    n = max(len(a), len(b))
    out = [0] * n
    for i in range(n - 1, -1, -1):
        sa = a[i - n + len(a)] if i - n + len(a) >= 0 else 1
        sb = b[i - n + len(b)] if i - n + len(b) >= 0 else 1
        if sa != sb and sa != 1 and sb != 1:
            raise KernelInputError(
                f"The size of tensor a ({sa}) must match the size of tensor b ({sb}) at non-singleton dimension {i}"
            )
        out[i] = sb if sa == 1 else sa
    return tuple(out)


def _integral(group, dtype, then: Exception) -> Exception:
    """The error of torch's step on an integer or bool parameter: the ops every optimizer starts
    with (``-grad`` when maximizing, ``grad.add(param, alpha=weight_decay)``), else ``then``."""
    if group.get("maximize", False) and dtype == torch.bool:
        return KernelInputError(_NEG_BOOL_MSG)
    if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
        return KernelInputError(_ALPHA_MSG)
    return then


def _cast_error(dtype) -> Exception:
    """An in-place op with a float scalar (``state.mul_(rho)``, ``param.addcdiv_``) on ``dtype``."""
    return KernelInputError(f"result type Float can't be cast to the desired output type {scalar_type_name(dtype)}")


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _state_of_shape(key: str, buf: Tensor, p: Tensor) -> Tensor:
    """A state tensor of another shape than its parameter's (a loaded state_dict from another
    model, its parameters in another order): refused with the error torch's step raises on it
    (its in-place update of the state with the parameter's gradient), never reshaped onto the
    parameter (one of the same number of elements trained on scrambled moments). SGD's momentum
    buffer, which torch's keeps in the gradient's shape where the gradient broadcasts to the
    parameter, is broadcast to the parameter's shape (ours keeps it there; the same values)."""
    try:
        shape = torch.broadcast_shapes(buf.shape, p.shape)
    except RuntimeError:
        a, b = list(buf.shape), list(p.shape)
        n = max(len(a), len(b))
        a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
        d = max(i for i in range(n) if a[i] != b[i] and 1 not in (a[i], b[i]))
        raise RuntimeError(f"The size of tensor a ({a[d]}) must match the size of tensor b ({b[d]}) "
                           f"at non-singleton dimension {d}") from None
    if key == "momentum_buffer" and tuple(shape) == tuple(p.shape):
        return buf.expand(p.shape).clone()
    raise RuntimeError(f"output with shape {list(buf.shape)} doesn't match the broadcast shape {list(shape)}")


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _grad_key(params):
    """What a kept plan depends on in the gradients and parameters, read cheaply: per
    parameter None (no gradient) or the parameter's address, dtype, shape and strides (a
    ``p.data`` swapped for a transposed or reshaped view at the same address changes them: the
    kept launch would step it in the old layout) and the gradient's dtype, shape and strides --
    not the gradient's address: a kept launch takes the step's gradients
    where they lie (``regrad``: the table's gradient column rebuilt when they moved, as a caching
    allocator moves them between steps). None where a gradient has no strides or storage
    (sparse): the full step says why."""
    if torch._C._len_torch_dispatch_stack():  # (a fake tensor's data_ptr warns; torch's step runs there)
        return None, None
    key, grads = [], []
    try:
        for p in params:
            g = p.grad
            if g is None:
                key.append(None)
            else:
                key.append((p.data_ptr(), p.dtype, p.shape, p.stride(), g.dtype, g.shape, g.stride(), g.get_device()))
                grads.append(g)
    except (RuntimeError, NotImplementedError):
        return None, None
    return key, grads


def _identical(a, b) -> bool:
    """The same objects, in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _Plan:
    """One group's step as the last full step left it, kept so the next step can skip the
    per-parameter work: the parameters that had gradients, where they were, their gradients'
    layouts (:func:`_grad_key`), the state tensors the step used, and the parts with their
    prepared launches (chunk tables and bases, see ``_dispatch.Part``).

    A group keeps up to PLANS_PER_GROUP of them. A step reuses
    one only when everything it was built from holds: the same group object
    and parameter list, the same :func:`_grad_key` (gradients may be new tensors, as after
    ``zero_grad(set_to_none=True)``, anywhere, with the same layout), the same
    state tensors in ``optimizer.state`` (a ``load_state_dict`` or a replaced buffer fails
    this) at the same addresses, and the same state-shaping settings (``_struct``: amsgrad,
    momentum, centered). Anything else takes the full step (checks, lazy state, dispatch),
    which records a new plan. Hyperparameters are read from the group on every step, and the
    backend is resolved on every step; a tensor lr is handed to the launch at every step (the
    kernels read it through its address, which no plan, table or prepared launch keeps), so an
    lr changed from a float to a tensor, to another tensor or in place takes effect at the next
    step. A plan holds no gradient: their memory stays the caller's to free."""

    __slots__ = ("group", "params", "struct", "key", "state", "parts", "inference")

    def __init__(self, group, struct, key, state, parts, inference=False):
        self.group, self.params, self.struct = group, list(group["params"]), struct
        self.key, self.state, self.parts = key, state, parts
        # whether it writes an inference tensor (a step taken inside torch.inference_mode): a
        # step outside the mode then takes the full path, which refuses it as torch does
        self.inference = inference

    @classmethod
    def record(cls, opt, group, params, grads, state_lists, parts, key):
        """A plan of the step just taken, or None where the next step could differ by more than
        the facts a plan checks (a gradient broadcast or cast by ``_checked_grads``; SGD's first
        momentum step, whose buffers start from the gradient), and for a step captured into a
        CUDA graph (its tables are written when the graph replays, not before). ``key``: the
        group's :func:`_grad_key`, read before the step (a step moves no tensor)."""
        if key is None or any(g is not p.grad for p, g in zip(params, grads)) or any(state_lists.get("first", ())):
            return None
        if any(_capturing(part.device) for part in parts):  # its tables are written by the graph alone
            return None
        state = []
        inference = False
        for p in params:
            d = opt.state.get(p)  # None: no state (SGD without momentum), and none may appear
            items = () if d is None else d.items()
            state.append((p, d, tuple((k, v, v.data_ptr() if torch.is_tensor(v) else None) for k, v in items)))
            inference = inference or p.is_inference() or any(torch.is_tensor(v) and v.is_inference() for _, v in items)
        return cls(group, opt._struct(group), key, state, parts, inference)

    def holds(self, opt, group, key) -> bool:
        """Whether the plan serves a step of ``group`` whose gradients have ``key``."""
        if key != self.key or group is not self.group or opt._struct(group) != self.struct:
            return False
        if self.inference and not torch.is_inference_mode_enabled():
            return False
        if not _identical(group["params"], self.params):
            return False
        states = opt.state
        for p, d, items in self.state:
            if states.get(p) is not d or (d is not None and len(d) != len(items)):
                return False
            for k, v, ptr in items:
                w = d.get(k)
                if w is not v or (ptr is not None and w.data_ptr() != ptr):
                    return False
        return True

    def same_state(self, other) -> bool:
        """Whether ``other`` steps the same parameters and state tensors (plans of one group that
        differ only in the gradients' layouts or which parameters had one)."""
        if not _identical(self.params, other.params) or len(self.state) != len(other.state):
            return False
        return all(
            a[0] is b[0] and a[1] is b[1] and len(a[2]) == len(b[2]) and all(x[1] is y[1] for x, y in zip(a[2], b[2]))
            for a, b in zip(self.state, other.state))


# plans kept per group, most recent first: steps whose gradients alternate between a few
# layouts or sets (a parameter without a gradient every other step) keep finding theirs
PLANS_PER_GROUP = 4


class _Base(Optimizer):
    """Shared step loop: closure, no_grad, sparse check, lazy state, dispatch by device/dtype;
    a step over the same tensors as the last one reuses its plan (:class:`_Plan`)."""

    _NAME = ""
    _KIND = ""
    _SPARSE_MSG = ""
    _SETDEFAULTS: dict = {}

    def __init__(self, params, defaults):
        self._plans: dict = {}
        super().__init__(params, defaults)
        _flag_refusals(self._NAME, defaults)
        _opaque_to_compiler()
        if defaults.get("fused"):
            # as torch's fused optimizers: GradScaler then hands the step its scale and found_inf
            # (as attributes) instead of unscaling, checking and skipping on the host (a host
            # synchronisation per step); the kernels unscale and skip on the device (_step_hp)
            self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        _opaque_to_compiler()  # (an optimizer unpickled in a new process was never constructed there)
        self._plans = {}
        for group in self.param_groups:
            for k, v in self._SETDEFAULTS.items():
                group.setdefault(k, v)

    def load_state_dict(self, state_dict) -> None:
        """torch's, but a float16 / bfloat16 parameter's float32 state stays float32: torch's
        load casts every floating state tensor to its parameter's dtype, which rounded the float32
        moments our half parameters keep (small second moments to 0), so a run resumed from its
        own checkpoint went elsewhere than the run it was saved from (torch's own resumes bit for
        bit). A state saved in the parameter's dtype (torch's optimizer) loads as torch loads it
        and is widened at the next step."""
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        keep = []
        if saved and state and len(saved) == len(self.param_groups):
            # the id map torch's load makes: saved ids to parameters, group by group, in order
            ids = (i for g in saved for i in g.get("params", ()))
            params = (p for g in self.param_groups for p in g["params"])
            for i, p in zip(ids, params):
                entry = state.get(i)
                if p.dtype in (torch.float16, torch.bfloat16) and isinstance(entry, dict):
                    keep += [(p, k, v) for k, v in entry.items()
                             if k != "step" and torch.is_tensor(v) and v.dtype == torch.float32]
        super().load_state_dict(state_dict)
        for p, k, v in keep:
            if k in self.state.get(p, ()):
                self.state[p][k] = v.to(device=p.device)

    # -- state helpers -------------------------------------------------------------------
    def _new_step(self, p: Tensor, fused=False) -> Tensor:
        # a CPU or meta parameter's on the CPU whatever torch.set_default_device says (torch's
        # non-fused steps keep it there; a meta one counts the steps too, as torch's), in float32
        # for a fused group as torch's (_get_scalar_dtype(is_fused=True)), else the default's
        if p.device.type in ("cpu", "meta"):
            return torch.tensor(0.0, dtype=torch.float32 if fused else _scalar_dtype(), device="cpu")
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _fix_step(self, state, p: Tensor) -> Tensor:
        """The step tensor where our kernels want it: CUDA params keep it on the device in
        float32 (torch's non-fused state keeps it on the CPU; moved once, no sync after)."""
        step = state["step"]
        if not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=_scalar_dtype(), device="cpu")
        if p.device.type not in ("cpu", "meta") and (step.device != p.device or step.dtype != torch.float32):
            step = step.to(device=p.device, dtype=torch.float32)
        refuse_inference_write(step)  # (torch's step count goes up in place first)
        state["step"] = step
        return step

    def _buf(self, state, key: str, p: Tensor, fill: float = 0.0) -> Tensor:
        """State buffer ``key`` of ``p``: created like torch (zeros_like / full_like, preserving
        the layout), widened to float32 for half parameters, moved to ``p``'s device."""
        dt = _state_dtype(p)
        buf = state.get(key)
        if buf is None:
            buf = torch.full_like(p, fill, dtype=dt, memory_format=torch.preserve_format)
            state[key] = buf
        elif buf.dtype != dt or buf.device != p.device or buf.shape != p.shape:
            if buf.shape != p.shape:
                buf = _state_of_shape(key, buf, p)
            buf = buf.to(device=p.device, dtype=dt)
            state[key] = buf
        # a state made in an inference-mode step and stepped outside one, or an expanded state (a
        # loaded state_dict's): torch's update refuses either
        refuse_in_place_write(buf)
        return buf

    def _params_with_grad(self, group):
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise KernelInputError(self._SPARSE_MSG or f"gpu_nn.optim.{self._NAME} does not support sparse gradients")
            if torch.is_complex(p):
                raise KernelInputError(f"gpu_nn.optim.{self._NAME} does not support complex parameters")
            out.append(p)
        return out

    # -- torch's errors for gradients and parameters it cannot step ------------------------
    def _grad_first(self, group) -> bool:
        """Whether torch's first op that combines the gradient with the parameter or its state
        has the gradient as its first operand (``grad.add(param, alpha=weight_decay)``) rather
        than the parameter or state (``param.add_(grad)``, ``state.addcmul_(grad, grad)``,
        ``exp_avg.lerp_(grad)``)."""
        return group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False)

    def _lerps(self, group) -> bool:
        """Whether torch's step lerps a same-dtype state towards the gradient (lerp refuses
        another dtype where the other ops promote)."""
        return False

    def _integral_error(self, group, dtype) -> Exception:  # pragma: no cover - abstract
        raise NotImplementedError

    def _checked_grads(self, group, params):
        """The gradients of ``params`` with their parameters' shapes and dtypes, or torch's
        error where torch's step raises. A shape torch broadcasts is expanded; a dtype torch
        promotes is rounded to the parameter's."""
        out = []
        for p in params:
            g = p.grad
            if not (p.is_floating_point() or p.is_complex()):
                raise self._integral_error(group, p.dtype)
            refuse_in_place_write(p)  # (made under torch.inference_mode, or expanded: torch's update refuses it)
            if g.shape != p.shape:
                a, b = (g.shape, p.shape) if self._grad_first(group) else (p.shape, g.shape)
                shape = _infer_size(tuple(a), tuple(b))
                if shape != tuple(p.shape):
                    # the in-place update of the parameter (or its state) with the broadcast result
                    raise KernelInputError(
                        f"output with shape {list(p.shape)} doesn't match the broadcast shape {list(shape)}"
                    )
                g = g.expand(p.shape)
            if g.dtype != p.dtype:
                # maximize negates in the gradient's dtype; weight decay adds the parameter
                end = torch.promote_types(g.dtype, p.dtype) if self._grad_first(group) else g.dtype
                if self._lerps(group) and end != p.dtype:
                    raise KernelInputError(
                        f"expected dtype {cpp_type_name(p.dtype)} for `end` but got dtype "
                        f"{cpp_type_name(end)}"
                    )
                g = g.to(p.dtype)
            out.append(g)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _opaque_step(self)
        return loss

    def _gpu_nn_step(self) -> None:
        """:meth:`step` but the closure, opaque to torch.compile (:func:`_step_of`)."""
        _refuse_captured_tensor_lr(self._KIND, self.param_groups)
        _refuse_captured_tensor_scalars(self.param_groups)
        plans = self._plans
        for group in self.param_groups:
            key, current = _grad_key(group["params"])
            kept = plans.get(id(group))
            if kept and key is not None and self._step_kept(group, kept, key, current):
                continue
            params = self._params_with_grad(group)
            if params:
                grads = self._checked_grads(group, params)
                hp = self._step_hp(group)  # (read first, as torch's steps: a bad value refused before any state exists)
                state_lists = self._state_lists(group, params)
                parts = _dispatch.run(self._KIND, params, state_lists, hp, grads)
                plan = _Plan.record(self, group, params, grads, state_lists, parts, key)
            else:
                plan = None
            if plan is None:
                plans.pop(id(group), None)
            else:
                if len(plans) >= len(self.param_groups):  # groups gone (load_state_dict makes new ones)
                    live = {id(g) for g in self.param_groups}
                    for k in [k for k in plans if k not in live]:
                        del plans[k]
                # the others only where they step the same state (else they would keep old
                # state tensors alive)
                same = [q for q in kept or () if q.same_state(plan)]
                plans[id(group)] = [plan, *same[:PLANS_PER_GROUP - 1]]

    def _step_kept(self, group, kept, key, grads) -> bool:
        """Run the step through the kept plan that holds for ``key`` (moved to the front), if one
        does; ``grads``: the group's gradients, as :func:`_grad_key` read them."""
        for i, plan in enumerate(kept):
            if plan.holds(self, group, key):
                if i:
                    kept.insert(0, kept.pop(i))
                _dispatch.run_parts(self._KIND, plan.parts, self._step_hp(group), grads)
                return True
        return False

    def _step_hp(self, group) -> dict:
        """:meth:`_hp`, and for a fused group the scalars GradScaler gave the step as attributes
        (``grad_scale``, None once ``unscale_`` ran; ``found_inf``), which torch's fused steps
        read: the step skipped where found_inf is nonzero, the gradients unscaled before it (and
        left so), on the device, no host read (``_dispatch.run_parts``)."""
        hp = self._hp(group)
        if group.get("fused"):
            scale, found = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            if scale is not None or found is not None:
                hp = dict(hp, grad_scale=scale, found_inf=found)
        return hp

    def _struct(self, group) -> tuple:
        """The group settings that decide which state tensors a step uses."""
        return ()

    def _state_lists(self, group, params) -> dict:  # pragma: no cover - abstract
        """Per state key, a list parallel to ``params`` (created lazily, as torch does)."""
        raise NotImplementedError

    def _hp(self, group) -> dict:  # pragma: no cover - abstract
        """The group's hyperparameters as Python numbers, read at every step."""
        raise NotImplementedError


class SGD(_Base):
    """torch.optim.SGD: momentum, dampening, nesterov, weight_decay, maximize."""

    _NAME = "SGD"
    _KIND = "sgd"
    _SETDEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        _lr_value(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

    def _struct(self, group):
        return (group["momentum"] != 0,)

    def _state_lists(self, group, params):
        momentum = group["momentum"]
        bufs, first = [], []
        fresh = set()  # parameters without a buffer before this step (every entry of one listed twice)
        for p in params:
            if momentum != 0:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    fresh.add(id(p))
                first.append(id(p) in fresh)
                bufs.append(self._buf(state, "momentum_buffer", p))
            else:
                bufs.append(None)
                first.append(False)
        return dict(momentum_buffer=bufs, first=first)

    def _hp(self, group):
        return dict(lr=_lr_arg(group["lr"]), momentum=_real(group, "momentum"), dampening=_real(group, "dampening"),
                    weight_decay=float(_real(group, "weight_decay")), nesterov=group["nesterov"],
                    maximize=group.get("maximize", False))

    def _integral_error(self, group, dtype):
        return _integral(group, dtype, KernelInputError(_ALPHA_MSG))  # param.add_(grad, alpha=-lr)


class Adagrad(_Base):
    """torch.optim.Adagrad: lr_decay, weight_decay, initial_accumulator_value, eps, maximize."""

    _NAME = "Adagrad"
    _KIND = "adagrad"
    _SETDEFAULTS = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None):
        _lr_value(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults)
        # torch creates Adagrad's state eagerly in the constructor, every sum filled with the
        # constructor's initial_accumulator_value (a group's own value is not read; nor is it for a
        # group added later: self.defaults', as torch 2.13's lazy path)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = self._new_step(p, group.get("fused"))
                self._buf(state, "sum", p, initial_accumulator_value)

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors (as torch's Adagrad)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _state_lists(self, group, params):
        steps, sums = [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = self._new_step(p, group.get("fused"))
            steps.append(self._fix_step(state, p))
            sums.append(self._buf(state, "sum", p, self.defaults["initial_accumulator_value"]))
        return dict(step=steps, sum=sums)

    def _hp(self, group):
        return dict(lr=_lr_arg(group["lr"]), lr_decay=_real(group, "lr_decay"), weight_decay=_real(group, "weight_decay"),
                    eps=_real(group, "eps"), maximize=group.get("maximize", False))

    def _integral_error(self, group, dtype):
        # state_sum.addcmul_(grad, grad) has no bool kernel; param.addcdiv_(grad, std) casts
        then = _NotImplementedInput("\"addcmul_cpu_out\" not implemented for 'Bool'") if dtype == torch.bool else _cast_error(dtype)
        return _integral(group, dtype, then)


class Adadelta(_Base):
    """torch.optim.Adadelta: lr, rho, eps, weight_decay, maximize."""

    _NAME = "Adadelta"
    _KIND = "adadelta"
    _SPARSE_MSG = "Adadelta does not support sparse gradients"
    _SETDEFAULTS = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False):
        _lr_value(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable, foreach=foreach, differentiable=differentiable)
        super().__init__(params, defaults)

    def _state_lists(self, group, params):
        steps, sq, acc = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step(p, group.get("fused"))
            steps.append(self._fix_step(state, p))
            sq.append(self._buf(state, "square_avg", p))
            acc.append(self._buf(state, "acc_delta", p))
        return dict(step=steps, square_avg=sq, acc_delta=acc)

    def _hp(self, group):
        return dict(lr=_lr_arg(group["lr"]), rho=_real(group, "rho"), eps=_real(group, "eps"),
                    weight_decay=_real(group, "weight_decay"), maximize=group.get("maximize", False))

    def _integral_error(self, group, dtype):
        return _integral(group, dtype, _cast_error(dtype))  # square_avg.mul_(rho)


class RMSprop(_Base):
    """torch.optim.RMSprop: alpha, eps, weight_decay, momentum, centered, maximize."""

    _NAME = "RMSprop"
    _KIND = "rmsprop"
    _SPARSE_MSG = "RMSprop does not support sparse gradients"
    _SETDEFAULTS = {"momentum": 0, "centered": False, "foreach": None, "maximize": False, "differentiable": False,
                    "capturable": False}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        _lr_value(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults)

    def _struct(self, group):
        return (group["momentum"] > 0, bool(group["centered"]))

    def _state_lists(self, group, params):
        steps, sq, ga, mb = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step(p, group.get("fused"))
            steps.append(self._fix_step(state, p))
            sq.append(self._buf(state, "square_avg", p))
            mb.append(self._buf(state, "momentum_buffer", p) if group["momentum"] > 0 else None)
            ga.append(self._buf(state, "grad_avg", p) if group["centered"] else None)
        return dict(step=steps, square_avg=sq, grad_avg=ga, momentum_buffer=mb)

    def _hp(self, group):
        return dict(lr=_lr_arg(group["lr"]), alpha=_real(group, "alpha"), eps=_real(group, "eps"),
                    weight_decay=_real(group, "weight_decay"), momentum=_real(group, "momentum"), centered=group["centered"],
                    maximize=group.get("maximize", False))

    def _lerps(self, group):
        return bool(group["centered"])  # grad_avg.lerp_(grad, 1 - alpha)

    def _integral_error(self, group, dtype):
        return _integral(group, dtype, _cast_error(dtype))  # square_avg.mul_(alpha)


class Adam(_Base):
    """torch.optim.Adam: betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay."""

    _NAME = "Adam"
    _KIND = "adam"
    _SPARSE_MSG = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _SETDEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                    "differentiable": False, "fused": None, "decoupled_weight_decay": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        if isinstance(lr, Tensor) and foreach and not capturable:  # torch's refusal, before its other checks
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        _lr_value(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")  # as torch: (0, 0.9) too
        for i, b in enumerate(betas):
            if isinstance(b, Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if b.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        # kept as given (a tensor as a 0-d tensor, as torch's _to_scalar): each step reads them
        # (_hp), so a tensor changed in place, by a scheduler say, takes effect as in torch
        betas = tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _struct(self, group):
        return (bool(group["amsgrad"]),)

    def _state_lists(self, group, params):
        steps, m, v, vmax = [], [], [], []
        amsgrad = group["amsgrad"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step(p, group.get("fused"))
            steps.append(self._fix_step(state, p))
            m.append(self._buf(state, "exp_avg", p))
            v.append(self._buf(state, "exp_avg_sq", p))
            vmax.append(self._buf(state, "max_exp_avg_sq", p) if amsgrad else None)
        return dict(step=steps, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax)

    def _hp(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(lr=_lr_arg(group["lr"]), beta1=beta1, beta2=beta2, eps=_real(group, "eps"),
                    weight_decay=_real(group, "weight_decay"), amsgrad=group["amsgrad"], maximize=group.get("maximize", False),
                    decoupled_weight_decay=group.get("decoupled_weight_decay", False))

    def _lerps(self, group):
        return True  # exp_avg.lerp_(grad, 1 - beta1)

    def _integral_error(self, group, dtype):
        if group["weight_decay"] != 0 and group.get("decoupled_weight_decay", False):
            if group.get("maximize", False) and dtype == torch.bool:
                return KernelInputError(_NEG_BOOL_MSG)
            return _cast_error(dtype)  # param.mul_(1 - lr * weight_decay)
        name = scalar_type_name(dtype)
        return _integral(group, dtype, _NotImplementedInput(f"\"lerp_kernel_scalar\" not implemented for '{name}'"))


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    _NAME = "AdamW"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
