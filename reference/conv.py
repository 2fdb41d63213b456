"""NumPy reference for conv1d / conv2d: forward and explicit backward (NumPy only).

Shapes (2d): input ``[N, C, H, W]``, weight ``[O, C // groups, kh, kw]``, bias ``[O]`` or None,
output ``[N, O, Ho, Wo]`` with ``Ho = (H + pad_top + pad_bottom - dh * (kh - 1) - 1) // sh + 1``
(likewise ``Wo``). 1d: input ``[N, C, L]``, weight ``[O, C // groups, k]``; it runs as 2d with H = 1.

    out[n, o, y, x] = bias[o] + sum_{c, i, j} in_pad[n, g*Cg + c, y*sh + i*dh, x*sw + j*dw] * w[o, c, i, j]

where ``g = o // (O // groups)`` and ``Cg = C // groups``.

``padding`` is either an int, a per-dimension tuple (symmetric), or the per-side tuple
``((top, bottom), (left, right))`` (``((left, right),)`` for 1d) -- the per-side form is what
``'same'`` with an even kernel needs (torch pads the extra element on the right/bottom). The
strings ``'same'`` / ``'valid'`` are resolved by :func:`resolve_padding`. Batched inputs only
(the torch-facing layer adds the batch dimension of unbatched inputs). No input checks here:
the torch-facing layer validates before calling.

How: BLAS does the work, with no Python loop over pixels, batch elements or groups; each part
(forward, weight gradient, input gradient) picks one of three algorithms by shape
(:func:`_choose`; the results agree to rounding):

- ``im2col`` (any stride): the padded input viewed through ``as_strided`` as the im2col tensor
  ``[N, G, Cg, kh, kw, Ho, Wo]`` (no copy), gathered once into a contiguous matrix and multiplied
  with the weight by one broadcast ``np.matmul`` over (batch, group). The input gradient is a
  gather-convolution of the output gradient (stride 1) or a scatter with one strided add per
  kernel tap (strided).
- ``flat`` (stride 1, any dilation / padding / groups): the padded input laid out channel-major
  and flat, where every kernel tap is a constant offset, so each tap is one GEMM on a shifted
  slice -- no im2col copy (see :class:`_Flat`). The input gradient is the same with mirrored
  taps on the zero-padded output gradient.
- ``stacked`` (stride 1): the flat layout's shifted slices gathered once (whole-row copies) and
  one GEMM; for depthwise input gradients.

Small problems (an im2col matrix of at most :data:`SMALL` elements, e.g. the per-call host-cost
benchmark's 1x2x5x5 input) skip all of that: one zero-padded copy, one gather through a cached
index table, one broadcast ``np.matmul``, and for the input gradient one ``np.bincount`` scatter
through the same table (:func:`_conv2d_small`, :func:`_backward_small`). On a few hundred
elements the general machinery's dozen NumPy calls and Python bookkeeping were all of the time
(56 us against 8 us for that forward). Both give the same values to rounding (the input
gradient sums in float64 here); tests/test_conv.py compares them.

Temporaries live in reused per-thread scratch memory (:func:`_scratch`); returned arrays are
fresh and C-contiguous.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from . import activation as _act

# Reused scratch memory for the temporaries of one call (im2col columns, the flat layouts, GEMM
# accumulators), per thread. Fresh multi-megabyte arrays are not free: every call would
# page-fault them in again (~2 us per 4 KiB page here: ~25% of the forward's time at
# N=8 C=64 32x32). Arrays handed back to the caller are always fresh (torch wraps them).
# At most 6 names x _SCRATCH_MAX bytes stay allocated per thread.
_SCRATCH = threading.local()
_SCRATCH_MAX = 1 << 25  # bytes; larger temporaries are allocated per call


def clear_scratch():
    """Release this thread's scratch memory (it is reallocated on the next call)."""
    _SCRATCH.bufs = {}


