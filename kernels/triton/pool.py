"""Triton kernels for max / min / avg pooling (2d; 1d runs as 2d of height 1), forward and backward.

Shapes: input ``x`` is ``[N, C, H, W]`` with any strides (NCHW, channels_last, non-contiguous
views are read in place); outputs, saved indices and gradients are ``[N, C, OH, OW]`` /
``[N, C, H, W]``, contiguous, or channels_last for a channels_last input (as torch's). Three
forms of each kernel:

* flat: one program handles ``BLOCK`` consecutive elements of the flattened output (forward) or
  input (backward), in NCHW or channels_last order; kernel size, stride, padding and dilation are
  run-time integers, so one compiled kernel serves many pooling geometries (Triton's JIT still
  compiles an integer equal to 1 or a multiple of 16 apart, but the divisors, which it takes as
  do_not_specialize). The heuristic, and
  the only form where a tensor spans 2^31 elements.
* tiled (NCHW): one program handles a 2-D tile of one (n, c) plane, window size compile-time
  (taps unrolled), int32 in-plane offsets, no per-element division; the backward visits only the
  windows that can cover an element.
* channels_last tiled: one program handles one row of one image x a tile of (positions,
  channels), the channels consecutive in memory (16-byte accesses), the window unrolled.

The tiled forms' program-id divisions (and the backward's divisions by the stride) are
multiply-high ones (``_div``, the launcher's divisors). sm_90 SASS, 3x3/2 float32, four elements
a thread, straight path per element (``gpu-nn sass``; ``--launched`` for the aligned forms):
tiled forward with indices 127, backward 114; channels_last as launched at 64 channels, forward
93, backward 62. The tiled forms are offered to the measuring chooser (``choose``) beside the
flat form until an H200 run has timed them.

Semantics are torch's (see ``reference/pool.py``): max visits taps row-major and takes a tap
when ``v > best or isnan(v)`` (NaN propagates, ties keep the first position, index
``ih * W + iw``; -1 for a window made only of padding); min is max of ``-x`` negated back;
avg divides by ``divisor_override``, else the window clipped to the padded input
(``count_include_pad``) or to the input. Loads widen to float32; stores narrow to the output
dtype (exact for max/min).

Backward kernels gather: each input element visits the windows that cover it (for tap (i, j),
``oh = (ih + ph - i*dh) / sh`` when that divides exactly) and sums their gradients, for max/min
only where the saved index names this element, in increasing (oh, ow) order: torch's order (its
CPU kernels scatter the outputs in order, its CUDA ones gather as here), so float32 sums are
torch's bit for bit. Averages divide with ``tl.div_rn`` (Triton's ``/`` on float32 is PTX's
approximate ``div.full.f32``, torch's CUDA kernels divide IEEE). No atomics, so results are
deterministic.

Not supported: 3d pooling, return of indices from avg, bfloat16 under the interpreter.
"""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .. import fastdiv
from ._aot import AotSpec
from ._launch import cdiv, next_power_of_2
from ._launch import launch as launch_kernel

MODES = {"max": 0, "min": 1}
GPU_BLOCK, GPU_WARPS = 512, 4
INTERP_BLOCK = 4096


@triton.jit
def _div(n, d, m, s, FAST: tl.constexpr):
    """``n // d`` for offsets ``n >= 0``. ``FAST`` (32-bit offsets): by the multiply-high divisor
    ``(m, s)`` the launcher computed for ``d`` (``kernels/fastdiv.py``; ``m`` as the int32 of its
    bits), four instructions where a 32-bit division takes about twenty; else a division."""
    if FAST:
        u = n.to(tl.uint32, bitcast=True)
        q = (tl.umulhi(u, m.to(tl.uint32, bitcast=True)) + u) >> s.to(tl.uint32)
        return q.to(tl.int32, bitcast=True)
    else:
        return n // d


@triton.jit
def _inside(i, n):
    """``0 <= i < n`` for int32 ``i`` and a size ``n >= 0`` as one unsigned comparison (a negative
    ``i`` wraps above any size). The tiled kernels' bounds (one predicate where two were; in the
    flat kernels, with their run-time tap loops, it cost registers instead). ``n`` through
    ``tl.cast``, not ``.to``: a size argument equal to 1 (H of a 1-d pooling) is specialised by
    the JIT into a plain int, which has no ``.to`` (the sm_90 compile failed there; the
    interpreter, which specialises nothing, never saw it)."""
    return i.to(tl.uint32, bitcast=True) < tl.cast(n, tl.uint32)


@triton.jit
def _decompose(offs, D1, D2, m1, s1, m2, s2, FAST: tl.constexpr):
    """offs -> (offs // (D1 * D2), (offs // D2) % D1, offs % D2): with ``FAST`` the divisions by
    :func:`_div` and the remainders by multiply-subtract, else ``//`` and ``%``."""
    if FAST:
        t = _div(offs, D2, m2, s2, FAST)
        q = _div(t, D1, m1, s1, FAST)
        return q, t - q * D1, offs - t * D2
    else:
        d2 = offs % D2
        t = offs // D2
        return t // D1, t % D1, d2


@triton.jit
def _block_offsets(total, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat element offsets and their in-range mask; int64 offsets when
    ``WIDE`` (a tensor may exceed 2^31 elements)."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < total


@triton.jit
def _unravel(offs, C, R, Q, mC, sC, mR, sR, mQ, sQ, FAST: tl.constexpr, CL: tl.constexpr):
    """Flat offsets of an [N, C, R, Q] tensor -> (n, c, r, q): NCHW order, or with ``CL``
    channels_last order (channels fastest). The divisions by :func:`_div` (``FAST``: the
    launcher's multiply-high divisors of C, R and Q)."""
    if CL:
        t = _div(offs, C, mC, sC, FAST)
        c = offs - t * C
        n, r, q = _decompose(t, R, Q, mR, sR, mQ, sQ, FAST)
    else:
        nc, r, q = _decompose(offs, R, Q, mR, sR, mQ, sQ, FAST)
        n = _div(nc, C, mC, sC, FAST)
        c = nc - n * C
    return n, c, r, q


@triton.jit
def _window_origin(offs, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW, mC, sC, mR, sR, mQ, sQ,
                   FAST: tl.constexpr, CL: tl.constexpr):
    """Flat output offsets -> (the input plane's element offset in x, top-left input row and
    column of each output's window, padding included). ``CL``: the output is channels_last
    (offsets in [N, OH, OW, C] order, channels fastest: a warp's lanes read consecutive channels
    of a channels_last input), else NCHW. ``FAST`` (32-bit offsets: x spans fewer than 2^31
    elements): the plane offset in int32, else int64."""
    n, c, oh, ow = _unravel(offs, C, OH, OW, mC, sC, mR, sR, mQ, sQ, FAST, CL)
    if FAST:
        plane = n * stride_xn + c * stride_xc
    else:
        plane = n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc
    return plane, oh * SH - PH, ow * SW - PW


@triton.jit
def _tap(plane, ih, iw, stride_xh, stride_xw, FAST: tl.constexpr):
    """The element offset in x of tap (ih, iw) of a plane at ``plane``: one int32 sum with
    ``FAST`` (a wide multiply-add of the address from it), int64 arithmetic otherwise."""
    if FAST:
        return plane + ih * stride_xh + iw * stride_xw
    else:
        return plane + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw


@triton.jit
def _max_tap(v, ok, pos, best, nan, bidx, STORE_IDX: tl.constexpr, DEFAULT_SET: tl.constexpr = False):
    """One tap ``v`` (-inf in the padding and masked lanes: never an update) of a max window at
    plane position ``pos`` (``ih * W + iw``): ``(best, nan, bidx)`` after it. torch's rule "v > best or v is
    NaN" for the value as for its position: a later NaN replaces an earlier one and a tie keeps
    the first tap, -0.0 against +0.0 included (a maximum would take +0.0). The default position
    is the first in-input tap: set before the taps where ``DEFAULT_SET``, else taken here where
    ``bidx < 0``. Values only (not ``STORE_IDX``): the same value, the NaN kept apart in ``nan``
    (a maximum: one instruction a tap; :func:`_max_result`)."""
    if STORE_IDX:
        upd = (v > best) | (v != v)
        if DEFAULT_SET:
            bidx = tl.where(upd, pos, bidx)
        else:
            bidx = tl.where(upd | (ok & (bidx < 0)), pos, bidx)
        best = tl.where(upd, v, best)
    else:
        best = tl.where(v > best, v, best)
        nan = tl.maximum(nan, v, propagate_nan=tl.PropagateNan.ALL)
    return best, nan, bidx


@triton.jit
def _max_result(best, nan, MINIMUM: tl.constexpr, STORE_IDX: tl.constexpr):
    """A window's value after its taps (:func:`_max_tap`): NaN where a tap was (values only), and
    negated back for min pooling."""
    if not STORE_IDX:
        best = tl.where(nan != nan, nan, best)
    if MINIMUM:
        best = -best
    return best


# the multiply-high divisors of the flat kernels' sizes (m and s of C, R, Q; the backwards' of
# SH and SW too): run-time ints whose value decides nothing a compiled kernel is specialised on
_DIVISORS = ["mC", "sC", "mR", "sR", "mQ", "sQ"]
_STRIDE_DIVISORS = ["mSH", "sSH", "mSW", "sSW"]


@triton.jit(do_not_specialize=_DIVISORS)
def _max_pool_fwd_kernel(x_ptr, y_ptr, i_ptr, total, C, H, W, OH, OW,
                         stride_xn, stride_xc, stride_xh, stride_xw,
                         KH, KW, SH, SW, PH, PW, DH, DW, mC, sC, mR, sR, mQ, sQ,
                         MINIMUM: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, CL: tl.constexpr = False,
                         STORE_IDX: tl.constexpr = True):
    """``STORE_IDX`` False: the values only (nothing will read the indices: an inference call);
    the index bookkeeping is then dead code, and i_ptr is never touched. ``mC`` .. ``sQ``: the
    multiply-high divisors of C, OH and OW (:func:`_div`; unused where ``WIDE``)."""
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    plane, h0, w0 = _window_origin(offs, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW,
                                   mC, sC, mR, sR, mQ, sQ, not WIDE, CL)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    nan = best  # values only: NaN once any tap is NaN (_max_tap)
    # a plane position fits int32 (an index is one: ih * W + iw); int64 where WIDE, as before
    if WIDE:
        bidx = tl.full([BLOCK], -1, tl.int64)
    else:
        bidx = tl.full([BLOCK], -1, tl.int32)
    # padding and masked lanes read -inf (+inf for min pooling, -inf once negated): never an update
    outside: tl.constexpr = float("inf") if MINIMUM else float("-inf")
    for i in range(0, KH):
        ih = h0 + i * DH
        hok = mask & (ih >= 0) & (ih < H)
        for j in range(0, KW):
            iw = w0 + j * DW
            ok = hok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + _tap(plane, ih, iw, stride_xh, stride_xw, not WIDE), mask=ok, other=outside)
            v = v.to(tl.float32)
            if MINIMUM:
                v = -v
            if WIDE:
                pos = ih.to(tl.int64) * W + iw
            else:
                pos = ih * W + iw
            best, nan, bidx = _max_tap(v, ok, pos, best, nan, bidx, STORE_IDX)
    best = _max_result(best, nan, MINIMUM, STORE_IDX)
    tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_IDX:
        tl.store(i_ptr + offs, bidx.to(tl.int64), mask=mask)


