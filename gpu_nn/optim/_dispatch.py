"""One optimizer step of one parameter group: split by (device, dtype), pick the backend, run.

``run(kind, params, state_lists, hp)``: ``kind`` is one of ``sgd``, ``adagrad``, ``adadelta``,
``rmsprop``, ``adam``; ``state_lists`` maps torch's state key to a list parallel to ``params``
(``step`` holds the step tensors, not yet incremented); ``hp`` the group's hyperparameters as
Python numbers, but ``hp["lr"]`` may be a 1-element tensor (see :func:`reads_lr_on_device`: the
kernels read it on the device where they can, everything else gets its value); ``grads``
(parallel to ``params``, default ``p.grad``) the gradients with the parameters' shapes and dtypes
(the optimizers check and broadcast them as torch does). The reference works on NumPy views of
CPU float32/float64 tensors in place; anything else (half dtypes, CUDA tensors under the
reference backend) goes through a host copy that is written back.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import increment_version

from .. import _backend
from .._errors import KernelInputError
from ..ops._dispatch import device_guard
from ..reference import optim as ref

BACKENDS = {
    "sgd": ("reference", "triton"),
    "adagrad": ("reference", "triton"),
    "adadelta": ("reference", "triton"),
    "rmsprop": ("reference", "triton", "cupy"),
    "adam": ("reference", "triton", "cupy"),
}
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_C = torch._C


def _split(params):
    """Indices of ``params`` grouped by (device, dtype), in first-seen order."""
    parts: dict = {}
    for i, p in enumerate(params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    return parts


class Part:
    """The parameters of one (device, dtype) of a step, with their state lists; ``prepared``
    keeps, per backend, a launch that needed no staging copy (see ``Plan`` in optimizers.py:
    a later step over the same tensors launches it again, its gradient column rebuilt where the
    gradients moved: ``regrad``)."""

    __slots__ = ("device", "dtype", "idx", "params", "states", "steps", "prepared", "repeated")

    def __init__(self, device, dtype, idx, params, states):
        self.device, self.dtype, self.idx, self.params, self.states = device, dtype, idx, params, states
        self.steps = states.get("step") or []
        self.prepared: dict = {}
        # a parameter listed more than once (torch warns that it will refuse this one day, and
        # meanwhile steps the entries one after the other, each reading what the one before
        # wrote): torch's own per-tensor step runs such a part (:func:`run_parts`); one launch
        # over all entries stepped the shared state several times over (a buffer per entry
        # updated in turn, in what a GPU runs as concurrent programs)
        self.repeated = len({id(p) for p in params}) != len(params)


def parts(params, state_lists: dict) -> list:
    out = []
    for (device, dtype), idx in _split(params).items():
        out.append(Part(device, dtype, idx, [params[i] for i in idx],
                        {k: [v[i] for i in idx] for k, v in state_lists.items()}))
    return out


def _prepare(kind: str, backend: str, part: Part, grads):
    """The checks a kernel backend needs (once per part and backend when the launch is kept),
    then that backend's prepared launch."""
    _backend.check_interpreter_dtype(f"optim.{kind}", backend, *part.params)
    if part.dtype not in GPU_DTYPES:
        raise KernelInputError(
            f"optim.{kind}: the {backend} backend takes float32, float16 and bfloat16 parameters, "
            f"got {part.dtype} (float64 runs on the reference backend)"
        )
    for p, g in zip(part.params, grads):
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise KernelInputError(
                f"optim.{kind}: a gradient must match its parameter's dtype, shape and device "
                f"(param {p.dtype} {tuple(p.shape)} on {p.device}, grad {g.dtype} "
                f"{tuple(g.shape)} on {g.device})"
            )
    if backend == "triton":
        from . import _triton as glue
    else:
        from . import _cupy as glue
    launch = glue.prepare(kind, part.params, part.states, grads)
    if launch.cacheable and not glue.capturing(part.device):
        part.prepared[backend] = launch
    return launch


def device_lr(lr: torch.Tensor, device) -> bool:
    """Whether a kernel on ``device`` can read the tensor lr ``lr`` itself: a 1-element float32
    tensor on that device (the form the kernels' pointer variants take and were compiled for)."""
    return lr.dtype == torch.float32 and lr.numel() == 1 and lr.device == device and not lr.is_neg()


