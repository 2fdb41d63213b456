"""``gpu_nn.nn.utils``: gradient clipping (mirrors ``torch.nn.utils``); its other names
(``rnn``, ``parametrize``, ``clip_grad_value_``, ...) are torch's."""

from __future__ import annotations

import math
import types
import warnings

import torch
from torch.autograd.graph import increment_version

from ... import _backend
from ..._errors import KernelInputError, KernelInputNotImplementedError, refuse_in_place_write
from ...optim._dispatch import needs_torch

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_: scale all gradients by ``min(1, max_norm / (total + 1e-6))``
    where ``total`` is the ``norm_type``-norm of all gradients viewed as one vector; returns
    ``total`` as a 0-d tensor (``torch.tensor(0.0)`` when no parameter has a gradient).

    CPU gradients run the NumPy reference in place; CUDA gradients run one fused reduction and
    one fused scale (Triton) per device with no host synchronisation unless
    ``error_if_nonfinite=True`` (which has to read the norm); gradients on several GPUs
    exchange their devices' partial norms (a few floats per 16 Ki elements), queued.
    ``foreach`` is accepted and ignored. The Triton path takes norm_type 2, inf and any other
    p > 0; sparse gradients are not supported.

    As torch's: the total is the norm of the per-gradient norms, each rounded to its gradient's
    dtype (where one is float16 or bfloat16: one launch more on the Triton path), in the
    gradients' promoted dtype, and the coefficient is 0-d math in that dtype (a half total's
    each op rounded to it); so a float16 gradient whose own norm passes 65504 makes the total
    inf and scales everything by 0, and half gradients scale to torch's bits.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            # (3: past torch.no_grad's wrapper, to the caller, as torch's own warning points)
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    if len(grads) == 0:
        return torch.tensor(0.0)
    for g in grads:
        if g.is_sparse:  # (torch's norm has no sparse kernel: NotImplementedError there too)
            raise KernelInputNotImplementedError("gpu_nn.nn.utils.clip_grad_norm_ does not support sparse gradients")
        if g.is_complex():  # before any gradient is touched: the float kernels would drop the imaginary part
            raise KernelInputError(f"gpu_nn.nn.utils.clip_grad_norm_ does not support complex gradients "
                                   f"(got {g.dtype}), as gpu-nn's optimizers take no complex parameters")
        if not g.is_floating_point():
            # an integer or bool gradient: torch's norm refuses its dtype (ours wrote zeros into
            # it and then failed making the total); torch is asked, on an empty stand-in
            from ...ops._dispatch import torchs_own_error

            raise torchs_own_error(lambda: torch.linalg.vector_norm(torch.zeros(0, dtype=g.dtype), norm_type),
                                   f"clip_grad_norm_: a gradient of {g.dtype}", KernelInputError)
        refuse_in_place_write(g)  # (made under torch.inference_mode, or expanded: torch's scaling refuses it)
    if (math.isinf(norm_type) or norm_type < 0) and any(g.numel() == 0 for g in grads):
        # a max / min or a negative power over no elements (no identity): torch refuses (its
        # words depend on foreach), so torch is asked on an empty gradient (ours returned the
        # other gradients' norm, or 0)
        from ...ops._dispatch import torchs_own_error

        empty = next(g for g in grads if g.numel() == 0)
        raise torchs_own_error(lambda: torch.nn.utils.get_total_norm([empty], norm_type, foreach=foreach),
                               f"the {norm_type} norm of an empty gradient has no value", KernelInputError)
    if all(g.is_meta for g in grads) or needs_torch(grads, ()):
        # meta gradients have no values, so nothing of ours to run: torch's own clipping (its meta
        # total, its version bumps, its refusal of error_if_nonfinite, which reads the total); so
        # for tensor subclasses (DTensor, fake tensors) and under a dispatch mode (optim/_dispatch
        # needs_torch): their in-place ops are theirs to run
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    devices = {g.device for g in grads}
    # float64 gradients (any of a device's: the kernels take no float64) take the reference under
    # auto, as every op's float64 does
    backends = {d: _backend.resolve("clip_grad_norm_", d, ("reference", "triton"),
                                    dtype=torch.float64 if any(g.dtype == torch.float64 for g in grads if g.device == d)
                                    else None) for d in devices}
    if all(b == "triton" for b in backends.values()) and norm_type > 0 and not math.isnan(norm_type):
        from ...optim import _triton

        out = _promoted_dtype(grads)
        # (several devices: each one's partial norms gathered on every other, queued)
        total = _triton.clip_grad_norm(grads, max_norm, norm_type, error_if_nonfinite, out)  # float32
        increment_version(grads)
        return total if out == torch.float32 else total.to(out)
    total = _clip_reference(grads, max_norm, norm_type, error_if_nonfinite)
    # the gradients were scaled in place (torch's mul_): their version counters move as torch's do
    increment_version(grads)
    return total


def _clip_reference(grads, max_norm, norm_type, error_if_nonfinite):
    from ...optim._dispatch import _Host
    from ...reference import optim as ref

    h = _Host()
    arrays = [h.inout(g) for g in grads]
    out = _promoted_dtype(grads)
    # the total as returned (torch's is in the promoted dtype): what the coefficient and the
    # non-finite check read, so a float16 total past 65504 is inf and scales by 0, as torch's
    rnd = _rounding(out)
    # each gradient's own norm in its dtype, as torch's per-tensor norms (a float16 gradient's
    # past 65504 is inf), where any is a half dtype (the host copies widened them to float32)
    each = [_rounding(g.dtype) for g in grads] if any(g.dtype in _HALF for g in grads) else None
    total = ref.clip_grad_norm(arrays, max_norm, norm_type, error_if_nonfinite, rnd, each)
    h.write_back()
    return torch.tensor(total, dtype=out, device=grads[0].device)


_HALF = (torch.float16, torch.bfloat16)


def _rounding(dtype):
    """``x -> x`` rounded to ``dtype`` (a float), or None where nothing rounds (float32, float64)."""
    if dtype not in _HALF:
        return None
    # (on the CPU whatever torch.set_default_device says)
    return lambda t: float(torch.tensor(t, dtype=torch.float32, device="cpu").to(dtype))


def _promoted_dtype(grads) -> torch.dtype:
    """The dtype of clipping's total norm, on either backend: the gradients' promoted dtype, as
    torch's (it stacks the per-tensor norms, which promotes): a float16 gradient beside a
    float32 one gives a float32 total (its own norm, rounded to float16, may be inf there)."""
    dt = grads[0].dtype
    for g in grads[1:]:
        if g.dtype != dt:
            dt = torch.promote_types(dt, g.dtype)
    return dt


from ..._namespace import fall_back_to as _fall_back_to  # noqa: E402

_fall_back_to(globals(), torch.nn.utils)