@triton.jit
def _avg_divisor(h0, w0, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR):
    """torch's avg divisor for windows starting at (h0, w0), and whether a window is empty."""
    hend = tl.minimum(h0 + KH, H + PH)
    wend = tl.minimum(w0 + KW, W + PW)
    pool = (hend - h0) * (wend - w0)
    ch = tl.minimum(hend, H) - tl.maximum(h0, 0)
    cw = tl.minimum(wend, W) - tl.maximum(w0, 0)
    div = tl.where(DIVISOR != 0, DIVISOR, tl.where(COUNT_PAD != 0, pool, ch * cw))
    return div.to(tl.float32), (ch <= 0) | (cw <= 0)


@triton.jit(do_not_specialize=_DIVISORS)
def _avg_pool_fwd_kernel(x_ptr, y_ptr, total, C, H, W, OH, OW,
                         stride_xn, stride_xc, stride_xh, stride_xw,
                         KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR, mC, sC, mR, sR, mQ, sQ,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr, CL: tl.constexpr = False):
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    plane, h0, w0 = _window_origin(offs, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW,
                                   mC, sC, mR, sR, mQ, sQ, not WIDE, CL)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, KH):
        ih = h0 + i
        hok = mask & (ih >= 0) & (ih < H)
        for j in range(0, KW):
            iw = w0 + j
            ok = hok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + _tap(plane, ih, iw, stride_xh, stride_xw, not WIDE), mask=ok, other=0.0)
            acc += v.to(tl.float32)
    div, empty = _avg_divisor(h0, w0, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
    y = tl.where(empty, 0.0, tl.div_rn(acc, div))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_DIVISORS + _STRIDE_DIVISORS)
def _max_pool_bwd_kernel(g_ptr, i_ptr, dx_ptr, total, H, W, OH, OW,
                         KH, KW, SH, SW, PH, PW, DH, DW, C, mC, sC, mR, sR, mQ, sQ, mSH, sSH, mSW, sSW,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr, CL: tl.constexpr = False):
    """``CL``: dx, grad_output and the indices are channels_last (dx offsets in [N, H, W, C]
    order; ``C`` is read only then), else NCHW.

    Each element visits only the windows whose span covers it, as the tiled form does
    (:func:`_max_pool_bwd_tile_kernel`): rows ``oh = (ih + PH) // SH - a`` for ``a <
    (KH - 1) * DH // SH + 1``, likewise columns (2 x 2 windows at 3x3/2, one division per row
    and per column), where the loop over every tap took 9 with a division by the stride each;
    the windows come in the same order (oh, then ow, increasing: torch's), so the sums are the
    same. (The loop form and the bounds as ``oh * SH >= lo_h`` are the ones found to compile
    without a spill under Triton 3.6 and 3.9 in every layout and index width: 54-64 registers
    at 32-bit indices, 102-104 at 64-bit ones, where the former loop took 126-128 there.)
    ``mC`` .. ``sQ``, ``mSH`` .. ``sSW``: the multiply-high divisors of C, H, W and of the strides
    (:func:`_div`; unused where ``WIDE``)."""
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    if CL:
        n, c, ih, iw = _unravel(offs, C, H, W, mC, sC, mR, sR, mQ, sQ, not WIDE, CL)
        obase = n * OH * OW * C + c  # int64 where WIDE (offs are), else every offset fits int32
    else:
        nc, ih, iw = _decompose(offs, H, W, mR, sR, mQ, sQ, not WIDE)
        obase = nc * OH * OW
    target = ih * W + iw  # int32 unless WIDE (then int64, as offs), in both layouts: each compiles without a spill
    top = _div(ih + PH, SH, mSH, sSH, not WIDE)  # ih + PH >= 0: floor division
    left = _div(iw + PW, SW, mSW, sSW, not WIDE)
    reach_h = (KH - 1) * DH - PH
    reach_w = (KW - 1) * DW - PW
    acc = tl.zeros([BLOCK], tl.float32)
    nwh = (KH - 1) * DH // SH + 1  # the windows covering an element: at most nwh x nww of them,
    nww = (KW - 1) * DW // SW + 1  # rows top - nwh + 1 .. top, columns likewise, visited increasing
    lo_h = ih - reach_h  # a window of row oh reaches ih where oh * SH >= lo_h
    lo_w = iw - reach_w
    first_h = top - (nwh - 1)
    first_w = left - (nww - 1)
    for a in range(0, nwh):
        oh = first_h + a
        hok = mask & (oh >= 0) & (oh < OH) & (oh * SH >= lo_h)
        for b in range(0, nww):
            ow = first_w + b
            ok = hok & (ow >= 0) & (ow < OW) & (ow * SW >= lo_w)
            if CL:
                o = obase + (oh * OW + ow) * C
            else:
                o = obase + oh * OW + ow
            sel = tl.load(i_ptr + o, mask=ok, other=-1)
            g = tl.load(g_ptr + o, mask=ok & (sel == target), other=0.0)
            acc += g.to(tl.float32)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_DIVISORS + _STRIDE_DIVISORS)
