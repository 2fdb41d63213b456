"""Drop-in optimizers with ``torch.optim``'s hyperparameters, state keys and state_dict."""

from .optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop  # noqa: F401
from .optimizers import __all__  # noqa: F401
from ._check import CHECK_CASES  # noqa: F401

import torch.optim as _torch_optim  # noqa: E402

from .._namespace import fall_back_to as _fall_back_to  # noqa: E402

_fall_back_to(globals(), _torch_optim)  # optim.lr_scheduler, optim.Optimizer, optim.NAdam, ...: torch's
