"""TorchScript: our modules refuse ``torch.jit.script`` with a clear error.

Scripting is not feasible for these modules: their ``forward`` goes through Python argument
checks with torch's wording (raising :class:`~gpu_nn.KernelInputError`), backend selection and
``PackedSequence`` handling that TorchScript's compiler cannot take, and would otherwise fail
deep inside that compiler with no word from us. ``torch.jit.trace``, ``torch.export`` and
``torch.compile`` all work, since they record the ``gpu_nn::`` custom ops themselves.

``torch.jit.script`` calls ``__prepare_scriptable__`` on the module and on every submodule
before compiling anything, so the error names the first of our modules it meets, whether it is
scripted alone or inside a model.
"""

from __future__ import annotations


class ScriptingNotSupportedError(RuntimeError):
    """``torch.jit.script`` of a model containing a gpu_nn module (a RuntimeError, as
    TorchScript's own compile errors are)."""


class NotScriptable:
    """Mixin for every module in :mod:`gpu_nn.nn` (put first among the bases)."""

    def __prepare_scriptable__(self):
        name = type(self).__name__
        raise ScriptingNotSupportedError(
            f"gpu_nn.nn.{name} cannot be compiled by torch.jit.script: its forward runs gpu_nn's Python argument "
            f"checks and backend dispatch around the gpu_nn:: custom ops, which TorchScript cannot compile. "
            f"Use torch.jit.trace(model, example_inputs), torch.export.export(model, example_inputs) or "
            f"torch.compile(model) instead; all three support gpu_nn.nn.{name}." + _reverts(self)
        )


def _reverts(module) -> str:
    """The error's pointer to gpu_nn.revert, where it gives ``module`` torch's layer (not for
    min pooling, a subclass of ours, a layer fusing an activation: revert leaves those)."""
    import torch

    from ..convert import _left_as_ours

    if _left_as_ours(module, torch.nn.utils.parametrize.type_before_parametrizations(module)) is not None:
        return ""
    return (" Or script torch's own layer: gpu_nn.revert(model) gives a model torch's layers back (the same "
            "tensors).")