def _avg_pool_bwd_kernel(g_ptr, dx_ptr, total, H, W, OH, OW,
                         KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR, C, mC, sC, mR, sR, mQ, sQ, mSH, sSH, mSW, sSW,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr, CL: tl.constexpr = False):
    """``CL`` and the divisors as in :func:`_max_pool_bwd_kernel`; the windows covering each
    element only, as there (no dilation: ``(KH - 1) // SH + 1`` rows of them)."""
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    if CL:
        n, c, ih, iw = _unravel(offs, C, H, W, mC, sC, mR, sR, mQ, sQ, not WIDE, CL)
        obase = n * OH * OW * C + c  # int64 where WIDE (offs are), else every offset fits int32
    else:
        nc, ih, iw = _decompose(offs, H, W, mR, sR, mQ, sQ, not WIDE)
        obase = nc * OH * OW
    top = _div(ih + PH, SH, mSH, sSH, not WIDE)  # ih + PH >= 0: floor division
    left = _div(iw + PW, SW, mSW, sSW, not WIDE)
    acc = tl.zeros([BLOCK], tl.float32)
    nwh = (KH - 1) // SH + 1
    nww = (KW - 1) // SW + 1
    lo_h = ih - (KH - 1 - PH)  # as in _max_pool_bwd_kernel
    lo_w = iw - (KW - 1 - PW)
    # the same windows in the same order as there, counted down from the last (the form of these
    # loops that compiles without a spill here under Triton 3.6 and 3.9; the max's counts up)
    for a in range(nwh - 1, -1, -1):
        oh = top - a
        hok = mask & (oh >= 0) & (oh < OH) & (oh * SH >= lo_h)
        for b in range(nww - 1, -1, -1):
            ow = left - b
            ok = hok & (ow >= 0) & (ow < OW) & (ow * SW >= lo_w)
            if CL:
                o = obase + (oh * OW + ow) * C
            else:
                o = obase + oh * OW + ow
            g = tl.load(g_ptr + o, mask=ok, other=0.0).to(tl.float32)
            div, empty = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
            acc += tl.where(ok & (~empty), tl.div_rn(g, div), 0.0)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# --- tiled forms: one program per 2-D tile of one plane ----------------------------------------
#
# The kernels above index the flattened tensor: every element pays three run-time divisions (by
# OW, OH and C; multiply-high ones for 32-bit offsets) to find its plane and position, and a tap
# loop of run-time length that cannot be unrolled. The forms below give each program a
# [BH, BW] tile of one (n, c) plane: the plane and tile come from the program id (a few scalar
# divisions per program), rows and columns are a [BH, 1] and a [1, BW] vector (no per-element
# division), the window's taps are unrolled (KH, KW are compile-time), and in-plane offsets are
# int32 (offered only where no tensor spans 2^31 elements: the flat kernels' WIDE case). Same
# semantics, same visiting order of taps (so the same ties, NaNs and indices). The backward
# visits, per input element, only the windows whose span covers it (NWH x NWW of them, from one
# division per row and per column) instead of every tap with two divisions each.


@triton.jit
def _first_inside(start, step, size, K: tl.constexpr):
    """The first of the K taps ``start + k * step`` inside ``[0, size)``, or -1 (same shape as start)."""
    first = start * 0 - 1
    for k in tl.static_range(K - 1, -1, -1):
        first = tl.where(_inside(start + k * step, size), start + k * step, first)
    return first


@triton.jit
def _default_position(h0, w0, H, W, DH, DW, KH: tl.constexpr, KW: tl.constexpr, bidx):
    """torch's default position of the windows at (h0, w0) (any shapes that broadcast to bidx's):
    the first in-input tap (-1 for a window of padding only), from the window's rows and columns
    alone, so that a tap then only compares (:func:`_max_tap` with DEFAULT_SET)."""
    fh = _first_inside(h0, DH, H, KH)
    fw = _first_inside(w0, DW, W, KW)
    return tl.where((fh >= 0) & (fw >= 0), fh * W + fw, bidx)


@triton.jit
def _tap_ptr(ptr0, row, col, ROW_FIRST: tl.constexpr):
    """A tap's address from the plane pointer, the row's and the column's offsets: ``ROW_FIRST``
    adds the row to the pointer first (the plane tiles: a pointer per tile row, then one add per
    element), else sums the offsets first (the channels_last tiles, whose row and column are the
    same [BP, 1] positions: one int32 sum per position, one add per element)."""
    if ROW_FIRST:
        return ptr0 + row + col
    else:
        return ptr0 + (row + col)


@triton.jit
def _max_window(ptr0, h0, w0, H, W, stride_xh, stride_xw, DH, DW, omask,
                KH: tl.constexpr, KW: tl.constexpr, MINIMUM: tl.constexpr, STORE_IDX: tl.constexpr,
                ROW_FIRST: tl.constexpr):
    """The tiled max / min forwards' windows, their taps unrolled: ``(value, index)`` of each
    output of ``omask``'s shape. ``ptr0`` points at each output's plane (tap (ih, iw) at ``ptr0 +
    ih * stride_xh + iw * stride_xw``, :func:`_tap_ptr`), ``(h0, w0)`` its window's first tap.
    The default position comes first (:func:`_default_position`); a masked tap reads -inf (+inf
    for min pooling, -inf once negated): never an update."""
    best = tl.full(omask.shape, float("-inf"), tl.float32)
    nan = best  # values only: NaN once any tap is NaN (_max_tap)
    bidx = tl.full(omask.shape, -1, tl.int32)
    if STORE_IDX:
        bidx = _default_position(h0, w0, H, W, DH, DW, KH, KW, bidx)
    outside: tl.constexpr = float("inf") if MINIMUM else float("-inf")
    for i in tl.static_range(KH):
        ih = h0 + i * DH
        hok = omask & _inside(ih, H)
        row = ih * stride_xh
        rowpos = ih * W
        for j in tl.static_range(KW):
            iw = w0 + j * DW
            ok = hok & _inside(iw, W)
            v = tl.load(_tap_ptr(ptr0, row, iw * stride_xw, ROW_FIRST), mask=ok, other=outside).to(tl.float32)
            if MINIMUM:
                v = -v
            best, nan, bidx = _max_tap(v, ok, rowpos + iw, best, nan, bidx, STORE_IDX, True)
    return _max_result(best, nan, MINIMUM, STORE_IDX), bidx


@triton.jit
def _avg_taps(ptr0, h0, w0, H, W, stride_xh, stride_xw, omask, acc, KH: tl.constexpr, KW: tl.constexpr,
              ROW_FIRST: tl.constexpr):
    """``acc`` plus the sum of the in-input taps of the tiled avg forwards' windows (addressed as
    :func:`_max_window`'s)."""
    for i in tl.static_range(KH):
        ih = h0 + i
        hok = omask & _inside(ih, H)
        row = ih * stride_xh
        for j in tl.static_range(KW):
            iw = w0 + j
            ok = hok & _inside(iw, W)
            acc += tl.load(_tap_ptr(ptr0, row, iw * stride_xw, ROW_FIRST), mask=ok, other=0.0).to(tl.float32)
    return acc


# the tiled kernels' multiply-high divisors (:func:`_div`; the launcher's, from
# :func:`_tile_divs`): of the tiles per plane, the tiles per tile row, the planes per image (C;
# the channels_last tiles' rows per image) and, backward, of the strides
_TILE_DIVISORS = ["mP", "sP", "mT", "sT"]
_TILE_PLANE_DIVISORS = ["mC", "sC"]


@triton.jit
def _plane_tile(tiles_h, tiles_w, mP, sP, mT, sT, BH: tl.constexpr, BW: tl.constexpr):
    """(plane, row offsets [BH, 1], column offsets [1, BW]) of this program's tile, the program
    ids running over the tiles_h x tiles_w tiles of each plane in turn. Divided by multiply-high
    (a tiled launch spans fewer than 2^31 elements, so its program ids are below 2^31 too):
    four instructions a division where a 32-bit one takes about twenty, for every thread."""
    pid = tl.program_id(0)
    per_plane = tiles_h * tiles_w
    plane = _div(pid, per_plane, mP, sP, True)
    t = pid - plane * per_plane
    tr = _div(t, tiles_w, mT, sT, True)
    return plane, tr * BH + tl.arange(0, BH)[:, None], (t - tr * tiles_w) * BW + tl.arange(0, BW)[None, :]


