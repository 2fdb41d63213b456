"""Activation modules: ReLU, Sigmoid, Tanh.

Subclasses of the torch modules (same constructor arguments and ``extra_repr``) whose
``forward`` calls :mod:`gpu_nn.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._jit import NotScriptable
from ..ops._dispatch import check_tensor, has_torch_function


def _torchs_type_check(op: str, input) -> None:
    """torch's modules call ``torch.sigmoid`` / ``torch.tanh``, whose parser refuses a non-tensor
    with a TypeError (``F.sigmoid`` / ``F.tanh``, which call the tensor's method, an AttributeError)."""
    if not isinstance(input, Tensor) and not has_torch_function(input):
        check_tensor(op, "input", input, 1)

__all__ = ["ReLU", "Sigmoid", "Tanh"]


class ReLU(NotScriptable, torch.nn.ReLU):
    """torch.nn.ReLU(inplace=False)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class Sigmoid(NotScriptable, torch.nn.Sigmoid):
    """torch.nn.Sigmoid()."""

    def forward(self, input: Tensor) -> Tensor:
        _torchs_type_check("sigmoid", input)
        return F.sigmoid(input)


class Tanh(NotScriptable, torch.nn.Tanh):
    """torch.nn.Tanh()."""

    def forward(self, input: Tensor) -> Tensor:
        _torchs_type_check("tanh", input)
        return F.tanh(input)
