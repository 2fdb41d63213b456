"""Conv1d / Conv2d: ``torch.nn.Conv1d`` / ``Conv2d`` with our functional convolution.

Subclasses of torch's modules, so the constructor, parameters (``weight`` [O, C/groups, *k],
``bias`` [O]), initialisation, ``extra_repr`` and ``state_dict`` are torch's own; only the
forward differs. A ``padding_mode`` other than ``'zeros'`` (``'reflect'``, ``'replicate'``,
``'circular'``) pads the input as torch's layers do, with ``torch.nn.functional.pad`` (a copy of
the input, padded; torch's own kernel), and convolves that without padding.
As ``Linear``, both take a keyword-only ``activation=None`` ('relu', 'sigmoid', 'tanh') fused
after the bias (not a parameter or buffer: state_dicts stay interchangeable with torch's; kept
under a name of ours, :class:`~gpu_nn.nn.dense.FusesActivation`); :func:`gpu_nn.fuse` sets it on
a model's convolution -> activation pairs.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .._errors import (KernelInputError, KernelInputIndexError, KernelInputNotImplementedError,
                       KernelInputTypeError)
from ..ops import conv as _conv
from ._jit import NotScriptable
from .dense import BecomesOurs, FusesActivation, activation_repr, checked_activation

__all__ = ["Conv1d", "Conv2d", "LazyConv1d", "LazyConv2d"]


def _padded(module, input: Tensor):
    """``(input, padding)`` for the convolution: with padding_mode 'zeros' the input and the
    layer's padding (the kernels pad with zeros themselves); with another mode the input padded
    as torch's ``_conv_forward`` pads it (``F.pad``, the layer's padding in reverse order, each
    twice) and no padding."""
    if module.padding_mode == "zeros":
        return input, module.padding
    try:
        padded = torch.nn.functional.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    except (NotImplementedError, TypeError, IndexError, RuntimeError, ValueError) as exc:
        ours = _AS_OURS.get(type(exc))
        if ours is None:  # ours already, or a subclass (out of memory, a device or tracing error)
            raise
        # bad input torch's layer refuses in the same F.pad: its words, as our error of that kind
        raise ours(str(exc)) from None
    return padded, (0,) * len(module.kernel_size)


# the plain error classes torch's checks raise -> ours (exactly these: a subclass, such as
# torch.OutOfMemoryError or a RecursionError, is no verdict on the input and passes unchanged)
_AS_OURS = {NotImplementedError: KernelInputNotImplementedError, TypeError: KernelInputTypeError,
            IndexError: KernelInputIndexError, RuntimeError: KernelInputError, ValueError: KernelInputError}


class Conv1d(FusesActivation, NotScriptable, torch.nn.Conv1d):
    """As ``torch.nn.Conv1d`` (input [N, C, L] or [C, L]); any padding_mode; plus
    ``activation`` (ours only, keyword-only, default None) fused after the bias."""

    def __init__(self, *args, **kwargs):
        act = checked_activation("Conv1d", kwargs.pop("activation", None))
        super().__init__(*args, **kwargs)
        self._gpu_nn_activation = act

    def forward(self, input: Tensor) -> Tensor:
        x, padding = _padded(self, input)
        return _conv.conv1d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                             activation=self._gpu_nn_activation)

    def extra_repr(self) -> str:
        return activation_repr(self, super().extra_repr())


class Conv2d(FusesActivation, NotScriptable, torch.nn.Conv2d):
    """As ``torch.nn.Conv2d`` (input [N, C, H, W] or [C, H, W]); any padding_mode; plus
    ``activation`` (ours only, keyword-only, default None) fused after the bias."""

    def __init__(self, *args, **kwargs):
        act = checked_activation("Conv2d", kwargs.pop("activation", None))
        super().__init__(*args, **kwargs)
        self._gpu_nn_activation = act

    def forward(self, input: Tensor) -> Tensor:
        x, padding = _padded(self, input)
        return _conv.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                             activation=self._gpu_nn_activation)

    def extra_repr(self) -> str:
        return activation_repr(self, super().extra_repr())


def _with_activation(cls, theirs) -> None:
    """``inspect.signature(cls)``: torch's constructor's, plus our keyword-only ``activation``
    (the constructor itself passes everything on, so that torch's checks and words stay its own)."""
    base = inspect.signature(theirs.__init__)
    params = [*base.parameters.values(),
              inspect.Parameter("activation", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")]
    cls.__init__.__signature__ = base.replace(parameters=params)


_with_activation(Conv1d, torch.nn.Conv1d)
_with_activation(Conv2d, torch.nn.Conv2d)


class LazyConv1d(BecomesOurs, torch.nn.LazyConv1d):
    """``torch.nn.LazyConv1d``, which becomes our :class:`Conv1d` (:class:`~gpu_nn.nn.dense.BecomesOurs`)."""

    cls_to_become = Conv1d


class LazyConv2d(BecomesOurs, torch.nn.LazyConv2d):
    """``torch.nn.LazyConv2d``, which becomes our :class:`Conv2d` (:class:`~gpu_nn.nn.dense.BecomesOurs`)."""

    cls_to_become = Conv2d
