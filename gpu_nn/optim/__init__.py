"""Drop-in optimizers with ``torch.optim``'s hyperparameters, state keys and state_dict."""

from .optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop  # noqa: F401
from .optimizers import __all__  # noqa: F401
from ._check import CHECK_CASES  # noqa: F401
