"""NumPy reference for the optimizers and gradient clipping (NumPy only).

Every step function updates its arrays **in place** and mirrors the arithmetic order of
torch's single-tensor implementations (``torch/optim/<name>.py``, ``_single_tensor_<name>``),
so that float64 trajectories agree with ``torch.optim`` to a few ulps per step (torch's CPU
kernels contract some of these expressions into FMAs, NumPy does not, so bit-equality is not
promised).

Conventions shared by every step function:

* ``params``, ``grads`` and the state lists are parallel lists of arrays of one floating dtype
  (float32 or float64); arrays of one index have the same shape. Arrays may be non-contiguous;
  contiguous ones are processed in cache-sized blocks with preallocated scratch.
* ``steps`` holds each parameter's step count **after** this step's increment (torch
  increments ``state["step"]`` first), as Python numbers.
* Hyperparameters are Python floats / bools named as in ``torch.optim``.
* Not supported: sparse gradients, complex parameters, tensor-valued hyperparameters.
* inf / NaN / overflowing values propagate as in torch, without NumPy's RuntimeWarnings (torch
  does not warn): each public function runs under one ``np.errstate`` (:func:`._errstate.quiet`).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ._errstate import quiet
from ._ufuncs import negative

__all__ = [
    "sgd_step",
    "adagrad_step",
    "adadelta_step",
    "rmsprop_step",
    "adam_step",
    "adamw_step",
    "clip_grad_norm",
    "total_norm",
    "lerp_",
]

# 32 Ki elements per block: the ~8 arrays an Adam block touches stay in L2, so each array
# crosses the memory bus once per step instead of once per ufunc.
BLOCK = 1 << 15

# per thread: NumPy releases the GIL inside its loops, so two threads stepping their own
# optimizers at once overwrote each other's temporaries in one shared set (Adam's denominators:
# NaN parameters)
_SCRATCH = threading.local()


def _scratch(dtype, n: int, k: int) -> list[np.ndarray]:
    """``k`` reusable scratch vectors of at least ``n`` elements of ``dtype``, this thread's."""
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    key = (np.dtype(dtype), k)
    bufs = cache.get(key)
    if bufs is None or bufs[0].size < n:
        bufs = [np.empty(max(n, 1), dtype=dtype) for _ in range(k)]
        cache[key] = bufs
    return bufs


def _blocks(arrays, k: int):
    """Yield ``(views, scratch)``: matching pieces of ``arrays`` and ``k`` scratch arrays of the
    pieces' shape. Contiguous arrays are cut into flat blocks of :data:`BLOCK` elements;
    a non-contiguous array is yielded whole (its views write through) with fresh scratch."""
    first = arrays[0]
    n = first.size
    if n == 0:
        return
    if all(a.flags.c_contiguous for a in arrays):
        flats = [a.reshape(-1) for a in arrays]
        bs = min(n, BLOCK)
        scratch = _scratch(first.dtype, bs, k)
        for s in range(0, n, bs):
            e = min(n, s + bs)
            yield [f[s:e] for f in flats], [b[: e - s] for b in scratch]
    else:
        yield list(arrays), [np.empty(first.shape, first.dtype) for _ in range(k)]


