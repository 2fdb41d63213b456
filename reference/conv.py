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

How: the padded input is viewed through ``as_strided`` as the im2col tensor
``[N, G, Cg, kh, kw, Ho, Wo]`` (no copy), gathered once into a contiguous matrix and multiplied
with the weight by one broadcast ``np.matmul`` over (batch, group) -- BLAS does the work, no
Python loop over pixels, batch elements or groups. The input gradient scatters the column
gradient back with one strided add per kernel tap (kh * kw adds of whole tensors).
"""

from __future__ import annotations

import numpy as np

from . import activation as _act


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
    """Zero-padded copy of ``x`` [N, C, H, W] (``x`` itself when there is no padding)."""
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + pt + pb, w + pl + pr), dtype=x.dtype)
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
    cols = np.empty(win.shape, dtype=x.dtype)
    np.copyto(cols, win)
    return cols.reshape(n, groups, cg * kh * kw, ho * wo), (ho, wo)


def _norm2d(stride, padding, dilation, kernel_size):
    stride = _pair(stride, 2)
    dilation = _pair(dilation, 2)
    pads = resolve_padding(padding, kernel_size, dilation)
    return stride, pads, dilation


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """2d convolution (cross-correlation, as torch); optional fused activation after the bias.

    ``input`` [N, C, H, W], ``weight`` [O, C/groups, kh, kw], ``bias`` [O] or None -> [N, O, Ho, Wo].
    """
    x = np.asarray(input)
    w = np.asarray(weight)
    stride, pads, dilation = _norm2d(stride, padding, dilation, w.shape[2:])
    n = x.shape[0]
    o = w.shape[0]
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


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    need=(True, True, True), output=None, activation=None):
    """Gradients ``(grad_input, grad_weight, grad_bias)`` of :func:`conv2d`.

    ``grad_output`` [N, O, Ho, Wo]. With a fused ``activation`` pass the forward ``output``
    (after the activation): the gradient first goes through the activation. ``need`` selects
    which gradients to compute (None for the others).

        grad_bias[o]      = sum_{n,y,x} g[n, o, y, x]
        grad_weight       = sum_n g[n] @ cols[n]^T                    (per group)
        grad_input        = col2im(W^T @ g)   (scatter-add per kernel tap)
    """
    x = np.asarray(input)
    w = np.asarray(weight)
    g = np.asarray(grad_output)
    if activation is not None:
        g = _act.activate_backward(g, np.asarray(output), activation)
    stride, pads, dilation = _norm2d(stride, padding, dilation, w.shape[2:])
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    ho, wo = g.shape[2:]
    gg = g.reshape(n, groups, og, ho * wo)
    gi = gw = gb = None
    if need[2]:
        gb = g.sum(axis=(0, 2, 3)) if n else np.zeros(o, g.dtype)
    if need[1]:
        cols, _ = _cols(x, w, stride, pads, dilation, groups)
        if n == 0 or ho * wo == 0:
            gw = np.zeros(w.shape, g.dtype)
        else:
            # [N, G, Og, K] then a sum over the batch: keeps every product a plain BLAS call
            gw = np.empty(w.shape, dtype=g.dtype)
            np.sum(np.matmul(gg, cols.transpose(0, 1, 3, 2)), axis=0, out=gw.reshape(groups, og, cg * kh * kw))
    if need[0]:
        if n == 0 or ho * wo == 0:
            gi = np.zeros(x.shape, g.dtype)
        elif stride == (1, 1) and o <= 2 * c:
            # gathering the output gradient costs ~O*k*HW copies; the scatter path ~4*C*k*HW
            gi = _dgrad_stride1(g, w, pads, dilation, groups, (h, wd))
        else:
            gi = _dgrad_col2im(gg, w, stride, pads, dilation, groups, x.shape, (ho, wo))
    return gi, gw, gb


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
    cols = np.empty(win.shape, dtype=g.dtype)
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


def _pads1d(padding, k, dilation):
    if isinstance(padding, str):
        return ((0, 0),) + resolve_padding(padding, (k,), _pair(dilation, 1))
    return ((0, 0),) + resolve_padding(padding if not isinstance(padding, (int, np.integer)) else (padding,), (k,), _pair(dilation, 1))


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """1d convolution: ``input`` [N, C, L], ``weight`` [O, C/groups, k] -> [N, O, Lo]; runs as 2d with H = 1."""
    x = np.asarray(input)[:, :, None, :]
    w = np.asarray(weight)[:, :, None, :]
    pads = _pads1d(padding, w.shape[-1], dilation)
    out = conv2d(x, w, bias, (1, _pair(stride, 1)[0]), pads, (1, _pair(dilation, 1)[0]), groups, activation)
    return out[:, :, 0, :]


def conv1d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    need=(True, True, True), output=None, activation=None):
    """Gradients ``(grad_input, grad_weight, grad_bias)`` of :func:`conv1d` (see :func:`conv2d_backward`)."""
    x = np.asarray(input)[:, :, None, :]
    w = np.asarray(weight)[:, :, None, :]
    g = np.asarray(grad_output)[:, :, None, :]
    out4 = None if output is None else np.asarray(output)[:, :, None, :]
    pads = _pads1d(padding, w.shape[-1], dilation)
    gi, gw, gb = conv2d_backward(g, x, w, (1, _pair(stride, 1)[0]), pads, (1, _pair(dilation, 1)[0]), groups,
                                 need, out4, activation)
    return (None if gi is None else gi[:, :, 0, :]), (None if gw is None else gw[:, :, 0, :]), gb