@triton.jit
def _tile_coords(C, tiles_h, tiles_w, mP, sP, mT, sT, mC, sC, BH: tl.constexpr, BW: tl.constexpr):
    """(n, c, plane, row offsets [BH, 1], column offsets [1, BW]) of this program's tile
    (:func:`_plane_tile`, the plane split by C). The channels_last tiles call it with (OH or H,
    tiles of positions, tiles of channels): (n, the row, the image row's index, positions
    [BP, 1], channels [1, BC])."""
    plane, r, q = _plane_tile(tiles_h, tiles_w, mP, sP, mT, sT, BH, BW)
    n = _div(plane, C, mC, sC, True)
    return n, plane - n * C, plane, r, q


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS)
def _max_pool_fwd_tile_kernel(x_ptr, y_ptr, i_ptr, C, H, W, OH, OW, tiles_h, tiles_w, mP, sP, mT, sT, mC, sC,
                              stride_xn, stride_xc, stride_xh, stride_xw, SH, SW, PH, PW, DH, DW,
                              KH: tl.constexpr, KW: tl.constexpr, MINIMUM: tl.constexpr,
                              BH: tl.constexpr, BW: tl.constexpr, STORE_IDX: tl.constexpr = True):
    n, c, plane, oh, ow = _tile_coords(C, tiles_h, tiles_w, mP, sP, mT, sT, mC, sC, BH, BW)
    base = x_ptr + n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc
    omask = (oh < OH) & (ow < OW)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    best, bidx = _max_window(base, h0, w0, H, W, stride_xh, stride_xw, DH, DW, omask, KH, KW, MINIMUM, STORE_IDX,
                             True)
    o = plane.to(tl.int64) * OH * OW + oh * OW + ow
    tl.store(y_ptr + o, best.to(y_ptr.dtype.element_ty), mask=omask)
    if STORE_IDX:
        tl.store(i_ptr + o, bidx.to(tl.int64), mask=omask)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS)
def _avg_pool_fwd_tile_kernel(x_ptr, y_ptr, C, H, W, OH, OW, tiles_h, tiles_w, mP, sP, mT, sT, mC, sC,
                              stride_xn, stride_xc, stride_xh, stride_xw, SH, SW, PH, PW, COUNT_PAD, DIVISOR,
                              KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n, c, plane, oh, ow = _tile_coords(C, tiles_h, tiles_w, mP, sP, mT, sT, mC, sC, BH, BW)
    base = x_ptr + n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc
    omask = (oh < OH) & (ow < OW)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    acc = _avg_taps(base, h0, w0, H, W, stride_xh, stride_xw, omask, tl.zeros([BH, BW], tl.float32), KH, KW, True)
    div, empty = _avg_divisor(h0, w0, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
    y = tl.where(empty, 0.0, tl.div_rn(acc, div))
    o = plane.to(tl.int64) * OH * OW + oh * OW + ow
    tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _STRIDE_DIVISORS)
def _max_pool_bwd_tile_kernel(g_ptr, i_ptr, dx_ptr, H, W, OH, OW, tiles_h, tiles_w, mP, sP, mT, sT,
                              SH, SW, PH, PW, DH, DW, mSH, sSH, mSW, sSW,
                              KH: tl.constexpr, KW: tl.constexpr, NWH: tl.constexpr, NWW: tl.constexpr,
                              BH: tl.constexpr, BW: tl.constexpr):
    """dx of a [BH, BW] tile of one input plane: the gradient of every window whose span covers
    an element and whose saved index names it. The windows covering row ih are oh = (ih + PH) //
    SH - a for a < NWH = (KH - 1) * DH // SH + 1 (those that start at or before ih and reach it;
    with dilation some of them skip ih, and their index then names another element)."""
    plane, ih, iw = _plane_tile(tiles_h, tiles_w, mP, sP, mT, sT, BH, BW)
    imask = (ih < H) & (iw < W)
    target = ih * W + iw
    top = _div(ih + PH, SH, mSH, sSH, True)  # ih + PH >= 0: floor division
    left = _div(iw + PW, SW, mSW, sSW, True)
    obase = plane.to(tl.int64) * OH * OW
    acc = tl.zeros([BH, BW], tl.float32)
    for a in tl.static_range(NWH - 1, -1, -1):
        oh = top - a
        hok = imask & _inside(oh, OH) & (oh * SH - PH + (KH - 1) * DH >= ih)
        for b in tl.static_range(NWW - 1, -1, -1):
            ow = left - b
            ok = hok & _inside(ow, OW) & (ow * SW - PW + (KW - 1) * DW >= iw)
            o = obase + oh * OW + ow
            sel = tl.load(i_ptr + o, mask=ok, other=-1)
            acc += tl.load(g_ptr + o, mask=ok & (sel == target), other=0.0).to(tl.float32)
    tl.store(dx_ptr + plane.to(tl.int64) * H * W + target, acc.to(dx_ptr.dtype.element_ty), mask=imask)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _STRIDE_DIVISORS)
def _avg_pool_bwd_tile_kernel(g_ptr, dx_ptr, H, W, OH, OW, tiles_h, tiles_w, mP, sP, mT, sT,
                              SH, SW, PH, PW, COUNT_PAD, DIVISOR, mSH, sSH, mSW, sSW,
                              KH: tl.constexpr, KW: tl.constexpr, NWH: tl.constexpr, NWW: tl.constexpr,
                              BH: tl.constexpr, BW: tl.constexpr):
    """dx of a [BH, BW] tile of one input plane: sum of g / divisor over the windows covering an
    element (NWH = (KH - 1) // SH + 1 per row, as the max backward without dilation)."""
    plane, ih, iw = _plane_tile(tiles_h, tiles_w, mP, sP, mT, sT, BH, BW)
    imask = (ih < H) & (iw < W)
    top = _div(ih + PH, SH, mSH, sSH, True)
    left = _div(iw + PW, SW, mSW, sSW, True)
    obase = plane.to(tl.int64) * OH * OW
    acc = tl.zeros([BH, BW], tl.float32)
    for a in tl.static_range(NWH - 1, -1, -1):
        oh = top - a
        hok = imask & _inside(oh, OH) & (oh * SH - PH + (KH - 1) >= ih)
        for b in tl.static_range(NWW - 1, -1, -1):
            ow = left - b
            ok = hok & _inside(ow, OW) & (ow * SW - PW + (KW - 1) >= iw)
            g = tl.load(g_ptr + obase + oh * OW + ow, mask=ok, other=0.0).to(tl.float32)
            div, empty = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
            acc += tl.where(ok & (~empty), tl.div_rn(g, div), 0.0)
    tl.store(dx_ptr + plane.to(tl.int64) * H * W + ih * W + iw, acc.to(dx_ptr.dtype.element_ty), mask=imask)


# --- channels_last tiles: one program per (image, row, positions x channels) tile ------------
#
# A channels_last flat kernel finds each element's (n, h, w, c) by three divisions and walks the
# window (forward) or the covering windows (backward) for it alone. These forms give a program one
# output row (forward) or input row (backward) of one image and a [BP, BC] tile of (positions,
# channels): the row and tile come from the program id (scalar divisions), a tap's or window's row
# is one value (its bound check uniform), its columns a [BP, 1] vector and its channels a [1, BC]
# one, consecutive in memory (16-byte loads and stores where C allows). The taps and windows are
# unrolled (KH, KW compile-time), offsets int32 (offered only where no tensor spans 2^31
# elements). Same semantics and visiting order as the other forms.


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS)
def _max_pool_fwd_cl_kernel(x_ptr, y_ptr, i_ptr, C, H, W, OH, OW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                            stride_xn, stride_xh, stride_xw, SH, SW, PH, PW, DH, DW,
                            KH: tl.constexpr, KW: tl.constexpr, MINIMUM: tl.constexpr,
                            BP: tl.constexpr, BC: tl.constexpr, STORE_IDX: tl.constexpr = True):
    """y (and the indices) channels_last [N, OH, OW, C] from a channels_last x (unit channel
    stride): see the section comment; the taps' rule is :func:`_max_tap`'s."""
    n, oh, _, ow, c = _tile_coords(OH, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC, BP, BC)
    omask = (ow < OW) & (c < C)
    # the row as a [BP, 1] vector of one value (a scalar's comparisons would mix a scalar
    # boolean into the masks, which the interpreter widens to int32; compiled, it stays one value)
    h0 = tl.full([BP, 1], 0, tl.int32) + oh * SH - PH
    w0 = ow * SW - PW
    best, bidx = _max_window(x_ptr + (n * stride_xn + c), h0, w0, H, W, stride_xh, stride_xw, DH, DW, omask,
                             KH, KW, MINIMUM, STORE_IDX, False)
    o = ((n * OH + oh) * OW + ow) * C + c
    tl.store(y_ptr + o, best.to(y_ptr.dtype.element_ty), mask=omask)
    if STORE_IDX:
        tl.store(i_ptr + o, bidx.to(tl.int64), mask=omask)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS)