def lerp_(start: np.ndarray, end: np.ndarray, weight: float, tmp: np.ndarray) -> None:
    """``start`` <- torch.lerp(start, end, weight), torch's two-sided formula:
    ``start + w (end - start)`` for |w| < 0.5, else ``end - (end - start)(1 - w)``."""
    np.subtract(end, start, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        start += tmp
    else:
        tmp *= 1.0 - weight
        np.subtract(end, tmp, out=start)


def _vectors(*arrays) -> list:
    """The arrays, 0-d ones as 1-element views of the same memory: NumPy returns a scalar, not a
    0-d array, from a ufunc on 0-d operands, and a later ``out=`` cannot take it (a 0-d parameter,
    a learnable temperature say, is as common as any other)."""
    return [a.reshape(1) if a.ndim == 0 else a for a in arrays]


def _effective_grad(p, g, weight_decay: float, maximize: bool, out) -> np.ndarray:
    """``(-g if maximize else g) + weight_decay * p`` (torch: ``grad.add(param, alpha=wd)``);
    returns ``g`` itself when there is nothing to do, else ``out``."""
    if maximize:
        negative(g, out)
        g = out
    if weight_decay != 0:
        tmp = np.multiply(p, weight_decay)
        np.add(g, tmp, out=out)
        g = out
    return g


@quiet
def sgd_step(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False) -> None:
    """SGD: ``g += wd p``; ``b = g`` on the first step else ``b = momentum b + (1 - dampening) g``;
    ``g = g + momentum b`` (nesterov) or ``g = b``; ``p -= lr g``.

    ``momentum_buffers`` is a list parallel to ``params`` (ignored when momentum is 0); a
    ``None`` entry is replaced by a new buffer (torch's first step).
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.size == 0:
            if momentum != 0 and momentum_buffers[i] is None:
                momentum_buffers[i] = g.copy()
            continue
        d = np.empty_like(p)
        g = _effective_grad(p, g, weight_decay, maximize, d)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = np.array(g, copy=True)
                momentum_buffers[i] = buf
            else:
                buf *= momentum
                buf += np.multiply(g, 1.0 - dampening)
            if nesterov:
                g = np.add(g, np.multiply(buf, momentum))
            else:
                g = buf
        p += np.multiply(g, -lr)


@quiet
def adagrad_step(params, grads, state_sums, steps, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                 maximize=False) -> None:
    """Adagrad: ``clr = lr / (1 + (step - 1) lr_decay)``; ``sum += g^2``;
    ``p -= clr g / (sqrt(sum) + eps)``."""
    for p, g, s, step in zip(params, grads, state_sums, steps):
        if p.size == 0:
            continue
        clr = lr / (1 + (step - 1) * lr_decay)
        d = np.empty_like(p)
        g = _effective_grad(p, g, weight_decay, maximize, d)
        s += np.multiply(g, g)
        std = np.sqrt(s)
        std += eps
        t = np.multiply(g, -clr)
        t /= std
        p += t


@quiet
def adadelta_step(params, grads, square_avgs, acc_deltas, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0,
                  maximize=False) -> None:
    """Adadelta: ``v = rho v + (1 - rho) g^2``; ``delta = sqrt(u + eps) / sqrt(v + eps) g``;
    ``u = rho u + (1 - rho) delta^2``; ``p -= lr delta``."""
    for p, g, v, u in zip(params, grads, square_avgs, acc_deltas):
        if p.size == 0:
            continue
        p, g, v, u = _vectors(p, g, v, u)
        d = np.empty_like(p)
        g = _effective_grad(p, g, weight_decay, maximize, d)
        v *= rho
        t = np.multiply(g, 1 - rho)
        t *= g
        v += t
        std = np.add(v, eps)
        np.sqrt(std, out=std)
        delta = np.add(u, eps)
        np.sqrt(delta, out=delta)
        delta /= std
        delta *= g
        u *= rho
        np.multiply(delta, 1 - rho, out=t)
        t *= delta
        u += t
        np.multiply(delta, -lr, out=t)
        p += t


@quiet
def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr=1e-2, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False) -> None:
    """RMSprop: ``v = alpha v + (1 - alpha) g^2``; centered: ``gbar = lerp(gbar, g, 1 - alpha)``,
    ``avg = sqrt(v - gbar^2) + eps`` else ``avg = sqrt(v) + eps``; momentum:
    ``b = momentum b + g / avg``, ``p -= lr b``; else ``p -= lr g / avg``.

    ``grad_avgs`` is used only when centered, ``momentum_buffers`` only when momentum > 0
    (entries may be None otherwise).
    """
    for i, (p, g, v) in enumerate(zip(params, grads, square_avgs)):
        if p.size == 0:
            continue
        p, g, v = _vectors(p, g, v)
        d = np.empty_like(p)
        g = _effective_grad(p, g, weight_decay, maximize, d)
        v *= alpha
        t = np.multiply(g, 1 - alpha)
        t *= g  # g^2 may overflow to inf, as in torch
        v += t
        if centered:
            (ga,) = _vectors(grad_avgs[i])
            lerp_(ga, g, 1 - alpha, t)
            avg = np.multiply(ga, -1)
            avg *= ga
            avg += v
            # torch's addcmul(v, ga, ga, value=-1) is one fused multiply-add (CPU and CUDA), so
            # ga^2 is never rounded alone: v = +inf (g^2 overflowed) minus a finite ga^2 is +inf.
            # NumPy rounds ga^2 first, which overflows too once |ga| > sqrt(max) and makes
            # inf - inf = NaN; that is the only case where the two differ in a special value
            # (a finite v with an overflowing ga^2 is negative either way, and sqrt gives NaN).
            np.copyto(avg, v, where=np.isposinf(v) & np.isfinite(ga))
            np.sqrt(avg, out=avg)  # a negative avg gives NaN, silently as in torch
        else:
            avg = np.sqrt(v)  # v < 0 (torch takes alpha > 1) gives NaN silently
        avg += eps
        if momentum > 0:
            (buf,) = _vectors(momentum_buffers[i])
            buf *= momentum
            np.divide(g, avg, out=t)
            buf += t
            np.multiply(buf, -lr, out=t)
            p += t
        else:
            np.multiply(g, -lr, out=t)
            t /= avg
            p += t


@quiet
def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False) -> None:
    """Adam (AdamW with ``decoupled_weight_decay=True``):

    ``p *= 1 - lr wd`` (decoupled) or ``g += wd p``; ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2 v + (1 - beta2) g^2``; amsgrad: ``vmax = max(vmax, v)``, used for v below;
    ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.

    ``max_exp_avg_sqs`` is used only with amsgrad. Contiguous arrays run in blocks with
    preallocated scratch (no allocation per call once warm).
    """
    beta1, beta2 = betas
    w1, w2 = 1 - beta1, 1 - beta2
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        neg_step_size = -(lr / bias_correction1)
        bc2_sqrt = bias_correction2**0.5
        arrays = [p, g, m, v] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        for views, (t0, t1) in _blocks(arrays, 2):
            pb, gb, mb, vb = views[:4]
            if weight_decay != 0 and decoupled_weight_decay:
                pb *= 1 - lr * weight_decay
            if maximize:
                negative(gb, t1)
                gb = t1
            if weight_decay != 0 and not decoupled_weight_decay:
                np.multiply(pb, weight_decay, out=t0)
                np.add(gb, t0, out=t1)
                gb = t1
            lerp_(mb, gb, w1, t0)
            vb *= beta2
            np.multiply(gb, w2, out=t0)
            t0 *= gb
            vb += t0
            if amsgrad:
                np.maximum(views[4], vb, out=views[4])
                np.sqrt(views[4], out=t0)
            else:
                np.sqrt(vb, out=t0)
            t0 /= bc2_sqrt
            t0 += eps
            np.multiply(mb, neg_step_size, out=t1)
            t1 /= t0
            pb += t1


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False) -> None:
    """AdamW: :func:`adam_step` with decoupled weight decay (``p *= 1 - lr wd`` first)."""
    adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, betas=betas, eps=eps,
              weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True)


def _norm(a: np.ndarray, norm_type: float):
    """torch.linalg.vector_norm(a, norm_type) in ``a``'s dtype."""
    x = np.abs(a.reshape(-1)) if a.flags.c_contiguous else np.abs(a).reshape(-1)
    if x.size == 0:
        return a.dtype.type(0)
    if math.isinf(norm_type):
        return x.max() if norm_type > 0 else x.min()
    if norm_type == 2:
        return np.sqrt(np.dot(x, x))  # an overflowing sum of squares is inf, silently as in torch
    if norm_type == 1:
        return x.sum(dtype=a.dtype)
    if norm_type == 0:
        return a.dtype.type(np.count_nonzero(x))
    return a.dtype.type(np.sum(x ** norm_type) ** (1.0 / norm_type))


@quiet
def total_norm(grads, norm_type: float = 2.0, error_if_nonfinite: bool = False, round_total=None, round_each=None):
    """The ``norm_type``-norm of all ``grads`` viewed as one vector (torch: the norm of the
    per-tensor norms, stacked in their promoted dtype), as a NumPy scalar of the arrays' promoted
    dtype (float32 0.0 when ``grads`` is empty). Raises RuntimeError with torch's message when it
    is non-finite and ``error_if_nonfinite``. Each per-tensor norm is taken in its array's dtype;
    the dispatch hands float16 / bfloat16 gradients over widened to float32, with
    ``round_each[i](x) -> float`` (None: none) rounding gradient i's norm to its own dtype as
    torch's is (a float16 gradient whose own norm passes 65504 makes torch's total inf, float32
    gradients beside it or not). ``round_total(x) -> float``: the total rounded to the dtype the
    caller returns it in (torch's is in the gradients' promoted dtype), before the check and any
    use: a half total past the half range is then inf, as torch's."""
    return _total_norm(grads, norm_type, error_if_nonfinite, round_total, round_each)


def _total_norm(grads, norm_type: float = 2.0, error_if_nonfinite: bool = False, round_total=None, round_each=None):
    """:func:`total_norm` without its errstate, for callers that run under one already."""
    norm_type = float(norm_type)
    if len(grads) == 0:
        return np.float32(0.0)
    dt = np.result_type(*(g.dtype for g in grads))
    norms = [_norm(g, norm_type) for g in grads]
    if round_each is not None:
        norms = [n if r is None else r(float(n)) for n, r in zip(norms, round_each)]
    norms = np.array(norms, dtype=dt)
    total = dt.type(_norm(norms, norm_type))
    if round_total is not None:
        total = dt.type(round_total(float(total)))
    if error_if_nonfinite and not np.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    return total


@quiet
def clip_grad_norm(grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   round_total=None, round_each=None):
    """Scale every gradient in place by ``min(1, max_norm / (total + 1e-6))`` (always multiplied,
    as torch does) and return the total norm (see :func:`total_norm`, also for ``round_total``
    and ``round_each``)."""
    total = _total_norm(grads, norm_type, error_if_nonfinite, round_total, round_each)
    if len(grads) == 0:
        return total
    dt = total.dtype.type
    # torch: max_norm / (total + 1e-6) on a 0-d tensor is reciprocal(total + 1e-6) * max_norm,
    # in the total's dtype: a half total's sum, reciprocal and product each rounded to it (the
    # gradients then scale by that rounded coefficient, as torch's mul_ by it)
    rnd = (lambda v: dt(round_total(float(v)))) if round_total is not None else (lambda v: v)
    coef = rnd(rnd(dt(1.0) / rnd(total + dt(1e-6))) * dt(float(max_norm)))
    coef = coef if np.isnan(coef) else min(coef, dt(1.0))
    for g in grads:  # a non-finite norm scales to NaN, as in torch
        g *= coef
    return total