def _scratch(name, shape, dtype, zero=False):
    """A C-contiguous scratch array of ``shape`` / ``dtype``: contents undefined unless ``zero``.
    Valid until the next request for the same ``name`` on this thread."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > _SCRATCH_MAX:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.nbytes < nbytes:
        # 64-byte aligned, so that any dtype view is aligned for BLAS
        raw = np.empty(nbytes + 64, np.uint8)
        start = (-raw.ctypes.data) % 64
        buf = bufs[name] = raw[start:start + nbytes]
    out = buf[:nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


# ----------------------------------------------------------------------------- small problems

SMALL = 1 << 14  # elements of the im2col matrix [N, G, Cg*kh*kw, Ho*Wo] up to which the small path runs
_SMALL_IDX: dict = {}  # geometry -> read-only gather table (bounded: cleared when full)
_SMALL_IDX_MAX = 256  # tables of at most SMALL int64 each: 32 MiB at most


def _small(n, groups, k, ho, wo, pads):
    """Whether a convolution takes the small path: a non-empty im2col matrix of at most
    :data:`SMALL` elements, non-negative padding, and no path forced by a test."""
    return (_FORCE is None and ho > 0 and wo > 0 and 0 < n * groups * k * ho * wo <= SMALL
            and min(pads[0][0], pads[0][1], pads[1][0], pads[1][1]) >= 0)


def _small_index(n, c, hp, wp, groups, kshape, out_size, stride, dilation):
    """``[N, G, Cg*kh*kw, Ho*Wo]`` flat positions in the zero-padded batch ``[N, C, Hp, Wp]`` of
    every im2col entry (entry ``(n, g, (c, i, j), (y, x))`` reads ``[n, g*Cg + c, y*sh + i*dh,
    x*sw + j*dw]``). Cached per geometry; read-only (shared by every call)."""
    key = (n, c, hp, wp, groups, kshape, out_size, stride, dilation)
    idx = _SMALL_IDX.get(key)
    if idx is None:
        (kh, kw), (ho, wo), cg = kshape, out_size, c // groups
        idx = (np.arange(n).reshape(n, 1, 1, 1, 1, 1, 1) * (c * hp * wp)
               + np.arange(c).reshape(1, groups, cg, 1, 1, 1, 1) * (hp * wp)
               + np.arange(kh).reshape(1, 1, 1, kh, 1, 1, 1) * (dilation[0] * wp)
               + np.arange(kw).reshape(1, 1, 1, 1, kw, 1, 1) * dilation[1]
               + np.arange(ho).reshape(1, 1, 1, 1, 1, ho, 1) * (stride[0] * wp)
               + np.arange(wo).reshape(1, 1, 1, 1, 1, 1, wo) * stride[1])
        idx = idx.astype(np.intp).reshape(n, groups, cg * kh * kw, ho * wo)
        idx.flags.writeable = False
        if len(_SMALL_IDX) >= _SMALL_IDX_MAX:
            _SMALL_IDX.clear()
        _SMALL_IDX[key] = idx
    return idx


def _small_cols(x, kshape, out_size, stride, pads, dilation, groups):
    """im2col matrix ``[N, G, Cg*kh*kw, Ho*Wo]`` (x's dtype) of a small problem: one zero-padded
    copy of ``x`` (any strides) and one gather. Also returns the gather table."""
    n, c, h, w = x.shape
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, w + pl + pr
    xp = np.zeros((n, c, hp, wp), x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    idx = _small_index(n, c, hp, wp, groups, kshape, out_size, stride, dilation)
    return xp.reshape(-1).take(idx), idx


def _conv2d_small(x, w, bias, stride, pads, dilation, groups, out_size):
    """The forward of a small problem: ``out[n, g] = W_g @ cols[n, g]`` (+ bias), one broadcast
    GEMM over (batch, group) into an array that owns its memory."""
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    ho, wo = out_size
    cols, _ = _small_cols(x, (kh, kw), out_size, stride, pads, dilation, groups)
    out = np.empty((n, o, ho, wo), dtype=np.result_type(x, w))
    np.matmul(w.reshape(groups, o // groups, cg * kh * kw), cols, out=out.reshape(n, groups, o // groups, ho * wo))
    if bias is not None:
        out += np.asarray(bias, dtype=out.dtype).reshape(1, o, 1, 1)
    return out


def _backward_small(g, x, w, stride, pads, dilation, groups, need):
    """``(grad_input, grad_weight)`` of a small problem (None where ``need`` says so):

        grad_weight[g] = sum_n gg[n, g] @ cols[n, g]^T
        grad_input     = scatter of W_g^T @ gg[n, g] to the positions the gather read

    The scatter is one ``np.bincount`` over the gather table (float64 sums) on the padded grid,
    then the interior copied out: a col2im over exactly the (output, tap) pairs that exist, as
    torch's and the general path's (so non-finite values reach the same gradients)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    ho, wo = g.shape[2:]
    gg = g.reshape(n, groups, og, ho * wo)
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, wd + pl + pr
    gi = gw = None
    if need[1]:
        cols, idx = _small_cols(x, (kh, kw), (ho, wo), stride, pads, dilation, groups)
        gw = np.empty(w.shape, dtype=g.dtype)
        gwv = gw.reshape(groups, og, cg * kh * kw)
        if n == 1:  # no batch to sum over: the GEMM writes the result
            np.matmul(gg[0], cols[0].transpose(0, 2, 1), out=gwv)
        else:
            np.sum(np.matmul(gg, cols.transpose(0, 1, 3, 2)), axis=0, out=gwv)
    else:
        idx = _small_index(n, c, hp, wp, groups, (kh, kw), (ho, wo), stride, dilation)
    if need[0]:
        dcols = np.matmul(w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1), gg)  # [N, G, Cg*kh*kw, Ho*Wo]
        dxp = np.bincount(idx.reshape(-1), weights=dcols.reshape(-1), minlength=n * c * hp * wp)
        gi = np.empty(x.shape, dtype=g.dtype)
        np.copyto(gi, dxp.reshape(n, c, hp, wp)[:, :, pt:pt + h, pl:pl + wd], casting="unsafe")
    return gi, gw


