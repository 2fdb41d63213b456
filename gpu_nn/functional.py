"""``torch.nn.functional``-style functions, each backed by one ``gpu_nn::`` custom op.

Every name here takes the same arguments, defaults and keyword names as its namesake in
``torch.nn.functional``; ops that torch lacks (``min_pool1d/2d``, the fused ``activation=``
keyword of conv and linear) follow the nearest torch op (shared/DESIGN.md section 3).
"""

from .ops.activation import *  # noqa: F401,F403
from .ops.activation import __all__ as _act_all
from .ops.conv import *  # noqa: F401,F403
from .ops.conv import __all__ as _conv_all
from .ops.dense import *  # noqa: F401,F403
from .ops.dense import __all__ as _dense_all
from .ops.pool import *  # noqa: F401,F403
from .ops.pool import __all__ as _pool_all
from .ops.rnn import *  # noqa: F401,F403
from .ops.rnn import __all__ as _rnn_all

__all__ = sorted({*_act_all, *_conv_all, *_dense_all, *_pool_all, *_rnn_all})

from .ops import _flops  # noqa: E402,F401  (FlopCounterMode counts our conv / linear / recurrent ops)

import torch.nn.functional as _torch_functional  # noqa: E402

from ._namespace import fall_back_to as _fall_back_to  # noqa: E402

_fall_back_to(globals(), _torch_functional)  # F.dropout, F.pad, F.gelu, ...: torch's
