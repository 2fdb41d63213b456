"""NumPy reference for max / avg / min pooling, 1d and 2d, forward and explicit backward.

Shapes: 2d functions take ``[..., H, W]`` (torch's ``[N, C, H, W]`` or unbatched ``[C, H, W]``),
1d functions ``[..., L]``; any strides (non-contiguous and channels_last views are read in
place). Outputs are fresh C-contiguous arrays.

Semantics are torch's (``aten/src/ATen/native/cpu/MaxPoolKernel.cpp`` / ``AvgPoolKernel.cpp``):

* output size ``floor_or_ceil((L + 2p - d(k-1) - 1) / s) + 1``; with ``ceil_mode`` the last
  window is dropped when it would start past the input and its left padding
  (``(out - 1) s >= L + p``).
* max: windows are visited in row-major tap order and a tap replaces the running best when
  ``v > best or isnan(v)``, so ties keep the first position and a NaN wins (the last NaN of a
  window, as torch). Indices are flat positions in the input's spatial plane (``ih * W + iw``),
  int64. A window whose taps all fall in the padding (possible only with dilation > 1 on tiny
  inputs) gives ``-inf`` and index ``-1``: torch returns an out-of-range index there and its
  backward writes out of bounds; ours marks it and the backward skips it.
* min: ``-max_pool(-x)``, indices included.
* avg: sum of the window's in-input values divided by ``divisor_override`` if given, else by
  the window size clipped to the padded input (``count_include_pad``) or to the input. Avg
  has no dilation (as torch).

inf / NaN values propagate as in torch, without NumPy's RuntimeWarnings (torch does not warn): the
average and the backward cores (the ops' entry points) run under one ``np.errstate`` each.

Not supported: return of int dtypes, 3d pooling, fractional/adaptive/lp pooling.
"""

from __future__ import annotations

import functools

import numpy as np

from ._errstate import quiet
from ._ufuncs import negative

# Small inputs take a gather path (one fancy index and one reduction, or one product with a
# 0/1 window matrix) whose index tables are cached per geometry: on a few hundred elements the
# per-tap loops below cost a dozen NumPy calls per tap, which is all of their time. Large
# inputs keep the loops (the gathered copy is k_h * k_w times the output).
SMALL = 1 << 15  # elements of the gathered [planes, windows, taps] array (or window matrix)


def _pair(v, n: int, name: str = "value") -> tuple:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {v}")
    return v