def reads_lr_on_device(kind: str, lr: torch.Tensor, device, dtype) -> bool:
    """Whether the step of the part on ``device`` with parameters of ``dtype`` reads the tensor
    lr ``lr`` on the device (no host read, capturable): a GPU backend -- or the triton backend
    under the interpreter, on the CPU -- and :func:`device_lr`."""
    backend = _backend.resolve(f"optim.{kind}", device, BACKENDS[kind], dtype=dtype)
    return backend != "reference" and device_lr(lr, device)


def run_parts(kind: str, parts_: list, hp: dict, grads) -> None:
    """One step of every part: the backend resolved per step (a ``gpu_nn.backend`` region may
    change it), the launch prepared unless a kept one serves. A tensor lr goes to the kernels as
    it is where they read it on the device (:func:`device_lr`; the launch takes it at every
    step, so nothing kept depends on it); elsewhere (the reference, another device or dtype)
    its value is read on the host, once per step."""
    lr = hp["lr"]
    tensor_lr = type(lr) is not float and isinstance(lr, torch.Tensor)  # the float test first: the hot path
    host_hp = None
    amp = "found_inf" in hp  # GradScaler's scalars (a fused step's: optimizers._Base._step_hp)
    for part in parts_:
        sub_g = [grads[i] for i in part.idx]
        if part.repeated or needs_torch(part.params, sub_g):
            _run_torch(kind, part.params, part.states, hp, sub_g, foreach=False if part.repeated else None)
            continue
        # the parameters change in place, as torch's step changes them with in-place ops: their
        # version counters move, so a backward through a graph that saved them before the step
        # fails as torch's does ("modified by an inplace operation") instead of mixing old and
        # new weights (the kernels and the reference's NumPy views write past autograd)
        increment_version(part.params)
        if part.device.type == "meta":  # no data (deferred initialisation): torch's step computes
            for s in part.steps:  # nothing there either; its step counts (CPU tensors) advance
                s.add_(1)
            continue
        backend = _backend.resolve(f"optim.{kind}", part.device, BACKENDS[kind], dtype=part.dtype)
        part_hp = hp
        if tensor_lr and (backend == "reference" or not device_lr(lr, part.device)):
            if host_hp is None:
                host_hp = dict(hp, lr=float(lr))  # a CUDA tensor: a host synchronisation
            part_hp = host_hp
        if amp:
            part_hp = _amp_on(part_hp, part.device)
        if backend == "reference":
            _run_reference(kind, part.params, part.states, part_hp, sub_g)
            continue
        # the part's device current (Triton launches go to the current one; on_device's guard)
        with device_guard(part.device):
            launch = part.prepared.get(backend)
            # a kept launch takes the step's gradients where they lie (regrad: the table's
            # gradient column rebuilt when they moved); prepared again where it cannot
            if launch is None or not launch.regrad(sub_g):
                launch = _prepare(kind, backend, part, sub_g)
            if part.steps:
                # torch's fused path does the same: one multi-tensor add, no host round trip
                torch._foreach_add_(part.steps, 1.0)
            launch(part_hp, sub_g)
            if amp and part.steps and part_hp["found_inf"] is not None:
                # a step GradScaler skips (found_inf 1) does not count, as torch's fused steps
                # take it back: on the device, no host read
                torch._foreach_sub_(part.steps, [part_hp["found_inf"]] * len(part.steps))


def needs_torch(params, grads) -> bool:
    """Whether a step (or a clipping) of these tensors is torch's own to run: a tensor subclass
    among them with a torch function or dispatch of its own (FSDP2's DTensor parameters, fake
    tensors, a wrapper subclass, an ``as_subclass`` view), whose data neither NumPy nor a kernel
    can read (".numpy() is not supported for tensor subclasses"; an invalid storage), or a
    dispatch mode active (FakeTensorMode, a logging mode), which would not see writes made past
    the dispatcher. nn.Parameter and its subclasses that keep its disabled torch function are
    plain, whatever torch-function mode is active (the class decides, not the mode stack)."""
    if _C._len_torch_dispatch_stack() > 0:
        return True
    for ts in (params, grads):
        for t in ts:
            c = type(t)
            if c is not torch.Tensor and c is not _Parameter and (
                    c.__torch_dispatch__ is not _NO_DISPATCH or c.__torch_function__ is not _NO_FUNCTION):
                return True
    return False


_Parameter = torch.nn.Parameter
_NO_DISPATCH = _C._disabled_torch_dispatch_impl  # a subclass without a __torch_dispatch__ of its own
_NO_FUNCTION = _C._disabled_torch_function_impl  # nn.Parameter's (and its plain subclasses') torch function


