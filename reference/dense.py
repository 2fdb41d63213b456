"""NumPy reference for the dense family: flatten, linear (+ fused activation), softmax,
log_softmax and cross_entropy, forward and explicit backward (NumPy only).

Every function mirrors its ``torch.nn.functional`` namesake on NumPy arrays and computes in
the dtype of its input (the dispatch widens float16/bfloat16 to float32 before calling).
Nothing here loops in Python over batch elements or rows: reductions are NumPy reductions
over an axis and matrix products go to BLAS. inf / NaN inputs give torch's inf / NaN, without
NumPy's RuntimeWarnings (torch does not warn): one ``np.errstate`` per public call.
"""

from __future__ import annotations

import math

import numpy as np

from . import activation as _act
from ._errstate import quiet
from ._ufuncs import negative

REDUCTIONS = ("none", "mean", "sum")
# cross_entropy with class indices and no label smoothing takes a path of fewer NumPy calls
# (_ce_index_rows, _ce_index_backward); False: the general one (the tests compare the two)
INDEX_PATH = True


# --------------------------------------------------------------------------- flatten


def flatten(x: np.ndarray, start_dim: int = 1, end_dim: int = -1) -> np.ndarray:
    """Merge dims ``start_dim..end_dim`` of ``x`` into one (torch.flatten's rule, 0-d -> (1,)).

    Always returns a fresh array, never a view of ``x``: a custom op must not alias its input.
    """
    if x.ndim == 0:
        return x.reshape(1).copy()
    nd = x.ndim
    s, e = start_dim % nd, end_dim % nd
    shape = x.shape[:s] + (int(np.prod(x.shape[s:e + 1], dtype=np.int64)),) + x.shape[e + 1:]
    return np.array(x.reshape(shape), copy=True)


def flatten_backward(grad_out: np.ndarray, input_shape) -> np.ndarray:
    return np.array(grad_out.reshape(input_shape), copy=True)


# --------------------------------------------------------------------------- linear


@quiet
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, activation=None) -> np.ndarray:
    """y = act(x @ w.T + b).

    x: [..., K] (any number of leading dims, including none), w: [O, K], b: [O] or None;
    returns [..., O]. ``activation`` is None, 'relu', 'sigmoid' or 'tanh'.
    """
    if x.ndim == 2:  # the usual case: no reshape either way
        y = x @ w.T
        if b is not None:
            y += b
        return y if activation is None else _act.FORWARD[activation](y)
    lead = x.shape[:-1]
    M = math.prod(lead)  # not -1: a zero-size dim (K = 0 included) leaves -1 undefined
    x2 = x.reshape(M, x.shape[-1])
    y = x2 @ w.T  # K = 0: a [M, O] zero matrix, as torch
    if b is not None:
        y += b
    y = _act.activate(y, activation)
    return y.reshape(*lead, w.shape[0])


@quiet
def linear_backward(grad_out: np.ndarray, x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None,
                    activation=None, has_bias: bool = True, need_input: bool = True, need_weight: bool = True):
    """(dx, dw, db) of :func:`linear`. ``out`` (the forward output) is needed only when an
    activation is fused: the derivatives of relu / sigmoid / tanh are written through it.

    dY' = act'(dY), dx = dY' @ w, dw = dY'^T @ x, db = column sums of dY' (None without bias);
    dx (dw) is None, not computed, where ``need_input`` (``need_weight``) is False.
    """
    K, O = x.shape[-1], w.shape[0]
    flat = x.ndim == 2 and grad_out.ndim == 2  # the usual case: no reshape
    M = x.shape[0] if flat else math.prod(x.shape[:-1])
    g = grad_out if flat else grad_out.reshape(M, O)
    if activation is not None:
        g = _act.activate_backward(g, out if flat else out.reshape(M, O), activation)
    dx = None if not need_input else (g @ w if flat else (g @ w).reshape(x.shape))
    dw = (g.T @ (x if flat else x.reshape(M, K))) if need_weight else None  # x read only here
    db = column_sums(g) if has_bias else None
    return dx, dw, db


def column_sums(g: np.ndarray) -> np.ndarray:
    """The column sums of a 2-d gradient (a bias gradient), accumulated in float64 where ``g``
    is narrower, rounded once to its dtype: NumPy adds along axis 0 one row at a time (its
    pairwise summation runs along a contiguous axis only), so a float32 sum over M rows erred as
    M x eps (60x torch's pairwise sum at M = 65536, 10x at 1024; an accuracy audit)."""
    if g.dtype == np.float64:
        return np.add.reduce(g, axis=0)
    return np.add.reduce(g, axis=0, dtype=np.float64).astype(g.dtype)


