"""NumPy reference for relu, sigmoid and tanh (forward and explicit backward).

Shapes: any. Backward functions take the forward *output* where that is what the derivative
needs (sigmoid, tanh), as torch's own backward formulas do.
"""

import numpy as np


def relu(x: np.ndarray) -> np.ndarray:
    # np.maximum would turn NaN into NaN too, but keep torch's rule explicit: relu(NaN) = NaN
    return np.where(x > 0, x, np.where(np.isnan(x), x, np.zeros((), x.dtype)))


def relu_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    """torch's threshold_backward: gradient flows where the output is > 0."""
    return np.where(out > 0, grad_out, np.zeros((), grad_out.dtype))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # split by sign so exp never overflows
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def sigmoid_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    return grad_out * out * (1 - out)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def tanh_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    return grad_out * (1 - out * out)


FORWARD = {"relu": relu, "sigmoid": sigmoid, "tanh": tanh}
BACKWARD = {"relu": relu_backward, "sigmoid": sigmoid_backward, "tanh": tanh_backward}


def activate(x: np.ndarray, activation) -> np.ndarray:
    """Apply the named activation (``None`` = identity); used by fused epilogues."""
    return x if activation is None else FORWARD[activation](x)


def activate_backward(grad_out: np.ndarray, out: np.ndarray, activation) -> np.ndarray:
    return grad_out if activation is None else BACKWARD[activation](grad_out, out)
