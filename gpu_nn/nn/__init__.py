"""Drop-in modules: same names, constructor arguments, parameter names, shapes and
initialisation as ``torch.nn``, so ``load_state_dict`` works in both directions."""

from . import utils  # noqa: F401
from .activation import *  # noqa: F401,F403
from .activation import __all__ as _act_all
from .conv import *  # noqa: F401,F403
from .conv import __all__ as _conv_all
from .dense import *  # noqa: F401,F403
from .dense import __all__ as _dense_all
from .pool import *  # noqa: F401,F403
from .pool import __all__ as _pool_all
from .rnn import *  # noqa: F401,F403
from .rnn import __all__ as _rnn_all

__all__ = sorted({*_act_all, *_conv_all, *_dense_all, *_pool_all, *_rnn_all, "utils"})

import torch.nn as _torch_nn  # noqa: E402

from .._namespace import fall_back_to as _fall_back_to  # noqa: E402

# nn.Module, nn.Sequential, nn.Dropout, nn.init, ...: torch's; nn.functional: ours
_fall_back_to(globals(), _torch_nn, {"functional": "gpu_nn.functional"})