# --------------------------------------------------------------------------- softmax


def _norm_dim(dim: int, ndim: int) -> int:
    return dim % max(ndim, 1)


def shifted_log_sum(x: np.ndarray, dim: int):
    """(x - m, log(sum(exp(x - m)))) over ``dim``, m = max(x) (the second keeps the dim).

    log_softmax is (x - m) - log_s: the shift is subtracted from each x *before* the small
    log_s is, so nothing large cancels (x - lse with lse = m + log_s rounded to x's precision
    gives log_softmax([1e8, 1e8]) = [0, 0] in float32, torch -0.693). The arithmetic is
    torch's, so is the NaN placement: a row holding NaN or +inf, or all -inf, has x - m NaN
    somewhere, hence a NaN log_s and an all-NaN row; a -inf entry of a finite row gives -inf.
    """
    m = np.maximum.reduce(x, axis=dim, keepdims=True)  # x.max without its Python wrapper
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = np.subtract(x, m)
        e = np.exp(shifted)
        log_s = np.log(np.add.reduce(e, axis=dim, keepdims=True))
    return shifted, log_s


def softmax(x: np.ndarray, dim: int) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) over ``dim`` (any shape; 0-d gives 1).

    NaN as torch: a row holding NaN or +inf, or all -inf, is all NaN."""
    if x.ndim == 0:
        return np.exp(x - x)
    if x.size == 0:  # np.max has no identity for an empty softmax dim
        return np.empty(x.shape, x.dtype)
    dim = _norm_dim(dim, x.ndim)
    # the ufuncs' reduce: x.max / e.sum without their Python wrappers (the same results)
    m = np.maximum.reduce(x, axis=dim, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.subtract(x, m)
        np.exp(e, out=e)
        e /= np.add.reduce(e, axis=dim, keepdims=True)
    return e


@quiet
def softmax_backward(grad_out: np.ndarray, out: np.ndarray, dim: int) -> np.ndarray:
    """dx = y * (g - sum(g * y)) over ``dim``, written through the forward output y."""
    if out.ndim == 0:
        return grad_out * out * (1 - out)
    dim = _norm_dim(dim, out.ndim)
    return out * np.subtract(grad_out, np.add.reduce(grad_out * out, axis=dim, keepdims=True))


def log_softmax(x: np.ndarray, dim: int) -> np.ndarray:
    """(x - m) - log(sum(exp(x - m))) over ``dim``, m = max(x): see :func:`shifted_log_sum`."""
    if x.ndim == 0:
        return x - x
    if x.size == 0:
        return np.empty(x.shape, x.dtype)
    dim = _norm_dim(dim, x.ndim)
    shifted, log_s = shifted_log_sum(x, dim)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted -= log_s
    return shifted


def log_softmax_backward(grad_out: np.ndarray, out: np.ndarray, dim: int) -> np.ndarray:
    """dx = g - exp(y) * sum(g) over ``dim``, y the forward output (log-probabilities)."""
    if out.ndim == 0:
        return grad_out - np.exp(out) * grad_out
    dim = _norm_dim(dim, out.ndim)
    with np.errstate(invalid="ignore", over="ignore"):
        return grad_out - np.exp(out) * np.add.reduce(grad_out, axis=dim, keepdims=True)


# --------------------------------------------------------------------------- cross_entropy


def _ce_layout(x: np.ndarray, target: np.ndarray):
    """Move the class dim last: x -> [M, C]; returns (x2, target2, lead_shape, prob).

    Input [N, C, d1, ...] (class dim 1) or unbatched [C] (class dim 0). Class-index targets
    are [N, d1, ...] / [] ; probability targets have the input's shape.
    """
    prob = target.dtype.kind == "f"  # a floating dtype (np.issubdtype costs a microsecond)
    if x.ndim == 1:
        x = x[None]
        target = target[None]
    C = x.shape[1]
    xl = x if x.ndim == 2 else np.moveaxis(x, 1, -1)  # [N, C] is laid out already
    lead = xl.shape[:-1]
    x2 = xl.reshape(-1, C)
    if prob:
        t2 = (target if target.ndim == 2 else np.moveaxis(target, 1, -1)).reshape(-1, C)
    else:
        t2 = target.reshape(-1).astype(np.int64, copy=False)
    return x2, t2, lead, prob




def _smoothed(t2: np.ndarray, eps: float, dtype) -> np.ndarray:
    tt = t2.astype(dtype, copy=True)
    if eps > 0:
        tt *= 1 - eps
        tt += eps / t2.shape[1]
    return tt


def _weights(weight, C, dtype):
    return np.ones(C, dtype) if weight is None else weight.astype(dtype, copy=False)


def _ce_logp(x2: np.ndarray, stats: np.ndarray | None = None):
    """(log_softmax of x2 [M, C] over C, stats [2, M] = (row max, log sum exp(x - max))).

    The rows' max and log-sum are the statistics kept for the backward instead of a
    logsumexp: m + log_s rounds to x's precision and x - (m + log_s) would lose everything
    below it (cross-entropy [1e8, 1e8] -> loss 0, gradient [0, 1]; torch 0.693, [-0.5, 0.5]).
    """
    if stats is None:
        shifted, log_s = shifted_log_sum(x2, 1)
        stats = np.empty((2, x2.shape[0]), x2.dtype)
        x2.max(axis=1, out=stats[0])
        stats[1] = log_s[:, 0]
    else:
        stats = stats.reshape(2, -1).astype(x2.dtype, copy=False)
        with np.errstate(invalid="ignore", over="ignore"):
            shifted = x2 - stats[0][:, None]
        log_s = stats[1][:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        shifted -= log_s
    return shifted, stats


def _ce_rows(x2, t2, prob, weight, ignore_index, eps):
    """Per-row losses [M], the per-row weights that 'mean' divides by [M], and the row
    statistics [2, M] of :func:`_ce_logp`.

    Term by term as torch: -logp_c = log_s - (x_c - m) times its weight, so a 0 weight on a
    -inf logit gives NaN as torch's 0 * inf does, and nothing overflows that torch keeps finite
    (label smoothing over [2e38, 2e38, 1]: the sum of the weighted logits would be inf).
    """
    M, C = x2.shape
    if INDEX_PATH and not prob and not eps > 0 and M and C:
        return _ce_index_rows(x2, t2, weight, ignore_index)
    logp, stats = _ce_logp(x2)
    w = _weights(weight, C, x2.dtype)
    if prob:
        wtt = _smoothed(t2, eps, x2.dtype)
        wtt *= w
        with np.errstate(invalid="ignore", over="ignore"):
            loss = -np.sum(logp * wtt, axis=1)
        return loss, np.ones(M, x2.dtype), stats
    valid = t2 != ignore_index
    tc = np.where(valid, t2, 0)
    wt = np.where(valid, w[tc], 0).astype(x2.dtype, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        loss = np.where(valid, -logp[np.arange(M), tc] * wt, 0).astype(x2.dtype, copy=False)
        if eps > 0:  # torch adds the smoothing term only when eps > 0 (0 * inf would be NaN)
            smooth = np.where(valid, -np.sum(logp * w, axis=1), 0)
            loss = (1 - eps) * loss + (eps / C) * smooth
    return loss, wt, stats


def _ce_targets(t2, ignore_index):
    """``(valid, n_valid, every, tc)`` of class-index targets ``t2 [M]``: the rows whose target
    is not ``ignore_index``, their count, whether that is all of them, and the targets with
    ignored ones replaced by class 0 (t2 itself when none is ignored), fit for indexing."""
    valid = t2 != ignore_index
    n_valid = np.count_nonzero(valid)
    every = n_valid == t2.shape[0]
    return valid, n_valid, every, (t2 if every else np.where(valid, t2, 0))


def _ce_target_weights(weight, dt, tc, valid, every):
    """The class weight of each row's target (0 for ignored rows), in dtype ``dt``."""
    wt = weight.astype(dt, copy=False)[tc]
    if not every:
        wt[~valid] = 0
    return wt


