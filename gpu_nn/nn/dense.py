"""Dense modules: Flatten, Linear, Softmax, LogSoftmax, CrossEntropyLoss.

Subclasses of the torch modules (same constructor arguments, parameters, initialisation,
``extra_repr`` and ``state_dict``), whose ``forward`` calls :mod:`gpu_nn.functional`. Only
``Linear`` adds something: a keyword-only ``activation=None`` ('relu', 'sigmoid', 'tanh')
fused into the matmul epilogue; it is not a parameter or buffer, so state_dicts stay
interchangeable with torch's, and it is kept under a name of ours (:class:`FusesActivation`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .._errors import KernelInputAttributeError, KernelInputError, KernelInputTypeError
from ..ops._dispatch import has_torch_function
from ..ops.dense import ACTIVATIONS
from ._jit import NotScriptable

__all__ = ["CrossEntropyLoss", "Flatten", "LazyLinear", "Linear", "LogSoftmax", "Softmax"]


class Flatten(NotScriptable, torch.nn.Flatten):
    """torch.nn.Flatten (start_dim=1, end_dim=-1): a view when the strides allow, as torch."""

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) and not has_torch_function(input):
            # torch's calls input.flatten(start_dim, end_dim): Python's error (an AttributeError,
            # an ndarray's TypeError), or what that method returns, as there
            try:
                return input.flatten(self.start_dim, self.end_dim)
            except AttributeError as exc:
                raise KernelInputAttributeError(str(exc)) from None
            except TypeError as exc:
                raise KernelInputTypeError(str(exc)) from None
        return F.flatten(input, self.start_dim, self.end_dim)


def checked_activation(layer: str, activation):
    """``activation`` when it is one our layers fuse (None, 'relu', 'sigmoid', 'tanh'), else
    KernelInputError naming the layer."""
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"{layer}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return activation


ACTIVATION_ATTR = "_gpu_nn_activation"


def fused_activation(module) -> str | None:
    """The activation ``module`` fuses after its bias (one of our Conv1d / Conv2d / Linear), or
    None (none fused, or any other module)."""
    return getattr(module, ACTIVATION_ATTR, None)


class FusesActivation:
    """Our Conv1d / Conv2d / Linear's fused activation (None, 'relu', 'sigmoid', 'tanh': the
    constructor's ``activation=``, or :func:`gpu_nn.fuse`'s) is the attribute
    ``_gpu_nn_activation`` (the class's None where an instance has none: a lazy layer that became
    ours), not ``activation``. torch's layers read no ``activation``, so a user's subclass of the
    drop-in layer may keep one of its own (a module or a name it applies itself after
    ``super().forward``, or a class attribute): under that name ours would have applied a name a
    second time, refused a module and hidden a class attribute behind its instance's None."""

    _gpu_nn_activation: str | None = None

    def __getstate__(self):
        # every state pickled carries the name (the class's None included: a layer convert
        # swapped, a lazy one that became ours), so that __setstate__ tells an old pickle from a
        # layer with an ``activation`` of its user's
        state = super().__getstate__()
        state.setdefault(ACTIVATION_ATTR, self._gpu_nn_activation)
        return state

    def __setstate__(self, state):
        # pickled by a gpu-nn that kept the fused activation as ``activation`` (its convert left a
        # layer with an ``activation`` of its own as torch's: that name was always ours there)
        if ACTIVATION_ATTR not in state and state.get("activation") in ACTIVATIONS[1:]:
            state = dict(state)
            state[ACTIVATION_ATTR] = state.pop("activation")
        super().__setstate__(state)


def activation_repr(module, s: str) -> str:
    """``s`` (torch's extra_repr) with ``activation=`` added where the layer has one."""
    act = fused_activation(module)
    return s + (f", activation={act!r}" if act is not None else "")


class Linear(FusesActivation, NotScriptable, torch.nn.Linear):
    """torch.nn.Linear: y = x W^T + b, W [out_features, in_features], b [out_features];
    plus ``activation`` (ours only, keyword-only, default None) fused into the epilogue."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None) -> None:
        checked_activation("Linear", activation)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._gpu_nn_activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias, activation=self._gpu_nn_activation)

    def extra_repr(self) -> str:
        return activation_repr(self, super().extra_repr())


class Softmax(NotScriptable, torch.nn.Softmax):
    """torch.nn.Softmax(dim=None)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(NotScriptable, torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax(dim=None)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class CrossEntropyLoss(NotScriptable, torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction='mean', label_smoothing=0.0); ``weight`` is a buffer, as in torch."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class BecomesOurs(NotScriptable):
    """A torch lazy layer that becomes ours (``cls_to_become``) at its first call (torch's becomes
    torch's layer: a model written with ``gpu_nn.nn`` ran torch's kernels there), that first call
    on ours too: torch takes the bound forward before its hook changes the class."""

    cls_to_become: type
    _gpu_nn_activation = None  # (ours' forward reads it; a lazy layer fuses none)

    def forward(self, input: Tensor) -> Tensor:
        # the class is ours already in the call that changed it (our layer: no cls_to_become);
        # a forward called directly before that still runs ours
        ours = getattr(type(self), "cls_to_become", None) or type(self)
        return ours.forward(self, input)


class LazyLinear(BecomesOurs, torch.nn.LazyLinear):
    """``torch.nn.LazyLinear``, which becomes our :class:`Linear` (:class:`BecomesOurs`)."""

    cls_to_become = Linear