def out_size(length: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape for one spatial dimension."""
    num = length + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1  # floor division (rounds towards -inf, as torch's div_rtn)
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1
    return out


def _params2d(kernel_size, stride, padding, dilation):
    k = _pair(kernel_size, 2, "kernel_size")
    s = k if stride is None or (not isinstance(stride, (int, np.integer)) and len(stride) == 0) else _pair(stride, 2, "stride")
    return k, s, _pair(padding, 2, "padding"), _pair(dilation, 2, "dilation")


def _params1d(kernel_size, stride, padding, dilation):
    k = _pair(kernel_size, 1, "kernel_size")
    s = k if stride is None or (not isinstance(stride, (int, np.integer)) and len(stride) == 0) else _pair(stride, 1, "stride")
    return (1,) + k, (1,) + s, (0,) + _pair(padding, 1, "padding"), (1,) + _pair(dilation, 1, "dilation")


def _tap_view(xp, i, j, k_s_d, oh, ow):
    """The strided view of padded ``xp`` that tap (i, j) of every window reads."""
    (dh, dw), (sh, sw) = k_s_d
    return xp[..., i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]


def _padded(x, k, s, p, d, oh, ow, fill):
    """``x`` inside a ``fill``-valued border wide enough for every tap of every window."""
    H, W = x.shape[-2:]
    hp = max(p[0] + H, (oh - 1) * s[0] + (k[0] - 1) * d[0] + 1)
    wp = max(p[1] + W, (ow - 1) * s[1] + (k[1] - 1) * d[1] + 1)
    if hp == H and wp == W:
        return x
    xp = np.full(x.shape[:-2] + (hp, wp), fill, dtype=x.dtype)
    xp[..., p[0]:p[0] + H, p[1]:p[1] + W] = x
    return xp


def _first_valid(o: int, k: int, s: int, p: int, d: int, length: int):
    """Per output position: the first tap position inside the input, or -1 if none."""
    start = np.arange(o) * s - p
    taps = start[:, None] + np.arange(k)[None, :] * d
    inside = (taps >= 0) & (taps < length)
    first = np.where(inside.any(1), taps[np.arange(o), inside.argmax(1)], -1)
    return first


@functools.lru_cache(maxsize=64)  # up to 2 x SMALL intp a plan: 32 MiB at most
def _window_plan(H: int, W: int, k: tuple, s: tuple, p: tuple, d: tuple, ceil_mode: bool):
    """Per geometry: ``(oh, ow, pos, gather, padded)``. ``pos[o, t]`` is the flat plane position
    ``ih * W + iw`` of tap ``t`` (row-major) of window ``o`` (row-major); ``gather`` is the same
    with ``H * W`` (a sentinel column) where the tap falls in the padding; ``padded`` says
    whether any tap does. Read-only arrays: the cache hands the same ones to every call."""
    oh, ow = out_size(H, k[0], s[0], p[0], d[0], ceil_mode), out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    rows = (np.arange(oh) * s[0] - p[0])[:, None] + np.arange(k[0]) * d[0]  # [oh, kh]
    cols = (np.arange(ow) * s[1] - p[1])[:, None] + np.arange(k[1]) * d[1]  # [ow, kw]
    pos = rows[:, None, :, None] * W + cols[None, :, None, :]  # [oh, ow, kh, kw]
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[None, :, None, :]
    pos = pos.reshape(oh * ow, k[0] * k[1]).astype(np.intp)
    gather = np.where(inside.reshape(pos.shape), pos, H * W).astype(np.intp)
    padded = not bool(inside.all())
    for a in (pos, gather):
        a.flags.writeable = False
    return oh, ow, pos, gather, padded


def _gathered(x, plan, fill):
    """``[planes, windows, taps]``: every window's taps of ``x`` ``[..., H, W]`` (``fill`` in
    the padding)."""
    H, W = x.shape[-2:]
    _, _, _, gather, padded = plan
    xf = x.reshape(-1, H * W)
    if padded:
        xe = np.empty((xf.shape[0], H * W + 1), x.dtype)
        xe[:, :-1] = xf
        xe[:, -1] = fill
        xf = xe
    return xf.take(gather, axis=1)  # C-contiguous (fancy indexing may lay the result out transposed)


def _max2d_small(x, plan, indices=True):
    """The gather path of :func:`_max2d`, or None where it would differ: a NaN (torch keeps the
    last NaN of a window, argmax the first) or an infinite maximum (a window of -inf only
    keeps its first in-input position; the loop path handles both). ``indices`` False: the
    values alone (the indices None)."""
    oh, ow, pos, _, _ = plan
    g = _gathered(x, plan, -np.inf)
    taps = pos.shape[1]
    shape = x.shape[:-2] + (oh, ow)
    # The first maximum of every window (row-major tap order: torch's tie rule, -0.0 against
    # +0.0 included), and the values read there. Not g.max(-1): NumPy reduces a short last axis
    # a row at a time, ~37 ns a window (310 us for the demo CNN's 2x2 pooling of [32, 16, 8, 8]),
    # where argmax takes a seventh of that. With a NaN the first NaN is taken: the value is NaN,
    # as max's (the indices then come from the loop path, below).
    at = g.reshape(-1, taps).argmax(-1)
    at += np.arange(0, g.size, taps)  # the flat position in g of each window's maximum
    # results allocated in their final shape and written through flat views: arrays that own
    # their memory, which the torch layer wraps without a copy ('clip': every position is in
    # range, and it spares take's buffered copy of out)
    vals = np.empty(shape, x.dtype)
    g.reshape(-1).take(at, out=vals.reshape(-1), mode="clip")
    if not indices:
        return vals, None
    if not np.isfinite(vals).all():
        return None
    np.remainder(at, pos.size, out=at)  # the same window's position in pos (g is planes of pos's shape)
    idx = np.empty(shape, np.int64)
    pos.reshape(-1).take(at, out=idx.reshape(-1), mode="clip")
    return vals, idx


def _max2d(x, k, s, p, d, ceil_mode, indices=True):
    """Core of max pooling on ``[..., H, W]``: returns (values, int64 flat indices); with
    ``indices`` False the indices may be None (the small path then skips them)."""
    x = np.asarray(x)
    H, W = x.shape[-2:]
    oh, ow = out_size(H, k[0], s[0], p[0], d[0], ceil_mode), out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    lead = x.shape[:-2]
    if 0 < x.size and oh > 0 and ow > 0 and x.size // (H * W) * oh * ow * k[0] * k[1] <= SMALL:
        got = _max2d_small(x, _window_plan(H, W, tuple(k), tuple(s), tuple(p), tuple(d), bool(ceil_mode)), indices)
        if got is not None:
            return got
    out = np.full(lead + (oh, ow), -np.inf, dtype=x.dtype)
    if out.size == 0:
        return out, np.zeros(out.shape, np.int64)
    xp = _padded(x, k, s, p, d, oh, ow, -np.inf)
    # torch's rule "v > best or isnan(v)"; the isnan test is only needed when a NaN is present
    has_nan = bool(np.isnan(x).any())
    # tap code per window: 0 = no tap beat -inf yet, else 1 + the row-major tap number of the best.
    # Taps are visited in increasing code order, so "replace where this tap wins" is a running
    # maximum of win * code: two small contiguous integer passes instead of a scattered putmask
    # (putmask was 2/3 of the forward time at the benchmark shape).
    n_taps = k[0] * k[1]
    tdt = np.int8 if n_taps < 127 else np.int16 if n_taps < 2**15 else np.int32
    code = np.zeros(out.shape, dtype=tdt)
    win_code = np.empty(out.shape, dtype=tdt)
    m = np.empty(out.shape, dtype=bool)
    for i in range(k[0]):
        for j in range(k[1]):
            v = _tap_view(xp, i, j, (d, s), oh, ow)
            np.greater(v, out, out=m)
            if has_nan:
                m |= np.isnan(v)
            # np.maximum keeps NaN like the rule above
            np.maximum(out, v, out=out)
            np.multiply(m, tdt(i * k[1] + j + 1), out=win_code)
            np.maximum(code, win_code, out=code)
    # flat index = window origin (ih0 * W + iw0) + the winning tap's offset in the plane
    ti, tj = np.divmod(np.arange(n_taps, dtype=np.int64), k[1])
    offset = np.concatenate(([0], ti * d[0] * W + tj * d[1]))
    origin = (np.arange(oh) * s[0] - p[0])[:, None] * W + (np.arange(ow) * s[1] - p[1])[None, :]
    idx = np.take(offset, code)
    idx += origin
    unset = code == 0
    if unset.any():
        # no tap beat -inf: torch keeps the window's first in-input position
        fh = _first_valid(oh, k[0], s[0], p[0], d[0], H)[:, None]
        fw = _first_valid(ow, k[1], s[1], p[1], d[1], W)[None, :]
        first = np.where((fh >= 0) & (fw >= 0), fh * W + fw, -1)
        idx = np.where(unset, np.broadcast_to(first, out.shape), idx)
    zero = out == 0
    if zero.any():
        # a window whose maximum is a zero: its sign is the winning element's (torch returns
        # x[index]), where np.maximum may keep either of +0 and -0 (a non-finite-values audit)
        won = np.take_along_axis(x.reshape(-1, H * W), np.maximum(idx, 0).reshape(-1, oh * ow), axis=1)
        np.copyto(out, won.reshape(out.shape), where=zero)
    return out, idx


@quiet
def _max_backward2d(grad_output, indices, input_shape):
    """Scatter-add of ``grad_output`` to the input positions ``indices``: ``np.add.at`` in
    output order, accumulating in the result dtype as torch's CPU kernel does (faster than
    ``np.bincount``, which also needs a float64 result twice the size of the gradient: big
    fresh temporaries that glibc may hand back to the OS and page-fault in again each call)."""
    g = np.asarray(grad_output)
    H, W = input_shape[-2:]
    hw = H * W
    dtype = g.dtype if g.dtype in (np.float32, np.float64) else np.float32
    gi = np.zeros(input_shape, dtype)
    if g.size == 0 or hw == 0:
        return gi
    planes = gi.size // hw
    idx = np.asarray(indices).reshape(planes, -1)
    gf = g.reshape(planes, -1).astype(dtype, copy=False)
    flat = idx + (np.arange(planes, dtype=np.int64) * hw)[:, None]
    if idx.min() < 0 or idx.max() >= hw:
        keep = (idx >= 0) & (idx < hw)  # -1 marks an all-padding window (no input to credit)
        flat, gf = flat[keep], gf[keep]
    np.add.at(gi.reshape(-1), flat.reshape(-1), gf.reshape(-1))
    return gi


def _avg_divisor(H, W, oh, ow, k, s, p, count_include_pad, divisor_override):
    """Per-output divisor ``[oh, ow]`` (torch's AvgPoolKernel rule)."""
    def sizes(o, k, s, p, length):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, length + p)
        pool = end - start
        clipped = np.minimum(end, length) - np.maximum(start, 0)
        return pool, clipped

    ph, ch = sizes(oh, k[0], s[0], p[0], H)
    pw, cw = sizes(ow, k[1], s[1], p[1], W)
    if divisor_override:
        div = np.full((oh, ow), float(divisor_override))
    elif count_include_pad:
        div = (ph[:, None] * pw[None, :]).astype(np.float64)
    else:
        div = (ch[:, None] * cw[None, :]).astype(np.float64)
    empty = (ch[:, None] <= 0) | (cw[None, :] <= 0)  # a window without input gives 0 (torch)
    return div, empty


