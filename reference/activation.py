"""NumPy reference for relu, sigmoid and tanh (forward and explicit backward).

Shapes: any. Backward functions take the forward *output* where that is what the derivative
needs (sigmoid, tanh), as torch's own backward formulas do.
"""

import numpy as np

from ._errstate import quiet


def relu(x: np.ndarray) -> np.ndarray:
    return relu_(np.array(x, copy=True))


def relu_(x: np.ndarray) -> np.ndarray:
    """relu in place (the recurrent reference's too): torch's clamp_min(x, 0), 0 where x < 0 and x
    itself elsewhere, so NaN stays NaN and -0.0 stays -0.0 (np.maximum gives +0.0 there)."""
    np.copyto(x, x.dtype.type(0), where=np.less(x, 0))
    return x


def relu_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    """torch's threshold_backward(grad, out, 0): +0 where ``out <= 0`` (even where the gradient
    is NaN or inf), the gradient everywhere else. Written as NOT(out <= 0), not out > 0: a NaN
    output compares false both ways, and torch passes the gradient through there."""
    grad_out = np.asarray(grad_out)
    if grad_out.size <= 4096 and np.shape(out) == grad_out.shape:
        # small: one comparison and one select (the same bits: +0 where out <= 0, else the gradient)
        return np.where(np.less_equal(out, 0), grad_out.dtype.type(0), grad_out)
    return keep_where(np.logical_not(np.less_equal(out, 0)), grad_out)


def keep_where(mask: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a`` where ``mask``, +0.0 elsewhere: a fresh array, bit-exact (NaN / inf / -0 kept where
    selected). Done on the bit patterns (AND with an all-ones or all-zeros word) because NumPy's
    select (``np.where``) branches per element: 7 ms against 1 ms on 2M float32 with a random mask."""
    a = np.asarray(a)
    if a.size <= 4096:
        # small: one select is cheaper than the word dance's five calls, and as exact
        return np.where(mask, a, a.dtype.type(0))
    word = np.dtype(f"u{a.dtype.itemsize}")
    bits = np.broadcast_to(mask, a.shape).astype(word)  # 0 / 1
    np.multiply(bits, np.iinfo(word).max, out=bits)     # 0 / all ones
    np.bitwise_and(bits, a.view(word), out=bits)
    return bits.view(a.dtype)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """sigmoid of a copy of ``x`` (:func:`sigmoid_`)."""
    x = np.asarray(x)
    return sigmoid_(np.array(x, copy=True))


def sigmoid_(a: np.ndarray) -> np.ndarray:
    """sigmoid in place: A / (A + B) with A = exp(min(x, 0)), B = exp(min(-x, 0)): that is
    e^x / (e^x + 1) for x < 0 and 1 / (1 + e^-x) otherwise, so no exp overflows and tiny results
    keep their relative precision (0.5 + 0.5 tanh(x / 2) would round them to 0: the recurrent
    reference's gates did, a forget gate of sigmoid(-50) times an inf state giving NaN where
    torch's gives inf); +-inf give 1 / 0, NaN stays NaN. Six plain passes: a select (np.where, or
    multiply with where=) cost 5x more than all of them. ``a`` may be a strided view."""
    zero = np.zeros((), a.dtype)
    t = np.minimum(a, zero, out=np.empty(a.shape, a.dtype))  # out= keeps a 0-d input an array
    np.exp(t, out=t)
    # -x as x * -1 (the same bits but a NaN's sign, which the division below never returns: it
    # gives t's NaN): NumPy 2.4's negation of a strided view in place is wrong (_ufuncs.negative),
    # and a gate here is one (an LSTM's [rows, 4H] gates); its multiplication is right and needs
    # no temporary
    np.multiply(a, a.dtype.type(-1), out=a)
    np.minimum(a, zero, out=a)
    np.exp(a, out=a)
    a += t
    return np.divide(t, a, out=a)


@quiet  # inf * 0 where torch gives NaN without a warning
def sigmoid_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    """torch's sigmoid_backward ``a * (1 - b) * b``, in that order: its CPU float32 / float64
    result bit for bit (16-bit tensors reach the reference widened to float32 and are rounded once
    at the end, as torch's CUDA kernels round; its CPU float16 kernel rounds each product)."""
    return grad_out * (1 - out) * out


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


@quiet  # inf * 0 where torch gives NaN without a warning
def tanh_backward(grad_out: np.ndarray, out: np.ndarray) -> np.ndarray:
    """torch's tanh_backward ``a * (1 - b * b)`` as its builds compile it, ``1 - b * b`` one fma
    (one rounding): for float32 and float16 outputs computed in float64, where b * b is exact, and
    rounded once (torch's CPU result bit for bit); float64 in float64 (two roundings, where
    torch's fma rounds once: within an ulp)."""
    out = np.asarray(out)
    if out.dtype.itemsize <= 4 and out.dtype.kind == "f":
        wide = out.astype(np.float64)
        one_minus = (1 - wide * wide).astype(out.dtype)
    else:
        one_minus = 1 - out * out
    return grad_out * one_minus


FORWARD = {"relu": relu, "sigmoid": sigmoid, "tanh": tanh}
BACKWARD = {"relu": relu_backward, "sigmoid": sigmoid_backward, "tanh": tanh_backward}


def activate(x: np.ndarray, activation) -> np.ndarray:
    """Apply the named activation (``None`` = identity); used by fused epilogues."""
    return x if activation is None else FORWARD[activation](x)


def activate_backward(grad_out: np.ndarray, out: np.ndarray, activation) -> np.ndarray:
    return grad_out if activation is None else BACKWARD[activation](grad_out, out)