def _run_torch(kind, params, st, hp, grads, foreach=None) -> None:
    """The step of torch's own optimizer on ``params`` (its functional form, its implementation
    chosen as its step chooses it by default: foreach where torch's would be, per tensor else;
    ``foreach=False``: per tensor, in order), into this optimizer's state tensors: for the
    tensors of :func:`needs_torch`, on which torch's in-place ops are the subclass's or the
    mode's to run, and for a parameter listed more than once (per tensor: each entry sees what
    the one before it wrote, as torch's CPU step does; a multi-tensor op over one tensor twice
    is a race on a GPU, torch's own foreach step too). Torch keeps a half parameter's state in
    the parameter's dtype where ours is float32: the step runs on copies in torch's dtype, copied
    back (the values torch's state holds). GradScaler's scalars of a fused step are applied as its
    fused step applies them (skipped where found_inf is set, read on the host; the gradients
    unscaled in place first)."""
    from torch.optim import adadelta, adagrad, adam, rmsprop, sgd

    found, scale = hp.get("found_inf"), hp.get("grad_scale")
    if found is not None and float(found) != 0:
        return
    if scale is not None:
        for g in grads:
            g.div_(scale)
    common = dict(lr=hp["lr"], weight_decay=hp["weight_decay"], maximize=hp["maximize"], foreach=foreach)
    back = []  # (our state tensor, torch's copy in the parameter's dtype)

    def as_torch(states):
        out = []
        for p, s in zip(params, states):
            if s is not None and s.dtype != p.dtype:
                c = s.to(p.dtype)
                back.append((s, c))
                s = c
            out.append(s)
        return out

    if kind == "sgd":
        ours = st["momentum_buffer"]
        # torch's first step clones the gradient into a buffer of its own (None asks for that)
        bufs = as_torch([None if first else b for b, first in zip(ours, st["first"])])
        sgd.sgd(params, grads, bufs, momentum=hp["momentum"], dampening=hp["dampening"], nesterov=hp["nesterov"],
                **common)
        for b, first, new in zip(ours, st["first"], bufs):
            if first and b is not None:
                b.copy_(new)
    elif kind == "adagrad":
        adagrad.adagrad(params, grads, as_torch(st["sum"]), st["step"], lr_decay=hp["lr_decay"], eps=hp["eps"],
                        **common)
    elif kind == "adadelta":
        adadelta.adadelta(params, grads, as_torch(st["square_avg"]), as_torch(st["acc_delta"]), st["step"],
                          rho=hp["rho"], eps=hp["eps"], **common)
    elif kind == "rmsprop":
        rmsprop.rmsprop(params, grads, as_torch(st["square_avg"]), as_torch(st["grad_avg"]),
                        as_torch(st["momentum_buffer"]), st["step"], alpha=hp["alpha"], eps=hp["eps"],
                        momentum=hp["momentum"], centered=hp["centered"], **common)
    else:
        adam.adam(params, grads, as_torch(st["exp_avg"]), as_torch(st["exp_avg_sq"]), as_torch(st["max_exp_avg_sq"]),
                  st["step"], decoupled_weight_decay=hp["decoupled_weight_decay"], amsgrad=hp["amsgrad"],
                  beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"], **common)
    for s, c in back:
        s.copy_(c)


def _amp_on(hp: dict, device) -> dict:
    """``hp`` with GradScaler's scalars as the kernels on ``device`` read them: float32 0-d
    tensors there (moved to a GPU without a host wait, as torch's fused steps move them), a zero
    ``found_inf`` where only a scale was given."""
    scale, found = hp.get("grad_scale"), hp.get("found_inf")
    # to a CPU part (the reference, which reads them on the host at once) a CUDA scaler's values
    # come synchronously: a non-blocking device-to-host copy returns before its bytes land
    queued = torch.device(device).type != "cpu"
    if scale is not None:
        scale = scale.to(device=device, dtype=torch.float32, non_blocking=queued).reshape(())
    if found is not None:
        found = found.to(device=device, dtype=torch.float32, non_blocking=queued).reshape(())
    elif scale is not None:
        found = torch.zeros((), dtype=torch.float32, device=device)
    return dict(hp, grad_scale=scale, found_inf=found)


def run(kind: str, params, state_lists: dict, hp: dict, grads=None) -> list:
    """One step of ``params``; returns its parts (with the launches it prepared)."""
    grads = [p.grad for p in params] if grads is None else grads
    ps = parts(params, state_lists)
    run_parts(kind, ps, hp, grads)
    return ps


# -- reference ----------------------------------------------------------------------------

class _Host:
    """NumPy arrays for tensors: views where the tensor is CPU float32/float64, else host
    copies that :meth:`write_back` copies into the tensors afterwards."""

    def __init__(self):
        self._back = []

    def inout(self, t):
        if t is None:
            return None
        if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.is_conj() and not t.is_neg():
            return t.detach().numpy()
        # (resolve_neg: a tensor with the negative bit set, already CPU float32, comes back from
        # to() as it is, and numpy() refuses it)
        a = t.detach().to("cpu", torch.float32 if t.dtype != torch.float64 else torch.float64).resolve_neg().numpy().copy()
        self._back.append((t, a))
        return a

    @staticmethod
    def inp(t):
        if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.is_conj() and not t.is_neg():
            return t.detach().numpy()
        return t.detach().to("cpu", torch.float32 if t.dtype != torch.float64 else torch.float64).resolve_neg().numpy()

    def write_back(self):
        for t, a in self._back:
            t.copy_(torch.from_numpy(a))


def _steps(step_tensors):
    out = []
    for s in step_tensors:
        s += 1
        out.append(float(s))  # host value: the reference runs on the host anyway
    return out


def _unscaled(h: _Host, grads, scale) -> list:
    """The gradients as the reference reads them, divided by GradScaler's ``scale`` (in their
    dtype's opmath: float32, float64 for float64 gradients, as torch's fused steps divide) and
    left so in the gradients, rounded to their dtype, as torch's fused steps leave them (the
    step itself uses the unrounded quotient)."""
    out = []
    s = float(scale)
    for g in grads:
        a = h.inp(g)
        q = a / a.dtype.type(s)  # (a is float32 or float64: the quotient in its dtype)
        g.copy_(torch.from_numpy(q))
        out.append(q)
    return out


def _run_reference(kind, params, st, hp, grads) -> None:
    """The step on the host through the NumPy reference."""
    found, scale = hp.get("found_inf"), hp.get("grad_scale")
    if found is not None and float(found) != 0:
        return  # GradScaler found an inf / NaN: the step skipped, nothing written (torch's fused)
    h = _Host()
    P = [h.inout(p) for p in params]
    G = [h.inp(g) for g in grads] if scale is None else _unscaled(h, grads, scale)
    if kind == "sgd":
        bufs = [None if first or b is None else h.inout(b) for b, first in zip(st["momentum_buffer"], st["first"])]
        ref.sgd_step(P, G, bufs, lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                     weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], maximize=hp["maximize"])
        if hp["momentum"] != 0:
            for b, first, a in zip(st["momentum_buffer"], st["first"], bufs):
                if first:
                    b.copy_(torch.from_numpy(a))
    elif kind == "adagrad":
        S = [h.inout(s) for s in st["sum"]]
        ref.adagrad_step(P, G, S, _steps(st["step"]), lr=hp["lr"], lr_decay=hp["lr_decay"],
                         weight_decay=hp["weight_decay"], eps=hp["eps"], maximize=hp["maximize"])
    elif kind == "adadelta":
        _steps(st["step"])
        ref.adadelta_step(P, G, [h.inout(s) for s in st["square_avg"]], [h.inout(s) for s in st["acc_delta"]],
                          lr=hp["lr"], rho=hp["rho"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                          maximize=hp["maximize"])
    elif kind == "rmsprop":
        _steps(st["step"])
        ref.rmsprop_step(P, G, [h.inout(s) for s in st["square_avg"]], [h.inout(s) for s in st["grad_avg"]],
                         [h.inout(s) for s in st["momentum_buffer"]], lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"],
                         weight_decay=hp["weight_decay"], momentum=hp["momentum"], centered=hp["centered"],
                         maximize=hp["maximize"])
    elif kind == "adam":
        ref.adam_step(P, G, [h.inout(s) for s in st["exp_avg"]], [h.inout(s) for s in st["exp_avg_sq"]],
                      [h.inout(s) for s in st["max_exp_avg_sq"]], _steps(st["step"]), lr=hp["lr"],
                      betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
                      amsgrad=hp["amsgrad"], maximize=hp["maximize"],
                      decoupled_weight_decay=hp["decoupled_weight_decay"])
    else:  # pragma: no cover
        raise ValueError(kind)
    h.write_back()
