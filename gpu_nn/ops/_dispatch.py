"""Helpers shared by every op family: tensor <-> NumPy for the reference backend, and
common input checks with torch's wording."""

from __future__ import annotations

import os

import numpy as np
import torch

from .._errors import KernelInputError

_NUMPY_NATIVE = (torch.float32, torch.float64)
_POISON = os.environ.get("GPU_NN_POISON", "0") == "1"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A NumPy view of ``t`` for the reference backend.

    float32/float64 CPU tensors are shared without a copy (strides kept: non-contiguous
    inputs stay views); float16/bfloat16 are widened to float32; CUDA tensors are copied
    to the host. Integer tensors (targets, indices) keep their dtype.
    """
    if t is None:
        return None
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
    if not a.flags.writeable or not (a.flags.c_contiguous or a.flags.f_contiguous) or a.base is not None:
        a = np.array(a, copy=True)
    t = torch.from_numpy(a)
    if t.dtype != dtype or t.device != torch.device(device):
        t = t.to(device=device, dtype=dtype)
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float16/bfloat16 widen to float32."""
    return dtype if dtype in _NUMPY_NATIVE else torch.float32


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{op}: expected {name} to be a floating-point tensor, but got {t.dtype}")


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


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output.

    With ``GPU_NN_POISON=1`` (the test suite sets it) the buffer is filled with NaN, so an
    element that a kernel forgets to write shows up as NaN instead of as stale memory that
    happens to be right.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out



def autocast_inputs(policy: str, *tensors):
    """Apply torch's autocast rule to an op's inputs, as torch's own ops get it.

    ``policy="lower"`` (conv, linear, recurrent layers): floating inputs run in the autocast
    dtype; ``policy="fp32"`` (softmax, log_softmax, cross_entropy): they run in float32.
    Outside an autocast region the inputs come back unchanged.
    """
    if not tensors:
        return tensors
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    dev = first.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev) if policy == "lower" else torch.float32
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )
