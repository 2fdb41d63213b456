"""Triton kernels for max / min / avg pooling (2d; 1d runs as 2d of height 1), forward and backward.

Shapes: input ``x`` is ``[N, C, H, W]`` with any strides (NCHW, channels_last, non-contiguous
views are read in place); outputs, saved indices and gradients are contiguous
``[N, C, OH, OW]`` / ``[N, C, H, W]``. One program handles ``BLOCK`` consecutive elements of
the flattened output (forward) or input (backward). Kernel size, stride, padding and dilation
are run-time integers, so one compiled kernel serves every pooling geometry.

Semantics are torch's (see ``reference/pool.py``): max visits taps row-major and takes a tap
when ``v > best or isnan(v)`` (NaN propagates, ties keep the first position, index
``ih * W + iw``; -1 for a window made only of padding); min is max of ``-x`` negated back;
avg divides by ``divisor_override``, else the window clipped to the padded input
(``count_include_pad``) or to the input. Loads widen to float32; stores narrow to the output
dtype (exact for max/min).

Backward kernels gather: each input element visits the windows that cover it (for tap (i, j),
``oh = (ih + ph - i*dh) / sh`` when that divides exactly) and sums their gradients, for max/min
only where the saved index names this element. No atomics, so results are deterministic.

Not supported: 3d pooling, return of indices from avg, bfloat16 under the interpreter.
"""

import triton
import triton.language as tl

from ._aot import AotSpec
from ._launch import cdiv
from ._launch import launch as launch_kernel

MODES = {"max": 0, "min": 1}
GPU_BLOCK, GPU_WARPS = 512, 4
INTERP_BLOCK = 4096


@triton.jit
def _decompose(offs, D1, D2):
    """offs -> (offs // (D1 * D2), (offs // D2) % D1, offs % D2)."""
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
def _window_origin(offs, x_ptr, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW):
    """Flat output offsets -> (the input plane's base pointer, top-left input row and column of
    each output's window, padding included)."""
    nc, oh, ow = _decompose(offs, OH, OW)
    n = nc // C
    c = nc % C
    base = x_ptr + n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc
    return base, oh * SH - PH, ow * SW - PW