@functools.lru_cache(maxsize=64)  # a window matrix of up to SMALL elements: 16 MiB at most
def _avg_plan(H: int, W: int, k: tuple, s: tuple, p: tuple, ceil_mode: bool, count_include_pad: bool,
              divisor_override, dtype: np.dtype):
    """Per geometry and dtype: ``(oh, ow, A, div, empty)``: the 0/1 window matrix ``A``
    ``[oh * ow, H * W]`` (window o covers position q), the per-window divisor and the mask of
    windows without input (None if none). Average pooling is then ``x @ A.T / div`` and its
    backward ``(g / div) @ A``. Read-only arrays, shared by every call."""
    oh, ow, _, gather, _ = _window_plan(H, W, k, s, p, (1, 1), ceil_mode)
    A = np.zeros((oh * ow, H * W), dtype)
    o, t = np.nonzero(gather < H * W)  # the taps inside the input (padding taps hold the sentinel H * W)
    A[o, gather[o, t]] = 1  # the taps of one window are distinct positions (stride, kernel > 0)
    div, empty = _avg_divisor(H, W, oh, ow, k, s, p, count_include_pad, divisor_override)
    div = div.reshape(-1).astype(dtype)
    empty = empty.reshape(-1)
    empty = empty if empty.any() else None
    for a in (A, div, empty):
        if a is not None:
            a.flags.writeable = False
    return oh, ow, A, div, empty