def _ce_index_rows(x2, t2, weight, ignore_index):
    """:func:`_ce_rows` for class indices without label smoothing (M, C > 0), the common case,
    the row weights None where every one is 1 (no weight, no ignored target),
    in fewer NumPy calls (at a loss's usual sizes each call costs about a microsecond whatever
    it does): only the target's log-probability per row is formed, the row max is taken once,
    one error-state block. The same operations per element as the general path, so the same
    values (tests/test_dense.py compares the two)."""
    M = x2.shape[0]
    stats = np.empty((2, M), x2.dtype)
    m = np.maximum.reduce(x2, axis=1, out=stats[0])
    rows = np.arange(M)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = np.subtract(x2, m[:, None])
        e = np.exp(shifted)
        np.log(np.add.reduce(e, axis=1), out=stats[1])
        valid, _, every, tc = _ce_targets(t2, ignore_index)
        loss = shifted[rows, tc]
        loss -= stats[1]
        negative(loss, loss)  # -logp[t]
        if weight is None:
            wt = None if every else valid.astype(x2.dtype)  # None: all ones
        else:
            wt = _ce_target_weights(weight, x2.dtype, tc, valid, every)
            loss *= wt
        if not every:
            loss[~valid] = 0
    return loss, wt, stats


def cross_entropy_forward(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0):
    """(loss, stats): :func:`cross_entropy` and the [2, M] row statistics (max, log-sum-exp
    of x - max; class dim moved last, M = x.size / C), which :func:`cross_entropy_backward`
    reuses."""
    x2, t2, _, prob = _ce_layout(x, target)
    loss, wt, stats = _ce_rows(x2, t2, prob, weight, ignore_index, label_smoothing)
    if reduction == "none":
        out = loss.reshape(ce_loss_shape(x.shape, target.shape, prob))
    elif reduction == "sum":
        out = np.asarray(np.add.reduce(loss), dtype=x.dtype)
    else:
        total = x2.shape[0] if wt is None else np.add.reduce(wt)  # None: M weights of 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.asarray(np.add.reduce(loss) / total, dtype=x.dtype)
        if label_smoothing > 0 and not prob and total == 0:
            # torch averages its nll and smoothing terms separately: the nll term is 0 / 0
            out = np.asarray(np.nan, dtype=x.dtype)
    return out, stats