@triton.jit
def _max_pool_fwd_kernel(x_ptr, y_ptr, i_ptr, total, C, H, W, OH, OW,
                         stride_xn, stride_xc, stride_xh, stride_xw,
                         KH, KW, SH, SW, PH, PW, DH, DW,
                         MINIMUM: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    base, h0, w0 = _window_origin(offs, x_ptr, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    bidx = tl.full([BLOCK], -1, tl.int64)
    for i in range(0, KH):
        ih = h0 + i * DH
        hok = mask & (ih >= 0) & (ih < H)
        for j in range(0, KW):
            iw = w0 + j * DW
            ok = hok & (iw >= 0) & (iw < W)
            v = tl.load(base + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, mask=ok, other=0.0)
            v = v.to(tl.float32)
            if MINIMUM:
                v = -v
            # padding and masked lanes never win (set after the negation of min pooling)
            v = tl.where(ok, v, float("-inf"))
            # torch's update rule; bidx < 0 makes the first in-input tap the default position
            take = ok & ((v > best) | (v != v) | (bidx < 0))
            bidx = tl.where(take, ih.to(tl.int64) * W + iw, bidx)
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    if MINIMUM:
        best = -best
    tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(i_ptr + offs, bidx, mask=mask)


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


@triton.jit
def _avg_pool_fwd_kernel(x_ptr, y_ptr, total, C, H, W, OH, OW,
                         stride_xn, stride_xc, stride_xh, stride_xw,
                         KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    base, h0, w0 = _window_origin(offs, x_ptr, C, OH, OW, stride_xn, stride_xc, SH, SW, PH, PW)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, KH):
        ih = h0 + i
        hok = mask & (ih >= 0) & (ih < H)
        for j in range(0, KW):
            iw = w0 + j
            ok = hok & (iw >= 0) & (iw < W)
            v = tl.load(base + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, mask=ok, other=0.0)
            acc += v.to(tl.float32)
    div, empty = _avg_divisor(h0, w0, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
    y = tl.where(empty, 0.0, acc / div)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_pool_bwd_kernel(g_ptr, i_ptr, dx_ptr, total, H, W, OH, OW,
                         KH, KW, SH, SW, PH, PW, DH, DW,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    nc, ih, iw = _decompose(offs, H, W)
    target = ih.to(tl.int64) * W + iw
    obase = nc.to(tl.int64) * OH * OW
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, KH):
        hnum = ih + PH - i * DH
        oh = hnum // SH
        hok = mask & (hnum >= 0) & (oh * SH == hnum) & (oh < OH)
        for j in range(0, KW):
            wnum = iw + PW - j * DW
            ow = wnum // SW
            ok = hok & (wnum >= 0) & (ow * SW == wnum) & (ow < OW)
            o = obase + oh * OW + ow
            sel = tl.load(i_ptr + o, mask=ok, other=-1)
            g = tl.load(g_ptr + o, mask=ok & (sel == target), other=0.0)
            acc += g.to(tl.float32)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _avg_pool_bwd_kernel(g_ptr, dx_ptr, total, H, W, OH, OW,
                         KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block_offsets(total, WIDE, BLOCK)
    nc, ih, iw = _decompose(offs, H, W)
    obase = nc.to(tl.int64) * OH * OW
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, KH):
        hnum = ih + PH - i
        oh = hnum // SH
        hok = mask & (hnum >= 0) & (oh * SH == hnum) & (oh < OH)
        for j in range(0, KW):
            wnum = iw + PW - j
            ow = wnum // SW
            ok = hok & (wnum >= 0) & (ow * SW == wnum) & (ow < OW)
            g = tl.load(g_ptr + obase + oh * OW + ow, mask=ok, other=0.0).to(tl.float32)
            div, empty = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, COUNT_PAD, DIVISOR)
            acc += tl.where(ok & (~empty), g / div, 0.0)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------------


def launch_config(interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps): 512 elements / 4 warps on a GPU (4 elements per thread, enough
    loads in flight for a memory-bound kernel); one large block per program under the
    interpreter, where every program costs Python time."""
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


def max_pool2d_forward(x, y, idx, k, s, p, d, minimum: bool, interpret: bool) -> None:
    """y, idx ``[N, C, OH, OW]`` (contiguous) = max (min) pooling of x ``[N, C, H, W]``."""
    N, C, H, W = x.shape
    OH, OW = y.shape[-2:]
    total = y.numel()
    blk, warps = launch_config(interpret)
    launch_kernel(_max_pool_fwd_kernel, (cdiv(total, blk),),
        x, y, idx, total, C, H, W, OH, OW, *x.stride(), *k, *s, *p, *d,
        MINIMUM=int(minimum), WIDE=_wide(x, y), BLOCK=blk, num_warps=warps)


def avg_pool2d_forward(x, y, k, s, p, ceil_mode, count_include_pad, divisor, interpret: bool) -> None:
    """y ``[N, C, OH, OW]`` (contiguous) = average pooling of x ``[N, C, H, W]``."""
    N, C, H, W = x.shape
    OH, OW = y.shape[-2:]
    total = y.numel()
    blk, warps = launch_config(interpret)
    launch_kernel(_avg_pool_fwd_kernel, (cdiv(total, blk),),
        x, y, total, C, H, W, OH, OW, *x.stride(), *k, *s, *p, int(count_include_pad), int(divisor),
        WIDE=_wide(x, y), BLOCK=blk, num_warps=warps)


def max_pool2d_backward(g, idx, dx, k, s, p, d, interpret: bool) -> None:
    """dx ``[N, C, H, W]`` from g and saved idx ``[N, C, OH, OW]`` (all contiguous)."""
    N, C, H, W = dx.shape
    OH, OW = g.shape[-2:]
    total = dx.numel()
    blk, warps = launch_config(interpret)
    launch_kernel(_max_pool_bwd_kernel, (cdiv(total, blk),),
        g, idx, dx, total, H, W, OH, OW, *k, *s, *p, *d, WIDE=_wide(dx, g), BLOCK=blk, num_warps=warps)


def avg_pool2d_backward(g, dx, k, s, p, count_include_pad, divisor, interpret: bool) -> None:
    """dx ``[N, C, H, W]`` from g ``[N, C, OH, OW]`` (contiguous)."""
    N, C, H, W = dx.shape
    OH, OW = g.shape[-2:]
    total = dx.numel()
    blk, warps = launch_config(interpret)
    launch_kernel(_avg_pool_bwd_kernel, (cdiv(total, blk),),
        g, dx, total, H, W, OH, OW, *k, *s, *p, int(count_include_pad), int(divisor),
        WIDE=_wide(dx, g), BLOCK=blk, num_warps=warps)


def aot_specs():
    """Every (kernel, dtype, mode, index width) the launchers can launch on a GPU."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for wide in (False, True):
            it = "i64" if wide else "i32"
            geo = {n: "i32" for n in ("KH", "KW", "SH", "SW", "PH", "PW")}
            common = {"BLOCK": GPU_BLOCK, "WIDE": wide}
            tag = f"{dt} {'int64' if wide else 'int32'}"
            for mode, code in MODES.items():
                sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "i_ptr": "*i64", "total": it, "C": "i32", "H": "i32", "W": "i32",
                       "OH": "i32", "OW": "i32", "stride_xn": it, "stride_xc": it, "stride_xh": it, "stride_xw": it,
                       **geo, "DH": "i32", "DW": "i32", "MINIMUM": "constexpr", "WIDE": "constexpr", "BLOCK": "constexpr"}
                specs.append(AotSpec(_max_pool_fwd_kernel, sig, {"MINIMUM": code, **common}, num_warps=GPU_WARPS, label=f"{mode} {tag}"))
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "total": it, "C": "i32", "H": "i32", "W": "i32",
                   "OH": "i32", "OW": "i32", "stride_xn": it, "stride_xc": it, "stride_xh": it, "stride_xw": it,
                   **geo, "COUNT_PAD": "i32", "DIVISOR": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
            specs.append(AotSpec(_avg_pool_fwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"avg {tag}"))
            sig = {"g_ptr": f"*{dt}", "i_ptr": "*i64", "dx_ptr": f"*{dt}", "total": it, "H": "i32", "W": "i32",
                   "OH": "i32", "OW": "i32", **geo, "DH": "i32", "DW": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
            specs.append(AotSpec(_max_pool_bwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"max/min {tag}"))
            sig = {"g_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "total": it, "H": "i32", "W": "i32", "OH": "i32", "OW": "i32",
                   **geo, "COUNT_PAD": "i32", "DIVISOR": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
            specs.append(AotSpec(_avg_pool_bwd_kernel, sig, common, num_warps=GPU_WARPS, label=f"avg {tag}"))
    return specs