def _avg_small(H, W, oh, ow, k, s, p, ceil_mode, count_include_pad, divisor_override, dtype):
    """The window-matrix plan of an average pooling when the matrix is small, else None."""
    if not (0 < oh * ow * H * W <= SMALL):
        return None
    return _avg_plan(H, W, tuple(k), tuple(s), tuple(p), bool(ceil_mode), bool(count_include_pad),
                     divisor_override, np.dtype(dtype))


@quiet
def _avg2d(x, k, s, p, ceil_mode, count_include_pad, divisor_override):
    x = np.asarray(x)
    H, W = x.shape[-2:]
    d = (1, 1)
    oh, ow = out_size(H, k[0], s[0], p[0], 1, ceil_mode), out_size(W, k[1], s[1], p[1], 1, ceil_mode)
    plan = _avg_small(H, W, oh, ow, k, s, p, ceil_mode, count_include_pad, divisor_override, x.dtype) if x.size else None
    # the product also multiplies the taps outside each window by 0: a NaN or inf anywhere in the
    # plane would reach every window (0 * inf = NaN), so non-finite inputs take the tap loop
    if plan is not None and np.isfinite(x).all():
        _, _, A, div, empty = plan
        res = np.empty(x.shape[:-2] + (oh, ow), x.dtype)  # owns its memory: no copy in the torch layer
        out = res.reshape(-1, oh * ow)
        np.matmul(x.reshape(-1, H * W), A.T, out=out)
        out /= div
        if empty is not None:
            out[:, empty] = 0
        return res
    out = np.zeros(x.shape[:-2] + (oh, ow), dtype=x.dtype)
    if out.size == 0:
        return out
    xp = _padded(x, k, s, p, d, oh, ow, 0)
    for i in range(k[0]):
        for j in range(k[1]):
            out += _tap_view(xp, i, j, (d, s), oh, ow)
    div, empty = _avg_divisor(H, W, oh, ow, k, s, p, count_include_pad, divisor_override)
    out /= div.astype(x.dtype)
    if empty.any():
        out[..., empty] = 0
    return out