def cross_entropy(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> np.ndarray:
    """torch.nn.functional.cross_entropy on NumPy arrays.

    x: [N, C, d1, ...] or [C] logits. target: class indices [N, d1, ...] / [] (integers;
    ``ignore_index`` rows contribute 0) or class probabilities of x's shape (floats).
    weight: [C] or None. Per element, with logp = log_softmax over C and eps = label_smoothing:

    * indices: l = (1 - eps) * w[t] * -logp[t] + eps / C * sum_c w_c * -logp_c
    * probabilities: l = -sum_c w_c * ((1 - eps) * t_c + eps / C) * logp_c

    'mean' divides the sum by the sum of w[t] over non-ignored elements (indices) or by the
    number of elements N * d1 * ... (probabilities), exactly as torch does; 'none' returns
    the per-element losses ([N, d1, ...], or [] for a [C] input).
    """
    return cross_entropy_forward(x, target, weight, ignore_index, reduction, label_smoothing)[0]


def _ce_row_scale(grad_out, x2, t2, prob, weight, ignore_index, reduction):
    """d(reduced loss)/d(per-row loss) as an [M] vector."""
    M, C = x2.shape
    g = np.asarray(grad_out, dtype=x2.dtype)
    if reduction == "none":
        return g.reshape(M)
    if reduction == "sum":
        return np.full(M, g, x2.dtype)
    if prob:
        denom = M
    else:
        valid = t2 != ignore_index
        denom = np.sum(valid) if weight is None else np.sum(weight.astype(x2.dtype)[t2[valid]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.full(M, g / x2.dtype.type(denom), x2.dtype)


def cross_entropy_backward(grad_out: np.ndarray, x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
                           ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                           lse: np.ndarray | None = None) -> np.ndarray:
    """d loss / d x, with p = softmax(x) over C (= exp((x - m) - log_s), from the forward's row
    statistics ``lse`` = [2, M] (m, log_s) when given), s = the row's share of grad_out,
    W = sum(w):

    * indices: s * ((1 - eps) * w[t] * (p - onehot(t)) + eps / C * (W * p - w)), 0 on ignored rows
    * probabilities: s * (p * sum_c w_c t'_c - w * t'), t' the smoothed target
    """
    x2, t2, _, prob = _ce_layout(x, target)
    M, C = x2.shape
    eps = label_smoothing
    if INDEX_PATH and not prob and not eps > 0 and M and C:
        return _ce_unlayout(_ce_index_backward(grad_out, x2, t2, weight, ignore_index, reduction, lse), x)
    g2, _ = _ce_logp(x2, lse)
    s = _ce_row_scale(grad_out, x2, t2, prob, weight, ignore_index, reduction)
    w = _weights(weight, C, x2.dtype)
    np.exp(g2, out=g2)  # p
    if prob:
        wtt = _smoothed(t2, eps, x2.dtype)
        wtt *= w
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf where torch has them
            g2 *= (s * wtt.sum(axis=1))[:, None]
            wtt *= s[:, None]
            g2 -= wtt
        return _ce_unlayout(g2, x)
    valid = t2 != ignore_index
    tc = np.where(valid, t2, 0)
    with np.errstate(invalid="ignore", over="ignore"):  # s is inf/NaN when 'mean' has nothing to average
        s = np.where(valid, s, 0).astype(x2.dtype, copy=False)
        wt = np.where(valid, w[tc], 0).astype(x2.dtype, copy=False)
        g2 *= (s * ((1 - eps) * wt + (eps / C) * w.sum()))[:, None]
        if eps > 0:
            g2 -= np.outer(s * (eps / C), w)
        g2[np.arange(M), tc] -= s * (1 - eps) * wt
    return _ce_unlayout(g2, x)


def _ce_index_backward(grad_out, x2, t2, weight, ignore_index, reduction, lse):
    """:func:`cross_entropy_backward` on [M, C] for class indices without label smoothing
    (M, C > 0): s w[t] (p - onehot(t)) per row in fewer NumPy calls, the same operations per
    element as the general path (tests/test_dense.py compares the two)."""
    M = x2.shape[0]
    dt = x2.dtype
    rows = np.arange(M)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if lse is None:
            m = np.maximum.reduce(x2, axis=1)
            g2 = np.subtract(x2, m[:, None])
            log_s = np.log(np.add.reduce(np.exp(g2), axis=1))
        else:
            st = lse.reshape(2, M).astype(dt, copy=False)
            g2 = np.subtract(x2, st[0][:, None])
            log_s = st[1]
        g2 -= log_s[:, None]
        np.exp(g2, out=g2)  # p
        valid, n_valid, every, tc = _ce_targets(t2, ignore_index)
        g = np.asarray(grad_out, dtype=dt)
        if reduction == "none":
            s = g.reshape(M).copy()
        else:
            if reduction == "sum":
                g1 = g
            else:
                denom = n_valid if weight is None else np.add.reduce(weight.astype(dt)[t2[valid]])
                g1 = g / dt.type(denom)
            s = np.full(M, g1, dt)
        if not every:
            s[~valid] = 0
        if weight is not None:
            s *= _ce_target_weights(weight, dt, tc, valid, every)  # s w[t]
        g2 *= s[:, None]
        g2[rows, tc] -= s
    return g2


@quiet
def cross_entropy_target_backward(grad_out: np.ndarray, x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
                                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                                  lse: np.ndarray | None = None) -> np.ndarray:
    """d loss / d target for probability targets: -s * (1 - eps) * w * logp (``lse``: as in
    :func:`cross_entropy_backward`)."""
    x2, t2, _, prob = _ce_layout(x, target)
    M, C = x2.shape
    g2, _ = _ce_logp(x2, lse)
    s = _ce_row_scale(grad_out, x2, t2, prob, weight, ignore_index, reduction)
    w = _weights(weight, C, x2.dtype)
    # (-(1 - eps) s) w first, then logp, as the Triton kernels order it: the row's scale (1 / N
    # for 'mean') before a large logp, whose product with the weight alone overflowed to inf where
    # torch's gradient is finite (a non-finite-values audit)
    g2 *= (-(1 - label_smoothing) * s)[:, None] * w
    return _ce_unlayout(g2, x)


def ce_loss_shape(input_shape, target_shape, prob: bool) -> tuple:
    """Shape of the 'none' loss: the input's without the class dim ([] for a 1-d input)."""
    if len(input_shape) <= 1:
        return ()
    return tuple(input_shape[:1]) + tuple(input_shape[2:])



def _ce_unlayout(g2: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[M, C] back to x's layout (class dim 1, or 0 for a 1-d input)."""
    if x.ndim == 1:
        return np.ascontiguousarray(g2.reshape(x.shape))
    if x.ndim == 2:  # [N, C] is the layout already
        return np.ascontiguousarray(g2)
    C = x.shape[1]
    lead = (x.shape[0],) + x.shape[2:]
    return np.ascontiguousarray(np.moveaxis(g2.reshape(*lead, C), -1, 1))
