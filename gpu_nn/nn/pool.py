"""Pooling modules: same constructors, attributes and ``extra_repr`` as ``torch.nn``.

``MaxPool1d/2d`` and ``AvgPool1d/2d`` subclass torch's modules and only replace ``forward``;
``MinPool1d/2d`` (no torch counterpart) subclass torch's ``_MaxPoolNd`` base, so they take
MaxPool's arguments and print like it, without claiming to be a ``torch.nn.MaxPool2d``.
"""

import torch
from torch.nn.modules.pooling import _MaxPoolNd

from .. import functional as F
from .._errors import KernelInputTypeError
from ..ops._dispatch import stand_in, torchs_own_error
from ._jit import NotScriptable

__all__ = ["MaxPool1d", "MaxPool2d", "MinPool1d", "MinPool2d", "AvgPool1d", "AvgPool2d"]


class MaxPool1d(NotScriptable, torch.nn.MaxPool1d):
    """``torch.nn.MaxPool1d`` running ``gpu_nn.functional.max_pool1d``."""

    def forward(self, input):
        return F.max_pool1d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MaxPool2d(NotScriptable, torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` running ``gpu_nn.functional.max_pool2d``."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MinPool1d(NotScriptable, _MaxPoolNd):
    """Min pooling over ``[N, C, L]``: ``-MaxPool1d(-x)``; MaxPool1d's constructor."""

    def forward(self, input):
        return F.min_pool1d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MinPool2d(NotScriptable, _MaxPoolNd):
    """Min pooling over ``[N, C, H, W]``: ``-MaxPool2d(-x)``; MaxPool2d's constructor."""

    def forward(self, input):
        return F.min_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


def _positional_type_error(exc, theirs, input, args):
    """A bad argument type of a layer that passes its arguments by position (torch's AvgPool
    layers call its parser's ``avg_pool*`` so, which then names each one's position): torch's
    own error for that call, asked on a stand-in of the input. The functional forms cannot tell
    a keyword from a position and word the flags as the usual keyword call (no position);
    ``exc`` itself where the input is no tensor."""
    if not isinstance(input, torch.Tensor):
        return exc
    return torchs_own_error(lambda: theirs(stand_in(input), *args), str(exc))


class AvgPool1d(NotScriptable, torch.nn.AvgPool1d):
    """``torch.nn.AvgPool1d`` running ``gpu_nn.functional.avg_pool1d``."""

    def forward(self, input):
        args = (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        try:
            return F.avg_pool1d(input, *args)
        except KernelInputTypeError as exc:
            raise _positional_type_error(exc, torch.nn.functional.avg_pool1d, input, args) from None


class AvgPool2d(NotScriptable, torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` running ``gpu_nn.functional.avg_pool2d``."""

    def forward(self, input):
        args = (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)
        try:
            return F.avg_pool2d(input, *args)
        except KernelInputTypeError as exc:
            raise _positional_type_error(exc, torch.nn.functional.avg_pool2d, input, args) from None