def _pair(v, n):
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    return v * n if len(v) == 1 else v


def resolve_padding(padding, kernel_size, dilation):
    """Per-side padding ``((lo, hi), ...)`` for each spatial dimension.

    ``'valid'`` is no padding; ``'same'`` pads ``d * (k - 1)`` in total with the odd element on
    the high side (right / bottom), exactly as torch does.
    """
    n = len(kernel_size)
    dilation = _pair(dilation, n)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            out = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"Invalid padding string: {padding!r}")
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * n
    padding = tuple(padding)
    if len(padding) == 1 and n > 1 and not isinstance(padding[0], (tuple, list)):
        padding = padding * n
    return tuple((int(p), int(p)) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1])) for p in padding)


def output_size(size, k, s, pad, d):
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def _pad(x, pads):
    """Zero-padded copy of ``x`` [N, C, H, W] in scratch memory (``x`` itself when there is no
    padding): only for temporaries."""
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    n, c, h, w = x.shape
    xp = _scratch("xpad", (n, c, h + pt + pb, w + pl + pr), x.dtype, zero=True)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    return xp


def _windows(xp, groups, kh, kw, ho, wo, stride, dilation):
    """Zero-copy im2col view ``[N, G, Cg, kh, kw, Ho, Wo]`` of the padded input."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    cg = c // groups
    return np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, groups, cg, kh, kw, ho, wo),
        strides=(sn, cg * sc, sc, dilation[0] * sh, dilation[1] * sw, stride[0] * sh, stride[1] * sw),
        writeable=False,
    )


def _cols(x, weight, stride, pads, dilation, groups):
    """Contiguous im2col matrix ``[N, G, Cg*kh*kw, Ho*Wo]`` and (Ho, Wo)."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho = output_size(h, kh, stride[0], pads[0], dilation[0])
    wo = output_size(w, kw, stride[1], pads[1], dilation[1])
    cg = c // groups
    if n == 0 or ho <= 0 or wo <= 0:
        return np.zeros((n, groups, cg * kh * kw, max(ho, 0) * max(wo, 0)), x.dtype), (max(ho, 0), max(wo, 0))
    win = _windows(_pad(x, pads), groups, kh, kw, ho, wo, stride, dilation)
    cols = _scratch("cols", win.shape, x.dtype)
    np.copyto(cols, win)
    return cols.reshape(n, groups, cg * kh * kw, ho * wo), (ho, wo)


def _remembered(parse):
    """``parse`` remembered for hashable arguments (the torch-facing layer passes tuples), since
    an argument parse costs more than a small convolution; unhashable ones (a list somewhere)
    are parsed every time."""
    cached = functools.lru_cache(maxsize=1024, typed=True)(parse)

    @functools.wraps(parse)
    def call(*args):
        try:
            return cached(*args)
        except TypeError:
            return parse(*args)

    return call


@_remembered
def _norm2d(stride, padding, dilation, kernel_size):
    """(stride, per-side pads, dilation) as int tuples."""
    stride = _pair(stride, 2)
    dilation = _pair(dilation, 2)
    pads = resolve_padding(padding, kernel_size, dilation)
    return stride, pads, dilation


# ----------------------------------------------------------------------------- path choice

# Which algorithm each part uses: "im2col" (any stride), "flat" (stride 1: one GEMM per kernel
# tap on shifted slices of the flat padded image) or "stacked" (stride 1: the shifted slices
# gathered once, one GEMM). Tests set this to a dict {"fwd"|"wgrad"|"dgrad": path} to force a
# path; None means "choose by shape" (:func:`_choose`).
_FORCE = None


