"""NumPy reference for relu, sigmoid and tanh (forward and explicit backward).

Shapes: any. Backward functions take the forward *output* where that is what the derivative
needs (sigmoid, tanh), as torch's own backward formulas do.
"""

import numpy as np


def relu(x: np.ndarray) -> np.ndarray:
    # np.maximum propagates NaN, which is torch's rule too: relu(NaN) = NaN
    return np.maximum(x, x.dtype.type(0))


def relu_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    """torch's threshold_backward: gradient flows where the output is > 0."""
    return np.where(out > 0, grad_out, np.zeros((), grad_out.dtype))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-|x|) never overflows: 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0; in place, so
    # that a large input costs two temporaries rather than six
    e = np.abs(x, out=np.empty_like(x))  # out= keeps 0-d inputs arrays, so later out= work
    np.negative(e, out=e)
    np.exp(e, out=e)
    out = np.add(e, 1, out=np.empty_like(x))
    np.reciprocal(out, out=out)
    np.multiply(out, e, out=out, where=x < 0)
    return out


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