@quiet
def _avg_backward2d(grad_output, input_shape, k, s, p, ceil_mode, count_include_pad, divisor_override):
    g = np.asarray(grad_output)
    H, W = input_shape[-2:]
    oh, ow = g.shape[-2:]
    dtype = g.dtype if g.dtype in (np.float32, np.float64) else np.float32
    d = (1, 1)
    plan = _avg_small(H, W, oh, ow, k, s, p, ceil_mode, count_include_pad, divisor_override, dtype) if g.size else None
    if plan is not None and plan[:2] == (oh, ow) and np.isfinite(g).all():  # non-finite: as in the forward
        _, _, A, div, empty = plan
        gs = g.reshape(-1, oh * ow).astype(dtype, copy=False) / div
        if empty is not None:
            gs[:, empty] = 0
        gi = np.empty(input_shape, dtype)
        np.matmul(gs, A, out=gi.reshape(-1, H * W))
        return gi
    hp = max(p[0] + H, (oh - 1) * s[0] + k[0])
    wp = max(p[1] + W, (ow - 1) * s[1] + k[1])
    gp = np.zeros(tuple(input_shape[:-2]) + (hp, wp), dtype=dtype)
    if g.size == 0:
        return np.zeros(input_shape, dtype)
    div, empty = _avg_divisor(H, W, oh, ow, k, s, p, count_include_pad, divisor_override)
    gs = g / div.astype(dtype)
    if empty.any():
        gs[..., empty] = 0
    # the taps from last to first: an input position then receives its windows' terms in
    # increasing (oh, ow) order (tap i of window oh lands where tap i + 1 of window oh - 1 does),
    # as torch's kernels add them, so the float32 sums are torch's bit for bit. One tap's
    # positions are distinct (stride > 0), so += on the strided view is exact
    for i in range(k[0] - 1, -1, -1):
        for j in range(k[1] - 1, -1, -1):
            _tap_view(gp, i, j, (d, s), oh, ow)[...] += gs
    return np.ascontiguousarray(gp[..., p[0]:p[0] + H, p[1]:p[1] + W])


# --- public functions (torch.nn.functional signatures on NumPy arrays) ---------------------


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling over ``[..., H, W]``; returns values (and int64 plane indices)."""
    out, idx = _max2d(input, *_params2d(kernel_size, stride, padding, dilation), ceil_mode)
    return (out, idx) if return_indices else out


def max_pool2d_backward(grad_output, indices, input_shape):
    """d input = scatter-add of grad_output ``[..., OH, OW]`` at ``indices`` into ``input_shape``."""
    return _max_backward2d(grad_output, indices, tuple(input_shape))


def min_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``-max_pool2d(-input)``, indices included."""
    out, idx = _max2d(-np.asarray(input), *_params2d(kernel_size, stride, padding, dilation), ceil_mode)
    negative(out, out)
    return (out, idx) if return_indices else out


def min_pool2d_backward(grad_output, indices, input_shape):
    """Same scatter as max: d(-max(-x))/dx routes the gradient to the selected position."""
    return _max_backward2d(grad_output, indices, tuple(input_shape))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Average pooling over ``[..., H, W]``."""
    k, s, p, _ = _params2d(kernel_size, stride, padding, 1)
    return _avg2d(input, k, s, p, ceil_mode, count_include_pad, divisor_override)


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """d input: each output's gradient divided by its divisor, spread over its window."""
    k, s, p, _ = _params2d(kernel_size, stride, padding, 1)
    return _avg_backward2d(grad_output, tuple(input_shape), k, s, p, ceil_mode, count_include_pad, divisor_override)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling over ``[..., L]`` (a 2d pooling of height 1); indices are positions in L."""
    x = np.asarray(input)
    out, idx = _max2d(x[..., None, :], *_params1d(kernel_size, stride, padding, dilation), ceil_mode)
    out, idx = out[..., 0, :], idx[..., 0, :]
    return (out, idx) if return_indices else out


def max_pool1d_backward(grad_output, indices, input_shape):
    input_shape = tuple(input_shape)
    g = np.asarray(grad_output)[..., None, :]
    return _max_backward2d(g, np.asarray(indices)[..., None, :], input_shape[:-1] + (1, input_shape[-1])).reshape(input_shape)


def min_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``-max_pool1d(-input)``, indices included."""
    out, idx = max_pool1d(-np.asarray(input), kernel_size, stride, padding, dilation, ceil_mode, True)
    negative(out, out)
    return (out, idx) if return_indices else out


min_pool1d_backward = max_pool1d_backward


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Average pooling over ``[..., L]`` (torch's avg_pool1d has no divisor_override)."""
    k, s, p, _ = _params1d(kernel_size, stride, padding, 1)
    x = np.asarray(input)
    return _avg2d(x[..., None, :], k, s, p, ceil_mode, count_include_pad, None)[..., 0, :]


def avg_pool1d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    input_shape = tuple(input_shape)
    k, s, p, _ = _params1d(kernel_size, stride, padding, 1)
    g = np.asarray(grad_output)[..., None, :]
    gi = _avg_backward2d(g, input_shape[:-1] + (1, input_shape[-1]), k, s, p, ceil_mode, count_include_pad, None)
    return gi.reshape(input_shape)