def _choose(part, stride, groups, cg, og, kshape, waste):
    """Path for ``part`` ("fwd", "wgrad", "dgrad") from the shape alone.

    ``waste`` is the share of flat positions that are not outputs, ``1 - Ho*Wo / (Hp*Wp)``.
    Measured (CPU time, one OpenBLAS thread, float32, temporaries in scratch memory; ms as
    im2col / flat / stacked): at N=8 C=O=64 32x32 3x3 the paths are within ~5% (forward
    9.2 / 8.7, weight grad 9.9 / 10.0, input grad 9.0 / 8.6: both are GEMM-bound); the flat path
    wins for grouped convolutions (groups=4: 4.5 / 3.8 forward and input grad) and for the weight
    gradient of narrow or depthwise convolutions (depthwise C=64: 2.2 / 1.0; C=O=8: 0.26 / 0.18);
    it loses when one side of the per-tap GEMM (C/groups or O/groups) is narrow (RGB input,
    N=32 C=3 O=32: 1.1 / 3.2 forward, 1.1 / 4.9 weight grad, 2.1 / 3.8 input grad), for 1x1
    kernels (2.0 / 2.3) and when the border is a large share of a small image (5x5 on 16x16,
    36% waste: 2.1 / 2.4). The depthwise input gradient is best stacked (3.8 / 7.7 / 2.8).
    """
    if isinstance(_FORCE, dict) and part in _FORCE:
        return "im2col" if stride != (1, 1) else _FORCE[part]
    if stride != (1, 1) or kshape == (1, 1) or waste > 0.2:
        return "im2col"
    if part == "wgrad":
        return "flat" if min(cg, og) >= 8 or cg == og == 1 else "im2col"
    if part == "dgrad" and cg == og == 1 and groups > 1:
        return "stacked"
    return "flat" if min(cg, og) >= 16 else "im2col"


def _waste(xshape, kshape, pads, dilation):
    hp = xshape[2] + pads[0][0] + pads[0][1]
    wp = xshape[3] + pads[1][0] + pads[1][1]
    ho, wo = hp - dilation[0] * (kshape[0] - 1), wp - dilation[1] * (kshape[1] - 1)
    return 1.0 - ho * wo / (hp * wp) if ho > 0 and wo > 0 else 1.0