def _avg_pool_fwd_cl_kernel(x_ptr, y_ptr, C, H, W, OH, OW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                            stride_xn, stride_xh, stride_xw, SH, SW, PH, PW, COUNT_PAD, DIVISOR,
                            KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    """Average pooling's channels_last tile (see :func:`_max_pool_fwd_cl_kernel`)."""
    n, oh, _, ow, c = _tile_coords(OH, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC, BP, BC)
    omask = (ow < OW) & (c < C)
    h0 = tl.full([BP, 1], 0, tl.int32) + oh * SH - PH  # as in _max_pool_fwd_cl_kernel
    w0 = ow * SW - PW
    acc = _avg_taps(x_ptr + (n * stride_xn + c), h0, w0, H, W, stride_xh, stride_xw, omask,
                    tl.zeros([BP, BC], tl.float32), KH, KW, False)
    div, empty = _avg_divisor(h0, w0, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
    y = tl.where(empty, 0.0, tl.div_rn(acc, div))
    o = ((n * OH + oh) * OW + ow) * C + c
    tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _cl_bwd_coords(H, W, PH, PW, SH, SW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC, mSH, sSH, mSW, sSW,
                   BP: tl.constexpr, BC: tl.constexpr):
    """(n, ih, positions iw [BP, 1], channels c [1, BC], the row as a [BP, 1] vector, the first
    covering window's row and column ``(ih + PH) // SH``, ``(iw + PW) // SW``) of a channels_last
    backward tile: one input row of one image x positions x channels."""
    n, ih, _, iw, c = _tile_coords(H, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC, BP, BC)
    ihv = tl.full([BP, 1], 0, tl.int32) + ih  # a vector, as the forward tiles' h0
    # ih + PH >= 0: floor division
    return n, ih, iw, c, ihv, _div(ihv + PH, SH, mSH, sSH, True), _div(iw + PW, SW, mSW, sSW, True)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS + _STRIDE_DIVISORS)
def _max_pool_bwd_cl_kernel(g_ptr, i_ptr, dx_ptr, C, H, W, OH, OW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                            SH, SW, PH, PW, DH, DW, mSH, sSH, mSW, sSW,
                            KH: tl.constexpr, KW: tl.constexpr, NWH: tl.constexpr, NWW: tl.constexpr,
                            BP: tl.constexpr, BC: tl.constexpr):
    """dx channels_last [N, H, W, C] from channels_last g and indices [N, OH, OW, C]: one input
    row of one image x [BP, BC] (positions, channels) per program, the covering windows as
    :func:`_max_pool_bwd_tile_kernel` visits them (same order: the same sums); a window's
    gradients and indices for a position are BC consecutive elements (16-byte loads where C
    allows), the window's row one value per program."""
    n, ih, iw, c, ihv, top, left = _cl_bwd_coords(H, W, PH, PW, SH, SW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                                                  mSH, sSH, mSW, sSW, BP, BC)
    imask = (iw < W) & (c < C)
    target = ihv * W + iw
    acc = tl.zeros([BP, BC], tl.float32)
    for a in tl.static_range(NWH - 1, -1, -1):
        oh = top - a
        hok = _inside(oh, OH) & (oh * SH - PH + (KH - 1) * DH >= ihv)
        orow = (n * OH + oh) * OW
        for b in tl.static_range(NWW - 1, -1, -1):
            ow = left - b
            ok = imask & hok & _inside(ow, OW) & (ow * SW - PW + (KW - 1) * DW >= iw)
            o = (orow + ow) * C + c
            sel = tl.load(i_ptr + o, mask=ok, other=-1)
            # g loaded under the window's mask alone (whole channel groups: 16-byte loads), the
            # index test a select after it: the same sum as a load masked by it
            acc += tl.where(sel == target, tl.load(g_ptr + o, mask=ok, other=0.0).to(tl.float32), 0.0)
    tl.store(dx_ptr + ((n * H + ih) * W + iw) * C + c, acc.to(dx_ptr.dtype.element_ty), mask=imask)


@triton.jit(do_not_specialize=_TILE_DIVISORS + _TILE_PLANE_DIVISORS + _STRIDE_DIVISORS)
def _avg_pool_bwd_cl_kernel(g_ptr, dx_ptr, C, H, W, OH, OW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                            SH, SW, PH, PW, COUNT_PAD, DIVISOR, mSH, sSH, mSW, sSW,
                            KH: tl.constexpr, KW: tl.constexpr, NWH: tl.constexpr, NWW: tl.constexpr,
                            BP: tl.constexpr, BC: tl.constexpr):
    """Average pooling's channels_last backward tile (see :func:`_max_pool_bwd_cl_kernel`; the
    windows and divisors as :func:`_avg_pool_bwd_tile_kernel`'s)."""
    n, ih, iw, c, ihv, top, left = _cl_bwd_coords(H, W, PH, PW, SH, SW, tiles_w, tiles_c, mP, sP, mT, sT, mC, sC,
                                                  mSH, sSH, mSW, sSW, BP, BC)
    imask = (iw < W) & (c < C)
    acc = tl.zeros([BP, BC], tl.float32)
    for a in tl.static_range(NWH - 1, -1, -1):
        oh = top - a
        hok = _inside(oh, OH) & (oh * SH - PH + (KH - 1) >= ihv)
        orow = (n * OH + oh) * OW
        for b in tl.static_range(NWW - 1, -1, -1):
            ow = left - b
            ok = imask & hok & _inside(ow, OW) & (ow * SW - PW + (KW - 1) >= iw)
            g = tl.load(g_ptr + (orow + ow) * C + c, mask=ok, other=0.0).to(tl.float32)
            div, empty = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
            acc += tl.where(ok & (~empty), tl.div_rn(g, div), 0.0)
    tl.store(dx_ptr + ((n * H + ih) * W + iw) * C + c, acc.to(dx_ptr.dtype.element_ty), mask=imask)


# --- launchers ------------------------------------------------------------------------------


def launch_config(interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of the flat kernels: 512 elements / 4 warps on a GPU (4 elements per
    thread, enough loads in flight for a memory-bound kernel); one large block per program under
    the interpreter, where every program costs Python time."""
    return (INTERP_BLOCK, 4) if interpret else (GPU_BLOCK, GPU_WARPS)


def _wide(*tensors) -> bool:
    """int64 index arithmetic when any tensor's element span reaches 2^31. A contiguous tensor
    spans its element count: the usual case costs no walk over the dims."""
    for t in tensors:
        if t.is_contiguous():
            if t.numel() >= 2**31 - 1:
                return True
            continue
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if max(span, t.numel()) >= 2**31 - 1:
            return True
    return False


FLAT, TILE, CLTILE = "flat", "tile", "cltile"
TILE_ELEMS = 512  # elements per tiled program on a GPU, as the flat kernels' BLOCK
TILE_MAX_W = 128  # widest tile row: 4 rows or more of a wide plane per program


def tile_config(rows: int, cols: int, interpret: bool) -> tuple:
    """``(TILE, BH, BW, num_warps)``: the tiled form's configuration for planes of ``rows`` x
    ``cols`` (the output's for a forward, the input's for a backward). BW the columns rounded up
    to a power of two (at most TILE_MAX_W), BH what fills TILE_ELEMS (at most the rows, rounded
    up), four elements per thread: a 56 x 56 plane takes 8 x 64 tiles, 7 x 7 one 8 x 8 tile on
    one warp, a 1d pooling's single row tiles of 1 x 128."""
    elems = INTERP_BLOCK if interpret else TILE_ELEMS
    bw = min(next_power_of_2(max(cols, 1)), TILE_MAX_W)
    bh = min(next_power_of_2(max(rows, 1)), max(1, elems // bw))
    return (TILE, bh, bw, max(1, min(4, bh * bw // 128)))


CL_TILE_MAX_C = 64  # widest channel block of a channels_last tile


def cl_tile_config(cols: int, channels: int, interpret: bool) -> tuple:
    """``(CLTILE, BP, BC, num_warps)``: the channels_last tile for rows of ``cols`` positions (the
    output's for a forward, the input's for a backward) of ``channels`` channels: BC the channels
    rounded up to a power of two (at most CL_TILE_MAX_C), BP the positions that fill TILE_ELEMS
    (at most the row, rounded up), four elements per thread: 64 channels of a 56-wide row take
    8 x 64 tiles."""
    elems = INTERP_BLOCK if interpret else TILE_ELEMS
    bc = min(next_power_of_2(max(channels, 1)), CL_TILE_MAX_C)
    bp = min(next_power_of_2(max(cols, 1)), max(1, elems // bc))
    return (CLTILE, bp, bc, max(1, min(4, bp * bc // 128)))


def flat_config(interpret: bool) -> tuple:
    return (FLAT, *launch_config(interpret))


@functools.lru_cache(maxsize=256)
def forms(rows: int, cols: int, flat_only: bool, interpret: bool, channels: int = 0) -> tuple:
    """The configurations a launch may use, the heuristic (the flat kernel) first: the tiled form
    joins unless ``flat_only`` (a tensor spanning 2^31 elements: the tiled forms' offsets are
    int32; or channels_last tensors, which the flat kernels read channels-fastest and the plane
    tiles would read C elements apart); ``channels`` (a channels_last launch's C, unit channel
    stride) offers the channels_last tile instead. The tiled forms are measured candidates only
    until an H200 run has timed them against the flat one (``GPU_NN_TUNE_RECORD`` at the bench
    shapes)."""
    flat = flat_config(interpret)
    if flat_only:
        return (flat,)
    if channels:
        return (flat, cl_tile_config(cols, channels, interpret))
    return (flat, tile_config(rows, cols, interpret))


def channels_last(t) -> bool:
    """A 4-D tensor laid out channels_last and not also contiguous (the kernels' ``CL`` layout)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _tiles(planes: int, rows: int, cols: int, bh: int, bw: int) -> tuple:
    """(grid, tiles_h, tiles_w) of the tiled form over ``planes`` planes of rows x cols."""
    th, tw = cdiv(rows, bh), cdiv(cols, bw)
    return (planes * th * tw,), th, tw


def _tile_divs(tiles_h: int, tiles_w: int, *sizes) -> tuple:
    """The tiled kernels' multiply-high divisor arguments (:func:`_plane_tile`): of the tiles per
    plane and per tile row, then of ``sizes`` (the planes per image, the strides), m and s each."""
    return fastdiv.launch_args((tiles_h * tiles_w, tiles_w, *sizes), True)


def _pick(op: str, key, run, choose, cfg, rows: int, cols: int, flat_only: bool, interpret: bool, channels: int = 0):
    """``cfg`` (forced), else without a chooser the heuristic (the flat kernel), else the
    chooser's measured pick among :func:`forms` for the problem ``key()`` names (built only
    here: a call without a chooser pays for no key)."""
    if cfg is not None:
        return tuple(cfg)
    if choose is None:
        return flat_config(interpret)
    cands = forms(rows, cols, flat_only, interpret, channels)
    if len(cands) == 1:
        return cands[0]
    # the facts the forms offered depend on (output size, layout, width) are in the key: the
    # callers' keys name the input, and one input pools to another output under ceil_mode
    return tuple(choose(op, (*key(), rows, cols, bool(flat_only), channels), cands, run, cands[0]))


def _divs(wide: bool, *sizes) -> tuple:
    """The flat kernels' multiply-high divisor arguments (m, s per size: C, R, Q, and a backward's
    strides) for 32-bit offsets; zeros where ``wide`` (the kernels divide there)."""
    return (0,) * (2 * len(sizes)) if wide else fastdiv.launch_args(sizes, True)


def _facts(inp, out, written) -> tuple:
    """``(N, C, H, W, OH, OW, wide, cl)`` of a launch over input-shaped ``inp`` and output-shaped
    ``out`` that writes ``written`` (whose layout, channels_last or not, is the launch's)."""
    N, C, H, W = inp.shape
    OH, OW = out.shape[-2:]
    return N, C, H, W, OH, OW, _wide(inp, out), channels_last(written)


def max_pool2d_forward(x, y, idx, k, s, p, d, minimum: bool, interpret: bool, choose=None, cfg=None) -> None:
    """y, idx ``[N, C, OH, OW]`` (both contiguous, or both channels_last) = max (min) pooling of
    x ``[N, C, H, W]`` (any strides); ``idx`` None: the values only.

    ``choose``: None (the heuristic) or a measuring chooser (``gpu_nn._tuning.choose`` bound to
    the device) between the flat and the tiled kernel (:func:`forms`); ``cfg`` forces one (tests)."""
    total = y.numel()
    if total == 0:
        return
    N, C, H, W, OH, OW, wide, cl = _facts(x, y, y)

    def run(c):
        if c[0] == TILE:
            _, bh, bw, warps = c
            grid, th, tw = _tiles(N * C, OH, OW, bh, bw)
            launch_kernel(_max_pool_fwd_tile_kernel, grid, x, y, y if idx is None else idx, C, H, W, OH, OW, th, tw,
                          *_tile_divs(th, tw, C), *x.stride(), *s, *p, *d, KH=k[0], KW=k[1], MINIMUM=int(minimum),
                          BH=bh, BW=bw, STORE_IDX=idx is not None, num_warps=warps)
            return
        if c[0] == CLTILE:
            _, bp, bc, warps = c
            tw, tc = cdiv(OW, bp), cdiv(C, bc)
            launch_kernel(_max_pool_fwd_cl_kernel, (N * OH * tw * tc,), x, y, y if idx is None else idx, C, H, W,
                          OH, OW, tw, tc, *_tile_divs(tw, tc, OH), x.stride(0), x.stride(2), x.stride(3), *s, *p, *d,
                          KH=k[0], KW=k[1], MINIMUM=int(minimum), BP=bp, BC=bc, STORE_IDX=idx is not None,
                          num_warps=warps)
            return
        _, blk, warps = c
        launch_kernel(_max_pool_fwd_kernel, (cdiv(total, blk),),
            x, y, y if idx is None else idx, total, C, H, W, OH, OW, *x.stride(), *k, *s, *p, *d,
            *_divs(wide, C, OH, OW), MINIMUM=int(minimum), WIDE=wide, BLOCK=blk, CL=cl, STORE_IDX=idx is not None,
            num_warps=warps)

    run(_pick("max_pool_fwd", lambda: (tuple(x.shape), tuple(x.stride()), str(x.dtype), tuple(k), tuple(s), tuple(p),
                                       tuple(d), bool(minimum), idx is not None), run, choose, cfg, OH, OW,
              wide or (cl and x.stride(1) != 1), interpret, C if cl else 0))


def avg_pool2d_forward(x, y, k, s, p, ceil_mode, count_include_pad, divisor, interpret: bool, choose=None,
                       cfg=None) -> None:
    """y ``[N, C, OH, OW]`` (contiguous or channels_last) = average pooling of x ``[N, C, H, W]``
    (any strides); ``choose`` / ``cfg`` as :func:`max_pool2d_forward`."""
    total = y.numel()
    if total == 0:
        return
    N, C, H, W, OH, OW, wide, cl = _facts(x, y, y)

    def run(c):
        if c[0] == TILE:
            _, bh, bw, warps = c
            grid, th, tw = _tiles(N * C, OH, OW, bh, bw)
            launch_kernel(_avg_pool_fwd_tile_kernel, grid, x, y, C, H, W, OH, OW, th, tw, *_tile_divs(th, tw, C),
                          *x.stride(), *s, *p, int(count_include_pad), int(divisor), KH=k[0], KW=k[1], BH=bh, BW=bw,
                          num_warps=warps)
            return
        if c[0] == CLTILE:
            _, bp, bc, warps = c
            tw, tc = cdiv(OW, bp), cdiv(C, bc)
            launch_kernel(_avg_pool_fwd_cl_kernel, (N * OH * tw * tc,), x, y, C, H, W, OH, OW, tw, tc,
                          *_tile_divs(tw, tc, OH), x.stride(0), x.stride(2), x.stride(3), *s, *p,
                          int(count_include_pad), int(divisor), KH=k[0], KW=k[1], BP=bp, BC=bc, num_warps=warps)
            return
        _, blk, warps = c
        launch_kernel(_avg_pool_fwd_kernel, (cdiv(total, blk),),
            x, y, total, C, H, W, OH, OW, *x.stride(), *k, *s, *p, int(count_include_pad), int(divisor),
            *_divs(wide, C, OH, OW), WIDE=wide, BLOCK=blk, CL=cl, num_warps=warps)

    run(_pick("avg_pool_fwd", lambda: (tuple(x.shape), tuple(x.stride()), str(x.dtype), tuple(k), tuple(s), tuple(p),
                                       bool(count_include_pad), int(divisor)), run, choose, cfg, OH, OW,
              wide or (cl and x.stride(1) != 1), interpret, C if cl else 0))


def windows_covering(k: int, s: int, d: int) -> int:
    """How many windows of size k, stride s, dilation d can cover one input position (the tiled
    backward's unrolled loop length per dimension)."""
    return (k - 1) * d // s + 1


def max_pool2d_backward(g, idx, dx, k, s, p, d, interpret: bool, choose=None, cfg=None) -> None:
    """dx ``[N, C, H, W]`` from g and saved idx ``[N, C, OH, OW]`` (all contiguous, or all three
    channels_last); ``choose`` / ``cfg`` as :func:`max_pool2d_forward`."""
    total = dx.numel()
    if total == 0:
        return
    N, C, H, W, OH, OW, wide, cl = _facts(dx, g, dx)

    def run(c):
        if c[0] == TILE:
            _, bh, bw, warps = c
            grid, th, tw = _tiles(N * C, H, W, bh, bw)
            launch_kernel(_max_pool_bwd_tile_kernel, grid, g, idx, dx, H, W, OH, OW, th, tw, *_tile_divs(th, tw), *s,
                          *p, *d, *fastdiv.launch_args(tuple(s), True), KH=k[0], KW=k[1],
                          NWH=windows_covering(k[0], s[0], d[0]), NWW=windows_covering(k[1], s[1], d[1]), BH=bh, BW=bw,
                          num_warps=warps)
            return
        if c[0] == CLTILE:
            _, bp, bc, warps = c
            tw, tc = cdiv(W, bp), cdiv(C, bc)
            launch_kernel(_max_pool_bwd_cl_kernel, (N * H * tw * tc,), g, idx, dx, C, H, W, OH, OW, tw, tc,
                          *_tile_divs(tw, tc, H), *s, *p, *d, *fastdiv.launch_args(tuple(s), True), KH=k[0], KW=k[1],
                          NWH=windows_covering(k[0], s[0], d[0]), NWW=windows_covering(k[1], s[1], d[1]), BP=bp, BC=bc,
                          num_warps=warps)
            return
        _, blk, warps = c
        launch_kernel(_max_pool_bwd_kernel, (cdiv(total, blk),),
            g, idx, dx, total, H, W, OH, OW, *k, *s, *p, *d, C, *_divs(wide, C, H, W, *s),
            WIDE=wide, BLOCK=blk, CL=cl, num_warps=warps)

    run(_pick("max_pool_bwd", lambda: (tuple(dx.shape), tuple(g.shape), str(dx.dtype), tuple(k), tuple(s), tuple(p),
                                       tuple(d), cl), run, choose, cfg, H, W, wide, interpret, C if cl else 0))


def avg_pool2d_backward(g, dx, k, s, p, count_include_pad, divisor, interpret: bool, choose=None, cfg=None) -> None:
    """dx ``[N, C, H, W]`` from g ``[N, C, OH, OW]`` (both contiguous, or both channels_last);
    ``choose`` / ``cfg`` as :func:`max_pool2d_forward`."""
    total = dx.numel()
    if total == 0:
        return
    N, C, H, W, OH, OW, wide, cl = _facts(dx, g, dx)

    def run(c):
        if c[0] == TILE:
            _, bh, bw, warps = c
            grid, th, tw = _tiles(N * C, H, W, bh, bw)
            launch_kernel(_avg_pool_bwd_tile_kernel, grid, g, dx, H, W, OH, OW, th, tw, *_tile_divs(th, tw), *s, *p,
                          int(count_include_pad), int(divisor), *fastdiv.launch_args(tuple(s), True), KH=k[0], KW=k[1],
                          NWH=windows_covering(k[0], s[0], 1), NWW=windows_covering(k[1], s[1], 1),
                          BH=bh, BW=bw, num_warps=warps)
            return
        if c[0] == CLTILE:
            _, bp, bc, warps = c
            tw, tc = cdiv(W, bp), cdiv(C, bc)
            launch_kernel(_avg_pool_bwd_cl_kernel, (N * H * tw * tc,), g, dx, C, H, W, OH, OW, tw, tc,
                          *_tile_divs(tw, tc, H), *s, *p, int(count_include_pad), int(divisor),
                          *fastdiv.launch_args(tuple(s), True), KH=k[0], KW=k[1],
                          NWH=windows_covering(k[0], s[0], 1), NWW=windows_covering(k[1], s[1], 1),
                          BP=bp, BC=bc, num_warps=warps)
            return
        _, blk, warps = c
        launch_kernel(_avg_pool_bwd_kernel, (cdiv(total, blk),),
            g, dx, total, H, W, OH, OW, *k, *s, *p, int(count_include_pad), int(divisor), C, *_divs(wide, C, H, W, *s),
            WIDE=wide, BLOCK=blk, CL=cl, num_warps=warps)

    run(_pick("avg_pool_bwd", lambda: (tuple(dx.shape), tuple(g.shape), str(dx.dtype), tuple(k), tuple(s), tuple(p),
                                       bool(count_include_pad), int(divisor), cl), run, choose, cfg, H, W, wide,
              interpret, C if cl else 0))


def aot_specs():
    """Every (kernel, dtype, mode, index width, layout) the launchers can launch on a GPU: the flat
    kernels NCHW at both index widths, channels_last at 32-bit ones (every bench and test size;
    the int64 channels_last form compiles from the same source on first use), then the tiled ones."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for wide, cl in ((False, False), (True, False), (False, True)):
            it = "i64" if wide else "i32"
            geo = {n: "i32" for n in ("KH", "KW", "SH", "SW", "PH", "PW")}
            divs = {n: "i32" for n in _DIVISORS}
            stride_divs = {n: "i32" for n in _STRIDE_DIVISORS}
            common = {"BLOCK": GPU_BLOCK, "WIDE": wide, "CL": cl}
            tag = f"{dt} {'int64' if wide else 'int32'}" + (" channels_last" if cl else "")
            # the values-only forms (STORE_IDX False: i_ptr, never touched, is y's pointer) at 32-bit indices
            for mode, code in MODES.items():
                for store in (True, False) if not wide else (True,):
                    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "i_ptr": "*i64" if store else f"*{dt}", "total": it,
                           "C": "i32", "H": "i32", "W": "i32", "OH": "i32", "OW": "i32", "stride_xn": it, "stride_xc": it,
                           "stride_xh": it, "stride_xw": it, **geo, "DH": "i32", "DW": "i32", **divs,
                           "MINIMUM": "constexpr", "WIDE": "constexpr", "BLOCK": "constexpr", "CL": "constexpr",
                           "STORE_IDX": "constexpr"}
                    specs.append(AotSpec(_max_pool_fwd_kernel, sig, {"MINIMUM": code, **common, "STORE_IDX": store},
                                         num_warps=GPU_WARPS, label=f"{mode} {tag}" + ("" if store else " values only")))
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "total": it, "C": "i32", "H": "i32", "W": "i32",
                   "OH": "i32", "OW": "i32", "stride_xn": it, "stride_xc": it, "stride_xh": it, "stride_xw": it,
                   **geo, "COUNT_PAD": "i32", "DIVISOR": "i32", **divs, "WIDE": "constexpr", "BLOCK": "constexpr",
                   "CL": "constexpr"}
            specs.append(AotSpec(_avg_pool_fwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"avg {tag}"))
            sig = {"g_ptr": f"*{dt}", "i_ptr": "*i64", "dx_ptr": f"*{dt}", "total": it, "H": "i32", "W": "i32",
                   "OH": "i32", "OW": "i32", **geo, "DH": "i32", "DW": "i32", "C": "i32", **divs, **stride_divs,
                   "WIDE": "constexpr", "BLOCK": "constexpr", "CL": "constexpr"}
            specs.append(AotSpec(_max_pool_bwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"max/min {tag}"))
            sig = {"g_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "total": it, "H": "i32", "W": "i32", "OH": "i32", "OW": "i32",
                   **geo, "COUNT_PAD": "i32", "DIVISOR": "i32", "C": "i32", **divs, **stride_divs,
                   "WIDE": "constexpr", "BLOCK": "constexpr", "CL": "constexpr"}
            specs.append(AotSpec(_avg_pool_bwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"avg {tag}"))
    return specs + tiled_specs() + cl_tiled_specs()


# (window, stride, output plane, input plane) of the tiled forms' ahead-of-time configurations:
# ResNet's stem pool (3x3/2 p1, 112x112 -> 56x56: the bench shape, every dtype), a 2x2/2 pool of
# a small feature map in float32 (the seed CNN's 28x28 -> 14x14; 7x7 planes: one 8x8 tile, one warp)
TILED_AOT = (((3, 3), (2, 2), (56, 56), (112, 112), ("fp32", "fp16", "bf16")),
             ((2, 2), (2, 2), (7, 7), (14, 14), ("fp32",)),
             ((1, 4), (1, 3), (1, 10), (1, 29), ("fp32",)))  # a 1-d pooling: see ONES_1D

# what the JIT makes constants of in a 1-d pooling's tiled launch ([N, C, L] as [N, C, 1, L], a
# contiguous input): every run-time int equal to 1 not marked do_not_specialize. The i32 specs
# never compiled that form; on the H200 at 09f2311 it failed to compile (a helper called ``.to``
# on the plain int the JIT passes for H), every 1-d tiled pooling test failing there
ONES_1D = ("H", "OH", "tiles_h", "SH", "DH", "stride_xw")


def _ones_specialised(spec: AotSpec) -> AotSpec:
    sig, cx = dict(spec.signature), dict(spec.constexprs)
    for n in ONES_1D:
        if n in sig:
            sig[n], cx[n] = "constexpr", 1
    return dataclasses.replace(spec, signature=sig, constexprs=cx, label=spec.label + " (1-d: ones specialised)")


def tiled_specs():
    """The tiled kernels as :func:`tile_config` configures them at TILED_AOT's problems (their
    window sizes and tile shapes are compile-time: every other problem compiles its own on first
    use, from the same source). Run-time ints unspecialised (i32), as for any plane size."""
    specs = []
    i32 = "i32"
    for k, st, out_hw, in_hw, dts in TILED_AOT:
        _, obh, obw, owarps = tile_config(*out_hw, False)
        _, ibh, ibw, iwarps = tile_config(*in_hw, False)
        nw = {"NWH": windows_covering(k[0], st[0], 1), "NWW": windows_covering(k[1], st[1], 1)}
        geo = f"{k[0]}x{k[1]}/{st[0]}"
        first = len(specs)
        for dt in dts:
            plane = {n: i32 for n in ("C", "H", "W", "OH", "OW", "tiles_h", "tiles_w", *_TILE_DIVISORS,
                                      *_TILE_PLANE_DIVISORS)}
            strides = {n: i32 for n in ("stride_xn", "stride_xc", "stride_xh", "stride_xw")}
            sp = {n: i32 for n in ("SH", "SW", "PH", "PW")}
            fwd_tile = {"KH": k[0], "KW": k[1], "BH": obh, "BW": obw}
            for mode, code in MODES.items() if dt == "fp32" else (("max", 0),):
                for store in (True, False):
                    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "i_ptr": "*i64" if store else f"*{dt}", **plane, **strides,
                           **sp, "DH": i32, "DW": i32, "KH": "constexpr", "KW": "constexpr", "MINIMUM": "constexpr",
                           "BH": "constexpr", "BW": "constexpr", "STORE_IDX": "constexpr"}
                    specs.append(AotSpec(_max_pool_fwd_tile_kernel, sig, {**fwd_tile, "MINIMUM": code, "STORE_IDX": store},
                                         num_warps=owarps,
                                         label=f"tiled {mode} {geo} {dt} {obh}x{obw}" + ("" if store else " values only")))
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **plane, **strides, **sp, "COUNT_PAD": i32, "DIVISOR": i32,
                   "KH": "constexpr", "KW": "constexpr", "BH": "constexpr", "BW": "constexpr"}
            specs.append(AotSpec(_avg_pool_fwd_tile_kernel, sig, fwd_tile, num_warps=owarps,
                                 label=f"tiled avg {geo} {dt} {obh}x{obw}"))
            bplane = {n: i32 for n in ("H", "W", "OH", "OW", "tiles_h", "tiles_w", *_TILE_DIVISORS)}
            sdivs = {n: i32 for n in _STRIDE_DIVISORS}
            bwd_tile = {"KH": k[0], "KW": k[1], **nw, "BH": ibh, "BW": ibw}
            cx = {n: "constexpr" for n in bwd_tile}
            sig = {"g_ptr": f"*{dt}", "i_ptr": "*i64", "dx_ptr": f"*{dt}", **bplane, **sp, "DH": i32, "DW": i32,
                   **sdivs, **cx}
            specs.append(AotSpec(_max_pool_bwd_tile_kernel, sig, bwd_tile, num_warps=iwarps,
                                 label=f"tiled max/min {geo} {dt} {ibh}x{ibw}"))
            sig = {"g_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **bplane, **sp, "COUNT_PAD": i32, "DIVISOR": i32, **sdivs,
                   **cx}
            specs.append(AotSpec(_avg_pool_bwd_tile_kernel, sig, bwd_tile, num_warps=iwarps,
                                 label=f"tiled avg {geo} {dt} {ibh}x{ibw}"))
        if k[0] == 1:
            specs[first:] = [_ones_specialised(sp) for sp in specs[first:]]
    return specs


# (window, stride, output row width, input row width, channels) of the channels_last tiles'
# ahead-of-time configurations: ResNet's stem pool on 64 channels (the bench's channels_last
# case, every dtype)
CL_TILED_AOT = (((3, 3), (2, 2), 56, 112, 64, ("fp32", "fp16", "bf16")),)


def launched_specs():
    """The channels_last tiles as launches whose channel count and strides are multiples of 16
    compile them (:meth:`AotSpec.aligned`, what the JIT specialises): ``gpu-nn sass --launched
    --family pool`` shows their 16-byte loads and stores (the general forms, alignment unknown,
    access 32 bits at a time)."""
    return [spec.aligned() for spec in cl_tiled_specs()]


def cl_tiled_specs():
    """The channels_last tiles, forward and backward, as :func:`cl_tile_config` configures them
    at CL_TILED_AOT's problems (window and tile compile-time; other problems compile their own)."""
    specs = []
    i32 = "i32"
    for k, st, cols, in_cols, channels, dts in CL_TILED_AOT:
        _, bp, bc, warps = cl_tile_config(cols, channels, False)
        _, ibp, ibc, iwarps = cl_tile_config(in_cols, channels, False)
        bwd_tile = {"KH": k[0], "KW": k[1], "NWH": windows_covering(k[0], st[0], 1),
                    "NWW": windows_covering(k[1], st[1], 1), "BP": ibp, "BC": ibc}
        # the run-time ints of both directions' kernels, the forward's x strides between them
        sizes = ("C", "H", "W", "OH", "OW", "tiles_w", "tiles_c", *_TILE_DIVISORS, *_TILE_PLANE_DIVISORS)
        sp = ("SH", "SW", "PH", "PW")
        ints = {n: i32 for n in (*sizes, "stride_xn", "stride_xh", "stride_xw", *sp)}
        bints = {n: i32 for n in (*sizes, *sp)}
        sdivs = {n: i32 for n in _STRIDE_DIVISORS}
        bcx = {n: "constexpr" for n in bwd_tile}
        geo = f"{k[0]}x{k[1]}/{st[0]}"
        tile = {"KH": k[0], "KW": k[1], "BP": bp, "BC": bc}
        cx = {n: "constexpr" for n in tile}
        for dt in dts:
            for mode, code in MODES.items() if dt == "fp32" else (("max", 0),):
                for store in (True, False):
                    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "i_ptr": "*i64" if store else f"*{dt}", **ints,
                           "DH": i32, "DW": i32, **cx, "MINIMUM": "constexpr", "STORE_IDX": "constexpr"}
                    specs.append(AotSpec(_max_pool_fwd_cl_kernel, sig, {**tile, "MINIMUM": code, "STORE_IDX": store},
                                         num_warps=warps, label=f"channels_last tiled {mode} {geo} {dt} {bp}x{bc}"
                                         + ("" if store else " values only")))
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **ints, "COUNT_PAD": i32, "DIVISOR": i32, **cx}
            specs.append(AotSpec(_avg_pool_fwd_cl_kernel, sig, tile, num_warps=warps,
                                 label=f"channels_last tiled avg {geo} {dt} {bp}x{bc}"))
            sig = {"g_ptr": f"*{dt}", "i_ptr": "*i64", "dx_ptr": f"*{dt}", **bints, "DH": i32, "DW": i32, **sdivs,
                   **bcx}
            specs.append(AotSpec(_max_pool_bwd_cl_kernel, sig, bwd_tile, num_warps=iwarps,
                                 label=f"channels_last tiled max/min {geo} {dt} {ibp}x{ibc}"))
            sig = {"g_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **bints, "COUNT_PAD": i32, "DIVISOR": i32, **sdivs, **bcx}
            specs.append(AotSpec(_avg_pool_bwd_cl_kernel, sig, bwd_tile, num_warps=iwarps,
                                 label=f"channels_last tiled avg {geo} {dt} {ibp}x{ibc}"))
    return specs
