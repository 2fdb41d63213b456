"""Activation modules: ReLU, Sigmoid, Tanh.

Subclasses of the torch modules (same constructor arguments and ``extra_repr``) whose
``forward`` calls :mod:`gpu_nn.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._jit import NotScriptable

__all__ = ["ReLU", "Sigmoid", "Tanh"]


class ReLU(NotScriptable, torch.nn.ReLU):
    """torch.nn.ReLU(inplace=False)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class Sigmoid(NotScriptable, torch.nn.Sigmoid):
    """torch.nn.Sigmoid()."""

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(NotScriptable, torch.nn.Tanh):
    """torch.nn.Tanh()."""

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)