def _quiet(fn):
    """Run ``fn`` without NumPy's warnings for NaN / inf operands: they are data, as in torch."""
    def wrapped(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    wrapped.__name__, wrapped.__qualname__, wrapped.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return wrapped


@_quiet
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """2d convolution (cross-correlation, as torch); optional fused activation after the bias.

    ``input`` [N, C, H, W], ``weight`` [O, C/groups, kh, kw], ``bias`` [O] or None -> [N, O, Ho, Wo].
    """
    x = np.asarray(input)
    w = np.asarray(weight)
    stride, pads, dilation = _norm2d(stride, padding, dilation, w.shape[2:])
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    ho = output_size(x.shape[2], kh, stride[0], pads[0], dilation[0])
    wo = output_size(x.shape[3], kw, stride[1], pads[1], dilation[1])
    if _small(n, groups, cg * kh * kw, ho, wo, pads):
        out = _conv2d_small(x, w, bias, stride, pads, dilation, groups, (ho, wo))
        return out if activation is None else _act.activate(out, activation)
    path = _choose("fwd", stride, groups, cg, o // groups, (kh, kw), _waste(x.shape, (kh, kw), pads, dilation))
    if path != "im2col" and n and ho > 0 and wo > 0:
        out = _conv2d_flat(x, w, bias, pads, dilation, groups, path == "stacked")
    else:
        cols, (ho, wo) = _cols(x, w, stride, pads, dilation, groups)
        wg = w.reshape(groups, o // groups, -1)
        # [N, G, Og, P]: one BLAS call per (batch, group), written straight into an array that owns
        # its memory (so the torch layer can wrap it without another copy)
        out = np.empty((n, o, ho, wo), dtype=np.result_type(x, w))
        np.matmul(wg, cols, out=out.reshape(n, groups, o // groups, ho * wo))
        if bias is not None:
            out += np.asarray(bias, dtype=out.dtype).reshape(1, o, 1, 1)
    if activation is not None:
        out = _act.activate(out, activation)
    return out


@_quiet
def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    need=(True, True, True), output=None, activation=None):
    """Gradients ``(grad_input, grad_weight, grad_bias)`` of :func:`conv2d`.

    ``grad_output`` [N, O, Ho, Wo]. With a fused ``activation`` pass the forward ``output``
    (after the activation): the gradient first goes through the activation. ``need`` selects
    which gradients to compute (None for the others).

        grad_bias[o]      = sum_{n,y,x} g[n, o, y, x]
        grad_weight       = sum_n g[n] @ cols[n]^T                    (per group)
        grad_input        = col2im(W^T @ g)   (scatter-add per kernel tap)

    Stride 1 runs both on the flat layout (see :class:`_Flat`): ``grad_weight[:, :, i, j] =
    g_flat @ x_flat[:, off_ij : off_ij + M]^T`` and ``grad_input`` is the flat forward of the
    zero-padded ``g_flat`` with the taps mirrored (offsets ``-off_ij``) and ``W_ij^T``.
    """
    x = np.asarray(input)
    w = np.asarray(weight)
    g = np.asarray(grad_output)
    if activation is not None:
        g = _act.activate_backward(g, np.asarray(output), activation)
    stride, pads, dilation = _norm2d(stride, padding, dilation, w.shape[2:])
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = g.shape[2:]
    gb = (g.sum(axis=(0, 2, 3)) if n else np.zeros(o, g.dtype)) if need[2] else None
    if _small(n, groups, cg * kh * kw, ho, wo, pads):
        gi, gw = _backward_small(g, x, w, stride, pads, dilation, groups, need) if need[0] or need[1] else (None, None)
        return gi, gw, gb
    og = o // groups
    gg = g.reshape(n, groups, og, ho * wo)
    gi = gw = None
    empty = n == 0 or ho * wo == 0
    waste = _waste(x.shape, (kh, kw), pads, dilation)
    wpath = _choose("wgrad", stride, groups, cg, og, (kh, kw), waste)
    dpath = _choose("dgrad", stride, groups, cg, og, (kh, kw), waste)
    # NaN / inf reach exactly the gradients torch's reach: torch's input gradient is a col2im
    # scatter of W^T g over the (output, tap) pairs that exist, so a non-finite weight tap
    # touches only the inputs it reads; the stride-1 and flat input gradients convolve the
    # zero-padded output gradient with the whole weight (0 * inf = NaN everywhere). Likewise
    # the flat weight gradient multiplies the zeros of its by-product positions with the
    # input. Those paths are exact only for finite operands: otherwise take im2col / col2im
    # (one isfinite pass; the weight's is negligible, the input's ~3% of the GEMM).
    w_finite = need[0] and bool(np.isfinite(w).all())
    if need[1] and wpath != "im2col" and not np.isfinite(x).all():
        wpath = "im2col"
    flat = None
    if need[0] and not w_finite:
        dpath = "col2im"
    if not empty and ((need[1] and wpath != "im2col") or (need[0] and dpath not in ("im2col", "col2im"))):
        geo = _Flat(x.shape, (kh, kw), pads, dilation, groups)
        # the output gradient on the padded grid, zero off the valid outputs, after off_max
        # leading zeros (the mirrored taps of the input gradient read up to off_max before 0)
        flat = geo, _to_flat(g, groups, geo.hp, geo.wp, 0, 0, lead=geo.offs[-1], name="gz")
    if need[1]:
        if empty:
            gw = np.zeros(w.shape, g.dtype)
        elif wpath != "im2col":
            gw = _wgrad_flat(x, w.shape, *flat, wpath == "stacked")
        else:
            cols, _ = _cols(x, w, stride, pads, dilation, groups)
            # [N, G, Og, K] then a sum over the batch: keeps every product a plain BLAS call
            gw = np.empty(w.shape, dtype=g.dtype)
            np.sum(np.matmul(gg, cols.transpose(0, 1, 3, 2)), axis=0, out=gw.reshape(groups, og, cg * kh * kw))
    if need[0]:
        if empty:
            gi = np.zeros(x.shape, g.dtype)
        elif dpath not in ("im2col", "col2im"):
            gi = _dgrad_flat(w, x.shape, *flat, dpath == "stacked")
        elif dpath == "im2col" and stride == (1, 1) and o <= 2 * c:
            # gathering the output gradient costs ~O*k*HW copies; the scatter path ~4*C*k*HW
            gi = _dgrad_stride1(g, w, pads, dilation, groups, (h, wd))
        else:
            gi = _dgrad_col2im(gg, w, stride, pads, dilation, groups, x.shape, (ho, wo))
    return gi, gw, gb


# ----------------------------------------------------------------------------- stride-1 flat path
#
# For stride 1, kernel tap (i, j) reads the padded image shifted by a constant. Laid out
# channel-major -- ``[C, N*Hp*Wp]``, image rows one after the other, images one after the other --
# that shift is the single flat offset ``off_ij = i*dh*Wp + j*dw``, so the output at flat position
# ``p = n*Hp*Wp + y*Wp + x`` is
#
#     out[:, p] = sum_ij W_ij @ xf[:, p + off_ij]          (W_ij = w[:, :, i, j], [O, C])
#
# and each tap is ONE GEMM on a contiguous slice of ``xf``: no im2col copy (kh*kw times the
# input), at the price of computing positions with y >= Ho or x >= Wo as by-products that are
# dropped (a share of 1 - Ho*Wo/(Hp*Wp) of the flops). Every valid p is below
# ``M = N*Hp*Wp - off_max``, so the GEMMs cover [0, M) and never read past the buffer.


class _Flat:
    """Geometry of the flat stride-1 layout of one convolution."""

    def __init__(self, xshape, kshape, pads, dilation, groups):
        self.n, self.c, self.h, self.w = xshape
        self.kh, self.kw = kshape
        (self.pt, self.pb), (self.pl, self.pr) = pads
        self.dh, self.dw = dilation
        self.groups = groups
        self.hp, self.wp = self.h + self.pt + self.pb, self.w + self.pl + self.pr
        self.ho, self.wo = self.hp - self.dh * (self.kh - 1), self.wp - self.dw * (self.kw - 1)
        self.p = self.n * self.hp * self.wp
        self.offs = [i * self.dh * self.wp + j * self.dw for i in range(self.kh) for j in range(self.kw)]
        self.m = self.p - self.offs[-1]

    def taps(self, a, start, length, mirror=False):
        """Zero-copy view ``[G, kh, kw, rows, length]`` of ``a`` [G, rows, L]: tap (i, j) is the
        slice starting at ``start + off_ij`` (``start - off_ij`` when ``mirror``)."""
        g, rows, _ = a.shape
        s0, s1, s2 = a.strides
        sign = -1 if mirror else 1
        return np.lib.stride_tricks.as_strided(
            a[:, :, start:], shape=(g, self.kh, self.kw, rows, length),
            strides=(s0, sign * self.dh * self.wp * s2, sign * self.dw * s2, s1, s2), writeable=False)


def _to_flat(a, groups, hp, wp, top, left, lead=0, name="xf"):
    """``a`` [N, C, h, w] as the zero-filled channel-major buffer ``[G, C/G, lead + N*hp*wp]``
    (scratch ``name``) holding ``a[n, c, y, x]`` at ``lead + n*hp*wp + (top + y)*wp + left + x``."""
    n, c, h, w = a.shape
    buf = _scratch(name, (c, lead + n * hp * wp), a.dtype, zero=True)
    buf[:, lead:].reshape(c, n, hp, wp)[:, :, top:top + h, left:left + w] = a.transpose(1, 0, 2, 3)
    return buf.reshape(groups, c // groups, lead + n * hp * wp)


def _from_flat(a, shape, hp, wp, bias=None):
    """New contiguous ``out[n, c, y, x] = a[c, n*hp*wp + y*wp + x] (+ bias[c])`` (``a`` [C, L],
    rows contiguous): the gather and the bias add in one pass."""
    n, c, h, w = shape
    s = a.strides[1]
    view = np.lib.stride_tricks.as_strided(a, shape=shape, strides=(hp * wp * s, a.strides[0], wp * s, s),
                                           writeable=False)
    out = np.empty(shape, dtype=a.dtype)
    if bias is None:
        np.copyto(out, view)
    else:
        np.add(view, np.asarray(bias, dtype=a.dtype).reshape(1, c, 1, 1), out=out)
    return out


def _tap_sum(wt, src, start, length, geo, stacked, mirror=False):
    """``sum_ij wt[ij] @ src[:, :, start +- off_ij : ... + length]`` -> ``[G, rows_out, length]``.

    ``wt`` [kh*kw, G, rows_out, rows_in] (contiguous). Per tap one GEMM (batched over groups)
    into a scratch buffer that is added to the accumulator. ``stacked``: copy the shifted
    slices once into ``[G, kh*kw*rows_in, length]`` (whole-row copies) and do one GEMM with
    K = kh*kw*rows_in -- the better choice when rows_in is so small that per-tap GEMMs starve.
    """
    t, g, ro, ri = wt.shape
    win = geo.taps(src, start, length, mirror)  # [G, kh, kw, ri, length]
    acc = _scratch("acc", (g, ro, length), src.dtype)
    if stacked:
        cols = _scratch("cols", win.shape, src.dtype)
        np.copyto(cols, win)
        return np.matmul(wt.transpose(1, 2, 0, 3).reshape(g, ro, t * ri), cols.reshape(g, t * ri, length), out=acc)
    np.matmul(wt[0], win[:, 0, 0], out=acc)
    if t > 1:
        tmp = _scratch("tmp", acc.shape, src.dtype)
        for k in range(1, t):  # one GEMM per kernel tap (kh*kw of them), not per pixel
            np.matmul(wt[k], win[:, k // geo.kw, k % geo.kw], out=tmp)
            acc += tmp
    return acc


def _conv2d_flat(x, w, bias, pads, dilation, groups, stacked):
    """Stride-1 forward on the flat layout, bias included -> new contiguous [N, O, Ho, Wo]."""
    o, cg, kh, kw = w.shape
    geo = _Flat(x.shape, (kh, kw), pads, dilation, groups)
    dt = np.result_type(x, w)
    xf = _to_flat(x.astype(dt, copy=False), groups, geo.hp, geo.wp, geo.pt, geo.pl)
    # [kh*kw, G, Og, Cg], contiguous so that every tap's matrix is a BLAS operand
    wt = np.ascontiguousarray(w.astype(dt, copy=False).reshape(groups, o // groups, cg, kh * kw).transpose(3, 0, 1, 2))
    acc = _tap_sum(wt, xf, 0, geo.m, geo, stacked)
    return _from_flat(acc.reshape(o, geo.m), (geo.n, o, geo.ho, geo.wo), geo.hp, geo.wp, bias)


def _wgrad_flat(x, wshape, geo, gz, stacked):
    """Stride-1 weight gradient: ``gw[:, :, i, j] = g_flat[:, :M] @ x_flat[:, off_ij : off_ij + M]^T``
    per group (padding positions of ``g_flat`` are zero, so by-product positions add nothing)."""
    o, cg, kh, kw = wshape
    groups, og = geo.groups, o // geo.groups
    xf = _to_flat(x.astype(gz.dtype, copy=False), groups, geo.hp, geo.wp, geo.pt, geo.pl)
    gm = gz[:, :, geo.offs[-1]:geo.offs[-1] + geo.m]  # [G, Og, M]
    win = geo.taps(xf, 0, geo.m)  # [G, kh, kw, Cg, M]
    if stacked:
        cols = _scratch("cols", win.shape, gz.dtype)
        np.copyto(cols, win)
        gwt = np.matmul(gm, cols.reshape(groups, kh * kw * cg, geo.m).transpose(0, 2, 1))  # [G, Og, kh*kw*Cg]
        gwt = gwt.reshape(groups, og, kh, kw, cg).transpose(0, 1, 4, 2, 3)
    else:
        gwt = np.matmul(gm[:, None, None], win.swapaxes(-1, -2))  # [G, kh, kw, Og, Cg]
        gwt = gwt.transpose(0, 3, 4, 1, 2)
    gw = np.empty(wshape, dtype=gz.dtype)
    np.copyto(gw.reshape(groups, og, cg, kh, kw), gwt)
    return gw


def _dgrad_flat(w, xshape, geo, gz, stacked):
    """Stride-1 input gradient: ``dx_flat[:, q] = sum_ij W_ij^T @ g_flat[:, q - off_ij]``, only for
    q between the first and the last interior (unpadded) pixel, then the interior gathered."""
    o, cg, kh, kw = w.shape
    groups = geo.groups
    q0 = geo.pt * geo.wp + geo.pl
    q1 = geo.p - geo.pb * geo.wp - geo.pr
    # [kh*kw, G, Cg, Og]
    wt = np.ascontiguousarray(w.astype(gz.dtype, copy=False).reshape(groups, o // groups, cg, kh * kw).transpose(3, 0, 2, 1))
    dx = _tap_sum(wt, gz, geo.offs[-1] + q0, q1 - q0, geo, stacked, mirror=True)
    return _from_flat(dx.reshape(xshape[1], q1 - q0), xshape, geo.hp, geo.wp)


# ----------------------------------------------------------------------------- strided / fallback paths

def _pad_or_crop(a, pads):
    """Pad (positive) or crop (negative) the last two axes of ``a`` by ``((top, bottom), (left, right))``."""
    (pt, pb), (pl, pr) = pads
    if min(pt, pb, pl, pr) < 0:
        h, w = a.shape[-2:]
        a = a[..., max(-pt, 0):h - max(-pb, 0), max(-pl, 0):w - max(-pr, 0)]
        pt, pb, pl, pr = max(pt, 0), max(pb, 0), max(pl, 0), max(pr, 0)
    return _pad(a, ((pt, pb), (pl, pr)))


def _dgrad_stride1(g, w, pads, dilation, groups, in_size):
    """Input gradient of a stride-1 convolution as a convolution of the output gradient with
    the flipped, transposed weight: one im2col gather and one BLAS product, no scatter-add.

        gi[n, c, y, x] = sum_{o, i, j} g_pad[n, o, y + dh*(kh-1-i), x + dw*(kw-1-j)] * w[o, c, i, j]
    """
    n, o, ho, wo = g.shape
    _, cg, kh, kw = w.shape
    h, wd = in_size
    dh, dw = dilation
    (pt, _), (pl, _) = pads
    lo_h, lo_w = dh * (kh - 1) - pt, dw * (kw - 1) - pl
    hi_h, hi_w = h + dh * (kh - 1) - ho - lo_h, wd + dw * (kw - 1) - wo - lo_w
    gp = _pad_or_crop(g, ((lo_h, hi_h), (lo_w, hi_w)))
    og = o // groups
    win = _windows(gp, groups, kh, kw, h, wd, (1, 1), dilation)  # [N, G, Og, kh, kw, H, W]
    cols = _scratch("cols", win.shape, g.dtype)
    np.copyto(cols, win)
    cols = cols.reshape(n, groups, og * kh * kw, h * wd)
    # wt[g, c, (o, i', j')] = w[g*Og + o, c, kh-1-i', kw-1-j']
    wt = w[:, :, ::-1, ::-1].reshape(groups, og, cg, kh * kw).transpose(0, 2, 1, 3).reshape(groups, cg, og * kh * kw)
    gi = np.empty((n, groups * cg, h, wd), dtype=g.dtype)
    np.matmul(wt, cols, out=gi.reshape(n, groups, cg, h * wd))
    return gi


def _dgrad_col2im(gg, w, stride, pads, dilation, groups, in_shape, out_size):
    """Input gradient for strided convolutions: W^T @ g, scattered back with one strided add
    per kernel tap."""
    n, c, h, wd = in_shape
    o, cg, kh, kw = w.shape
    og = o // groups
    ho, wo = out_size
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, wd + pl + pr
    dxp = np.zeros((n, c, hp, wp), dtype=gg.dtype)
    wt = w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)
    dcols = np.matmul(wt, gg).reshape(n, groups, cg, kh, kw, ho, wo)
    dxv = dxp.reshape(n, groups, cg, hp, wp)
    sh, sw = stride
    dh, dw = dilation
    for i in range(kh):  # one strided add of a whole tensor per kernel tap
        for j in range(kw):
            dxv[:, :, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw] += dcols[:, :, :, i, j]
    gi = dxp[:, :, pt:pt + h, pl:pl + wd]
    return gi if pt == pb == pl == pr == 0 else np.ascontiguousarray(gi)


@_remembered
def _args1d(stride, padding, dilation, k):
    """conv1d's arguments as conv2d's of the [N, C, 1, L] view: (stride, per-side pads,
    dilation)."""
    return (1, _pair(stride, 1)[0]), _pads1d(padding, k, dilation), (1, _pair(dilation, 1)[0])


def _pads1d(padding, k, dilation):
    if isinstance(padding, str):
        return ((0, 0),) + resolve_padding(padding, (k,), _pair(dilation, 1))
    return ((0, 0),) + resolve_padding(padding if not isinstance(padding, (int, np.integer)) else (padding,), (k,), _pair(dilation, 1))


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """1d convolution: ``input`` [N, C, L], ``weight`` [O, C/groups, k] -> [N, O, Lo]; runs as 2d with H = 1."""
    x = np.asarray(input)[:, :, None, :]
    w = np.asarray(weight)[:, :, None, :]
    out = conv2d(x, w, bias, *_args1d(stride, padding, dilation, w.shape[-1]), groups, activation)
    return out[:, :, 0, :]


def conv1d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    need=(True, True, True), output=None, activation=None):
    """Gradients ``(grad_input, grad_weight, grad_bias)`` of :func:`conv1d` (see :func:`conv2d_backward`)."""
    x = np.asarray(input)[:, :, None, :]
    w = np.asarray(weight)[:, :, None, :]
    g = np.asarray(grad_output)[:, :, None, :]
    out4 = None if output is None else np.asarray(output)[:, :, None, :]
    gi, gw, gb = conv2d_backward(g, x, w, *_args1d(stride, padding, dilation, w.shape[-1]), groups, need, out4,
                                 activation)
    return (None if gi is None else gi[:, :, 0, :]), (None if gw is None else gw[:, :, 0, :]), gb
