"""gpu-nn: classic deep-learning layers as our own GPU kernels.

Import ``gpu_nn.functional as F``, ``gpu_nn.nn as nn`` and ``gpu_nn.optim as optim`` in
place of torch's, or call :func:`gpu_nn.convert` on an existing model (:func:`gpu_nn.revert` gives
it torch's layers back); :func:`gpu_nn.fuse` fuses its convolution / linear -> activation pairs.
"""

from ._backend import available_backends, backend, status as backend_status
from ._errors import (BackendUnavailableError, KernelInputAttributeError, KernelInputError, KernelInputIndexError,
                      KernelInputNotImplementedError, KernelInputTypeError)

__version__ = "0.1.0"

import warnings as _warnings  # noqa: E402

import torch as _torch  # noqa: E402

# torch.jit.trace warns about every Python bool it sees made from a traced size; our argument
# checks compare sizes (to raise torch's errors), which changes nothing in the trace: those
# warnings, and only those (attributed to gpu_nn's own modules), are not shown
_warnings.filterwarnings("ignore", category=_torch.jit.TracerWarning, module=r"gpu_nn(\.|$)")

from . import functional, nn, optim  # noqa: E402  (registers the custom ops)
from .convert import convert, revert  # noqa: E402
from .fuse import fuse  # noqa: E402
from .nn._jit import ScriptingNotSupportedError  # noqa: E402

__all__ = [
    "BackendUnavailableError",
    "KernelInputError",
    "KernelInputAttributeError",
    "KernelInputIndexError",
    "KernelInputNotImplementedError",
    "KernelInputTypeError",
    "ScriptingNotSupportedError",
    "available_backends",
    "backend",
    "backend_status",
    "convert",
    "functional",
    "fuse",
    "nn",
    "optim",
    "revert",
]
